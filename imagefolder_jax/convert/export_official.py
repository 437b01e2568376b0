"""imagefolder-jax variables -> the authors' PyTorch layouts (the inverse of `convert.official*`).

Writes, for a bundle holding a tokenizer (and optionally a generator):

  tokenizer.pt            {"model": sd, "ema": sd, "steps": n}   (official tokenizer checkpoint; the
                          bundle holds one set of weights, the EMA ones, so both entries are it)
  tokenizer.safetensors   sd
  generator.pt            {"epoch", "iter", "trainer": {"config", "var_wo_ddp": var_sd,
                          "vae_local": sd}, "args"}             (official `ar-ckpt-*.pth`)
  generator.safetensors   var_sd
  config.json             architecture JSON in the parity `config.json` format (`convert-official
                          --config` reads it), plus the full imagefolder-jax configs under
                          "imagefolder_jax" so that a round trip restores fields shapes cannot tell

Every name, shape, dtype and layout follows `tests/fixtures/official_layout/{tokenizer,ar}_state_dict.tsv`:
NCHW convolutions, (out, in) linear weights, int64 level buffers, the 0/-inf block-causal mask.
Only what the official constructors can build is exported; anything else raises `ExportError`
naming the option (see `check_tokenizer` / `check_generator`).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from imagefolder_jax.errors import ImageFolderError
from imagefolder_jax.models.generator import GeneratorConfig
from imagefolder_jax.models.tokenizer import TokenizerConfig
from imagefolder_jax.models.vit import ViTConfig
from imagefolder_jax.ops.masks import block_causal_mask, scale_of_position

OFFICIAL_NORM_EPS = 1e-6          # timm DINOv2 LayerNorm
OFFICIAL_MAX_SCALE_MUL = math.log(100.0)
TOKENIZER_FILE, GENERATOR_FILE, CONFIG_FILE = "tokenizer.pt", "generator.pt", "config.json"
_TIMM_NAMES = {384: "vit_small_patch14_dinov2.lvd142m", 768: "vit_base_patch14_dinov2.lvd142m",
               1024: "vit_large_patch14_dinov2.lvd142m"}


class ExportError(ImageFolderError):
  """The model cannot be written in the official layout (names the option or the missing part)."""


# ----------------------------------------------------------------------------- what can be exported
def official_phi_index(num_scales: int, num_phi: int) -> tuple[int, ...]:
  """The official `PhiPartiallyShared` choice of phi per scale.

  Its ticks are linspace(1/3K, 1-1/3K, K) only for K == 4 and linspace(1/2K, 1-1/2K, K) otherwise
  (tokenizer/tokenizer_image/quant.py); float64 argmin over |ticks - s/(S-1)| as there.
  """
  k = num_phi
  ticks = (np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k))
  if num_scales == 1:
    return (0,)
  return tuple(int(np.argmin(np.abs(ticks - s / (num_scales - 1)))) for s in range(num_scales))


def check_vit(vit: ViTConfig, name: str) -> None:
  """Refuses ViT options the official DINOv2 encoder/decoder (timm `vit_*_dinov2`) cannot hold."""
  if not vit.layerscale:
    raise ExportError(f"{name}.layerscale=False: the official DINOv2 ViTs always have LayerScale "
                      "(blocks.i.ls1/ls2.gamma)")
  if abs(vit.norm_eps - OFFICIAL_NORM_EPS) > 1e-12:
    raise ExportError(f"{name}.norm_eps={vit.norm_eps}: the official DINOv2 ViTs use LayerNorm eps 1e-6")
  if vit.gelu_approximate:
    raise ExportError(f"{name}.gelu_approximate=True: the official DINOv2 ViTs use exact (erf) GELU")
  if vit.grid != vit.patch_size:
    # DINOv2Encoder/Decoder build `lvl1LC` with patch_size**2 + 1 image slots, not grid**2 + 1.
    raise ExportError(f"{name}.image_size={vit.image_size} with patch_size={vit.patch_size}: the official "
                      f"level buffer (lvl1LC) has patch_size^2+1 = {vit.patch_size ** 2 + 1} image slots, so "
                      f"image_size must be patch_size^2 = {vit.patch_size ** 2}")


def check_tokenizer(config: TokenizerConfig) -> None:
  """Raises ExportError naming the first option the official VQModel cannot express."""
  check_vit(config.vit, "model.vit")
  q = config.quantizer
  if config.num_branches < 2:
    raise ExportError(f"model.num_branches={config.num_branches}: the official single-branch VQModel uses a "
                      "different layout (quantize.*, sem_linear) and its VAR needs product_quant >= 2")
  if q.num_phi < 2:
    raise ExportError(f"model.quantizer.num_phi={q.num_phi}: the official share_quant_resi=1 layout "
                      "(quant_resi.qresi) is not the partially shared one (quant_resi.qresi_ls.k)")
  if q.phi_ratio <= 1e-6:
    raise ExportError(f"model.quantizer.phi_ratio={q.phi_ratio}: the official Phi uses |quant_resi| and "
                      "drops the conv (nn.Identity) for quant_resi ~ 0")
  if q.phi_index != official_phi_index(len(q.scales), q.num_phi):
    raise ExportError(f"model.quantizer.num_phi={q.num_phi}: phi per scale here {q.phi_index}, the official "
                      f"PhiPartiallyShared picks {official_phi_index(len(q.scales), q.num_phi)} for "
                      f"{len(q.scales)} scales")


def check_generator(config: GeneratorConfig, tokenizer: TokenizerConfig) -> None:
  """Raises ExportError naming the first option the official VAR cannot express."""
  q = tokenizer.quantizer
  if (config.num_branches, config.codebook_size, config.latent_dim) != (
      tokenizer.num_branches, q.codebook_size, q.latent_dim):
    raise ExportError(f"generator (P, V, Cq) = {(config.num_branches, config.codebook_size, config.latent_dim)} "
                      f"differs from the tokenizer's {(tokenizer.num_branches, q.codebook_size, q.latent_dim)}")
  if tuple(config.scales) != tuple(q.scales):
    raise ExportError(f"generator scales {config.scales} differ from the tokenizer's {q.scales}")
  if config.attn_l2_norm and abs(config.max_scale_mul - OFFICIAL_MAX_SCALE_MUL) > 1e-6:
    raise ExportError(f"model.max_scale_mul={config.max_scale_mul}: the official VAR clamps at log(100)")


# ----------------------------------------------------------------------------- variables -> tensors
class _Tree:
  """Read-tracking view of a nested params dict; `leftover()` lists leaves nothing exported."""

  def __init__(self, tree: dict, name: str):
    self.tree, self.name, self.used = tree, name, set()

  def get(self, *path: str) -> np.ndarray:
    node = self.tree
    for key in path:
      if not isinstance(node, dict) or key not in node:
        raise ExportError(f"{self.name}: missing variable {'/'.join(path)!r}")
      node = node[key]
    self.used.add(path)
    return np.asarray(node)

  def leftover(self) -> list[str]:
    out = []

    def walk(node, path):
      if isinstance(node, dict):
        for k, v in node.items():
          walk(v, path + (k,))
      elif path not in self.used:
        out.append("/".join(path))

    walk(self.tree, ())
    return sorted(out)


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32))


def _linear(t: _Tree, *path: str, bias: bool = True) -> dict:
  """Flax Dense {kernel (in, out), bias} -> PyTorch Linear {weight (out, in), bias}."""
  out = {"weight": _f32(t.get(*path, "kernel").T)}
  if bias:
    out["bias"] = _f32(t.get(*path, "bias"))
  return out


def _conv(t: _Tree, *path: str) -> dict:
  """Flax Conv kernel (kh, kw, I, O) -> PyTorch Conv2d weight (O, I, kh, kw)."""
  return {"weight": _f32(t.get(*path, "kernel").transpose(3, 2, 0, 1)), "bias": _f32(t.get(*path, "bias"))}


def _conv1x1(t: _Tree, *path: str) -> dict:
  """A Dense used as the official 1x1 Conv2d: kernel (in, out) -> weight (out, in, 1, 1)."""
  return {"weight": _f32(t.get(*path, "kernel").T[:, :, None, None]), "bias": _f32(t.get(*path, "bias"))}


def _put(sd: dict, prefix: str, tensors: dict) -> None:
  for k, v in tensors.items():
    sd[f"{prefix}.{k}"] = v


def vit_state_dict(params: dict, config: ViTConfig, prefix: str, *, with_patch_embed: bool = True,
                   name: str = "vit") -> dict[str, np.ndarray]:
  """`ViTTrunk` params -> timm names under `prefix` (e.g. 'encoder.model.'), in timm's order."""
  t = _Tree(params, name)
  sd: dict[str, np.ndarray] = {prefix + "cls_token": _f32(t.get("cls_token")),
                               prefix + "pos_embed": _f32(t.get("pos_embed"))}
  if with_patch_embed:
    _put(sd, prefix + "patch_embed.proj", _conv(t, "patch_embed", "proj"))
  for i in range(config.depth):
    b, p = f"blocks_{i}", f"{prefix}blocks.{i}."
    sd[p + "norm1.weight"], sd[p + "norm1.bias"] = _f32(t.get(b, "norm1", "scale")), _f32(t.get(b, "norm1", "bias"))
    _put(sd, p + "attn.qkv", _linear(t, b, "attn", "qkv"))
    _put(sd, p + "attn.proj", _linear(t, b, "attn", "proj"))
    sd[p + "ls1.gamma"] = _f32(t.get(b, "ls1", "gamma"))
    sd[p + "norm2.weight"], sd[p + "norm2.bias"] = _f32(t.get(b, "norm2", "scale")), _f32(t.get(b, "norm2", "bias"))
    _put(sd, p + "mlp.fc1", _linear(t, b, "mlp", "fc1"))
    _put(sd, p + "mlp.fc2", _linear(t, b, "mlp", "fc2"))
    sd[p + "ls2.gamma"] = _f32(t.get(b, "ls2", "gamma"))
  sd[prefix + "norm.weight"], sd[prefix + "norm.bias"] = _f32(t.get("norm", "scale")), _f32(t.get("norm", "bias"))
  left = t.leftover()
  if left:
    raise ExportError(f"{name}: variables with no place in the timm layout: {left[:6]}")
  return sd


