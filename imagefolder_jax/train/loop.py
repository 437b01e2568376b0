"""One training loop for both stages (tokenizer, generator): mesh, grain data, jitted step,
orbax checkpoints with the data-iterator state, clu metrics and images, progress with ETA.

A `Task` supplies the model-specific parts (see `imagefolder_jax.train.tasks`):
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
import math
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagefolder_jax import parallel
from imagefolder_jax.train import checkpointing

log = logging.getLogger("imagefolder_jax.train")


class ConfigError(ValueError):
  """A config value is invalid (raised before any long work starts)."""


def fsdp_shardings(mesh, tree: Any, axis: str = "fsdp", min_size: int = 2 ** 14) -> Any:
  """Shape-based FSDP (big_vision's `fsdp` rule): each leaf of >= `min_size` elements is split along
  its largest dimension divisible by the `axis` size; everything else is replicated. Applies alike to
  params, their EMA and the optimizer moments, so the whole train state follows one rule."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  n = mesh.shape[axis]

  def one(x):
    shape = np.shape(x)
    if n == 1 or int(np.prod(shape)) < min_size:
      return NamedSharding(mesh, P())
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
      if shape[d] % n == 0:
        spec = [None] * len(shape)
        spec[d] = axis
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree)


class Progress:
  """Step/s, images/s and ETA; a live line on an interactive terminal, log lines otherwise."""

  def __init__(self, total_steps: int, start_step: int, global_batch: int):
    self.total, self.start, self.batch = total_steps, start_step, global_batch
    self.t0 = time.perf_counter()
    self.tty = sys.stderr.isatty()

  def rates(self, step: int) -> dict:
    elapsed = max(time.perf_counter() - self.t0, 1e-9)
    done = max(step - self.start, 1)
    steps_per_s = done / elapsed
    return dict(steps_per_s=steps_per_s, images_per_s=steps_per_s * self.batch,
                eta_s=(self.total - step) / steps_per_s)

  def line(self, step: int, metrics: dict) -> str:
    r = self.rates(step)
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.endswith("loss"))
    eta = time.strftime("%H:%M:%S", time.gmtime(r["eta_s"]))
    return (f"step {step}/{self.total} {shown} | {r['images_per_s']:.1f} img/s "
            f"{r['steps_per_s']:.2f} step/s | ETA {eta}")

  def tick(self, step: int, metrics: dict) -> None:
    if self.tty:
      print("\r" + self.line(step, metrics)[:160], end="", file=sys.stderr, flush=True)


def _to_float(tree: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items() if np.ndim(v) == 0}


def config_fingerprint(config: ml_collections.ConfigDict) -> dict:
  """The parts of a config that must not change when resuming (the model architecture)."""
  return json.loads(config.model.to_json_best_effort())


def run(task, config: ml_collections.ConfigDict, workdir: str, *, loader_factory) -> dict:
  """Trains `task` until `config.train.num_steps`, resuming from `workdir` if it holds checkpoints.

  loader_factory(shard_index, shard_count) -> (grain loader, per-process batch size).
  Returns the final metrics (floats). Writes `workdir/config.json`, `checkpoints/`, TensorBoard
  events, and PNG grids under `workdir/images/`.
  """
  from clu import metric_writers

  t = config.train
  os.makedirs(workdir, exist_ok=True)
  _check_resume_config(config, workdir, task.name)

  mesh = parallel.make_mesh(**config.get("mesh", {}))
  loader = loader_factory(jax.process_index(), jax.process_count())
  iterator = iter(loader)
  global_batch = config.data.batch_size
  if global_batch % mesh.devices.size and global_batch >= mesh.devices.size:
    raise ConfigError(f"data.batch_size={global_batch} is not divisible by the {mesh.devices.size} devices")

  first = next(iterator)
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(task.init_state, rng, first)
  state_shardings = fsdp_shardings(mesh, abstract)
  batch_sharding = lambda x: parallel.batch_sharding(mesh, np.ndim(x))
  init = jax.jit(task.init_state, out_shardings=state_shardings)

  manager = checkpointing.make_manager(workdir, keep=t.keep_checkpoints, async_save=t.get("async_checkpoints", True))
  restored = checkpointing.restore_latest(manager, checkpointing.abstract_with_shardings(abstract, state_shardings))
  if restored is None:
    state = init(rng, _shard(mesh, first))
    state = jax.device_put(task.load_pretrained(state), state_shardings)
    start_step = 0
    pending = [first]
  else:
    start_step, state, meta = restored
    from imagefolder_jax.data import set_iterator_state
    set_iterator_state(iterator, meta["data_iterator"].encode())
    pending = []
    log.info("resumed from step %d (%s)", start_step, manager.directory)

  frozen = jax.device_put(task.frozen, parallel.replicated(mesh))
  step_fn = jax.jit(task.train_step, in_shardings=(state_shardings, None, None),
                    out_shardings=(state_shardings, None), donate_argnums=(0,))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0, asynchronous=False)
  progress = Progress(t.num_steps, start_step, global_batch)
  images_dir = os.path.join(workdir, "images")
  fail_at = t.get("fail_at_step", -1)  # test hook: exit abruptly (like kill -9) after this step.

  def checkpoint(step: int, state) -> None:
    from imagefolder_jax.data import get_iterator_state
    checkpointing.save(manager, step, state, {"data_iterator": get_iterator_state(iterator).decode()})

  metrics = {}
  step = start_step
  if start_step >= t.num_steps:
    log.info("already trained to step %d (num_steps=%d)", start_step, t.num_steps)
  try:
    while step < t.num_steps:
      batch = pending.pop() if pending else next(iterator)
      state, step_metrics = step_fn(state, frozen, _shard(mesh, batch))
      step += 1
      if step % t.log_every == 0 or step == t.num_steps or step == start_step + 1:
        metrics = _to_float(step_metrics)
        metrics.update(progress.rates(step))
        writer.write_scalars(step, metrics)
        if jax.process_index() == 0:
          with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if progress.tty:
          print(file=sys.stderr)
        log.info(progress.line(step, metrics))
      else:
        progress.tick(step, {})
      if t.image_every and (step % t.image_every == 0 or step == t.num_steps):
        _write_images(task, writer, state, batch, step, images_dir)
      if step % t.checkpoint_every == 0 or step == t.num_steps:
        checkpoint(step, state)
      if step == fail_at:
        manager.wait_until_finished()
        os._exit(137)
  except KeyboardInterrupt:
    log.warning("interrupted at step %d: writing a checkpoint", step)
    checkpoint(step, state)
    raise
  finally:
    manager.wait_until_finished()
    writer.flush()
  final = dict(metrics)
  final["step"] = step
  final["state"] = state
  return final


def _shard(mesh, batch: dict) -> dict:
  return parallel.shard_batch(mesh, {k: np.asarray(v) for k, v in batch.items()})


def _write_images(task, writer, state, batch, step: int, images_dir: str) -> None:
  from PIL import Image
  from imagefolder_jax.data import image_grid
  os.makedirs(images_dir, exist_ok=True)
  for name, (images, nrow) in task.image_grids(state, batch).items():
    grid = image_grid(np.asarray(jax.device_get(images)), nrow)
    for suffix in (f"{step:07d}", "latest"):
      Image.fromarray(grid).save(os.path.join(images_dir, f"{name}_{suffix}.png"))
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
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump({"stage": task_name, "model": fingerprint,
                 "config": json.loads(config.to_json_best_effort())}, f, indent=1)
