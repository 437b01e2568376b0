"""The official sampling path in plain eager PyTorch: the baseline `bench_vs_official.py` times.

Written for this project (no official code is vendored): the same modules, parameter names and op
sequence as the official `models/var.py::VAR.autoregressive_infer_cfg` with the tokenizer's
`VQModel.get_next_autoregressive_input` / `fhat_to_img` (github.com/lxa9867/ImageFolder), so that
it costs what the official sampler costs on the same machine:

  * eager PyTorch, one `nn.Module` per official module, no fused kernels (the official code falls
    back to these on a CPU: no flash-attn / xformers);
  * a KV cache grown by `torch.cat` at every scale, attention by `F.scaled_dot_product_attention`;
  * guidance by batch doubling, t = cfg * s / (S - 1); top-k by `topk`, top-p by a full ascending
    `sort` + softmax + cumsum + scatter, one `torch.multinomial` per branch;
  * bicubic upsampling / area downsampling with `F.interpolate`, phi as `Conv2d`, the DINOv2-layout
    ViT decoder with its position table resampled (bicubic, antialiased) on every call.

Weights load with `load_state_dict(strict=True)` from official-layout state dicts, so a checkpoint
that loads here has the official key names and shapes. tests/convert/test_torch_reference.py checks this
module against the official parity fixture (teacher-forced logits, guided logits per scale,
top-k/top-p masks, decoded images), which is what makes it a faithful stand-in.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class OfficialShape:
  """What the official constructors take (MSVR10P2-4096 + VAR-d`depth` by default)."""
  var_depth: int = 17
  vit_width: int = 768
  vit_depth: int = 12
  vit_heads: int = 12
  num_classes: int = 1000
  num_branches: int = 2
  codebook_size: int = 4096
  latent_dim: int = 32
  scales: tuple = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
  num_phi: int = 4
  phi_ratio: float = 0.5
  image_size: int = 256
  patch_size: int = 16
  vit_mlp_ratio: float = 4.0
  var_width_override: Optional[int] = None
  var_heads: Optional[int] = None
  var_mlp_ratio: float = 4.0
  attn_l2_norm: bool = True

  @property
  def var_width(self) -> int:
    return self.var_width_override or 64 * self.var_depth

  @property
  def var_num_heads(self) -> int:
    return self.var_heads or self.var_depth


# --------------------------------------------------------------------------------------------- VAR
class VarAttention(nn.Module):
  """Self-attention with l2-normalised q/k, learned per-head scale, q/v biases and a KV cache."""

  def __init__(self, width: int, num_heads: int, attn_l2_norm: bool = True):
    super().__init__()
    self.num_heads, self.head_dim = num_heads, width // num_heads
    self.attn_l2_norm = attn_l2_norm
    if attn_l2_norm:
      self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
      self.max_scale_mul = math.log(100)
    self.scale = 1.0 if attn_l2_norm else 0.25 / math.sqrt(self.head_dim)
    self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
    self.q_bias, self.v_bias = nn.Parameter(torch.zeros(width)), nn.Parameter(torch.zeros(width))
    self.register_buffer("zero_k_bias", torch.zeros(width))
    self.proj = nn.Linear(width, width)
    self.cached_k = self.cached_v = None
    self.caching = False

  def kv_caching(self, enable: bool) -> None:
    self.caching, self.cached_k, self.cached_v = enable, None, None

  def forward(self, x, attn_bias=None):
    b, l, c = x.shape
    bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
    qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, l, 3, self.num_heads, self.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, l, D) each
    if self.attn_l2_norm:
      scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
      q = F.normalize(q, dim=-1).mul(scale_mul)
      k = F.normalize(k, dim=-1)
    if self.caching:
      if self.cached_k is None:
        self.cached_k, self.cached_v = k, v
      else:
        k = self.cached_k = torch.cat((self.cached_k, k), dim=2)
        v = self.cached_v = torch.cat((self.cached_v, v), dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(b, l, c))


class VarFFN(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class VarBlock(nn.Module):
  """AdaLN block: LayerNorm without affine, modulated by SiLU -> Linear(C, 6C) of the condition."""

  def __init__(self, width: int, num_heads: int, eps: float = 1e-6, mlp_ratio: float = 4.0,
               attn_l2_norm: bool = True):
    super().__init__()
    self.width = width
    self.attn = VarAttention(width, num_heads, attn_l2_norm)
    self.ffn = VarFFN(width, round(width * mlp_ratio))
    self.ln_wo_grad = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
    self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

  def forward(self, x, cond, attn_bias=None):
    gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(-1, 1, 6, self.width).unbind(2)
    x = x + self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add(shift1), attn_bias).mul(gamma1)
    return x + self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add(shift2)).mul(gamma2)


class HeadNorm(nn.Module):
  def __init__(self, width: int, eps: float = 1e-6):
    super().__init__()
    self.width = width
    self.ln_wo_grad = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
    self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

  def forward(self, x, cond):
    scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)
    return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class Var(nn.Module):
  """The official VAR layout (`var_wo_ddp` keys) with its teacher-forced forward."""

  def __init__(self, shape: OfficialShape):
    super().__init__()
    s, w = shape, shape.var_width
    self.shape, self.width = s, w
    self.num_tokens = sum(n * n for n in s.scales)
    self.first_l = s.scales[0] ** 2
    self.word_embed = nn.Linear(s.num_branches * s.latent_dim, w)
    self.class_emb = nn.Embedding(s.num_classes + 1, w)
    self.pos_start = nn.Parameter(torch.randn(1, self.first_l, w) * 0.02)
    self.pos_1LC = nn.Parameter(torch.randn(1, self.num_tokens, w) * 0.02)
    self.lvl_embed = nn.Embedding(len(s.scales), w)
    self.blocks = nn.ModuleList([VarBlock(w, s.var_num_heads, mlp_ratio=s.var_mlp_ratio, attn_l2_norm=s.attn_l2_norm)
                                 for _ in range(s.var_depth)])
    self.head_nm = HeadNorm(w)
    self.head = nn.Linear(w, s.num_branches * s.codebook_size)
    levels = torch.cat([torch.full((n * n,), i) for i, n in enumerate(s.scales)]).view(1, self.num_tokens, 1)
    self.register_buffer("lvl_1L", levels[:, :, 0].contiguous())
    bias = torch.where(levels >= levels.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, self.num_tokens,
                                                                                   self.num_tokens)
    self.register_buffer("attn_bias_for_masking", bias.contiguous())

  def logits(self, x, cond):
    return self.head(self.head_nm(x.float(), cond).float()).float()

  @torch.no_grad()
  def forward(self, labels: torch.Tensor, next_scale_inputs: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: labels (B,), next_scale_inputs (B, L - first_l, P*Cq) -> logits (B, L, P*V)."""
    b = labels.shape[0]
    cond = self.class_emb(labels)
    sos = cond.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start.expand(b, self.first_l, -1)
    x = torch.cat((sos, self.word_embed(next_scale_inputs.float())), dim=1)
    x = x + self.lvl_embed(self.lvl_1L.expand(b, -1)) + self.pos_1LC
    for block in self.blocks:
      x = block(x, cond, self.attn_bias_for_masking)
    return self.logits(x, cond)