def _lvl_buffer(first: int, groups: list[int]) -> np.ndarray:
  """(1, first + sum(groups)) int64: `first` zeros, then group i filled with i + 1 (official lvl1LC)."""
  parts = [np.zeros(first, np.int64)] + [np.full(n, i + 1, np.int64) for i, n in enumerate(groups)]
  return np.concatenate(parts)[None]


def check_teacher(teacher: ViTConfig, encoder: ViTConfig) -> None:
  """The official `semantic_model` is `create_model(encoder_model, ...)`: the encoder's exact shape."""
  for field in ("width", "depth", "num_heads", "mlp_ratio", "patch_size", "image_size", "layerscale",
                "norm_eps", "gelu_approximate"):
    if getattr(teacher, field) != getattr(encoder, field):
      raise ExportError(f"semantic teacher {field}={getattr(teacher, field)} differs from the encoder's "
                        f"{getattr(encoder, field)}: the official semantic_model is built like the encoder "
                        "(pass --teacher with a matching DINOv2, or --without-teacher)")


def tokenizer_state_dict(config: TokenizerConfig, variables: dict,
                         teacher: Optional[tuple[ViTConfig, dict]] = None) -> dict[str, np.ndarray]:
  """Tokenizer variables (+ optional frozen teacher) -> the official VQModel state dict (NumPy).

  EMA-codebook models export their codebook (the 'codebook' collection's `embedding`) as the official
  gradient-mode `quantizes.{b}.embedding.weight`; the EMA cluster sizes/sums have no official place.
  teacher: (ViTConfig, params) of the frozen DINOv2 -> `semantic_model.*`; None exports without it
  (loads with strict=True into a VQModel built with semantic_guide='none').
  """
  check_tokenizer(config)
  c, q = config, config.quantizer
  w, n2, p = c.vit.width, q.grid ** 2, c.vit.patch_size
  params = _Tree(variables.get("params", {}), "tokenizer params")
  stats = variables.get("quantizer_stats", {})
  codebooks = variables.get("codebook", {})
  sd: dict[str, np.ndarray] = {}
  sd["encoder.latent_tokens"] = _f32(params.get("encoder", "latent_tokens"))
  sd["encoder.lvl1LC"] = _lvl_buffer(p * p + 1, [n2] * c.num_branches)
  sd.update(vit_state_dict(_subtree(params, "encoder", "model"), c.vit, "encoder.model.", name="encoder.model"))
  sd["encoder.lvl_embed.weight"] = _f32(params.get("encoder", "lvl_embed", "embedding"))
  _put(sd, "quant_conv", _conv1x1(params, "quant_conv"))
  sd["decoder.mask_token"] = _f32(params.get("decoder", "mask_token"))
  sd["decoder.lvl1LC"] = _lvl_buffer(p * p + 1, [n2 + 1])
  sd.update(vit_state_dict(_subtree(params, "decoder", "model"), c.vit, "decoder.model.", with_patch_embed=False,
                           name="decoder.model"))
  sd["decoder.lvl_embed.weight"] = _f32(params.get("decoder", "lvl_embed", "embedding"))
  _put(sd, "decoder.to_pixel.model", _linear(params, "decoder", "to_pixel"))
  _put(sd, "post_quant_conv", _conv1x1(params, "post_quant_conv"))
  for b in range(c.num_branches):
    branch, prefix = f"quantizer_{b}", f"quantizes.{b}."
    usage = stats.get(branch, {}).get("usage")
    sd[prefix + "ema_vocab_hit_SV"] = (_f32(usage) if usage is not None
                                       else np.zeros((len(q.scales), q.codebook_size), np.float32))
    for k in range(q.num_phi):
      if k not in q.phi_index:
        # Flax never creates a phi no scale uses; the official ModuleList holds all K.
        raise ExportError(f"model.quantizer.num_phi={q.num_phi}: scales {q.scales} use only phi convs "
                          f"{sorted(set(q.phi_index))}, phi_{k} has no weights for quant_resi.qresi_ls.{k}")
      _put(sd, f"{prefix}quant_resi.qresi_ls.{k}", _conv(params, branch, f"phi_{k}", "conv"))
    if q.codebook_update == "gradient":
      embedding = params.get(branch, "embedding")
    else:
      if "embedding" not in codebooks.get(branch, {}):
        raise ExportError(f"tokenizer variables: EMA codebook mode but no 'codebook/{branch}/embedding'")
      embedding = codebooks[branch]["embedding"]
    sd[prefix + "embedding.weight"] = _f32(embedding)
  left = params.leftover()
  if left:
    raise ExportError(f"tokenizer params with no place in the official layout: {left[:6]}")
  if teacher is not None:
    check_teacher(teacher[0], c.vit)
    sd.update(vit_state_dict(teacher[1], teacher[0], "semantic_model.", name="semantic_teacher"))
  _check_shapes(sd, {"encoder.latent_tokens": (1, c.num_branches * n2, w), "quant_conv.weight": (q.latent_dim, w, 1, 1),
                     "post_quant_conv.weight": (w, c.num_branches * q.latent_dim, 1, 1),
                     "decoder.to_pixel.model.weight": (p * p * 3, w)})
  return sd


