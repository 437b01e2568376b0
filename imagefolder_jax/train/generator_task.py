"""Generator training (DESIGN §3): teacher-forced next-scale prediction of folded token pairs.

Each step tokenizes the batch with the frozen tokenizer bundle (inside the same jitted program),
builds the folded next-scale inputs (f_hat accumulated through the tokenizer's quantizer and phi,
area-downsampled), and minimises the mean of the per-branch cross-entropies with label dropout.
Batches may instead carry pre-tokenized codes (`imagefolder-jax pretokenize`), which skips the encoder.

State: step, rng, skipped, params, ema_params, opt_state. Frozen: the tokenizer variables.
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from imagefolder_jax import parallel
from imagefolder_jax.checkpoint import BundleError, load_bundle, read_bundle_configs
from imagefolder_jax.models.generator import GeneratorConfig, NextScaleGenerator, flatten_ids, generator_loss, \
    unflatten_ids
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig
from imagefolder_jax.train import optim

log = logging.getLogger("imagefolder_jax.train")


class GeneratorTask:
  """The generator stage for `train.loop.run`."""

  name = "generator"

  def __init__(self, config: ml_collections.ConfigDict, load_frozen: bool = True):
    self.config = config
    bundle = config.tokenizer_bundle
    if not bundle:
      raise ValueError("tokenizer_bundle is empty: pass --config.tokenizer_bundle=DIR (a tokenizer bundle from "
                       "train-tokenizer/export or convert-official)")
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
    self.model = NextScaleGenerator(self.model_config)
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

  def init_state(self, rng: jax.Array, batch: dict) -> dict:
    k_model, k_state = jax.random.split(rng)
    c = self.model_config
    labels = jnp.zeros((1,), jnp.int32)
    inputs = jnp.zeros((1, c.num_tokens - c.scales[0] ** 2, c.input_dim), jnp.float32)
    params = nn.unbox(self.model.init({"params": k_model}, labels, inputs))["params"]
    return dict(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(k_state), skipped=jnp.zeros((), jnp.int32),
                params=params, ema_params=params, opt_state=self.tx.init(params))

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

    def loss_fn(params):
      logits = self.model.apply({"params": params}, labels, inputs, train=True, rngs={"dropout": rng})
      loss = generator_loss(logits, targets)
      accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
      return loss, accuracy

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
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

  # ------------------------------------------------------------------ images and export
  def sample(self, state: dict, frozen: dict, labels: jax.Array, key: jax.Array, cfg: float = 2.0,
             top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """Samples images (B, H, W, 3) in [-1, 1] with the EMA weights."""
    from imagefolder_jax.sampling import SamplerSettings, make_sampler
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
