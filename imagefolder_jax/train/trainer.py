"""Entry points: `train(stage, config, workdir)` and `export(workdir, out)` (CLI: train-*, export)."""
from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from imagefolder_jax import parallel
from imagefolder_jax.train import checkpointing, loop

log = logging.getLogger("imagefolder_jax.train")
STAGES = ("tokenizer", "generator")


def make_task(stage: str, config: ml_collections.ConfigDict, load_frozen: bool = True):
  if stage == "tokenizer":
    from imagefolder_jax.train.tokenizer_task import TokenizerTask
    return TokenizerTask(config, load_frozen=load_frozen)
  if stage == "generator":
    from imagefolder_jax.train.generator_task import GeneratorTask
    return GeneratorTask(config, load_frozen=load_frozen)
  raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def validate_common(config: ml_collections.ConfigDict) -> None:
  t, d = config.train, config.data
  for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    if int(t[name]) < 1:
      raise loop.ConfigError(f"train.{name} must be >= 1, got {t[name]}")
  if d.batch_size < 1:
    raise loop.ConfigError(f"data.batch_size must be >= 1, got {d.batch_size}")
  if d.batch_size % jax.process_count():
    raise loop.ConfigError(f"data.batch_size={d.batch_size} is not divisible by {jax.process_count()} processes")


def train(stage: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates everything cheap first (config, data source, weights files), then trains."""
  from imagefolder_jax import data
  parallel.initialize_distributed()
  validate_common(config)
  if not parallel.is_primary():
    logging.getLogger("imagefolder_jax").setLevel(logging.WARNING)
  d = config.data
  per_process = d.batch_size // jax.process_count()
  if d.source.startswith("codes:"):
    if stage != "generator":
      raise loop.ConfigError("data.source=codes:... (pre-tokenized) only trains the generator")
    from imagefolder_jax.data.codes import CodesSource, make_codes_loader
    task = make_task(stage, config)
    source = CodesSource(d.source[len("codes:"):], num_classes=task.model_config.num_classes)
    task.check_codes(source.meta)
    loader_factory = lambda rows, start: make_codes_loader(
        source, batch_size=per_process, train=True, seed=config.seed, shard_index=jax.process_index(),
        shard_count=jax.process_count(), worker_count=d.get("worker_count", 0), global_batch_size=d.batch_size,
        batch_rows=rows, start_position=start)
  else:
    source = data.build_source(d.source, data_dir=d.get("data_dir") or None, split=d.get("split", "train"),
                               seed=config.seed, crops_per_class=d.get("crops_per_class", 64))
    task = make_task(stage, config)
    loader_factory = lambda rows, start: data.make_loader(
        source, batch_size=per_process, resolution=task.resolution, train=True, seed=config.seed,
        worker_count=d.get("worker_count", 0), shard_index=jax.process_index(), shard_count=jax.process_count(),
        global_batch_size=d.batch_size, batch_rows=rows, start_position=start)

  result = loop.run(task, config, workdir, loader_factory=loader_factory)
  # Every process takes part: export gathers parameters sharded over processes, and the bundle is
  # written collectively (process 0 writes its metadata).
  bundle = os.path.join(workdir, "bundle")
  configs, variables = task.export(result.pop("state"))
  from imagefolder_jax.storage.bundle import save_bundle
  save_bundle(bundle, configs, variables)
  if parallel.is_primary():
    log.info("wrote inference bundle %s", bundle)
  return result


def load_workdir_config(workdir: str) -> tuple[str, ml_collections.ConfigDict]:
  """(stage, config) a run recorded in `workdir/config.json`; `ConfigError` (one line naming the
  file) when it is unreadable or not what `train` writes."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: no training run here (missing config.json)")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise loop.ConfigError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
  if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
    found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
    raise loop.ConfigError(f"{path}: expected an object with the run's 'config' (as train writes), got {found}")
  stage = saved.get("stage", "tokenizer")
  if stage not in STAGES:
    raise loop.ConfigError(f"{path}: stage must be one of {STAGES}, got {stage!r}")
  return stage, ml_collections.ConfigDict(saved["config"])


def _workdir_task(workdir: str, stage: str, config: ml_collections.ConfigDict, mesh, rules):
  """(task, abstract train state, its shardings) of a recorded run; config fields of the wrong type
  or shape are a `ConfigError`."""
  try:
    task = make_task(stage, config, load_frozen=False)
    r = task.resolution
    example = {"image": np.zeros((1, r, r, 3), np.float32), "label": np.zeros((1,), np.int32)}
    if hasattr(task, "example_batch"):
      example = task.example_batch(1)
    abstract, shardings = loop.shardings_for(task, mesh, rules, jax.random.key(0), example)
    return task, abstract, shardings
  except (TypeError, KeyError, AttributeError) as e:
    raise loop.ConfigError(f"{os.path.join(workdir, 'config.json')}: unusable config "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e


def export(workdir: str, out: str) -> int:
  """Writes the bundle of the latest checkpoint in `workdir` (EMA weights). Returns its step."""
  from imagefolder_jax.storage.bundle import save_bundle
  stage, config = load_workdir_config(workdir)
  mesh, rules = parallel.mesh_from_config({"rules": config.get("mesh", {}).get("rules")})
  task, abstract, shardings = _workdir_task(workdir, stage, config, mesh, rules)
  manager = checkpointing.make_manager(workdir, keep=1000, async_save=False)
  # Read-only: an unusable newer step is reported and left where it is (training moves it aside).
  restored = checkpointing.restore_latest(manager, checkpointing.abstract_with_shardings(abstract, shardings),
                                          quarantine=False)
  if restored is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint to export")
  step, state, _ = restored
  configs, variables = task.export(state)
  save_bundle(out, configs, variables)
  return step
