"""Inference and evaluation on 8 fake CPU devices, all run by one process
(tests/programs/eight_devices.py: one jax start, compiles shared; the micro bundle: the property
does not depend on the model), read here one check per test:

* tokenizer encode / decode / reconstruct with the batch over 8 devices equal 1 device;
* Inception features (random weights) over 8 devices equal 1, the last batch padded;
* `evaluate_tokenizer` on 8 devices equals 1 (padding rows never counted);
* `Generator.sample` over 8 devices equals 1 (the micro bundle);
* the TPU attention kernel (interpreted) inside shard_map, batch and heads split, equals XLA's.

Training on 8 devices is tests/parallel/test_eight_devices_training.py: a second process, so the
two run side by side on two test workers.
"""
import json

import pytest
from support import eight_device_check_passed, eight_device_checks

pytestmark = pytest.mark.slow   # one process of a few minutes


@pytest.fixture(scope="module")
def checks(micro_bundle) -> dict:
  return eight_device_checks("tokenizer", "inception", "eval_tokenizer", "sampling", "attention_kernel",
                             micro_bundle=micro_bundle)


def test_tokenizer_sharded_over_8_devices(checks):
  eight_device_check_passed(checks, "tokenizer")


def test_inception_features_sharded_over_8_devices(checks):
  eight_device_check_passed(checks, "inception")


def test_evaluate_tokenizer_8_devices_equal_1(checks):
  out = json.loads(eight_device_check_passed(checks, "eval_tokenizer").split("RESULT ", 1)[1])
  one, eight = out["one"], out["eight"]
  assert one["num_images"] == eight["num_images"] == 11
  for k in ("psnr", "ssim"):
    assert eight[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6)
  for b1, b8 in zip(one["usage"]["branches"], eight["usage"]["branches"]):
    assert b8["used"] == b1["used"] and b8["perplexity"] == pytest.approx(b1["perplexity"], rel=1e-9)
    # 11 images: every one of them counted at scale 0 (1 code), none of the padding rows.
    assert 0 < b1["scales"][0]["used"] <= 11 / 64
  assert one["lpips"] is None and "lpips" in one["absent"] and one["rfid"] is None


def test_sampling_sharded_over_8_devices_equals_one(checks):
  eight_device_check_passed(checks, "sampling")


def test_attention_kernel_per_device_equals_xla_attention(checks):
  """The TPU attention kernel (interpreted) inside shard_map, batch and heads split over 8 devices."""
  eight_device_check_passed(checks, "attention_kernel")