def sample_with_top_k_top_p_(logits: torch.Tensor, top_k: int, top_p: float, rng: Optional[torch.Generator],
                             return_p: bool = False) -> torch.Tensor:
  """(B, l, V) -> ids (B, l, 1), or the filtered probabilities; filters `logits` in place (official)."""
  b, l, vocab = logits.shape
  if top_k > 0:
    logits.masked_fill_(logits < logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True),
                        -torch.inf)
  if top_p > 0:
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    sorted_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
    sorted_remove[..., -1:] = False
    logits.masked_fill_(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
  probs = logits.softmax(dim=-1)
  if return_p:
    return probs
  return torch.multinomial(probs.view(-1, vocab), num_samples=1, replacement=True, generator=rng).view(b, l, 1)


# --------------------------------------------------------------------------------------- tokenizer
class Phi(nn.Conv2d):
  """phi(h) = (1 - r) h + r conv3x3(h)."""

  def __init__(self, dim: int, ratio: float):
    super().__init__(dim, dim, kernel_size=3, padding=1)
    self.ratio = ratio

  def forward(self, h):
    return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiList(nn.Module):
  def __init__(self, dim: int, ratio: float, count: int):
    super().__init__()
    self.qresi_ls = nn.ModuleList([Phi(dim, ratio) for _ in range(count)])
    # numpy's linspace and argmin, as the official PhiPartiallyShared: scales 2 and 7 sit exactly
    # between two ticks, and only this float64 rounding gives the official choice. Its ticks use
    # 1/(3K) margins only for K = 4 and 1/(2K) otherwise.
    self.ticks = (np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count) if count == 4
                  else np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count))

  def __getitem__(self, at: float) -> Phi:
    return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at)))]


