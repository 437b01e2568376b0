"""DINO / DINOv2 ViT weights (local files) → `ViTTrunk` / `DinoV2` params.

Reads three key layouts, auto-detected:
* timm (`vit_*_dinov2.*`, DINO v1 `vit_small_patch16_224.dino`) and the official
  facebookresearch releases (hub `dinov2_vit*14`, `dino_deitsmall16_pretrain.pth`):
  `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.{norm1, attn.qkv, attn.proj,
  ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}.*`, `norm.*`; the facebookresearch files
  may add `mask_token` (ignored) and training checkpoints chunk blocks as
  `blocks.{chunk}.{i}.*` (flattened). The official ImageFolder tokenizer's
  `encoder.model.*`, `decoder.model.*` and `semantic_model.*` are this layout.
* HF transformers `Dinov2Model`, optionally under `dinov2.`: `embeddings.{cls_token,
  mask_token, position_embeddings, patch_embeddings.projection.*}`,
  `encoder.layer.{i}.{norm1, attention.attention.{query,key,value}, attention.output.dense,
  layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2, layer_scale2.lambda1}.*`, `layernorm.*`
  (transformers ≥5 names the attention `attention.{q,k,v,o}_proj`; both are read).
Register tokens and SwiGLU FFNs (ViT-g) are rejected (ConversionError, a ValueError).

Shapes are inferred from the tensors: width from the cls token, depth from the
block indices, FFN width from `fc1`, LayerScale from its presence, patch size from
the patch kernel, grid from the position table. **The head count is not in the
shapes**: by default `num_heads = width // 64` (every released DINO / DINOv2 ViT
has 64-wide heads); pass `num_heads` for anything else.

Resolution changes follow timm's checkpoint filter: the patch kernel is resampled
with the pseudo-inverse of the (antialiased) resize matrix (FlexiViT,
`resample_patch_embed`), so ⟨resize(x), W'⟩ = ⟨x, W⟩ for every patch x when
upsampling; the position table is resampled with antialiased bicubic, cls row kept.
"""
from __future__ import annotations

import math
import os
import pathlib
import re
from typing import Any, Mapping, Optional

import numpy as np

from imagefolder_jax.convert.common import ConversionError
from imagefolder_jax.models.dinov2 import resample_pos_embed
from imagefolder_jax.models.vit import ViTConfig
from imagefolder_jax.ops.resample import antialiased_bicubic_matrix, antialiased_bilinear_matrix

PathLike = str | os.PathLike

HEAD_DIM = 64  # DINO / DINOv2 convention used to infer num_heads
# Tensors that exist in released files but play no part in feature extraction.
_IGNORED = ("mask_token", "embeddings.mask_token", "head.weight", "head.bias")


# ----------------------------------------------------------------------------- resampling
def resize_matrix(n_in: int, n_out: int, interpolation: str = "bicubic") -> np.ndarray:
  """(n_out, n_in) 1-D matrix of `F.interpolate(mode=interpolation, antialias=True)`."""
  if interpolation == "bicubic":
    return np.asarray(antialiased_bicubic_matrix(n_in, n_out))
  if interpolation == "bilinear":
    return np.asarray(antialiased_bilinear_matrix(n_in, n_out))
  raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")


def resample_patch_kernel(kernel: np.ndarray, new_size: tuple[int, int],
                          interpolation: str = "bicubic") -> np.ndarray:
  """Resamples a patch-embedding kernel (O, I, h, w) to (O, I, h', w') (FlexiViT PI-resize).

  With R the (h'w', hw) resize of a row-major patch, the new kernel is
  pinv(Rᵀ)·w, so that ⟨R x, w'⟩ = xᵀ Rᵀ pinv(Rᵀ) w = ⟨x, w⟩ whenever Rᵀ has full
  row rank (upsampling). Computed in float64, returned as float32.
  """
  o, i, h, w = kernel.shape
  nh, nw = new_size
  if (nh, nw) == (h, w):
    return kernel.astype(np.float32)
  resize = np.kron(resize_matrix(h, nh, interpolation), resize_matrix(w, nw, interpolation))
  pinv = np.linalg.pinv(resize.T)  # (h'w', hw)
  flat = kernel.reshape(o * i, h * w).astype(np.float64) @ pinv.T
  return flat.reshape(o, i, nh, nw).astype(np.float32)


