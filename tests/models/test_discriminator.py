"""Discriminators, DiffAugment and the dino-disc converter against NumPy / PyTorch references."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import FIXTURES

from imagefolder_jax.convert.discriminator import (
  convert_dino_disc_heads,
  convert_dino_discriminator,
  convert_dino_vit_features,
)
from imagefolder_jax.models.discriminator import (
  DinoDiscConfig,
  DinoDiscriminator,
  LocalBatchNorm,
  PatchGANDiscriminator,
  SpectralConv1d,
  trainable_mask,
)
from imagefolder_jax.models.vit import ViTConfig
from imagefolder_jax.ops import diffaug

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

TINY_VIT = ViTConfig(width=32, depth=4, num_heads=2, patch_size=8, image_size=32, layerscale=False)
TINY = DinoDiscConfig(vit=TINY_VIT, tap_blocks=(0, 1, 2, 3))
BATCH, SIDE = 16, 40  # two virtual batches of 8; 40 px -> area resize to 32


def _images(seed: int = 0, batch: int = BATCH, side: int = SIDE) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted():
  model = DinoDiscriminator(TINY)
  init = jax.jit(functools.partial(model.init, train=False))
  apply_eval = jax.jit(functools.partial(model.apply, train=False))
  apply_train = jax.jit(functools.partial(model.apply, train=True, mutable=["spectral", "batch_stats"]))
  return model, init, apply_eval, apply_train


# ------------------------------------------------------------------------------------------------
# PyTorch reference of the official dino disc (written from its semantics, timm ViT names).


class _TorchBNLocal(tnn.Module):
  def __init__(self, c, virtual_bs=8, eps=1e-6):
    super().__init__()
    self.virtual_bs, self.eps = virtual_bs, eps
    self.weight = tnn.Parameter(1 + 0.1 * torch.randn(c))
    self.bias = tnn.Parameter(0.1 * torch.randn(c))

  def forward(self, x):  # (B, C, L)
    shape = x.shape
    g = int(np.ceil(x.shape[0] / self.virtual_bs))
    x = x.view(g, -1, x.shape[-2], x.shape[-1])
    mean = x.mean([1, 3], keepdim=True)
    var = x.var([1, 3], keepdim=True, unbiased=False)
    x = (x - mean) / torch.sqrt(var + self.eps)
    x = x * self.weight[None, :, None] + self.bias[None, :, None]
    return x.view(shape)


class _TorchResidual(tnn.Module):
  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x):
    return (self.fn(x) + x) / math.sqrt(2)


def _torch_block(c, k):
  conv = tnn.utils.spectral_norm(tnn.Conv1d(c, c, k, padding=k // 2, padding_mode="circular"))
  return tnn.Sequential(conv, _TorchBNLocal(c), tnn.LeakyReLU(0.2))


class _TorchBlock(tnn.Module):
  def __init__(self, w, heads):
    super().__init__()
    self.heads = heads
    self.norm1 = tnn.LayerNorm(w, eps=1e-6)
    self.attn = tnn.Module()
    self.attn.qkv = tnn.Linear(w, 3 * w)
    self.attn.proj = tnn.Linear(w, w)
    self.norm2 = tnn.LayerNorm(w, eps=1e-6)
    self.mlp = tnn.Module()
    self.mlp.fc1 = tnn.Linear(w, 4 * w)
    self.mlp.fc2 = tnn.Linear(4 * w, w)

  def forward(self, x):
    b, l, w = x.shape
    qkv = self.attn.qkv(self.norm1(x)).view(b, l, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // self.heads), -1) @ v
    x = x + self.attn.proj(a.transpose(1, 2).reshape(b, l, w))
    return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class _TorchDino(tnn.Module):
  """Tiny DINO ViT (timm names) with the official disc's forward (exact GELU, like our ViTTrunk)."""

  def __init__(self, c: ViTConfig, taps):
    super().__init__()
    w, grid = c.width, c.grid
    self.c, self.taps = c, taps
    self.patch_embed = tnn.Module()
    self.patch_embed.proj = tnn.Conv2d(3, w, c.patch_size, c.patch_size)
    self.cls_token = tnn.Parameter(0.02 * torch.randn(1, 1, w))
    self.pos_embed = tnn.Parameter(0.02 * torch.randn(1, grid * grid + 1, w))
    self.blocks = tnn.ModuleList([_TorchBlock(w, c.num_heads) for _ in range(c.depth)])
    self.norm = tnn.LayerNorm(w, eps=1e-6)

  def forward(self, x):  # x: (B, 3, H, W) in [-1, 1]
    m = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    s = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    x = ((x + 1) / 2 - m) / s
    x = F.interpolate(x, size=(self.c.image_size, self.c.image_size), mode="area")
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    acts = [(x[:, 1:] + x[:, :1]).transpose(1, 2)]
    for i, blk in enumerate(self.blocks):
      x = blk(x)
      if i in self.taps:
        acts.append((x[:, 1:] + x[:, :1]).transpose(1, 2))
    return acts


