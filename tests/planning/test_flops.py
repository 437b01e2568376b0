"""Analytic training FLOPs (imagefolder_jax.planning.flops) against XLA's own count of the compiled step.

XLA's `cost_analysis()['flops']` counts every op: the matmuls (2·M·N·K, as we do) plus element-wise
work (LayerNorm, softmax, GELU, the loss) that the model-FLOPs convention leaves out. So XLA's number
must lie in [1, 1.25] × the analytic one on these tiny configs (measured at depth 2: 1.05 for the generator,
1.08 for the tokenizer; element-wise work weighs more at width 64 than at real widths).
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from support import ROOT

from imagefolder_jax.models.generator import GeneratorConfig, NextScaleGenerator, generator_loss
from imagefolder_jax.models.quantizer import QuantizerConfig
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig
from imagefolder_jax.models.vit import ViTConfig
from imagefolder_jax.planning import flops
from imagefolder_jax.train.configuration import load_config
from imagefolder_jax.train.tokenizer_task import TokenizerTask

B = 4


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_generator_train_flops_match_xla():
  gc = GeneratorConfig(depth=1, width=64, num_heads=2, num_classes=9, codebook_size=256, latent_dim=8,
                       scales=(1, 2, 3, 4, 6), num_branches=2)
  model = NextScaleGenerator(gc)
  labels = jnp.zeros((B,), jnp.int32)
  inputs = jnp.zeros((B, gc.num_tokens - 1, gc.input_dim))
  targets = jnp.zeros((B, gc.num_tokens, 2), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), labels[:1], inputs[:1]))["params"]
  loss = lambda p: generator_loss(model.apply({"params": p}, labels, inputs), targets)
  xla = _xla_flops(jax.grad(loss), params) / B
  # XLA runs the masked attention densely, so compare with the dense pair count.
  analytic = 3 * sum(flops.generator_parts(gc, dense_attention=True).values())
  assert 1.0 <= xla / analytic <= 1.25, (xla, analytic)
  # The model-FLOPs count keeps only the pairs the block-causal mask allows: each scale's side²
  # queries see every position up to the end of their scale.
  assert flops._scale_pairs(gc.scales) == 1 * 1 + 4 * 5 + 9 * 14 + 16 * 30 + 36 * 66
  per_example = flops.train_flops_per_example(gc)
  assert per_example["total"] == pytest.approx(sum(v for k, v in per_example.items() if k != "total"))
  assert per_example["attention"] < 3 * flops.generator_parts(gc, dense_attention=True)["attention"]


def test_tokenizer_train_flops_match_xla():
  tc = TokenizerConfig(vit=ViTConfig(width=64, depth=1, num_heads=2, mlp_ratio=4.0, patch_size=8, image_size=32),
                       quantizer=QuantizerConfig(codebook_size=256, latent_dim=8, scales=(1, 2, 4), num_phi=2),
                       num_branches=2)
  model = ImageFolderTokenizer(tc)
  images = jnp.zeros((B, 32, 32, 3))
  variables = nn.unbox(model.init(jax.random.key(0), images[:1]))
  params = variables.pop("params")
  variables.pop("intermediates", None)

  def loss(p):
    out, _ = model.apply({"params": p, **variables}, images, train=True, mutable=["quantizer_stats", "intermediates"])
    return jnp.mean((out["recon"] - images) ** 2) + out["vq_loss"] + out["commit_loss"]

  xla = _xla_flops(jax.grad(loss), params) / B
  analytic = flops.train_flops_per_example(tc)["total"]
  assert 1.0 <= xla / analytic <= 1.25, (xla, analytic)


def test_frozen_networks_forward_only():
  # LPIPS-VGG16 at 224 px: 15.35 GMACs for the 13 convs (the well-known VGG16 15.5 G minus the
  # 0.12 G of fc layers LPIPS does not run) -> 2 × 15.35e9 FLOPs.
  assert flops.lpips_forward(224) == pytest.approx(2 * 15.35e9, rel=0.01)
  tc = TokenizerConfig(vit=ViTConfig(width=64, depth=2, num_heads=2, patch_size=8, image_size=32),
                       quantizer=QuantizerConfig(codebook_size=256, latent_dim=8, scales=(1, 2, 4), num_phi=2))
  plain = flops.tokenizer_train_flops(tc)["total"]
  with_lpips = flops.tokenizer_train_flops(tc, lpips=True)
  assert with_lpips["total"] - plain == pytest.approx(2 * flops.lpips_forward(32))
  # A task counts its DINOv2 teacher's forward whether its frozen networks are loaded (training) or
  # only laid out (`plan`).
  config = load_config(os.path.join(ROOT, "configs", "tokenizer_tiny.py"))
  planned = TokenizerTask(config, load_frozen=False)
  planned.abstract_frozen()
  counts = [flops.train_flops_per_example(t) for t in (planned, TokenizerTask(config))]
  assert counts[0] == counts[1] and counts[0]["teacher_forward"] > 0


def test_mfu_and_peaks():
  out = flops.mfu(flops_per_step=2e12, step_seconds=0.5, num_devices=4, peak_per_device=flops.PEAK_FLOPS["a100"])
  assert out["tflops_per_device"] == pytest.approx(1.0)
  assert out["mfu"] == pytest.approx(1e12 / 312e12)
  rate = flops.measure_cpu_matmul_rate(n=256, seconds=0.05)
  assert 1e8 < rate < 1e14  # a CPU does between 0.1 GFLOP/s and 100 TFLOP/s of float32
  name, peak = flops.peak_flops_per_device(jax.devices("cpu")[0], cpu_rate=5e10)
  assert (name, peak) == ("cpu", 5e10)
