"""One training loop for both stages (tokenizer, generator): mesh, grain data, jitted step,
orbax checkpoints with the data-iterator state, clu metrics and images, progress with ETA.

A `Task` supplies the model-specific parts (`train/tokenizer_task.py`, `train/generator_task.py`):
  init_state(rng, example_batch) -> state      (a pytree; state['step'] is the step counter)
  load_pretrained(state) -> state               (host-side: weights from local files, once)
  frozen                                        (frozen networks' params, passed beside the state)
  train_step(state, frozen, batch) -> (state, metrics)  (pure; jitted here with explicit shardings)
  image_grids(state, batch) -> {name: (N, H, W, 3) in [-1, 1]}
  export(state) -> (configs, variables)         (an inference bundle)
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from imagefolder_jax import parallel
from imagefolder_jax.errors import ImageFolderError
from imagefolder_jax.progress import TrainingProgress
from imagefolder_jax.train import checkpointing

log = logging.getLogger("imagefolder_jax.train")


class ConfigError(ImageFolderError):
  """A config value is invalid (raised before any long work starts)."""


def shardings_for(task, mesh, rules, rng, example_batch):
  """(abstract state, its shardings) by the logical-axis rules: params, EMA params and optimizer
  moments follow the parameters' logical axes (`task.init_state_and_logical_axes`: one trace of the
  model's init for both); the rest is replicated."""
  abstract, logical = jax.eval_shape(task.init_state_and_logical_axes, rng, example_batch)
  return abstract, parallel.state_shardings(mesh, abstract, logical, rules)


def jit_train_step(task, mesh, rules, state_shardings, frozen_shardings, *, donate: bool = True):
  """The task's step jitted with explicit shardings, traced under the logical rules (so that the
  models' activation constraints apply); call it inside `jax.set_mesh(mesh)`. The state's buffers
  are donated (the new state reuses them) unless `donate=False`."""
  import flax.linen as nn

  from imagefolder_jax.ops.platform import compiling_for

  def step(state, frozen, batch):
    with nn.logical_axis_rules(rules), compiling_for(mesh):
      return task.train_step(state, frozen, batch)

  return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, None),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=(0,) if donate else ())


def step_flop_budget(task, mesh, example: dict, global_batch: int) -> tuple[float, float]:
  """(analytic model FLOPs of one global step, peak FLOP/s per device). The CPU's peak is its matmul
  rate measured here; every process uses process 0's measurement, so all log the same MFU."""
  from imagefolder_jax.planning import flops
  try:
    per_example = flops.train_flops_per_example(task, pretokenized="codes" in example)["total"]
  except TypeError:  # a task flops.py does not know (tests' toy tasks): no MFU
    return 0.0, 0.0
  device = mesh.devices.flat[0]
  if device.platform == "cpu":
    rate = np.frombuffer(parallel.allgather_bytes(np.float64(flops.measure_cpu_matmul_rate()).tobytes())[0])[0]
    peak = float(rate)
  else:
    try:
      _, peak = flops.peak_flops_per_device(device)
    except KeyError as e:
      log.warning("no MFU: %s", e)
      peak = 0.0
  return per_example * global_batch, peak


def _to_float(tree: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items() if np.ndim(v) == 0}


def config_fingerprint(config: ml_collections.ConfigDict) -> dict:
  """The parts of a config that must not change when resuming (the model architecture)."""
  return json.loads(config.model.to_json_best_effort())