class _TorchDisc(tnn.Module):
  def __init__(self, config: DinoDiscConfig):
    super().__init__()
    c = config.vit.width
    self.heads = tnn.ModuleList([
        tnn.Sequential(_torch_block(c, 1), _TorchResidual(_torch_block(c, config.kernel_size)),
                       tnn.utils.spectral_norm(tnn.Conv1d(c, 1, 1)))
        for _ in range(config.num_taps)])

  def forward(self, acts):
    b = acts[0].shape[0]
    return torch.cat([h(a).view(b, -1) for h, a in zip(self.heads, acts)], 1)


def _torch_reference(seed: int = 0):
  torch.manual_seed(seed)
  dino = _TorchDino(TINY_VIT, TINY.tap_blocks)
  with torch.no_grad():  # a non-zero key bias: the converter zeroes it, softmax must not care
    for blk in dino.blocks:
      blk.attn.qkv.bias.normal_(0, 0.5)
  return dino, _TorchDisc(TINY)


def _sd(module) -> dict:
  return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_dino_disc_matches_torch_reference_eval_and_train():
  model, init, apply_eval, apply_train = _jitted()
  dino, disc = _torch_reference()
  x = _images(1)
  variables = convert_dino_discriminator(_sd(disc), _sd(dino), TINY)
  ours_template = nn.unbox(init(jax.random.key(0), x))
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(ours_template)
  for got, want in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(ours_template)):
    assert got.shape == want.shape

  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  with torch.no_grad():
    acts = dino(xt)
    disc.eval()  # spectral norm uses the stored u, v
    want_eval = disc(acts).numpy()
    disc.train()  # one power iteration, u and v updated in place
    want_train = disc(acts).numpy()
  got_eval = np.asarray(apply_eval(variables, x))
  assert got_eval.shape == (BATCH, TINY.num_taps * 16)
  np.testing.assert_allclose(got_eval, want_eval, rtol=1e-4, atol=1e-4)

  got_train, updated = apply_train(variables, x)
  np.testing.assert_allclose(np.asarray(got_train), want_train, rtol=1e-4, atol=1e-4)
  after = convert_dino_disc_heads(_sd(disc), TINY)["spectral"]
  for got, want in zip(jax.tree_util.tree_leaves(updated["spectral"]), jax.tree_util.tree_leaves(after)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_virtual_batches_are_independent_in_train_mode():
  model, init, _, apply_train = _jitted()
  x = _images(2)
  variables = init(jax.random.key(0), x)
  base, _ = apply_train(variables, x)
  x2 = x.copy()
  x2[3] = _images(3, batch=1)[0]  # a sample of the first virtual batch
  changed, _ = apply_train(variables, x2)
  base, changed = np.asarray(base), np.asarray(changed)
  np.testing.assert_array_equal(changed[8:], base[8:])
  assert np.abs(changed[:8] - base[:8]).max() > 1e-3


def test_gradients_reach_heads_and_images_but_not_features():
  model, init, _, _ = _jitted()
  x = _images(4)
  variables = init(jax.random.key(0), x)

  def loss(params, images):
    logits, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["spectral"])
    return jnp.mean(logits ** 2)

  g_params, g_images = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], jnp.asarray(x))
  g_params = nn.unbox(g_params)
  mask = trainable_mask(nn.unbox(variables["params"]))
  norms = jax.tree_util.tree_map(lambda g: float(jnp.abs(g).sum()), g_params)
  flat = jax.tree_util.tree_leaves_with_path(norms)
  flat_mask = jax.tree_util.tree_leaves(mask)
  assert len(flat) == len(flat_mask)
  for (path, norm), trainable in zip(flat, flat_mask):
    is_features = path[0].key == "features"
    assert trainable == (not is_features), path
    if is_features:
      assert norm == 0.0, path
  assert sum(n for (p, n), t in zip(flat, flat_mask) if t) > 0
  assert float(jnp.abs(g_images).sum()) > 0  # the generator's gradient path through the frozen ViT
  # Boxed trees give the same mask.
  boxed = trainable_mask(variables["params"])
  assert jax.tree_util.tree_leaves(boxed) == flat_mask


