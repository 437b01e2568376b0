"""Training losses against direct NumPy formulas."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagefolder_jax.train import losses

RNG = np.random.default_rng(0)


def _relu(x):
  return np.maximum(x, 0.0)


def test_hinge_losses_match_numpy():
  real = RNG.normal(size=(4, 50)).astype(np.float32)
  fake = RNG.normal(size=(4, 50)).astype(np.float32)
  want_d = 0.5 * (_relu(1 - real).mean() + _relu(1 + fake).mean())
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), want_d, rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_g_loss(fake), -fake.mean(), rtol=1e-6)
  # PatchGAN maps (B, h, w, 1) work the same way.
  np.testing.assert_allclose(losses.hinge_d_loss(real.reshape(4, 5, 10, 1), fake.reshape(4, 5, 10, 1)), want_d,
                             rtol=1e-6)


def test_l2_pixel_loss():
  a = RNG.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  b = RNG.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.l2_pixel_loss(a, b), ((a - b) ** 2).mean(), rtol=1e-6)


def test_lecam_ema_update_and_loss():
  state = losses.lecam_init()
  ema_r = ema_f = 0.0
  for step in range(3):
    real = RNG.normal(1.0, 1.0, (8, 20)).astype(np.float32)
    fake = RNG.normal(-1.0, 1.0, (8, 20)).astype(np.float32)
    state = losses.lecam_update(state, real, fake, decay=0.9)
    ema_r = 0.9 * ema_r + 0.1 * real.mean()
    ema_f = 0.9 * ema_f + 0.1 * fake.mean()
    np.testing.assert_allclose(state.real_ema, ema_r, rtol=1e-5)
    np.testing.assert_allclose(state.fake_ema, ema_f, rtol=1e-5)
    want = (_relu(real - ema_f) ** 2).mean() + (_relu(ema_r - fake) ** 2).mean()
    np.testing.assert_allclose(losses.lecam_loss(real, fake, state), want, rtol=1e-5)
  # No gradient reaches the EMA state; the logits get one.
  g_state = jax.grad(lambda s: losses.lecam_loss(real, fake, s))(state)
  assert float(g_state.real_ema) == 0.0 and float(g_state.fake_ema) == 0.0
  g_update = jax.grad(lambda r: losses.lecam_update(state, r, fake).real_ema)(jnp.asarray(real))
  assert float(jnp.abs(g_update).sum()) == 0.0
  assert float(jnp.abs(jax.grad(lambda r: losses.lecam_loss(r, fake, state))(jnp.asarray(real))).sum()) > 0
  # The state is a pytree that jit carries.
  jitted = jax.jit(losses.lecam_update)(state, real, fake)
  assert isinstance(jitted, losses.LeCamState)


def test_adaptive_weight_against_manual_linear_layer_grads():
  h = RNG.normal(size=(6, 5)).astype(np.float32)  # last-layer input (N, D_in)
  w = RNG.normal(size=(5, 3)).astype(np.float32)  # last-layer kernel (D_in, D_out)
  target = RNG.normal(size=(6, 3)).astype(np.float32)
  c = RNG.normal(size=(6, 3)).astype(np.float32)
  rec_fn = lambda y: jnp.mean((y - target) ** 2)
  gan_fn = lambda y: -jnp.mean(y * c)
  layer = lambda k: h @ k
  y = h @ w
  g_rec, g_gan = (losses.last_layer_grad_norm(layer, jnp.asarray(w), jax.grad(f)(jnp.asarray(y)))
                  for f in (rec_fn, gan_fn))
  manual_rec = h.T @ (2 * (y - target) / y.size)
  manual_gan = h.T @ (-c / y.size)
  np.testing.assert_allclose(g_rec, np.linalg.norm(manual_rec), rtol=1e-5)
  np.testing.assert_allclose(g_gan, np.linalg.norm(manual_gan), rtol=1e-5)
  # = the norm of the loss's own gradient w.r.t. the kernel
  np.testing.assert_allclose(g_rec, np.linalg.norm(jax.grad(lambda k: rec_fn(layer(k)))(jnp.asarray(w))), rtol=1e-5)
  want = np.linalg.norm(manual_rec) / (np.linalg.norm(manual_gan) + 1e-4)
  np.testing.assert_allclose(losses.adaptive_weight(g_rec, g_gan), want, rtol=1e-5)
  # Clamped to [0, max] and free of gradient.
  np.testing.assert_allclose(losses.adaptive_weight(jnp.float32(5.0), jnp.float32(0.0)), 1e4)
  assert float(jax.grad(lambda a: losses.adaptive_weight(a, jnp.float32(2.0)))(jnp.float32(1.0))) == 0.0
  # A pytree last layer (kernel + bias) uses the global norm over its leaves.
  params = {"kernel": jnp.asarray(w), "bias": jnp.zeros(3)}
  out_grad = jax.grad(rec_fn)(jnp.asarray(y))
  g_tree = losses.last_layer_grad_norm(lambda p: h @ p["kernel"] + p["bias"], params, out_grad)
  bias_grad = np.asarray(out_grad).sum(0)
  np.testing.assert_allclose(g_tree, np.sqrt(np.linalg.norm(manual_rec) ** 2 + np.sum(bias_grad ** 2)), rtol=1e-5)


def _np_clip_loss(student, teacher):
  logits = teacher @ student.T

  def ce(lg):
    lg = lg - lg.max(axis=1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
    return -np.diag(logp).mean()

  return 0.5 * (ce(logits) + ce(logits.T))


def test_semantic_contrastive_loss_matches_numpy():
  student = RNG.normal(size=(8, 4)).astype(np.float32)
  teacher = RNG.normal(size=(8, 4)).astype(np.float32)
  np.testing.assert_allclose(losses.semantic_contrastive_loss(student, teacher), _np_clip_loss(student, teacher),
                             rtol=1e-5)
  valid = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
  got = losses.semantic_contrastive_loss(student, teacher, jnp.asarray(valid))
  np.testing.assert_allclose(got, _np_clip_loss(student[valid], teacher[valid]), rtol=1e-5)
  # Dropped samples neither score nor serve as negatives: changing them changes nothing.
  s2, t2 = student.copy(), teacher.copy()
  s2[1] += 100.0
  t2[4] -= 50.0
  np.testing.assert_allclose(losses.semantic_contrastive_loss(s2, t2, jnp.asarray(valid)), got, rtol=1e-6)
  grads = jax.grad(losses.semantic_contrastive_loss, argnums=(0, 1))(jnp.asarray(student), jnp.asarray(teacher),
                                                                     jnp.asarray(valid))
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[~valid], 0.0)
  none_valid = jnp.zeros((8,), bool)
  assert float(losses.semantic_contrastive_loss(student, teacher, none_valid)) == 0.0
  g_none = jax.grad(losses.semantic_contrastive_loss)(jnp.asarray(student), jnp.asarray(teacher), none_valid)
  np.testing.assert_array_equal(np.asarray(g_none), 0.0)
  with pytest.raises(ValueError, match="valid"):
    losses.semantic_contrastive_loss(student, teacher, jnp.ones((7,), bool))


def test_vq_losses_match_numpy_with_and_without_dropout_mask():
  s, b = 4, 5
  f = RNG.normal(size=(b, 3, 3, 2)).astype(np.float32)
  f_hats = [RNG.normal(size=(b, 3, 3, 2)).astype(np.float32) for _ in range(s)]
  out = losses.vq_losses([jnp.asarray(x) for x in f_hats], jnp.asarray(f), beta=0.25)
  mse = [((x - f) ** 2).mean() for x in f_hats]
  np.testing.assert_allclose(out.vq, sum(mse) / s, rtol=1e-5)
  np.testing.assert_allclose(out.commit, 0.25 * sum(mse) / s, rtol=1e-5)
  np.testing.assert_allclose(out.total, 1.25 * sum(mse) / s, rtol=1e-5)

  n = np.array([4, 2, 3, 4, 4])  # quantizer dropout keeps scales s < n_b
  mask = np.arange(s)[None, :] < n[:, None]
  masked = losses.vq_losses([jnp.asarray(x) for x in f_hats], jnp.asarray(f), 0.25, jnp.asarray(mask))
  per = [((x - f) ** 2).mean(axis=(1, 2, 3)) for x in f_hats]
  want = sum(per[i][mask[:, i]].mean() for i in range(s)) / s
  np.testing.assert_allclose(masked.vq, want, rtol=1e-5)
  np.testing.assert_allclose(masked.commit, 0.25 * want, rtol=1e-5)
  # A scale no sample reaches contributes 0, not NaN.
  none = np.zeros((b, s), bool)
  none[:, 0] = True
  out0 = losses.vq_losses([jnp.asarray(x) for x in f_hats], jnp.asarray(f), 0.25, jnp.asarray(none))
  np.testing.assert_allclose(out0.vq, per[0].mean() / s, rtol=1e-5)

  # vq trains f̂ (codebook, φ) only; commit trains f (encoder) only.
  g_vq = jax.grad(lambda fh, ff: losses.vq_losses([fh], ff).vq, argnums=(0, 1))(jnp.asarray(f_hats[0]), jnp.asarray(f))
  g_cm = jax.grad(lambda fh, ff: losses.vq_losses([fh], ff).commit, argnums=(0, 1))(jnp.asarray(f_hats[0]),
                                                                                  jnp.asarray(f))
  np.testing.assert_allclose(g_vq[0], 2 * (f_hats[0] - f) / f.size, rtol=1e-4, atol=1e-7)
  assert float(jnp.abs(g_vq[1]).sum()) == 0.0
  assert float(jnp.abs(g_cm[0]).sum()) == 0.0
  np.testing.assert_allclose(g_cm[1], 0.25 * 2 * (f - f_hats[0]) / f.size, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="scale_mask"):
    losses.vq_losses([jnp.asarray(x) for x in f_hats], jnp.asarray(f), 0.25, jnp.ones((b, s + 1), bool))