def _subtree(tree: _Tree, *path: str) -> dict:
  """The dict under `path`, marked used as a whole (its own exporter checks every leaf)."""
  node = tree.tree
  for key in path:
    if not isinstance(node, dict) or key not in node:
      raise ExportError(f"{tree.name}: missing variables {'/'.join(path)!r}")
    node = node[key]

  def mark(n, pre):
    if isinstance(n, dict):
      for k, v in n.items():
        mark(v, pre + (k,))
    else:
      tree.used.add(pre)

  mark(node, tuple(path))
  return node


def _check_shapes(sd: dict, expected: dict) -> None:
  for name, shape in expected.items():
    if tuple(sd[name].shape) != tuple(shape):
      raise ExportError(f"tensor {name!r} would have shape {tuple(sd[name].shape)}, the official layout needs {shape}")


def generator_state_dict(config: GeneratorConfig, variables: dict) -> dict[str, np.ndarray]:
  """Generator params -> the official VAR state dict (`var_wo_ddp`), buffers included, tsv order."""
  c = config
  t = _Tree(variables.get("params", {}), "generator params")
  L = c.num_tokens
  sd: dict[str, np.ndarray] = {
      "pos_start": _f32(t.get("pos_start")),
      "pos_1LC": _f32(t.get("pos_1LC")),
      "lvl_1L": np.asarray(scale_of_position(c.scales), np.int64)[None],
      # Without xformers the official mask is exactly (1, 1, L, L); it pads to a multiple of 8 only
      # when xformers is importable (a build-time difference the released tsv does not have).
      "attn_bias_for_masking": np.where(np.asarray(block_causal_mask(c.scales)), 0.0, -np.inf
                                        ).astype(np.float32).reshape(1, 1, L, L),
  }
  _put(sd, "word_embed", _linear(t, "word_embed"))
  sd["class_emb.weight"] = _f32(t.get("class_emb", "embedding"))
  sd["lvl_embed.weight"] = _f32(t.get("lvl_embed", "embedding"))
  for i in range(c.depth):
    b, p = f"blocks_{i}", f"blocks.{i}."
    if c.attn_l2_norm:
      sd[p + "attn.scale_mul_1H11"] = _f32(t.get(b, "attn", "scale_mul").reshape(1, c.num_heads, 1, 1))
    sd[p + "attn.q_bias"] = _f32(t.get(b, "attn", "q_bias"))
    sd[p + "attn.v_bias"] = _f32(t.get(b, "attn", "v_bias"))
    sd[p + "attn.zero_k_bias"] = np.zeros((c.width,), np.float32)
    sd[p + "attn.mat_qkv.weight"] = _f32(t.get(b, "attn", "mat_qkv", "kernel").T)
    _put(sd, p + "attn.proj", _linear(t, b, "attn", "proj"))
    _put(sd, p + "ffn.fc1", _linear(t, b, "ffn", "fc1"))
    _put(sd, p + "ffn.fc2", _linear(t, b, "ffn", "fc2"))
    _put(sd, p + "ada_lin.1", _linear(t, b, "ada_lin"))
  _put(sd, "head_nm.ada_lin.1", _linear(t, "head_nm", "ada_lin"))
  _put(sd, "head", _linear(t, "head"))
  left = t.leftover()
  if left:
    raise ExportError(f"generator params with no place in the official VAR layout: {left[:6]}")
  _check_shapes(sd, {"class_emb.weight": (c.num_classes + 1, c.width), "pos_1LC": (1, L, c.width),
                     "word_embed.weight": (c.width, c.input_dim),
                     "head.weight": (c.num_branches * c.codebook_size, c.width)})
  return sd


