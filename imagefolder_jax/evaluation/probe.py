"""Linear probing of frozen tokenizer features (`probe`, paper Table 4 "L.P.").

Features (computed once per split, sharded over every device and process like `eval-tokenizer`):
for each image, the quantized latent f_hat of each branch (B, 11, 11, Cq), i.e. what the decoder
and the generator see, averaged over the 11x11 positions -> (Cq,) per branch:
  'detail'   branch 0 (Cq),  'semantic' branch 1 (Cq),  'both' = [detail, semantic] (2 Cq).
The classifier is a linear layer on standardised features (mean / std of the training split),
trained full batch with optax AdamW (softmax cross-entropy + decoupled weight decay on the weights,
not the bias) for a fixed number of steps from a seeded initialisation; top-1 accuracy on the
validation split. Everything is deterministic given the seed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from imagefolder_jax import parallel
from imagefolder_jax.evaluation.tokenizer import EvalInputError, eval_batches
from imagefolder_jax.progress import Progress

FEATURE_SETS = ("detail", "semantic", "both")


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  steps: int = 500
  learning_rate: float = 0.05
  weight_decay: float = 1e-4
  seed: int = 0

  def validate(self) -> None:
    if self.steps < 1 or self.learning_rate <= 0 or self.weight_decay < 0:
      raise EvalInputError(f"probe needs steps >= 1, learning_rate > 0, weight_decay >= 0; got {self}")


def tokenizer_features(tokenizer, source, *, mesh=None, batch_size: int = 32, limit: Optional[int] = None,
                       what: str = "probe features") -> dict[str, np.ndarray]:
  """Every record of `source` once -> {'detail': (N, Cq), 'semantic': (N, Cq), 'labels': (N,)}
  float32 / int32 NumPy on every process (padding rows dropped), in source order."""
  mesh = mesh if mesh is not None else parallel.make_mesh()
  if tokenizer.config.num_branches != 2:
    raise EvalInputError(f"probe expects the two-branch tokenizer, got {tokenizer.config.num_branches} branches")
  _, batches = eval_batches(source, mesh, batch_size, tokenizer.resolution, limit)
  variables = parallel.put_global(tokenizer.variables, jax.tree.map(
      lambda _: parallel.replicated(mesh), tokenizer.variables))
  step = _feature_step(tokenizer.module, mesh)
  progress = Progress(what, len(source) if limit is None else min(limit, len(source)))
  parts: dict[str, list] = {"detail": [], "semantic": [], "labels": []}
  for device_batch, _ in batches:
    out = parallel.to_host(step(variables, device_batch["image"], device_batch["label"], device_batch["valid"]))
    valid = out.pop("valid").astype(bool)
    for k, v in out.items():
      parts[k].append(v[valid])
    progress.update(int(valid.sum()))
  result = {k: np.concatenate(v) for k, v in parts.items()}
  if not len(result["labels"]):
    raise EvalInputError(f"{source!r}: no readable image")
  return result


def _feature_step(module, mesh):
  batch = parallel.batch_sharding(mesh, 1)
  rows = parallel.batch_sharding(mesh, 2)

  def step(variables, images, labels, valid):
    with jax.default_matmul_precision("highest"):
      ids = module.apply(variables, images, method=type(module).encode_ids)
      f_hats = module.apply(variables, ids, method=type(module).ids_to_f_hats)
    detail, semantic = (jnp.mean(f.astype(jnp.float32), axis=(1, 2)) for f in f_hats)
    return dict(detail=detail, semantic=semantic, labels=labels, valid=valid)

  return jax.jit(step, out_shardings=dict(detail=rows, semantic=rows, labels=batch, valid=batch))


def feature_sets(features: dict) -> dict[str, np.ndarray]:
  """{'detail', 'semantic', 'both'} arrays from `tokenizer_features`' output."""
  return {"detail": features["detail"], "semantic": features["semantic"],
          "both": np.concatenate([features["detail"], features["semantic"]], axis=1)}


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "learning_rate", "weight_decay"))
def _fit(key, x, y, *, num_classes: int, steps: int, learning_rate: float, weight_decay: float):
  params = {"w": 0.01 * jax.random.normal(key, (x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}
  # Decay the weights only: a decayed bias would pull the class priors towards uniform.
  tx = optax.adamw(learning_rate, weight_decay=weight_decay, mask={"w": True, "b": False})
  opt = tx.init(params)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def body(_, carry):
    p, o = carry
    grads = jax.grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o

  params, _ = jax.lax.fori_loop(0, steps, body, (params, opt))
  return params, loss_fn(params)


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                       num_classes: int, settings: ProbeSettings = ProbeSettings()) -> dict:
  """A linear classifier on standardised features -> {'top1', 'train_top1', 'train_loss'}.

  train_x (N, D), train_y (N,) int in [0, num_classes); val_x (M, D), val_y (M,).
  """
  settings.validate()
  train_x, val_x = np.asarray(train_x, np.float64), np.asarray(val_x, np.float64)
  train_y, val_y = np.asarray(train_y, np.int32), np.asarray(val_y, np.int32)
  if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
    raise EvalInputError(f"probe features must be (N, D) and (M, D), got {train_x.shape} and {val_x.shape}")
  if len(train_x) != len(train_y) or len(val_x) != len(val_y) or not len(train_x) or not len(val_x):
    raise EvalInputError(f"probe needs non-empty splits with one label per row, got {len(train_x)}/{len(train_y)} "
                         f"and {len(val_x)}/{len(val_y)}")
  labels = np.concatenate([train_y, val_y])
  if labels.min() < 0 or labels.max() >= num_classes:
    raise EvalInputError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  standard = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
  params, loss = _fit(jax.random.key(settings.seed), standard(train_x), jnp.asarray(train_y),
                      num_classes=num_classes, steps=settings.steps, learning_rate=settings.learning_rate,
                      weight_decay=settings.weight_decay)

  def top1(x, y):
    logits = np.asarray(standard(x) @ params["w"] + params["b"])
    return float(np.mean(np.argmax(logits, axis=1) == y))

  return {"top1": top1(val_x, val_y), "train_top1": top1(train_x, train_y), "train_loss": float(loss)}


def linear_probe(tokenizer, train_source, val_source, *, mesh=None, batch_size: int = 32,
                 settings: ProbeSettings = ProbeSettings(), limit_train: Optional[int] = None,
                 limit_val: Optional[int] = None) -> dict:
  """Features of both splits once, then one probe per feature set -> JSON-ready dict:
  {'detail': {top1, train_top1, train_loss}, 'semantic': ..., 'both': ..., 'num_train', 'num_val',
  'num_classes', 'features', settings}."""
  settings.validate()
  train = tokenizer_features(tokenizer, train_source, mesh=mesh, batch_size=batch_size, limit=limit_train,
                             what="probe features (train)")
  val = tokenizer_features(tokenizer, val_source, mesh=mesh, batch_size=batch_size, limit=limit_val,
                           what="probe features (validation)")
  labels = np.concatenate([train["labels"], val["labels"]])
  if labels.min() < 0:
    raise EvalInputError("the source has unlabelled records (label < 0); probing needs class labels")
  num_classes = int(labels.max()) + 1
  result: dict = {"num_train": int(len(train["labels"])), "num_val": int(len(val["labels"])),
                  "num_classes": num_classes, **dataclasses.asdict(settings),
                  "features": "mean over the 11x11 positions of each branch's quantized f_hat; both = concat"}
  train_sets, val_sets = feature_sets(train), feature_sets(val)
  for name in FEATURE_SETS:
    result[name] = train_linear_probe(train_sets[name], train["labels"], val_sets[name], val["labels"],
                                      num_classes, settings)
  return result