class BranchQuantizer(nn.Module):
  """One branch's codebook and phi convs (`quantizes.{b}`) with the sampling-time f_hat update."""

  def __init__(self, shape: OfficialShape):
    super().__init__()
    self.scales = shape.scales
    self.embedding = nn.Embedding(shape.codebook_size, shape.latent_dim)
    self.quant_resi = PhiList(shape.latent_dim, shape.phi_ratio, shape.num_phi)
    self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(shape.scales), shape.codebook_size))

  def get_next_autoregressive_input(self, si: int, f_hat, h):
    num_scales, side = len(self.scales), self.scales[-1]
    if si != num_scales - 1:
      h = self.quant_resi[si / (num_scales - 1)](F.interpolate(h, size=(side, side), mode="bicubic"))
      f_hat.add_(h)
      return f_hat, F.interpolate(f_hat, size=(self.scales[si + 1],) * 2, mode="area")
    f_hat.add_(self.quant_resi[si / (num_scales - 1)](h))
    return f_hat, f_hat


class VitAttention(nn.Module):
  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
  def __init__(self, width: int):
    super().__init__()
    self.gamma = nn.Parameter(torch.full((width,), 1e-5))

  def forward(self, x):
    return x * self.gamma


class VitMlp(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class VitBlock(nn.Module):
  """timm `Block` (pre-norm, LayerScale)."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
    self.attn, self.ls1 = VitAttention(width, num_heads), LayerScale(width)
    self.mlp, self.ls2 = VitMlp(width, int(width * mlp_ratio)), LayerScale(width)

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
  """timm `PatchEmbed`: conv with stride = kernel = patch, flattened row-major to (B, N, C)."""

  def __init__(self, width: int, patch_size: int):
    super().__init__()
    self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class VitTrunk(nn.Module):
  """timm DINOv2 ViT: cls token, position table, blocks, final norm; `decoder.model` has no patch
  embedding (DINOv2Decoder deletes it), `encoder.model` and `semantic_model` have one."""

  def __init__(self, shape: OfficialShape, with_patch_embed: bool = False):
    super().__init__()
    w, g = shape.vit_width, shape.image_size // shape.patch_size
    self.grid = g
    self.cls_token = nn.Parameter(torch.randn(1, 1, w) * 1e-6)
    self.pos_embed = nn.Parameter(torch.randn(1, g * g + 1, w) * 0.02)
    if with_patch_embed:
      self.patch_embed = PatchEmbed(w, shape.patch_size)
    self.blocks = nn.Sequential(*[VitBlock(w, shape.vit_heads, shape.vit_mlp_ratio) for _ in range(shape.vit_depth)])
    self.norm = nn.LayerNorm(w, eps=1e-6)

  def pos_embed_tokens(self, x, side: int):
    """timm `_pos_embed` with a dynamic grid: x (B, side*side, C) -> (B, 1 + side*side, C)."""
    pos = self.pos_embed
    if side != self.grid:
      grid = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
      grid = F.interpolate(grid, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
      pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)], dim=1)
    return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos


class Decoder(nn.Module):
  """`decoder`: one shared mask token per image patch + the latent tokens -> pixels."""

  def __init__(self, shape: OfficialShape):
    super().__init__()
    w, g = shape.vit_width, shape.image_size // shape.patch_size
    self.grid, self.patch, self.latent_side = g, shape.patch_size, shape.scales[-1]
    self.model = VitTrunk(shape)
    self.mask_token = nn.Parameter(torch.randn(1, 1, w) * 1e-6)
    self.lvl_embed = nn.Embedding(2, w)
    self.register_buffer("lvl1LC", torch.cat([torch.zeros(g * g + 1), torch.ones(self.latent_side ** 2 + 1)]
                                             ).long().view(1, -1))
    self.to_pixel = nn.Module()
    self.to_pixel.model = nn.Linear(w, shape.patch_size ** 2 * 3)

  def forward(self, z):
    b = z.shape[0]
    x = self.model.pos_embed_tokens(self.mask_token.expand(b, self.grid ** 2, -1), self.grid)
    z = self.model.pos_embed_tokens(z, self.latent_side)
    x = torch.cat([x, z], dim=1) + self.lvl_embed(self.lvl1LC.expand(b, -1))
    x = self.model.norm(self.model.blocks(x))[:, 1:1 + self.grid ** 2]
    p, g = self.patch, self.grid
    pixels = self.to_pixel.model(x).reshape(b, g, g, p, p, 3)
    return torch.einsum("nhwpqc->nchpwq", pixels).reshape(b, 3, g * p, g * p)


class SamplingTokenizer(nn.Module):
  """The part of the official `VQModel` sampling touches: quantizers, post_quant_conv, decoder."""

  def __init__(self, shape: OfficialShape):
    super().__init__()
    self.shape = shape
    self.quantizes = nn.ModuleList([BranchQuantizer(shape) for _ in range(shape.num_branches)])
    self.post_quant_conv = nn.Conv2d(shape.num_branches * shape.latent_dim, shape.vit_width, 1)
    self.decoder = Decoder(shape)

  def get_next_autoregressive_input(self, si: int, f_hat, h):
    parts = [q.get_next_autoregressive_input(si, f, hh) for q, f, hh in
             zip(self.quantizes, f_hat.chunk(len(self.quantizes), 1), h.chunk(len(self.quantizes), 1))]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

  @torch.no_grad()
  def fhat_to_img(self, f_hat):
    """f_hat (B, P*Cq, n, n) -> images (B, 3, H, W) clamped to [-1, 1]."""
    return self.decoder(self.post_quant_conv(f_hat).flatten(2).permute(0, 2, 1)).clamp_(-1, 1)


class Encoder(nn.Module):
  """`encoder` (DINOv2Encoder, abs_pos_embed=True, P > 1): images -> the last P*n*n tokens after the norm."""

  def __init__(self, shape: OfficialShape):
    super().__init__()
    w, p, n = shape.vit_width, shape.patch_size, shape.scales[-1]
    self.num_branches, self.side = shape.num_branches, n
    self.model = VitTrunk(shape, with_patch_embed=True)
    self.latent_tokens = nn.Parameter(torch.randn(1, shape.num_branches * n * n, w) * 1e-6)
    self.lvl_embed = nn.Embedding(1 + shape.num_branches, w)
    # Official: patch_size**2 + 1 image slots (equals the patch count + cls only when grid == patch).
    self.register_buffer("lvl1LC", torch.cat([torch.zeros(p * p + 1)] + [torch.full((n * n,), i + 1.0) for i in
                                                                         range(shape.num_branches)]).long().view(1, -1))

  def forward(self, images):
    x = self.model.patch_embed(images)
    x = self.model.pos_embed_tokens(x, self.model.grid)
    b, n = x.shape[0], self.side
    z = self.latent_tokens.expand(b, -1, -1).reshape(b, self.num_branches * n, n, -1)
    z_list = [self.model.pos_embed_tokens(zb.reshape(b, n * n, -1), n)[:, 1:] for zb in z.chunk(self.num_branches, 1)]
    x = torch.cat([x] + z_list, dim=1)
    x = x + self.lvl_embed(self.lvl1LC.expand(b, -1))
    x = self.model.norm(self.model.blocks(x))
    return x[:, -self.num_branches * n * n:]


def f_to_idx_and_fhat(quantizer: BranchQuantizer, f, scales):
  """`VectorQuantizer2.f_to_idxBl_or_fhat` (eval): f (B, Cq, n, n) -> ([ids (B, n_s^2)], final f_hat)."""
  b, c, h, w = f.shape
  f_rest, f_hat = f.detach().clone(), torch.zeros_like(f)
  num_scales, ids = len(scales), []
  for si, side in enumerate(scales):
    z = (F.interpolate(f_rest, size=(side, side), mode="area") if si != num_scales - 1 or side != 16 else f_rest)
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, c), dim=-1)
    idx = torch.argmax(z @ F.normalize(quantizer.embedding.weight.data.T, dim=0), dim=1)
    h_bchw = quantizer.embedding(idx.view(b, side, side)).permute(0, 3, 1, 2)
    if si != num_scales - 1:
      h_bchw = F.interpolate(h_bchw, size=(h, w), mode="bicubic").contiguous()
    h_bchw = quantizer.quant_resi[0 if num_scales == 1 else si / (num_scales - 1)](h_bchw)
    f_hat.add_(h_bchw)
    f_rest.sub_(h_bchw)
    ids.append(idx.reshape(b, side * side))
  return ids, f_hat


def idx_to_var_input(quantizer: BranchQuantizer, ids, scales, latent_dim: int):
  """`VectorQuantizer2.idxBl_to_var_input`: ids [(B, n_s^2)] -> (B, L - n_0^2, Cq)."""
  b, n, num_scales = ids[0].shape[0], scales[-1], len(scales)
  f_hat = ids[0].new_zeros(b, latent_dim, n, n, dtype=torch.float32)
  out, pn_next = [], scales[0]
  for si in range(num_scales - 1):
    h = F.interpolate(quantizer.embedding(ids[si]).transpose_(1, 2).view(b, latent_dim, pn_next, pn_next),
                      size=(n, n), mode="bicubic")
    f_hat.add_(quantizer.quant_resi[si / (num_scales - 1)](h))
    pn_next = scales[si + 1]
    out.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(b, latent_dim, -1).transpose(1, 2))
  return torch.cat(out, dim=1)


class Tokenizer(SamplingTokenizer):
  """The whole official `VQModel` (enc/dec dinov2, P > 1): every key of its state dict, including the
  frozen `semantic_model` unless `with_teacher=False` (semantic_guide='none')."""

  def __init__(self, shape: OfficialShape, with_teacher: bool = True):
    super().__init__(shape)
    self.encoder = Encoder(shape)
    self.quant_conv = nn.Conv2d(shape.vit_width, shape.latent_dim, 1)
    if with_teacher:
      self.semantic_model = VitTrunk(shape, with_patch_embed=True)

  def latents(self, images):
    """`VQModel.img_to_reconstructed_img` up to the quantizers: images (B,3,H,W) -> [(B, Cq, n, n)] per branch."""
    h = self.encoder(images)
    b, l, c = h.shape
    f = self.quant_conv(h.view(b, l, 1, c).permute(0, 3, 1, 2))
    n = self.shape.scales[-1]
    return [fb.reshape(b, -1, n, n) for fb in f.chunk(self.shape.num_branches, dim=2)]

  @torch.no_grad()
  def encode(self, images):
    """images (B,3,H,W) in [-1, 1] -> (ids[branch][scale] (B, n_s^2), f_hat (B, P*Cq, n, n))."""
    out = [f_to_idx_and_fhat(q, f, self.shape.scales) for q, f in zip(self.quantizes, self.latents(images))]
    return [o[0] for o in out], torch.cat([o[1] for o in out], dim=1)

  @torch.no_grad()
  def reconstruct(self, images):
    """`img_to_reconstructed_img(last_one=True)`: clamped (B, 3, H, W)."""
    return self.fhat_to_img(self.encode(images)[1])

  @torch.no_grad()
  def var_input(self, ids):
    """`VQModel.idxBl_to_var_input`: ids[branch][scale] -> (B, L - n_0^2, P*Cq)."""
    return torch.cat([idx_to_var_input(q, i, self.shape.scales, self.shape.latent_dim)
                      for q, i in zip(self.quantizes, ids)], dim=-1)


# ---------------------------------------------------------------------------------------- sampler
@torch.no_grad()
def autoregressive_infer_cfg(var: Var, tokenizer: SamplingTokenizer, labels: torch.Tensor, *, seed: int = 0,
                             cfg: float = 3.25, top_k: int = 750, top_p: float = 0.95,
                             forced: Optional[Sequence[Sequence[torch.Tensor]]] = None,
                             record: Optional[list] = None, decode: bool = True) -> dict:
  """The official sampler. labels (B,) -> {'images': (B, 3, H, W) in [0, 1], 'f_hat', 'ids'}.

  forced: optional ids[branch][scale] (B, n_s^2) replacing every draw (the fixture's teacher-forcing
    stand-in); record: a list that receives each scale's guided logits (B, n_s^2, P*V).
  """
  s = var.shape
  rng = torch.Generator().manual_seed(seed)
  b = labels.shape[0]
  cond = var.class_emb(torch.cat((labels, torch.full_like(labels, s.num_classes))))
  lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
  first = var.first_l
  tokens = cond.unsqueeze(1).expand(2 * b, first, -1) + var.pos_start.expand(2 * b, first, -1) + lvl_pos[:, :first]
  f_hat = cond.new_zeros(b, s.num_branches * s.latent_dim, s.scales[-1], s.scales[-1])
  ids: list = [[] for _ in range(s.num_branches)]
  cur = 0
  for block in var.blocks:
    block.attn.kv_caching(True)
  for si, side in enumerate(s.scales):
    cur += side * side
    x = tokens
    for block in var.blocks:
      x = block(x, cond)
    logits = var.logits(x, cond)
    t = cfg * si / (len(s.scales) - 1)
    logits = (1 + t) * logits[:b] - t * logits[b:]
    if record is not None:
      record.append(logits.clone())
    if forced is not None:
      drawn = [forced[br][si] for br in range(s.num_branches)]
    else:
      drawn = [sample_with_top_k_top_p_(part, top_k, top_p, rng)[:, :, 0] for part in logits.chunk(s.num_branches, -1)]
    for br, idx in enumerate(drawn):
      ids[br].append(idx)
    h = [tokenizer.quantizes[br].embedding(idx).transpose_(1, 2).reshape(b, s.latent_dim, side, side)
         for br, idx in enumerate(drawn)]
    f_hat, tokens = tokenizer.get_next_autoregressive_input(si, f_hat, torch.cat(h, dim=1))
    if si != len(s.scales) - 1:
      nxt = s.scales[si + 1]
      tokens = var.word_embed(tokens.view(b, -1, nxt * nxt).transpose(1, 2)) + lvl_pos[:, cur:cur + nxt * nxt]
      tokens = tokens.repeat(2, 1, 1)
  for block in var.blocks:
    block.attn.kv_caching(False)
  out = {"f_hat": f_hat, "ids": ids}
  if decode:
    out["images"] = tokenizer.fhat_to_img(f_hat).add_(1).mul_(0.5)
  return out


# ---------------------------------------------------------------------------------------- weights
def build(shape: OfficialShape, seed: int = 0) -> tuple[Var, SamplingTokenizer]:
  """Randomly initialised modules (eval mode). Gains are drawn so that every path carries signal."""
  torch.manual_seed(seed)
  var, tok = Var(shape).eval(), SamplingTokenizer(shape).eval()
  with torch.no_grad():
    for name, p in list(var.named_parameters()) + list(tok.named_parameters()):
      if name.endswith("gamma"):
        p.uniform_(0.2, 0.8)
      elif name.endswith("scale_mul_1H11"):
        p.fill_(math.log(4.0))
      elif p.ndim >= 2:
        p.normal_(0.0, (1.0 / p.shape[-1]) ** 0.5 if "embedding" not in name else 1.0)
      else:
        p.normal_(0.0, 0.02)
    for block in var.blocks:
      block.ada_lin[1].weight.mul_(0.1)
  return var, tok


def var_state_dict(var: Var) -> dict:
  return {k: v.detach().clone() for k, v in var.state_dict().items()}


def tokenizer_state_dict(tok: SamplingTokenizer) -> dict:
  return {k: v.detach().clone() for k, v in tok.state_dict().items()}


def load(shape: OfficialShape, var_sd: dict, tokenizer_sd: dict) -> tuple[Var, SamplingTokenizer]:
  """Modules from official-layout state dicts (the tokenizer's encoder-side keys are ignored)."""
  var, tok = Var(shape).eval(), SamplingTokenizer(shape).eval()
  var.load_state_dict(var_sd, strict=True)
  wanted = {k: v for k, v in tokenizer_sd.items() if k.split(".")[0] in ("quantizes", "post_quant_conv", "decoder")}
  tok.load_state_dict(wanted, strict=True)
  return var, tok


def load_tokenizer(shape: OfficialShape, tokenizer_sd: dict) -> Tokenizer:
  """The whole official tokenizer, strict=True (with the teacher iff the state dict has semantic_model.*)."""
  tok = Tokenizer(shape, with_teacher=any(k.startswith("semantic_model.") for k in tokenizer_sd)).eval()
  tok.load_state_dict(tokenizer_sd, strict=True)
  return tok


def encoder_state_dict(shape: OfficialShape, seed: int = 1) -> dict:
  """Random encoder-side tensors of the official tokenizer layout. Sampling never runs the encoder;
  they complete a tokenizer state dict for converters that read whole checkpoints."""
  torch.manual_seed(seed)
  w, p = shape.vit_width, shape.patch_size
  n_latent = shape.num_branches * shape.scales[-1] ** 2
  trunk = VitTrunk(shape)
  sd = {f"encoder.model.{k}": v.detach().clone() for k, v in trunk.state_dict().items()}
  sd.update({
      "encoder.model.patch_embed.proj.weight": torch.randn(w, 3, p, p) * 0.02,
      "encoder.model.patch_embed.proj.bias": torch.zeros(w),
      "encoder.latent_tokens": torch.randn(1, n_latent, w) * 0.02,
      "encoder.lvl_embed.weight": torch.randn(shape.num_branches + 1, w) * 0.02,
      "quant_conv.weight": torch.randn(shape.latent_dim, w, 1, 1) * w ** -0.5,
      "quant_conv.bias": torch.zeros(shape.latent_dim),
  })
  return sd
