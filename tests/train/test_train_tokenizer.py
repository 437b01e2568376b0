"""Tokenizer trainer: learning, non-finite skip, one-line config errors. Kill-and-resume and export
from a workdir: tests/train/test_checkpointing.py."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import ROOT

from imagefolder_jax.cli import main
from imagefolder_jax.train.configuration import load_config
from imagefolder_jax.train.tokenizer_task import TokenizerTask

TINY = os.path.join(ROOT, "configs", "tokenizer_tiny.py")


def fixed_batch(n=8, size=32):
  from imagefolder_jax import data
  it = iter(data.make_loader(data.DemoSource(crops_per_class=2, crop_size=48), batch_size=n, resolution=size,
                             train=False, seed=0))
  return jax.tree.map(jnp.asarray, next(it))


@pytest.fixture(scope="module")
def task():
  return TokenizerTask(load_config(TINY))  # every loss on: LPIPS, semantic (random teacher), PatchGAN


@pytest.fixture(scope="module")
def jitted(task):
  """(init_state, train_step) jitted once for the module's tests (one compile each)."""
  return jax.jit(task.init_state), jax.jit(task.train_step)


def adaptive_weight_by_definition(task, state, batch) -> float:
  """‖∂rec/∂W‖ / (‖∂gan/∂W‖ + 1e-4) for the decoder's last layer W at the first step, each gradient
  taken through the whole model (as the official's autograd.grad), with the step's keys."""
  from imagefolder_jax.ops.diffaug import diff_augment
  from imagefolder_jax.train import losses
  lc = task.config.loss
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  k_drop, k_restart, k_g, _, _, k_crop = jax.random.split(rng, 6)

  # Every array is an argument: closed over, the weights would be constants of the program, and
  # XLA's compile time grows with them.
  def gradient_norms(params, model_state, disc, lpips_params, images, keys):
    k_drop, k_restart, k_g, k_crop = keys

    def recon(w):
      p = dict(params, decoder=dict(params["decoder"], to_pixel=w))
      out, _ = task.model.apply({"params": p, **model_state}, images, train=True, quantizer_dropout=True,
                                update_codebook=True, rngs={"dropout": k_drop, "codebook_restart": k_restart},
                                mutable=["codebook", "quantizer_stats", "intermediates"])
      return out["recon"]
    rec = lambda w: lc.l2 * losses.l2_pixel_loss(recon(w), images) + lc.lpips * jnp.mean(
        task.lpips.apply({"params": lpips_params}, recon(w), images))
    gan = lambda w: losses.hinge_g_loss(task._disc_logits(disc["params"], disc["state"],
                                                          diff_augment(k_g, recon(w)), k_crop)[0])
    w = params["decoder"]["to_pixel"]
    return [losses.global_norm(jax.grad(f)(w)) for f in (rec, gan)]

  norms = [float(n) for n in jax.jit(gradient_norms)(state["params"], state["model_state"], state["disc"],
                                                     task.frozen["lpips"], batch["image"],
                                                     (k_drop, k_restart, k_g, k_crop))]
  return min(norms[0] / (norms[1] + 1e-4), lc.adaptive_max)


@pytest.mark.slow
def test_steps_lower_the_loss_and_touch_all_state(task, jitted):
  batch = fixed_batch()
  init, step = jitted
  state = init(jax.random.key(0), batch)
  state0 = jax.tree.map(np.asarray, state)
  # The step's adaptive GAN weight (from the one backward of LPIPS and the discriminator) is the
  # ratio of the two losses' full-model gradient norms w.r.t. the last layer.
  want = adaptive_weight_by_definition(task, state, batch)
  losses = []
  for _ in range(4):   # the first at warm-up's zero learning rate
    state, metrics = step(state, task.frozen, batch)
    losses.append(float(metrics["rec_loss"]))
    if len(losses) == 1:
      assert float(metrics["adaptive_weight"]) == pytest.approx(want, rel=1e-4)
  assert losses[-1] < losses[0]
  assert int(state["step"]) == 4 and int(state["skipped"]) == 0
  assert np.isfinite(float(metrics["d_loss"])) and np.isfinite(float(metrics["semantic_loss"]))
  # EMA codebook and usage counters moved; discriminator and LeCam state trained.
  cb0 = state0["model_state"]["codebook"]["quantizer_0"]["embedding"]
  assert not np.allclose(state["model_state"]["codebook"]["quantizer_0"]["embedding"], cb0)
  assert int(state["model_state"]["quantizer_stats"]["quantizer_1"]["usage_steps"]) == 4
  assert float(jnp.abs(state["lecam"].real_ema)) > 0
  d0 = jax.tree.leaves(state0["disc"]["params"])
  assert any(not np.allclose(a, b) for a, b in zip(d0, jax.tree.leaves(state["disc"]["params"])))


def test_non_finite_step_is_skipped(task, jitted):
  batch = fixed_batch()
  init, step = jitted
  state = init(jax.random.key(0), batch)
  before = jax.tree.map(np.asarray, state["params"])
  bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
  state, metrics = step(state, task.frozen, bad)
  assert int(state["skipped"]) == 1 and int(state["step"]) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("override,message", [
    ("--config.train.num_steps=0", "num_steps"),
    ("--config.data.source=folder:/definitely/missing", "/definitely/missing"),
    ("--config.model.quantizer.codebook_update=kmeans", "codebook_update"),
    ("--config.optim.lr=fast", "expected float"),
    ("--config.nonexistent=1", "unknown field"),
])
def test_bad_config_one_line_error(tmp_path, capsys, override, message):
  code = main(["train-tokenizer", "--config", TINY, "--workdir", str(tmp_path / "w"), override])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert message in err and len(err.splitlines()) == 1, err
