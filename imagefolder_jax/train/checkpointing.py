"""Resumable training checkpoints (orbax): train state + data-iterator position + bookkeeping.

Async, keep-N, atomic (orbax writes to a temporary directory and renames it on commit), so a job
killed at any moment resumes from the last committed step. Restoring takes abstract targets with
shardings, so a run may resume on a different mesh.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint directory exists but does not match the current run."""


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
  """(step, state, meta) of the latest committed checkpoint, or None when there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint at step {step} in {manager.directory} does not match this "
                          f"config ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "use a new --workdir or the config it was trained with") from e
  return step, restored["state"], restored["meta"]


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