def resample_pos_table(pos_embed: np.ndarray, grid: int, num_prefix_tokens: int = 1) -> np.ndarray:
  """(1, P + g², C) → (1, P + grid², C), antialiased bicubic, prefix rows kept (NumPy in/out)."""
  return np.asarray(resample_pos_embed(pos_embed, (grid, grid), num_prefix_tokens))


# ----------------------------------------------------------------------------- reading
def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor (bf16 included), without importing torch here
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


class _Reader:
  """Looks tensors up under a prefix, checks shapes, and remembers what it used."""

  def __init__(self, state_dict: Mapping[str, Any], prefix: str):
    self.prefix = prefix
    self.tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not self.tensors:
      raise ConversionError(f"no tensors under prefix {prefix!r}")
    self.used: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def get(self, name: str, shape: Optional[tuple[int, ...]] = None) -> np.ndarray:
    if name not in self.tensors:
      raise ConversionError(f"state dict is missing tensor {self.prefix + name!r}")
    array = _to_numpy(self.tensors[name])
    if shape is not None and array.shape != tuple(shape):
      raise ConversionError(f"tensor {self.prefix + name!r} has shape {array.shape}, "
                       f"expected {tuple(shape)}")
    if not np.all(np.isfinite(array)):
      raise ConversionError(f"tensor {self.prefix + name!r} holds non-finite values")
    self.used.add(name)
    return array

  def check_all_used(self, ignored: set[str]) -> None:
    left = sorted(set(self.tensors) - self.used - ignored)
    if left:
      shown = ", ".join(repr(self.prefix + k) for k in left[:8])
      raise ConversionError(f"{len(left)} unexpected tensors in the ViT state dict: {shown}"
                       + (" …" if len(left) > 8 else ""))


def detect_layout(keys) -> str:
  """'timm' (timm / facebookresearch) or 'hf' (transformers Dinov2Model), from key names."""
  keys = list(keys)
  if any(k.startswith(("embeddings.", "encoder.layer.")) or k == "layernorm.weight" for k in keys):
    return "hf"
  if any(k.startswith("blocks.") for k in keys):
    return "timm"
  raise ConversionError(f"unrecognised ViT key layout (first keys: {keys[:5]})")


def _reject_unsupported(keys) -> None:
  for k in keys:
    if k in ("register_tokens", "reg_token", "embeddings.register_tokens"):
      raise ConversionError(f"tensor {k!r}: DINOv2 with register tokens is not supported "
                       "(use the register-free weights)")
    if re.search(r"mlp\.(w12|w3|weights_in|weights_out)\.", k):
      raise ConversionError(f"tensor {k!r}: SwiGLU FFNs (ViT-g) are not supported")


_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _flatten_block_chunks(state: dict[str, Any]) -> dict[str, Any]:
  """facebookresearch training checkpoints: blocks.{chunk}.{i}.* → blocks.{i}.* (i is global)."""
  if not any(_CHUNKED.match(k) for k in state):
    return state
  return {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in state.items()}


def _block_count(keys, pattern: str) -> int:
  indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  if not indices:
    raise ConversionError("state dict has no transformer blocks")
  if indices != set(range(len(indices))):
    missing = sorted(set(range(max(indices) + 1)) - indices)
    raise ConversionError(f"block indices are not contiguous; missing blocks {missing}")
  return len(indices)


