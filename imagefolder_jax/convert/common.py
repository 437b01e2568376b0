"""Reading PyTorch state dicts safely and mapping them onto Flax parameter trees."""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Optional

import numpy as np

from imagefolder_jax.errors import ImageFolderError


class ConversionError(ImageFolderError):
  """A checkpoint does not hold what the target architecture needs (names the tensor)."""


# File signatures that say what a file given as a checkpoint really is (first bytes).
_NOT_CHECKPOINT_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"BM", "a BMP image"),
    (b"\x1f\x8b", "a gzip archive"), (b"%PDF", "a PDF document"), (b"\x93NUMPY", "a NumPy .npy file"),
)
# A torch.save file is a zip archive (PyTorch >= 1.6) or a bare pickle (legacy: protocol byte 0x80).
_TORCH_SIGNATURES = (b"PK\x03\x04", b"\x80")


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = " ".join((str(e).strip().splitlines() or [""])[0].split())
  text = text if len(text) <= limit else text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _what_file_is(head: bytes) -> str:
  for signature, name in _NOT_CHECKPOINT_SIGNATURES:
    if head.startswith(signature):
      return name
  if not head:
    return "empty"
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    return "a WebP image"
  try:
    head.decode("utf-8")
    return "a text file"
  except UnicodeDecodeError:
    return "not a zip or pickle file"


def load_torch_file(path: str) -> Any:
  """Loads a .pt/.pth (tensors only, `weights_only=True`: never unpickles code) or .safetensors file.

  Raises `ConversionError` (one line, naming the file and what it looks like) for anything that is
  not such a checkpoint: an image, a text file, a truncated download, an empty file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  with open(path, "rb") as f:
    head = f.read(16)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ValueError...
      raise ConversionError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e
  if not head.startswith(_TORCH_SIGNATURES):
    raise ConversionError(f"{path}: not a PyTorch checkpoint ({_what_file_is(head)}; "
                          "expected a file written by torch.save or a .safetensors file)")
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("reading PyTorch checkpoints needs torch: pip install 'imagefolder-jax[test]' "
                      "or pip install torch") from e
  try:
    with warnings.catch_warnings():
      # torch warns (a second stderr line) before refusing a TorchScript archive; the error says it.
      warnings.simplefilter("ignore")
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # truncated zip, pickles of code (refused by weights_only), bad records...
    if "with TorchScript archives" in str(e):
      raise ConversionError(f"{path}: a TorchScript archive, not a state dict of tensors (torch.save of a "
                            "state_dict)") from e
    if "Weights only load failed" in str(e):
      raise ConversionError(f"{path}: holds pickled Python objects besides tensors, which are never "
                            "unpickled (torch.load weights_only=True)") from e
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from e


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

  def get(self, name: str, shape: Optional[tuple[int, ...]] = None, *,
          allow_non_finite: bool = False) -> np.ndarray:
    """The tensor `name` as NumPy (marked used); checks `shape` when given.

    allow_non_finite: accept inf/NaN entries (e.g. a -inf attention-mask buffer); weights never hold them.
    """
    self._require(name)
    array = to_numpy(self._tensors[name])
    if shape is not None and tuple(array.shape) != tuple(shape):
      raise ConversionError(f"{self.source}: tensor {name!r} has shape {tuple(array.shape)}, "
                            f"expected {tuple(shape)}")
    if not allow_non_finite and array.dtype.kind == "f" and not np.all(np.isfinite(array)):
      raise ConversionError(f"{self.source}: tensor {name!r} holds non-finite values")
    self.used.add(name)
    return array

  def under(self, prefix: str) -> dict:
    """The raw tensors whose names start with `prefix` (full names; marked used), for converters that
    check their own names and shapes (`convert.dinov2.vit_params_from_state_dict`)."""
    tensors = {k: v for k, v in self._tensors.items() if k.startswith(prefix)}
    self.used.update(tensors)
    return tensors

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