# ----------------------------------------------------------------------------- architecture JSON
def architecture_json(tokenizer: TokenizerConfig, generator: Optional[GeneratorConfig] = None, *,
                      with_teacher: bool = True, exported_from: str = "") -> dict:
  """What shapes cannot tell, in the parity `config.json` format that `convert-official --config` reads.

  The official-named keys describe the model for the official constructors (VQ_models['VQ-16'](...),
  VAR(...)); "imagefolder_jax" records our full configs so that `convert-official` restores the
  fields the official code has no place for (initialisers, EMA settings, dtype).
  """
  t, q, v = tokenizer, tokenizer.quantizer, tokenizer.vit
  if t.patch_skip:
    raise ValueError("patch_skip (a demo-only shortcut) has no counterpart in the official tokenizer")
  timm_name = _TIMM_NAMES.get(v.width, "vit_base_patch14_dinov2.lvd142m")
  arch: dict[str, Any] = {
      "format": "imagefolder-jax export-official 1",
      "exported_from": exported_from,
      "tokenizer": {
          "vq_model": "VQ-16", "enc_type": "dinov2", "dec_type": "dinov2", "to_pixel": "linear",
          "encoder_model": timm_name, "decoder_model": timm_name,
          "timm_kwargs_override": {"img_size": v.image_size, "patch_size": v.patch_size, "embed_dim": v.width,
                                   "depth": v.depth, "num_heads": v.num_heads, "mlp_ratio": v.mlp_ratio},
          "vit": {"img_size": v.image_size, "patch_size": v.patch_size, "embed_dim": v.width, "depth": v.depth,
                  "num_heads": v.num_heads, "head_dim": v.width // v.num_heads, "mlp_ratio": v.mlp_ratio,
                  "layerscale": True, "qkv_bias": True, "norm": "LayerNorm eps=1e-6",
                  "mlp_act": "GELU (exact, erf)"},
          "num_latent_tokens": q.grid ** 2, "product_quant": t.num_branches,
          "codebook_size": q.codebook_size, "codebook_embed_dim": q.latent_dim, "codebook_l2_norm": True,
          "v_patch_nums": list(q.scales), "share_quant_resi": q.num_phi, "quant_resi": q.phi_ratio,
          "phi_index_per_scale": list(q.phi_index), "commit_loss_beta": q.beta, "entropy_loss_ratio": 0.0,
          "codebook_drop": t.dropout_fraction, "start_drop": t.dropout_start, "abs_pos_embed": True,
          "semantic_guide": "dinov2" if with_teacher else "none", "detail_guide": "none", "half_sem": True,
          "codebook_update_here": q.codebook_update,
      },
      "imagefolder_jax": {"tokenizer": tokenizer.to_dict()},
  }
  if generator is not None:
    g = generator
    arch["generator"] = {
        "class": "models/var.py::VAR", "depth": g.depth, "embed_dim": g.width, "num_heads": g.num_heads,
        "mlp_ratio": g.mlp_ratio, "norm_eps": g.norm_eps, "shared_aln": False, "attn_l2_norm": g.attn_l2_norm,
        "max_scale_mul": g.max_scale_mul, "cond_drop_rate": g.label_dropout, "num_classes": g.num_classes,
        "uncond_label": g.num_classes, "patch_nums": list(g.scales), "drop_path_rate": g.drop_path_rate,
        "p_drop": 0.0, "V": g.num_branches * g.codebook_size, "Cvae": g.input_dim,
    }
    arch["imagefolder_jax"]["generator"] = generator.to_dict()
  return arch


def ar_checkpoint_args(tokenizer: TokenizerConfig, generator: GeneratorConfig, with_teacher: bool) -> dict:
  """The `args` entry of an official AR checkpoint (the fields `train.py` / `inference.py` read)."""
  q, v = tokenizer.quantizer, tokenizer.vit
  timm_name = _TIMM_NAMES.get(v.width, "vit_base_patch14_dinov2.lvd142m")
  return {"depth": generator.depth, "pn": "_".join(str(s) for s in q.scales), "patch_nums": tuple(q.scales),
          "saln": False, "anorm": generator.attn_l2_norm, "p_drop": 0.0, "codebook_size": q.codebook_size,
          "codebook_embed_dim": q.latent_dim, "product_quant": tokenizer.num_branches,
          "num_latent_tokens": q.grid ** 2, "v_patch_nums": list(q.scales), "encoder_model": timm_name,
          "decoder_model": timm_name, "semantic_guide": "dinov2" if with_teacher else "none"}
