"""Checks on 8 fake CPU devices, all run by one process (tests/programs/eight_devices.py: one jax
start, compiles shared), read here one check per test:

* tokenizer encode / decode / reconstruct with the batch over 8 devices equal 1 device;
* Inception features (random weights) over 8 devices equal 1, the last batch padded;
* `evaluate_tokenizer` on 8 devices equals 1 (padding rows never counted);
* `Generator.sample` over 8 devices equals 1 (the micro bundle);
* training under the logical-axis rules: generator steps on meshes (data, fsdp, tensor) = (8,1,1),
  (2,4,1), (2,2,2), (1,2,4) equal one device; parameter, EMA and Adam-moment shardings are what
  `parallel.LOGICAL_RULES` says; a state checkpointed on 8 devices resumes on 4 and on 1 with the
  same next steps; remat and gradient accumulation change the compiled memory, not the result;
  `plan`'s per-device bytes are what the trained state holds.

Training tolerance: global relative L2 error of all trainable parameters < 1e-5 after 3 AdamW steps
(float32; sharded reductions sum in another order, ~1e-7 per step, and Adam's normalisation can
amplify it on near-zero gradients — docs/design.md §4c).
"""
import json
import os
import re

import pytest
from support import CONFIGS, PARITY_DIR, run_program

pytestmark = pytest.mark.slow   # one process of a few minutes


@pytest.fixture(scope="module")
def checks(parity_bundle, micro_bundle, tmp_path_factory) -> dict:
  """{check name: its stdout}, from one run of tests/programs/eight_devices.py."""
  work = str(tmp_path_factory.mktemp("eight"))
  result = run_program("eight_devices.py", parity_bundle, os.path.join(PARITY_DIR, "expected.npz"), micro_bundle,
                       CONFIGS, work, devices=8, timeout=1800)
  sections = dict(re.findall(r"^=== (\w+)\n(.*?)^=== \1 (?:OK|FAILED)$", result.stdout, re.S | re.M))
  status = dict(re.findall(r"^=== (\w+) (OK|FAILED)$", result.stdout, re.M))
  return {"sections": sections, "status": status, "stderr": result.stderr, "returncode": result.returncode}


def _passed(checks, name) -> str:
  """The check's output; fails with its traceback (or the process's stderr) unless it passed."""
  status = checks["status"].get(name)
  assert status == "OK", checks["sections"].get(name, "") + "\n" + checks["stderr"][-4000:]
  return checks["sections"][name]


def test_tokenizer_sharded_over_8_devices(checks):
  _passed(checks, "tokenizer")


def test_inception_features_sharded_over_8_devices(checks):
  _passed(checks, "inception")


def test_evaluate_tokenizer_8_devices_equal_1(checks):
  out = json.loads(_passed(checks, "eval_tokenizer").split("RESULT ", 1)[1])
  one, eight = out["one"], out["eight"]
  assert one["num_images"] == eight["num_images"] == 11
  for k in ("psnr", "ssim"):
    assert eight[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6)
  for b1, b8 in zip(one["usage"]["branches"], eight["usage"]["branches"]):
    assert b8["used"] == b1["used"] and b8["perplexity"] == pytest.approx(b1["perplexity"], rel=1e-9)
    # 11 images: every one of them counted at scale 0 (1 code), none of the padding rows.
    assert 0 < b1["scales"][0]["used"] <= 11 / 4096
  assert one["lpips"] is None and "lpips" in one["absent"] and one["rfid"] is None


def test_sampling_sharded_over_8_devices_equals_one(checks):
  _passed(checks, "sampling")


def test_training_under_logical_rules(checks):
  out = _passed(checks, "training")
  assert "meshes OK" in out and "resume OK" in out and "memory OK" in out and "plan OK" in out, out