def run(task, config: ml_collections.ConfigDict, workdir: str, *, loader_factory,
        after_step: Optional[Callable[[int, Any], None]] = None) -> dict:
  """Trains `task` until `config.train.num_steps`, resuming from `workdir` if it holds checkpoints.

  loader_factory(batch_rows, start_position) -> grain loader of this process's rows `batch_rows`
  of every global batch (`config.data.batch_size`), from global position `start_position`.
  Every process of a multi-process job runs this together: the same steps, the same parameters;
  process 0 alone writes logs, metrics.jsonl, TensorBoard events and PNG grids, and all processes
  write the orbax checkpoints together (each its own shards; the data-iterator states of all
  processes go into the checkpoint's metadata).
  after_step(step, manager): called on every process after each step and its checkpoint save (if
  that step saves one), e.g. to stop or inspect a run; tests inject faults through it.
  Returns the final metrics (floats) and the final `state` (global arrays).
  """
  t = config.train
  primary = parallel.is_primary()
  os.makedirs(workdir, exist_ok=True)
  _check_resume_config(config, workdir, task.name)

  try:
    mesh, rules = parallel.mesh_from_config(config.get("mesh", {}))
  except parallel.MeshConfigError as e:
    raise ConfigError(str(e)) from e
  global_batch = config.data.batch_size
  shards = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
  if global_batch % shards:
    raise ConfigError(f"data.batch_size={global_batch} is not divisible by the {shards} batch shards of the "
                      f"mesh {dict(mesh.shape)}")
  rows = parallel.process_rows(mesh, global_batch)
  loader = loader_factory(rows, 0)
  iterator = iter(loader)

  first = next(iterator)
  rng = jax.random.key(config.seed)
  abstract, state_shardings = shardings_for(task, mesh, rules, rng, first)
  init = jax.jit(task.init_state, out_shardings=state_shardings)

  manager = checkpointing.make_manager(workdir, keep=t.keep_checkpoints, async_save=t.get("async_checkpoints", True))
  restored = checkpointing.restore_latest(manager, checkpointing.abstract_with_shardings(abstract, state_shardings))
  if restored is None:
    state = init(rng, _to_global(mesh, first, global_batch))
    state = parallel.put_global(task.load_pretrained(state), state_shardings)
    start_step = 0
    pending = [first]
  else:
    start_step, state, meta = restored
    iterator, how = _resume_iterator(iterator, meta, loader_factory, rows, start_step * global_batch)
    pending = []
    if primary:
      log.info("resumed from step %d (%s; data %s)", start_step, manager.directory, how)

  frozen_shardings = parallel.frozen_shardings(
      mesh, task.frozen, config.get("mesh", {}).get("frozen_replicate_below_mb", parallel.FROZEN_REPLICATE_BELOW_MB))
  frozen = parallel.put_global(task.frozen, frozen_shardings)
  step_fn = parallel.compile_then_sync(jit_train_step(task, mesh, rules, state_shardings, frozen_shardings),
                                       "train step", mesh)
  writer = _tensorboard_writer(workdir) if primary and t.get("tensorboard", True) else None
  flops_per_step, peak = step_flop_budget(task, mesh, first, global_batch)
  progress = TrainingProgress(t.num_steps, start_step, global_batch, flops_per_step=flops_per_step,
                      num_devices=mesh.devices.size, peak_per_device=peak)
  images_dir = os.path.join(workdir, "images")
  if primary and jax.process_count() > 1:
    log.info("%d processes x %d devices, mesh %s, %d rows of each global batch of %d per process",
             jax.process_count(), jax.local_device_count(), dict(mesh.shape), len(rows), global_batch)

  def checkpoint(step: int, state) -> None:
    from imagefolder_jax.data import get_iterator_state
    states = parallel.allgather_bytes(get_iterator_state(iterator))
    checkpointing.save(manager, step, state, {"data_iterators": [x.decode() for x in states],
                                              "process_count": jax.process_count(),
                                              "global_batch": global_batch})

  metrics = {}
  step = start_step
  if start_step >= t.num_steps and primary:
    log.info("already trained to step %d (num_steps=%d)", start_step, t.num_steps)
  try:
    while step < t.num_steps:
      batch = pending.pop() if pending else next(iterator)
      global_batch_arrays = _to_global(mesh, batch, global_batch)
      with jax.set_mesh(mesh):
        state, step_metrics = step_fn(state, frozen, global_batch_arrays)
      step += 1
      if step % t.log_every == 0 or step == t.num_steps or step == start_step + 1:
        metrics = _to_float(step_metrics)
        metrics.update(progress.rates(step))
        if writer is not None:
          writer.write_scalars(step, metrics)
        if primary:
          with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
          if progress.tty:
            print(file=sys.stderr)
          log.info(progress.line(step, metrics))
      elif primary:
        progress.tick(step, {})
      if t.image_every and (step % t.image_every == 0 or step == t.num_steps):
        _write_images(task, primary, writer, state, global_batch_arrays, step, images_dir)
      if step % t.checkpoint_every == 0 or step == t.num_steps:
        checkpoint(step, state)
      if after_step is not None:
        after_step(step, manager)
  except KeyboardInterrupt:
    # One process alone cannot write a multi-process checkpoint (the others are not saving).
    if jax.process_count() == 1:
      log.warning("interrupted at step %d: writing a checkpoint", step)
      checkpoint(step, state)
    raise
  finally:
    manager.wait_until_finished()
    if writer is not None:
      writer.flush()
  final = dict(metrics)
  final["step"] = step
  final["state"] = state
  return final


