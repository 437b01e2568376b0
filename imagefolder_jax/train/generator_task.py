"""Generator training (docs/design.md §3): teacher-forced next-scale prediction of folded token pairs.

Each step tokenizes the batch with the frozen tokenizer bundle (inside the same jitted program),
builds the folded next-scale inputs (f_hat accumulated through the tokenizer's quantizer and phi,
area-downsampled), and minimises the mean of the per-branch cross-entropies with label dropout.
Batches may instead carry pre-tokenized codes (`imagefolder-jax pretokenize`), which skips the encoder.

State: step, rng, skipped, params, ema_params, opt_state. Frozen: the tokenizer variables.
"""
from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from imagefolder_jax import parallel
from imagefolder_jax.models.generator import (
  GeneratorConfig,
  NextScaleGenerator,
  flatten_ids,
  generator_loss,
  unflatten_ids,
)
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig
from imagefolder_jax.ops import block_causal_attention
from imagefolder_jax.storage.bundle import BundleError, load_bundle, read_bundle_configs
from imagefolder_jax.train import optim

# train.attention_kernel: 'auto' runs the fused TPU attention kernels where `block_causal_attention.applies`
# (on TPUs: the lane-dense kernels, or splash attention except on v6e), 'xla' keeps XLA's attention
# everywhere (a compute-bound model, e.g. d30 on v5p).
ATTENTION_KERNELS = ("auto", "xla")

log = logging.getLogger("imagefolder_jax.train")


