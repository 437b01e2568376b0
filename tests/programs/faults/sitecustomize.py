"""Fault injection for tests: a directory on PYTHONPATH, so every Python process a test starts
(directly or through launch/local.sh) imports this at start-up.

IFJ_FAULTS (comma-separated; nothing happens without it):
  fail_at_step=N     exit abruptly (status 137, as if killed) right after training step N (and its
                     checkpoint save, once that has finished)
  fail_process=P     ... on process P only; the others go on and find the peer lost
  block_save=N:PATH  the asynchronous checkpoint save of step N never commits; PATH is created when
                     the writer starts waiting, so the test can SIGKILL the process mid-save

Nothing is imported here at start-up beyond the standard library: the training modules are patched
right after the program itself imports them (importing jax or absl this early would, among other
things, configure logging before the CLI does).
"""
import functools
import importlib.abc
import importlib.util
import os
import sys


def _faults() -> dict:
  out = {}
  for item in filter(None, os.environ.get("IFJ_FAULTS", "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip()
  return out


def _patch_loop(loop, fail_at: int, process: int) -> None:
  def crash(step: int, manager) -> None:
    import jax

    from imagefolder_jax import parallel
    if step != fail_at or process not in (-1, jax.process_index()):
      return
    if jax.process_count() == 1 or process == -1:
      manager.wait_until_finished()  # (a lone failing process must not wait for the others)
      parallel.sync("fail_at_step")
    os._exit(137)

  loop.run = functools.partial(loop.run, after_step=crash)


def _patch_checkpointing(checkpointing, block_step: int, marker: str) -> None:
  import time

  import orbax.checkpoint as ocp

  class BlockingFuture:
    """A commit future that never completes (creates `marker` when the writer waits on it)."""

    def result(self, timeout=None):
      with open(marker, "w") as f:
        f.write(str(os.getpid()))
      while True:
        time.sleep(3600)

    def cancel(self):
      return None

  class BlockingJsonHandler(ocp.JsonCheckpointHandler):
    async def async_save(self, directory, item=None, args=None):
      futures = list(await super().async_save(directory, item=item, args=args) or [])
      # The step directory is `<step>.orbax-checkpoint-tmp-*/meta` while the save is in flight.
      if os.path.basename(os.path.dirname(os.fspath(directory))).split(".")[0] == str(block_step):
        futures.append(BlockingFuture())
      return futures

  make_manager = checkpointing.make_manager

  def blocking_manager(workdir, keep, async_save=True, meta_handler=None):
    handler = BlockingJsonHandler() if async_save else meta_handler
    return make_manager(workdir, keep, async_save, meta_handler=handler)

  checkpointing.make_manager = blocking_manager


class _PatchAfterImport(importlib.abc.MetaPathFinder):
  """Runs `patches[name](module)` right after module `name` is first imported."""

  def __init__(self, patches: dict):
    self.patches = patches

  def find_spec(self, name, path, target=None):
    if name not in self.patches:
      return None
    sys.meta_path.remove(self)
    try:
      spec = importlib.util.find_spec(name)
    finally:
      sys.meta_path.insert(0, self)
    patch, exec_module = self.patches.pop(name), spec.loader.exec_module

    def exec_and_patch(module):
      exec_module(module)
      patch(module)

    spec.loader.exec_module = exec_and_patch
    return spec


def _install(faults: dict) -> None:
  patches = {}
  if "fail_at_step" in faults:
    patches["imagefolder_jax.train.loop"] = functools.partial(
        _patch_loop, fail_at=int(faults["fail_at_step"]), process=int(faults.get("fail_process", -1)))
  if "block_save" in faults:
    step, _, marker = faults["block_save"].partition(":")
    patches["imagefolder_jax.train.checkpointing"] = functools.partial(
        _patch_checkpointing, block_step=int(step), marker=marker)
  sys.meta_path.insert(0, _PatchAfterImport(patches))


if _faults():
  _install(_faults())
