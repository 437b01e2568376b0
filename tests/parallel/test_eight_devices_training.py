"""Training under the logical-axis rules on 8 fake CPU devices (tests/programs/training_sharded.py,
run by tests/programs/eight_devices.py): generator steps on meshes (data, fsdp, tensor) = (8,1,1),
(2,4,1), (2,2,2), (1,2,4) equal one device; parameter, EMA and Adam-moment shardings are what
`parallel.LOGICAL_RULES` says; a state checkpointed on 8 devices resumes on 4 and on 1 with the
same next steps; remat and gradient accumulation change the compiled memory, not the result;
`plan`'s per-device bytes are what the trained state holds; a checkpoint of arrays replicated over
the 8 devices is saved replica-parallel only where each replica's slice is large enough
(tests/programs/checkpoint_sharded.py), and restores equal.

Tolerance: global relative L2 error of all trainable parameters < 1e-5 after 3 AdamW steps
(float32; sharded reductions sum in another order, ~1e-7 per step, and Adam's normalisation can
amplify it on near-zero gradients — docs/design.md §4c).
"""
import json

import pytest
from support import CONFIGS, eight_device_check_passed, eight_device_checks

from imagefolder_jax.train import checkpointing

pytestmark = pytest.mark.slow   # one process of a few minutes


def test_training_under_logical_rules(tmp_path):
  checks = eight_device_checks("training", "checkpoint", configs=CONFIGS, work=str(tmp_path))
  out = eight_device_check_passed(checks, "training")
  assert "meshes OK" in out and "resume OK" in out and "memory OK" in out and "plan OK" in out, out
  out = json.loads(eight_device_check_passed(checks, "checkpoint").split("RESULT ", 1)[1])
  assert out == {"slices": 8, "slice_bytes": 2 * checkpointing.REPLICA_PARALLEL_MIN_SLICE_BYTES}, out