@functools.lru_cache(maxsize=8)
def _abstract_tokenizer_variables(tokenizer_config, image_size: int) -> dict:
  """The frozen tokenizer's variables as ShapeDtypeStructs, traced once per (config, size): the
  planner makes a task per probe of a `--largest-batch` search, and tracing the init of a 12-block
  tokenizer costs about a second each time."""
  v = jax.eval_shape(ImageFolderTokenizer(tokenizer_config).init, jax.random.key(0),
                     jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  return {k: x for k, x in nn.unbox(v).items() if k != "intermediates"}


class GeneratorTask:
  """The generator stage for `train.loop.run`."""

  name = "generator"

  def __init__(self, config: ml_collections.ConfigDict, load_frozen: bool = True,
               tokenizer_config: TokenizerConfig | None = None):
    """tokenizer_config: the frozen tokenizer's layout without a bundle (planning only: nothing
    can be loaded then, so `load_frozen` must be False)."""
    self.config = config
    bundle = config.tokenizer_bundle
    if tokenizer_config is not None:
      if load_frozen:
        raise ValueError("tokenizer_config without a bundle cannot load frozen weights (load_frozen=False)")
      configs = {"tokenizer": tokenizer_config.to_dict()}
    elif not bundle:
      raise ValueError("tokenizer_bundle is empty: pass --config.tokenizer_bundle=DIR (a tokenizer bundle from "
                       "train-tokenizer/export or convert-official)")
    else:
      try:
        configs = read_bundle_configs(bundle)
      except BundleError as e:
        raise ValueError(str(e)) from e
    if "tokenizer" not in configs:
      raise ValueError(f"tokenizer_bundle {bundle} holds no tokenizer")
    self.tokenizer_config = TokenizerConfig.from_dict(configs["tokenizer"])
    q = self.tokenizer_config.quantizer
    self.model_config = GeneratorConfig(
        **config.model.to_dict(), num_branches=self.tokenizer_config.num_branches,
        codebook_size=q.codebook_size, latent_dim=q.latent_dim, scales=q.scales,
        dtype=config.get("dtype", "float32"))
    self.model_config.validate()
    self.remat = config.train.get("remat", "none")
    self.attention_kernel = config.train.get("attention_kernel", "auto")
    if self.attention_kernel not in ATTENTION_KERNELS:
      raise ValueError(f"train.attention_kernel={self.attention_kernel!r} must be one of {ATTENTION_KERNELS}")
    self.grad_accum = int(config.train.get("grad_accum", 1))
    if self.grad_accum < 1 or config.data.batch_size % self.grad_accum:
      raise ValueError(f"train.grad_accum={self.grad_accum} must be >= 1 and divide data.batch_size="
                       f"{config.data.batch_size}")
    self.model = NextScaleGenerator(self.model_config, remat=self.remat)
    self.tokenizer = ImageFolderTokenizer(self.tokenizer_config)
    o = config.optim
    self.schedule = optim.learning_rate_schedule(o.lr, config.train.num_steps, o.warmup_steps, o.schedule,
                                                 end_factor=o.get("end_factor", 0.0))
    self.tx = optim.adamw(self.schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, clip_norm=o.clip_norm)
    self.frozen = {}
    self._samplers = {}
    if load_frozen:
      _, variables = load_bundle(bundle)
      self.frozen = {"tokenizer": {k: v for k, v in variables["tokenizer"].items() if k != "intermediates"}}

  @property
  def resolution(self) -> int:
    return self.tokenizer_config.image_size

  def check_codes(self, meta: dict) -> None:
    """Refuses pre-tokenized codes made by a tokenizer with another token layout."""
    c = self.model_config
    mine = {"scales": list(c.scales), "num_branches": c.num_branches, "codebook_size": c.codebook_size}
    theirs = {k: meta.get(k) for k in mine}
    if mine != theirs:
      raise ValueError(f"pre-tokenized codes {theirs} do not match the tokenizer bundle {mine}")

  def example_batch(self, batch: int) -> dict:
    r = self.resolution
    return {"image": np.zeros((batch, r, r, 3), np.float32), "label": np.zeros((batch,), np.int32)}

  def load_pretrained(self, state: dict) -> dict:
    return state

  def _boxed_params(self, k_model: jax.Array) -> dict:
    c = self.model_config
    labels = jnp.zeros((1,), jnp.int32)
    inputs = jnp.zeros((1, c.num_tokens - c.scales[0] ** 2, c.input_dim), jnp.float32)
    return self.model.init({"params": k_model}, labels, inputs)["params"]

  def abstract_frozen(self, image_size: int | None = None) -> dict:
    """Shapes/dtypes (jax.ShapeDtypeStruct) of `frozen` without loading anything (planning)."""
    shapes = _abstract_tokenizer_variables(self.tokenizer_config, image_size or self.resolution)
    return {"tokenizer": jax.tree.map(lambda x: x, shapes)}   # a copy: the cached tree stays as it is

  def init_state_and_logical_axes(self, rng: jax.Array, batch: dict) -> tuple[dict, dict]:
    """(train state, {state key: boxed params}) from one init of the model: the second is what
    `parallel.state_shardings` reads (`train.loop.shardings_for` takes both from one trace)."""
    k_model, k_state = jax.random.split(rng)
    boxed = self._boxed_params(k_model)
    params = nn.unbox(boxed)
    state = dict(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(k_state), skipped=jnp.zeros((), jnp.int32),
                 params=params, ema_params=params, opt_state=self.tx.init(params))
    return state, {"params": boxed, "ema_params": boxed, "opt_state": boxed}

  def init_state(self, rng: jax.Array, batch: dict) -> dict:
    return self.init_state_and_logical_axes(rng, batch)[0]

  def tokens(self, frozen: dict, batch: dict) -> list:
    """ids[branch][scale] of the batch: from pre-tokenized codes, or by encoding the images."""
    if "codes" in batch:
      return unflatten_ids(jnp.swapaxes(batch["codes"].astype(jnp.int32), 1, 2), self.model_config.scales)
    return self.tokenizer.apply(frozen["tokenizer"], batch["image"].astype(jnp.float32),
                                method=ImageFolderTokenizer.encode_ids)

  def train_step(self, state: dict, frozen: dict, batch: dict):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    labels = batch["label"].astype(jnp.int32)
    ids = jax.lax.stop_gradient(self.tokens(frozen, batch))
    inputs = self.tokenizer.apply(frozen["tokenizer"], ids, method=ImageFolderTokenizer.next_scale_inputs)
    targets = flatten_ids(ids)

    def loss_fn(params, labels, inputs, targets, key):
      with block_causal_attention.xla_attention(self.attention_kernel == "xla"):
        logits = self.model.apply({"params": params}, labels, inputs, train=True, rngs={"dropout": key})
      loss = generator_loss(logits, targets)
      accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
      return loss, accuracy

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if self.grad_accum == 1:
      (loss, accuracy), grads = grad_fn(state["params"], labels, inputs, targets, rng)
    else:
      (loss, accuracy), grads = self._accumulate(grad_fn, state["params"], (labels, inputs, targets), rng)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, params=params, opt_state=opt_state,
               ema_params=optim.ema_update(state["ema_params"], params, self.config.optim.ema_decay))
    ok = jnp.isfinite(loss) & optim.all_finite(grads)
    new = optim.select_tree(ok, new, state)
    new["step"] = step + 1
    new["skipped"] = state["skipped"] + (~ok).astype(jnp.int32)
    metrics = dict(loss=loss, token_accuracy=accuracy, lr=self.schedule(step), grad_norm=optax.tree.norm(grads),
                   skipped_steps=new["skipped"])
    return new, metrics

  def _accumulate(self, grad_fn, params, batch: tuple, rng: jax.Array):
    """Gradient accumulation: the batch in `grad_accum` equal microbatches (microbatch j = rows
    j::k, so each device keeps its own rows and nothing moves), one `lax.scan` step each; the mean
    of the microbatch means equals the whole batch's mean. Label dropout / stochastic depth draw
    from fold_in(rng, j), so those random draws (only those) differ from the one-batch step."""
    k = self.grad_accum

    def split(x):  # (B, ...) -> (k, B / k, ...)
      return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    micro = jax.tree.map(split, batch)

    def body(carry, xs):
      j, one = xs
      (loss, accuracy), grads = grad_fn(params, *one, jax.random.fold_in(rng, j))
      total = jax.tree.map(jnp.add, carry, (loss, accuracy, grads))
      return total, None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, accuracy, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    return (loss / k, accuracy / k), jax.tree.map(lambda g: g / k, grads)

  # ------------------------------------------------------------------ images and export
  def sample(self, state: dict, frozen: dict, labels: jax.Array, key: jax.Array, cfg: float = 2.0,
             top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """Samples images (B, H, W, 3) in [-1, 1] with the EMA weights."""
    from imagefolder_jax.inference.sampling import SamplerSettings, make_sampler
    key_settings = (top_k, top_p)
    if key_settings not in self._samplers:  # one compiled sampler per static setting
      self._samplers[key_settings] = make_sampler(self.model, self.tokenizer, SamplerSettings(top_k=top_k, top_p=top_p))
    out = self._samplers[key_settings]({"params": state["ema_params"]}, frozen["tokenizer"], labels, key, cfg, 1.0, {})
    return out["images"]

  def image_grids(self, state: dict, batch: dict) -> dict:
    n = min(8, self.model_config.num_classes)
    labels = jnp.arange(n, dtype=jnp.int32) % self.model_config.num_classes
    images = self.sample(state, self.frozen, labels, jax.random.key(0))
    return {"samples": (images, n)}

  def export(self, state: dict) -> tuple[dict, dict]:
    state = parallel.to_host(state)
    _, variables = load_bundle(self.config.tokenizer_bundle)
    return ({"tokenizer": self.tokenizer_config.to_dict(), "generator": self.model_config.to_dict()},
            {"tokenizer": variables["tokenizer"], "generator": {"params": state["ema_params"]}})
