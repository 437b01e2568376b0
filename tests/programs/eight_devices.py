"""Every 8-device check in one process (one jax start, 8 fake CPU devices): argv PARITY_BUNDLE
PARITY_EXPECTED_NPZ MICRO_BUNDLE CONFIGS_DIR WORK_DIR.

Each check runs in turn whatever the others did and reports on stdout between `=== NAME` and
`=== NAME OK` (with `RESULT <json>` when it returns something) or `=== NAME FAILED` and the traceback;
tests/parallel/test_eight_devices.py reads one check each."""
import json
import os
import sys
import traceback

import eval_tokenizer_sharded
import inception_sharded
import jax
import sampling_sharded
import tokenizer_sharded
import training_sharded

assert jax.device_count() == 8, jax.devices()
parity_bundle, parity_expected, micro_bundle, configs, work = sys.argv[1:6]
CHECKS = {
    "tokenizer": lambda: tokenizer_sharded.run(parity_bundle, parity_expected),
    "inception": inception_sharded.run,
    "eval_tokenizer": lambda: eval_tokenizer_sharded.run(parity_bundle),
    "sampling": lambda: sampling_sharded.run(micro_bundle),
    "training": lambda: training_sharded.run(configs, os.path.join(work, "training")),
}
only = sys.argv[6:] or list(CHECKS)   # a developer may run some checks alone: ... NAME [NAME ...]
for name in only:
  print(f"=== {name}", flush=True)
  try:
    result = CHECKS[name]()
  except Exception:   # noqa: BLE001  (reported, and the next check still runs)
    print(traceback.format_exc(), flush=True)
    print(f"=== {name} FAILED", flush=True)
    continue
  if result is not None:
    print("RESULT " + json.dumps(result), flush=True)
  print(f"=== {name} OK", flush=True)
