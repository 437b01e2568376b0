"""Reading PyTorch state dicts safely and mapping them onto Flax parameter trees."""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional

import numpy as np


class ConversionError(ValueError):
  """A checkpoint does not hold what the target architecture needs (names the tensor)."""


def load_torch_file(path: str) -> Any:
  """Loads a .pt/.pth (tensors only, `weights_only=True`: never unpickles code) or .safetensors file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("reading PyTorch checkpoints needs torch: pip install 'imagefolder-jax[test]' "
                      "or pip install torch") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def to_numpy(value: Any) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):
    return value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
  return np.asarray(value)


class StateDict:
  """A read-tracking view of a flat `name -> tensor` mapping with shape checks.

  Every accessor raises `ConversionError` naming the missing or mis-shaped tensor, so a wrong or
  truncated checkpoint never loads partially.
  """

  def __init__(self, tensors: dict, source: str = "checkpoint"):
    self._tensors = tensors
    self.source = source
    self.used: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def keys(self) -> Iterable[str]:
    return self._tensors.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    self._require(name)
    return tuple(to_numpy(self._tensors[name]).shape)

  def get(self, name: str, shape: Optional[tuple[int, ...]] = None) -> np.ndarray:
    self._require(name)
    array = to_numpy(self._tensors[name])
    if shape is not None and tuple(array.shape) != tuple(shape):
      raise ConversionError(f"{self.source}: tensor {name!r} has shape {tuple(array.shape)}, "
                            f"expected {tuple(shape)}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
      raise ConversionError(f"{self.source}: tensor {name!r} holds non-finite values")
    self.used.add(name)
    return array

  def _require(self, name: str) -> None:
    if name not in self._tensors:
      raise ConversionError(f"{self.source}: missing tensor {name!r}")

  def count(self, prefix: str) -> int:
    """Number of consecutive indices i such that some key starts with f'{prefix}{i}.'."""
    i = 0
    while any(k.startswith(f"{prefix}{i}.") for k in self._tensors):
      i += 1
    return i

  # Layer helpers: PyTorch (out, in) linear -> (in, out) kernel; conv (O, I, kh, kw) -> (kh, kw, I, O).
  def linear(self, name: str, d_in: int, d_out: int, bias: bool = True) -> dict:
    out = {"kernel": self.get(f"{name}.weight", (d_out, d_in)).T}
    if bias:
      out["bias"] = self.get(f"{name}.bias", (d_out,))
    return out

  def conv(self, name: str, c_in: int, c_out: int, k: int, bias: bool = True) -> dict:
    out = {"kernel": self.get(f"{name}.weight", (c_out, c_in, k, k)).transpose(2, 3, 1, 0)}
    if bias:
      out["bias"] = self.get(f"{name}.bias", (c_out,))
    return out

  def conv1x1_as_linear(self, name: str, c_in: int, c_out: int) -> dict:
    return {"kernel": self.get(f"{name}.weight", (c_out, c_in, 1, 1))[:, :, 0, 0].T,
            "bias": self.get(f"{name}.bias", (c_out,))}

  def layer_norm(self, name: str, width: int) -> dict:
    return {"scale": self.get(f"{name}.weight", (width,)), "bias": self.get(f"{name}.bias", (width,))}


def timm_vit_params(sd: StateDict, prefix: str, vit_config, *, with_patch_embed: bool = True) -> dict:
  """timm / DINOv2-layout ViT (`{prefix}blocks.{i}.attn.qkv.weight`, `ls1.gamma`, ...) -> `ViTTrunk` params."""
  c = vit_config
  w = c.width
  hidden = int(w * c.mlp_ratio)
  params = {
      "cls_token": sd.get(f"{prefix}cls_token", (1, 1, w)),
      "pos_embed": sd.get(f"{prefix}pos_embed", (1, c.grid * c.grid + 1, w)),
      "norm": sd.layer_norm(f"{prefix}norm", w),
  }
  if with_patch_embed:
    params["patch_embed"] = {"proj": sd.conv(f"{prefix}patch_embed.proj", 3, w, c.patch_size)}
  for i in range(c.depth):
    b = f"{prefix}blocks.{i}."
    block = {
        "norm1": sd.layer_norm(b + "norm1", w),
        "attn": {"qkv": sd.linear(b + "attn.qkv", w, 3 * w), "proj": sd.linear(b + "attn.proj", w, w)},
        "norm2": sd.layer_norm(b + "norm2", w),
        "mlp": {"fc1": sd.linear(b + "mlp.fc1", w, hidden), "fc2": sd.linear(b + "mlp.fc2", hidden, w)},
    }
    if c.layerscale:
      block["ls1"] = {"gamma": sd.get(b + "ls1.gamma", (w,))}
      block["ls2"] = {"gamma": sd.get(b + "ls2.gamma", (w,))}
    params[f"blocks_{i}"] = block
  if f"{prefix}blocks.{c.depth}.norm1.weight" in sd:
    raise ConversionError(f"{sd.source}: {prefix}blocks has more than the expected {c.depth} blocks")
  return params


def infer_timm_vit_shape(sd: StateDict, prefix: str, *, num_heads: Optional[int] = None,
                         patch_size: Optional[int] = None) -> dict:
  """Reads width, depth, mlp ratio, patch size and image size of a timm-layout ViT from its shapes.

  Heads cannot be read from shapes: `num_heads` defaults to width // 64 (the ViT-S/B/L convention).
  """
  _, n_pos, width = sd.shape(f"{prefix}pos_embed")
  depth = sd.count(f"{prefix}blocks.")
  if depth == 0:
    raise ConversionError(f"{sd.source}: no '{prefix}blocks.0.*' tensors")
  hidden = sd.shape(f"{prefix}blocks.0.mlp.fc1.weight")[0]
  if patch_size is None:
    patch_size = sd.shape(f"{prefix}patch_embed.proj.weight")[-1]
  grid = int(round((n_pos - 1) ** 0.5))
  if grid * grid != n_pos - 1:
    raise ConversionError(f"{sd.source}: {prefix}pos_embed has {n_pos} rows, not 1 + a square")
  return dict(width=width, depth=depth, num_heads=num_heads or max(width // 64, 1),
              mlp_ratio=hidden / width, patch_size=patch_size, image_size=grid * patch_size,
              layerscale=f"{prefix}blocks.0.ls1.gamma" in sd)
