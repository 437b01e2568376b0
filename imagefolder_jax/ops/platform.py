"""The platform a program is compiled for ('cpu', 'gpu' or 'tpu'), for code paths that differ by it.

Some numerics have a faster form per platform (XLA:CPU wants cache-sized chunks and one image at a
time through large convolutions; GPUs have cuDNN's fused attention). The choice must follow the
devices the program is compiled for, not the host: `plan --topology` compiles TPU and GPU programs
on a CPU-only machine, where `jax.default_backend()` is 'cpu'. The target is, in order: the platform
set with `compiling_for` around the trace, the platform of the mesh set with `jax.set_mesh`, else
jax's default backend.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional

import jax
import numpy as np

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}
_TARGET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("imagefolder_jax_target", default=None)


def normalize(platform: str) -> str:
  """jax's platform names ('cuda', 'rocm', 'gpu', 'tpu', 'cpu') -> one of PLATFORMS."""
  try:
    return _ALIASES[platform.lower()]
  except KeyError:
    raise ValueError(f"unknown platform {platform!r}; expected one of {sorted(_ALIASES)}") from None


def platform_of(where: Any) -> str:
  """Platform of a `Mesh`, a device, a sequence of devices or a platform name; None -> the default
  backend's. Mixed platforms are refused."""
  if where is None:
    return normalize(jax.default_backend())
  if isinstance(where, str):
    return normalize(where)
  if hasattr(where, "devices") and not callable(where.devices):  # a Mesh
    devices = np.asarray(where.devices).flat
  elif hasattr(where, "platform"):
    devices = [where]
  else:
    devices = list(where)
  platforms = {normalize(d.platform) for d in devices}
  if len(platforms) != 1:
    raise ValueError(f"devices of several platforms (or none): {sorted(platforms)}")
  return platforms.pop()


@contextlib.contextmanager
def set_within(var: contextvars.ContextVar, value: Any) -> Iterator[Any]:
  """Within the block, `var` holds `value` (the trace-time switches of this package's kernels)."""
  token = var.set(value)
  try:
    yield value
  finally:
    var.reset(token)


def compiling_for(where: Any):
  """Within the block (a context manager yielding the platform), `target_platform()` is
  `platform_of(where)` (a mesh, devices or a name). Use it around the trace of a program whose
  devices are known (a jitted function's body)."""
  return set_within(_TARGET, platform_of(where))


def target_platform() -> str:
  """The platform of the program being traced (see the module docstring)."""
  explicit = _TARGET.get()
  if explicit is not None:
    return explicit
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  if device is not None and getattr(device, "platform", None):
    return normalize(device.platform)
  return normalize(jax.default_backend())


def target_device_kind() -> Optional[str]:
  """The device kind of the mesh set with `jax.set_mesh` (e.g. 'TPU v5', 'TPU v6 lite'), else of the
  default backend's first device; None inside `compiling_for` without such a mesh (only the
  platform is known there)."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  if device is not None and getattr(device, "device_kind", None):
    return device.device_kind
  if _TARGET.get() is not None:
    return None
  return jax.devices()[0].device_kind