def _canonical_timm(r: _Reader, width: int, depth: int, hidden: int, layerscale: bool,
                    with_patch_embed: bool, patch: Optional[int], rows: int) -> dict[str, np.ndarray]:
  c = width
  out = {"cls_token": r.get("cls_token", (1, 1, c)), "pos_embed": r.get("pos_embed", (1, rows, c)),
         "norm.weight": r.get("norm.weight", (c,)), "norm.bias": r.get("norm.bias", (c,))}
  if with_patch_embed:
    out["patch_embed.proj.weight"] = r.get("patch_embed.proj.weight", (c, 3, patch, patch))
    out["patch_embed.proj.bias"] = r.get("patch_embed.proj.bias", (c,))
  for i in range(depth):
    b = f"blocks.{i}."
    shapes = {"norm1.weight": (c,), "norm1.bias": (c,), "attn.qkv.weight": (3 * c, c),
              "attn.qkv.bias": (3 * c,), "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
              "norm2.weight": (c,), "norm2.bias": (c,), "mlp.fc1.weight": (hidden, c),
              "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (c, hidden), "mlp.fc2.bias": (c,)}
    if layerscale:
      shapes.update({"ls1.gamma": (c,), "ls2.gamma": (c,)})
    out.update({b + k: r.get(b + k, s) for k, s in shapes.items()})
  return out


def _canonical_hf(r: _Reader, width: int, depth: int, hidden: int, layerscale: bool,
                  with_patch_embed: bool, patch: Optional[int], rows: int) -> dict[str, np.ndarray]:
  c = width
  out = {"cls_token": r.get("embeddings.cls_token", (1, 1, c)),
         "pos_embed": r.get("embeddings.position_embeddings", (1, rows, c)),
         "norm.weight": r.get("layernorm.weight", (c,)), "norm.bias": r.get("layernorm.bias", (c,))}
  if with_patch_embed:
    p = "embeddings.patch_embeddings.projection."
    out["patch_embed.proj.weight"] = r.get(p + "weight", (c, 3, patch, patch))
    out["patch_embed.proj.bias"] = r.get(p + "bias", (c,))
  new_names = "encoder.layer.0.attention.q_proj.weight" in r
  for i in range(depth):
    h, b = f"encoder.layer.{i}.", f"blocks.{i}."
    if new_names:
      q, k, v, o = (h + f"attention.{n}_proj." for n in "qkvo")
    else:
      q, k, v = (h + f"attention.attention.{n}." for n in ("query", "key", "value"))
      o = h + "attention.output.dense."
    # timm's fused qkv rows are [q; k; v], each head-major, as HF's separate projections are.
    out[b + "attn.qkv.weight"] = np.concatenate([r.get(n + "weight", (c, c)) for n in (q, k, v)])
    out[b + "attn.qkv.bias"] = np.concatenate([r.get(n + "bias", (c,)) for n in (q, k, v)])
    out[b + "attn.proj.weight"] = r.get(o + "weight", (c, c))
    out[b + "attn.proj.bias"] = r.get(o + "bias", (c,))
    for name in ("norm1", "norm2"):
      out[b + f"{name}.weight"] = r.get(h + f"{name}.weight", (c,))
      out[b + f"{name}.bias"] = r.get(h + f"{name}.bias", (c,))
    out[b + "mlp.fc1.weight"] = r.get(h + "mlp.fc1.weight", (hidden, c))
    out[b + "mlp.fc1.bias"] = r.get(h + "mlp.fc1.bias", (hidden,))
    out[b + "mlp.fc2.weight"] = r.get(h + "mlp.fc2.weight", (c, hidden))
    out[b + "mlp.fc2.bias"] = r.get(h + "mlp.fc2.bias", (c,))
    if layerscale:
      out[b + "ls1.gamma"] = r.get(h + "layer_scale1.lambda1", (c,))
      out[b + "ls2.gamma"] = r.get(h + "layer_scale2.lambda1", (c,))
  return out


# Names the shape inference reads, per layout.
_LAYOUT_NAMES = {
    "timm": {"blocks": r"^blocks\.(\d+)\.", "cls": "cls_token", "pos": "pos_embed",
             "patch": "patch_embed.proj.weight", "fc1": "blocks.0.mlp.fc1.weight",
             "ls": "blocks.0.ls1.gamma"},
    "hf": {"blocks": r"^encoder\.layer\.(\d+)\.", "cls": "embeddings.cls_token",
           "pos": "embeddings.position_embeddings",
           "patch": "embeddings.patch_embeddings.projection.weight",
           "fc1": "encoder.layer.0.mlp.fc1.weight", "ls": "encoder.layer.0.layer_scale1.lambda1"},
}


def _linear(weight: np.ndarray, bias: np.ndarray) -> dict:
  return {"kernel": np.ascontiguousarray(weight.T), "bias": bias}


def _layer_norm(weight: np.ndarray, bias: np.ndarray) -> dict:
  return {"scale": weight, "bias": bias}


def vit_params_from_state_dict(state_dict: Mapping[str, Any], prefix: str = "", *,
                               with_patch_embed: bool = True,
                               num_heads: Optional[int] = None,
                               patch_size: Optional[int] = None,
                               image_size: Optional[int] = None,
                               interpolation: str = "bicubic",
                               norm_eps: float = 1e-6,
                               gelu_approximate: bool = False) -> tuple[ViTConfig, dict]:
  """A timm / facebookresearch / HF ViT state dict (torch tensors or arrays) → (config, params).

  Args:
    state_dict: tensors by name; only names under `prefix` are read.
    prefix: e.g. `'encoder.model.'` or `'semantic_model.'` for the official tokenizer
      checkpoint (a missing trailing dot is added).
    with_patch_embed: False for a trunk without a patch embedding (the tokenizer's decoder);
      then `patch_size` is required and any patch tensors present are ignored.
    num_heads: attention heads; default width // 64 (the DINO/DINOv2 convention).
    patch_size: target patch size; the kernel is PI-resampled when it differs from the file's.
    image_size: target input side in pixels; default keeps the file's patch grid.
      The position table is resampled (antialiased bicubic) when the grid changes.
    interpolation: 'bicubic' (timm's default) or 'bilinear' for the kernel resampling.
    norm_eps, gelu_approximate: copied into the config (not recoverable from tensors).
  Returns:
    (ViTConfig, params) where params is the `ViTTrunk` / `DinoV2` tree of float32 NumPy
    arrays: patch_embed/proj/{kernel (p,p,3,C), bias}, cls_token, pos_embed,
    blocks_{i}/{norm1, attn/{qkv,proj}, ls1/gamma, norm2, mlp/{fc1,fc2}, ls2/gamma}, norm.
  Raises:
    ConversionError (a ValueError) naming the tensor for missing, mis-shaped or
    unexpected tensors, register tokens or SwiGLU FFNs; ValueError for bad arguments.
  """
  if prefix and not prefix.endswith("."):
    prefix += "."
  reader = _Reader(state_dict, prefix)
  _reject_unsupported(reader.tensors)
  layout = detect_layout(reader.tensors)
  if layout == "timm":
    reader.tensors = _flatten_block_chunks(reader.tensors)
  names = _LAYOUT_NAMES[layout]
  block_pattern, cls_name, pos_name = names["blocks"], names["cls"], names["pos"]
  patch_name, fc1_name, ls_name = names["patch"], names["fc1"], names["ls"]
  canonical = _canonical_timm if layout == "timm" else _canonical_hf

  cls = reader.get(cls_name)
  if cls.ndim != 3 or cls.shape[:2] != (1, 1):
    raise ConversionError(f"tensor {prefix + cls_name!r} has shape {cls.shape}, expected (1, 1, C)")
  width = cls.shape[-1]
  depth = _block_count(reader.tensors, block_pattern)
  hidden = reader.get(fc1_name).shape[0]
  layerscale = ls_name in reader
  rows = reader.get(pos_name).shape[1]
  grid = math.isqrt(rows - 1)
  if grid * grid != rows - 1:
    raise ConversionError(f"tensor {prefix + pos_name!r} has {rows} rows: not 1 + a square grid")

  if with_patch_embed:
    source_patch = reader.get(patch_name).shape[-1]
  else:
    if patch_size is None:
      raise ValueError("patch_size is required when with_patch_embed=False")
    source_patch = patch_size
    reader.used.update(k for k in reader.tensors if k.startswith(patch_name.rsplit(".", 1)[0]))
  if num_heads is None:
    if width % HEAD_DIM:
      raise ValueError(f"width {width} is not a multiple of {HEAD_DIM}; pass num_heads")
    num_heads = width // HEAD_DIM

  t = canonical(reader, width, depth, hidden, layerscale, with_patch_embed, source_patch, rows)
  reader.check_all_used(set(_IGNORED))

  patch = source_patch if patch_size is None else patch_size
  image_size = grid * patch if image_size is None else image_size
  config = ViTConfig(width=width, depth=depth, num_heads=num_heads, mlp_ratio=hidden / width,
                     patch_size=patch, image_size=image_size, layerscale=layerscale,
                     norm_eps=norm_eps, gelu_approximate=gelu_approximate)
  config.validate()
  if int(width * config.mlp_ratio) != hidden:
    raise ConversionError(f"FFN width {hidden} is not representable as mlp_ratio * {width}")

  pos = t["pos_embed"]
  if config.grid != grid:
    pos = resample_pos_table(pos, config.grid)
  params: dict = {"cls_token": t["cls_token"], "pos_embed": pos.astype(np.float32),
                  "norm": _layer_norm(t["norm.weight"], t["norm.bias"])}
  if with_patch_embed:
    kernel = resample_patch_kernel(t["patch_embed.proj.weight"], (patch, patch), interpolation)
    params["patch_embed"] = {"proj": {"kernel": np.ascontiguousarray(kernel.transpose(2, 3, 1, 0)),
                                      "bias": t["patch_embed.proj.bias"]}}
  for i in range(depth):
    b = f"blocks.{i}."
    block = {
        "norm1": _layer_norm(t[b + "norm1.weight"], t[b + "norm1.bias"]),
        "attn": {"qkv": _linear(t[b + "attn.qkv.weight"], t[b + "attn.qkv.bias"]),
                 "proj": _linear(t[b + "attn.proj.weight"], t[b + "attn.proj.bias"])},
        "norm2": _layer_norm(t[b + "norm2.weight"], t[b + "norm2.bias"]),
        "mlp": {"fc1": _linear(t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"]),
                "fc2": _linear(t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"])},
    }
    if layerscale:
      block["ls1"] = {"gamma": t[b + "ls1.gamma"]}
      block["ls2"] = {"gamma": t[b + "ls2.gamma"]}
    params[f"blocks_{i}"] = block
  return config, params


def load_state_dict(path: PathLike) -> dict[str, Any]:
  """Reads a local `.safetensors` file (NumPy) or a PyTorch file with `weights_only=True`."""
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    return dict(load_file(str(path)))
  import torch  # only the .pth/.pt/.bin reader needs torch
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__})")
  return dict(state)


def dinov2_params_from_file(path: PathLike, *, prefix: Optional[str] = None,
                            patch_size: Optional[int] = None, image_size: Optional[int] = None,
                            num_heads: Optional[int] = None, interpolation: str = "bicubic",
                            norm_eps: float = 1e-6,
                            gelu_approximate: bool = False) -> tuple[ViTConfig, dict]:
  """A local DINO/DINOv2 checkpoint (timm, facebookresearch or HF layout) → (config, params).

  `prefix` defaults to `'dinov2.'` when keys carry it (HF task models such as
  `Dinov2ForImageClassification`, whose classifier is then skipped), else `''`.
  E.g. the tokenizer's teacher from the hub ViT-B/14 file:
  `dinov2_params_from_file('dinov2_vitb14_pretrain.pth', patch_size=16, image_size=256)`.
  Other arguments as in `vit_params_from_state_dict`.
  """
  state = load_state_dict(path)
  if prefix is None:
    prefix = "dinov2." if any(k.startswith("dinov2.embeddings.") for k in state) else ""
  return vit_params_from_state_dict(state, prefix, num_heads=num_heads, patch_size=patch_size,
                                    image_size=image_size, interpolation=interpolation,
                                    norm_eps=norm_eps, gelu_approximate=gelu_approximate)