def _resume_iterator(iterator, meta: dict, loader_factory, rows, position: int):
  """Puts the data iterator where the checkpoint left it: this process's saved grain state when the
  process count is unchanged, else a fresh loader at the global position step * batch (the global
  order does not depend on the process count). Returns (iterator, description)."""
  from imagefolder_jax.data import set_iterator_state
  states = meta.get("data_iterators")
  if states is None and "data_iterator" in meta:  # checkpoints written before multi-process support
    states = [meta["data_iterator"]]
  if states is not None and len(states) == jax.process_count():
    set_iterator_state(iterator, states[jax.process_index()].encode())
    return iterator, "iterator state restored"
  return iter(loader_factory(rows, position)), f"re-sharded at position {position}"


def _to_global(mesh, batch: dict, global_batch: int) -> dict:
  arrays = {k: np.asarray(v) for k, v in batch.items() if k not in ("index", "valid")}
  return parallel.host_to_global(mesh, arrays, global_batch)


def _tensorboard_writer(workdir: str):
  """clu's console + TensorBoard writer. clu's writers import TensorFlow (2-4 s of start-up),
  hence `train.tensorboard=False` for short runs (the tiny configs)."""
  from clu import metric_writers
  return metric_writers.create_default_writer(workdir, asynchronous=False)


def _write_images(task, primary: bool, writer, state, batch, step: int, images_dir: str) -> None:
  """Every process computes the grids (they may need sharded state); process 0 writes them (PNG
  files, and to TensorBoard when `writer` is not None)."""
  from PIL import Image

  from imagefolder_jax.data import image_grid
  grids = task.image_grids(state, batch)
  host = parallel.to_host({name: images for name, (images, _) in grids.items()})
  if not primary:
    return
  os.makedirs(images_dir, exist_ok=True)
  for name, (_, nrow) in grids.items():
    grid = image_grid(host[name], nrow)
    for suffix in (f"{step:07d}", "latest"):
      Image.fromarray(grid).save(os.path.join(images_dir, f"{name}_{suffix}.png"))
    if writer is not None:
      writer.write_images(step, {name: grid[None].astype(np.float32) / 255.0})


def _check_resume_config(config, workdir: str, task_name: str) -> None:
  path = os.path.join(workdir, "config.json")
  fingerprint = config_fingerprint(config)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("model") != fingerprint or saved.get("stage", task_name) != task_name:
      raise checkpointing.CheckpointError(
          f"{workdir} holds a run with a different model architecture; use a new --workdir "
          "or the config it was trained with")
  # Every process has read the old file before process 0 replaces it (atomically: a reader that is
  # late anyway sees the old or the new file whole, never a truncated one).
  parallel.sync("config.json read")
  if parallel.is_primary():
    with open(path + ".tmp", "w") as f:
      json.dump({"stage": task_name, "model": fingerprint,
                 "config": json.loads(config.to_json_best_effort())}, f, indent=1)
    os.replace(path + ".tmp", path)
  parallel.sync("config.json written")
