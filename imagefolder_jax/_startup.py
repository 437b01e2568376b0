"""Imports jax quietly when the compile-only accelerator plugins are installed (the `tpu` /
`gpu-compile` extras, for `plan --topology`) on a machine without those accelerators.

* The CUDA plugin (`jax-cuda12-plugin`) logs "Could not find cuda drivers on your machine" four
  times on every `import jax` and plugin discovery, before absl's logging starts, so no flag or
  environment variable silences it. Those two steps run here with file descriptor 2 captured; every
  other line is written back.
* libtpu (and the CUDA plugin), when JAX_PLATFORMS is unset, try to start their backends on any
  host and print initialisation errors and tracebacks. Where the host has no TPU chip (jax's own
  PCI check), JAX_PLATFORMS is set to the platforms the host has: `cuda,cpu` with an NVIDIA PCI
  device and the CUDA plugin, else `cpu`.

Without either plugin installed, or with JAX_PLATFORMS set, nothing is changed. Compile-only
devices for `plan` do not depend on these backends (`planning.topology`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from typing import Iterator, Sequence

# Lines of the CUDA plugin's import-time log on a machine without CUDA.
CUDA_PLUGIN_NOISE = ("Could not find cuda drivers on your machine",
                     "All log messages before absl::InitializeLog() is called are written to STDERR")


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
  """Captures file descriptor 2 (C++ logging included) in the block; the yielded list holds its
  lines afterwards."""
  sys.stderr.flush()
  saved = os.dup(2)
  lines: list[str] = []
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield lines
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines.extend(captured.read().decode(errors="replace").splitlines(keepends=True))


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[str]) -> Iterator[None]:
  """Captures file descriptor 2 in the block; afterwards writes back every line that contains none
  of `noise`."""
  with captured_stderr() as lines:
    yield
  kept = [line for line in lines if not any(n in line for n in noise)]
  if kept:
    sys.stderr.write("".join(kept))
    sys.stderr.flush()


def _pci_vendors() -> set[str]:
  """Vendor ids of the host's PCI devices ('0x10de' NVIDIA), read without importing jax."""
  vendors = set()
  root = "/sys/bus/pci/devices"
  for name in os.listdir(root) if os.path.isdir(root) else ():
    try:
      with open(os.path.join(root, name, "vendor")) as f:
        vendors.add(f.read().strip().lower())
    except OSError:
      continue
  return vendors


def _tpu_chips() -> int:
  """TPU chips on this host by jax's own PCI check (`jax/_src/hardware_utils.py`, loaded as a file:
  importing it as `jax._src...` would import jax first). Unknown -> 1 (leave jax alone)."""
  try:
    spec = importlib.util.find_spec("jax")
    path = os.path.join(os.path.dirname(spec.origin), "_src", "hardware_utils.py")
    module_spec = importlib.util.spec_from_file_location("_ifj_jax_hardware_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return int(module.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # pylint: disable=broad-except  # another jax layout: do not guess
    return 1


def _host_platforms(vendors: set[str]) -> str:
  cuda = _installed("jax_cuda12_plugin") and "0x10de" in vendors
  return "cuda,cpu" if cuda else "cpu"


def import_jax() -> None:
  if "jax" in sys.modules:
    return
  cuda_plugin, libtpu = _installed("jax_cuda12_plugin"), _installed("libtpu")
  if not (cuda_plugin or libtpu):
    return
  if os.environ.get("JAX_PLATFORMS") is None and _tpu_chips() == 0:
    # No TPU chip here: libtpu would only print its start-up errors (and the CUDA plugin its own
    # without a GPU).
    os.environ["JAX_PLATFORMS"] = _host_platforms(_pci_vendors())
  if not cuda_plugin:
    return
  with filtered_stderr(CUDA_PLUGIN_NOISE):
    import jax  # noqa: F401
    try:  # registers the plugin's backend factory (no backend starts), which logs once more
      from jax._src import xla_bridge
      xla_bridge._discover_and_register_pjrt_plugins()  # pylint: disable=protected-access
    except AttributeError:
      pass