def test_random_crop_is_one_offset_per_batch():
  from imagefolder_jax.models.discriminator import fit_to_resolution
  x = jnp.asarray(_images(5, batch=2))
  crops = [np.asarray(fit_to_resolution(x, 32, jax.random.key(s), 1.0)) for s in range(3)]
  xs = np.asarray(x)
  for crop in crops:
    hits = [(i, j) for i in range(9) for j in range(9) if np.array_equal(crop, xs[:, i:i + 32, j:j + 32])]
    assert len(hits) == 1
  area = np.asarray(fit_to_resolution(x, 32, None, 1.0))
  want = F.interpolate(torch.from_numpy(xs).permute(0, 3, 1, 2), size=(32, 32), mode="area")
  np.testing.assert_allclose(area, want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)
  up = np.asarray(fit_to_resolution(x[:, :24, :24], 32, jax.random.key(0), 1.0))
  want = F.interpolate(torch.from_numpy(xs[:, :24, :24]).permute(0, 3, 1, 2), size=(32, 32), mode="bicubic")
  np.testing.assert_allclose(up, want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Building blocks.


def test_local_batch_norm_matches_numpy_and_tracks_running_stats():
  x = np.random.default_rng(6).normal(2.0, 3.0, (12, 5, 3)).astype(np.float32)  # 12 -> 2 groups of 6
  bn = LocalBatchNorm(virtual_batch=8, eps=1e-6, momentum=0.9)
  variables = bn.init(jax.random.key(0), x, train=False)
  y, updated = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  g = x.reshape(2, 6, 5, 3)
  mean = g.mean(axis=(1, 2), keepdims=True)
  var = g.var(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(np.asarray(y), ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape), atol=1e-5)
  np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.1 * mean.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(updated["batch_stats"]["var"], 0.9 + 0.1 * var.mean(axis=(0, 1, 2)), rtol=1e-5)
  with pytest.raises(ValueError, match="batch size 10"):
    LocalBatchNorm(virtual_batch=4).apply(variables, x[:10].reshape(10, 5, 3), train=True)


def test_spectral_norm_converges_to_unit_sigma():
  conv = SpectralConv1d(6, kernel_size=3)
  x = np.random.default_rng(7).normal(size=(2, 8, 4)).astype(np.float32)
  variables = conv.init(jax.random.key(1), x, train=False)
  w_mat = np.asarray(nn.unbox(variables["params"])["kernel"]).reshape(12, 6).T
  sigma_max = np.linalg.svd(w_mat, compute_uv=False)[0]

  @jax.jit
  def iterate(spectral):
    def body(_, s):
      return conv.apply({**variables, "spectral": s}, x, train=True, mutable=["spectral"])[1]["spectral"]
    return jax.lax.fori_loop(0, 200, body, spectral)

  spectral = iterate(variables["spectral"])
  u, v = np.asarray(spectral["u"]), np.asarray(spectral["v"])
  np.testing.assert_allclose(u @ w_mat @ v, sigma_max, rtol=1e-5)
  # The normalised kernel has spectral norm 1: y = conv(x, W / sigma).
  y = np.asarray(conv.apply({**variables, "spectral": spectral}, x, train=False))
  x_pad = np.pad(x, ((0, 0), (1, 1), (0, 0)), mode="wrap")
  windows = np.stack([x_pad[:, t:t + 8] for t in range(3)], axis=2).reshape(2, 8, 12)
  bias = np.asarray(nn.unbox(variables["params"])["bias"])
  np.testing.assert_allclose(y, windows @ (w_mat / sigma_max).T + bias, rtol=1e-4, atol=1e-5)
  assert abs(np.linalg.svd(w_mat / (u @ w_mat @ v), compute_uv=False)[0] - 1.0) < 1e-5


def test_patchgan_matches_torch_nlayer_discriminator():
  model = PatchGANDiscriminator(base_features=8, num_layers=3)
  x = _images(8, batch=4, side=32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  logits, updated = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, x)
  assert logits.shape == (4, 2, 2, 1)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2

  params = nn.unbox(variables["params"])
  layers = []
  c_in = 3
  for idx, (c_out, stride, bn) in zip((0, 2, 5, 8, 11), ((8, 2, False), (16, 2, True), (32, 2, True),
                                                          (64, 1, True), (1, 1, False))):
    conv = tnn.Conv2d(c_in, c_out, 4, stride, 1, bias=not bn)
    conv.weight.data = torch.from_numpy(np.asarray(params[f"main_{idx}"]["kernel"]).transpose(3, 2, 0, 1).copy())
    if not bn:
      conv.bias.data = torch.from_numpy(np.asarray(params[f"main_{idx}"]["bias"]).copy())
    layers.append(conv)
    if bn:
      norm = tnn.BatchNorm2d(c_out)
      norm.weight.data = torch.from_numpy(np.asarray(params[f"main_{idx + 1}"]["scale"]).copy())
      norm.bias.data = torch.from_numpy(np.asarray(params[f"main_{idx + 1}"]["bias"]).copy())
      layers.append(norm)
    if idx != 11:
      layers.append(tnn.LeakyReLU(0.2))
    c_in = c_out
  ref = tnn.Sequential(*layers).train()
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(updated["batch_stats"]["main_3"]["mean"], ref[3].running_mean.numpy(),
                             rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Converter errors.


def test_converter_names_missing_mismatched_and_unexpected_tensors():
  _, disc = _torch_reference()
  sd = _sd(disc)
  missing = dict(sd)
  del missing["heads.2.1.fn.0.weight_v"]
  with pytest.raises(ValueError, match=r"heads\.2\.1\.fn\.0\.weight_v"):
    convert_dino_disc_heads(missing, TINY)
  wrong = dict(sd)
  wrong["heads.1.0.1.weight"] = torch.zeros(5)
  with pytest.raises(ValueError, match=r"heads\.1\.0\.1\.weight"):
    convert_dino_disc_heads(wrong, TINY)
  extra = dict(sd)
  extra["heads.5.0.0.bias"] = torch.zeros(32)
  with pytest.raises(ValueError, match=r"heads\.5\.0\.0\.bias"):
    convert_dino_disc_heads(extra, TINY)
  # A VQLoss-style state dict with a `discriminator.` prefix converts the same.
  prefixed = {f"discriminator.{k}": v for k, v in sd.items()}
  prefixed["perceptual_loss.net.w"] = torch.zeros(1)
  a = convert_dino_disc_heads(prefixed, TINY)
  b = convert_dino_disc_heads(sd, TINY)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  dino, _ = _torch_reference()
  dsd = _sd(dino)
  del dsd["blocks.3.mlp.fc2.bias"]
  with pytest.raises(ValueError, match=r"blocks\.3\.mlp\.fc2\.bias"):
    convert_dino_vit_features(dsd, TINY)


def test_official_head_layout_matches_reference_tsv():
  """The official (ViT-S, 5 heads, k=9) names and shapes, as listed in
  fixtures/official_layout/dinodisc_state_dict.tsv."""
  import ast
  import os
  path = os.path.join(FIXTURES, "official_layout", "dinodisc_state_dict.tsv")
  sd = {}
  with open(path) as f:
    next(f)
    for line in f:
      name, _, shape, _, _ = line.rstrip("\n").split("\t")
      sd[name] = np.full(ast.literal_eval(shape), 0.5, np.float32)  # shapes like "(384, 384, 1)"
  variables = convert_dino_disc_heads(sd, DinoDiscConfig())
  assert variables["params"]["heads_4"]["residual"]["conv"]["kernel"].shape == (9, 384, 384)
  assert variables["spectral"]["heads_0"]["residual"]["conv"]["v"].shape == (3456,)
  assert variables["params"]["heads_0"]["cls"]["kernel"].shape == (1, 384, 1)


# ------------------------------------------------------------------------------------------------
# DiffAugment against NumPy transcriptions of the official index arithmetic.


def _np_translate(x, u_h, u_w, ratio):  # x: (B, H, W, C); official pads by 1 and gathers clamped indices
  b, h, w, _ = x.shape
  dh, dw = round(h * ratio), round(w * ratio)
  th = np.floor(u_h * (2 * dh + 1)).astype(int) - dh
  tw = np.floor(u_w * (2 * dw + 1)).astype(int) - dw
  pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  gh = np.clip(np.arange(h)[None, :] + th[:, None] + 1, 0, h + 1)
  gw = np.clip(np.arange(w)[None, :] + tw[:, None] + 1, 0, w + 1)
  return np.stack([pad[i][gh[i]][:, gw[i]] for i in range(b)])


def _np_color(x, u2, u3, u4):
  x = x + (u2[:, None, None, None] - 0.5)
  m = x.mean(axis=3, keepdims=True)
  x = (x - m) * (u3[:, None, None, None] * 2) + m
  m = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - m) * (u4[:, None, None, None] + 0.5) + m


def _np_cutout(x, u5, u6, ratio):
  b, h, w, _ = x.shape
  ch, cw = round(h * ratio), round(w * ratio)
  oh = np.floor(u5 * (h + (1 - ch % 2))).astype(int)
  ow = np.floor(u6 * (w + (1 - cw % 2))).astype(int)
  mask = np.ones((b, h, w), x.dtype)
  for i in range(b):
    rows = np.clip(np.arange(ch) + oh[i] - ch // 2, 0, h - 1)
    cols = np.clip(np.arange(cw) + ow[i] - cw // 2, 0, w - 1)
    mask[i][np.ix_(rows, cols)] = 0
  return x * mask[..., None]


def test_diffaug_ops_match_official_index_arithmetic():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(6, 20, 24, 3)).astype(np.float32)
  u = rng.uniform(size=(7, 6)).astype(np.float32)
  u[:, 0] = 0.0  # extreme draws: largest negative shift, cutout at the top-left corner
  u[:, 1] = 0.9999
  np.testing.assert_allclose(diffaug._translate(jnp.asarray(x), u[0], u[1], 0.125),
                             _np_translate(x, u[0], u[1], 0.125), atol=1e-6)
  np.testing.assert_allclose(diffaug._color(jnp.asarray(x), u[2], u[3], u[4]), _np_color(x, u[2], u[3], u[4]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(diffaug._cutout(jnp.asarray(x), u[5], u[6], 0.2), _np_cutout(x, u[5], u[6], 0.2),
                             atol=1e-6)


def test_diff_augment_determinism_shapes_and_policy():
  x = jnp.asarray(_images(10, batch=8, side=32))
  a = diffaug.diff_augment(jax.random.key(0), x)
  b = diffaug.diff_augment(jax.random.key(0), x)
  c = diffaug.diff_augment(jax.random.key(1), x)
  assert a.shape == x.shape and a.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.1
  jitted = jax.jit(diffaug.diff_augment, static_argnames=("policy", "translation_ratio", "cutout_ratio", "prob"))
  np.testing.assert_allclose(np.asarray(jitted(jax.random.key(0), x)), np.asarray(a), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(diffaug.diff_augment(jax.random.key(0), x, policy="")), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(diffaug.diff_augment(jax.random.key(0), x, prob=0.0)), np.asarray(x))
  with pytest.raises(ValueError, match="'blur'"):
    diffaug.diff_augment(jax.random.key(0), x, policy="color,blur")
  # Official order: with the same key, translation->color differs from color->translation only
  # through the zero padding, which colour shifts in the first case.
  t_c = diffaug.diff_augment(jax.random.key(3), x, policy="translation,color")
  c_t = diffaug.diff_augment(jax.random.key(3), x, policy="color,translation")
  assert np.abs(np.asarray(t_c) - np.asarray(c_t)).max() > 0


def test_translation_is_a_per_sample_integer_shift():
  x = np.random.default_rng(11).uniform(0.5, 1.0, (6, 32, 32, 3)).astype(np.float32)
  y = np.asarray(diffaug.diff_augment(jax.random.key(4), jnp.asarray(x), policy="translation"))
  d = 4
  for i in range(6):
    matches = []
    for th in range(-d, d + 1):
      for tw in range(-d, d + 1):
        shifted = np.zeros_like(x[i])
        src = x[i][max(th, 0):32 + min(th, 0), max(tw, 0):32 + min(tw, 0)]
        shifted[max(-th, 0):max(-th, 0) + src.shape[0], max(-tw, 0):max(-tw, 0) + src.shape[1]] = src
        if np.array_equal(shifted, y[i]):
          matches.append((th, tw))
    assert len(matches) == 1, (i, matches)


def test_cutout_zeroes_about_the_expected_fraction():
  x = jnp.ones((256, 40, 40, 3))
  y = np.asarray(diffaug.diff_augment(jax.random.key(5), x, policy="cutout"))
  zero_frac = (y[..., 0] == 0).mean(axis=(1, 2))
  assert zero_frac.max() <= 0.2 * 0.2 + 1e-9  # an 8x8 square at most
  assert (zero_frac > 0).all()
  # Clipping at the borders removes on average ~1/5 of the square's area here.
  assert 0.025 < zero_frac.mean() < 0.04
  # Zeroed pixels form one axis-aligned rectangle per sample.
  for img in y[:16, ..., 0]:
    rows, cols = np.nonzero(img == 0)
    assert (img[rows.min():rows.max() + 1, cols.min():cols.max() + 1] == 0).all()
