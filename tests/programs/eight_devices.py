"""8-device checks in one process (one jax start, 8 fake CPU devices):

  eight_devices.py [--micro-bundle B] [--configs DIR --work DIR] NAME...

NAME: tokenizer, inception, eval_tokenizer, sampling (the micro bundle), attention_kernel, training
(configs and a work directory), checkpoint (a work directory).

Each check runs in turn whatever the others did and reports on stdout between `=== NAME` and
`=== NAME OK` (with `RESULT <json>` when it returns something) or `=== NAME FAILED` and the traceback;
tests/parallel/test_eight_devices*.py read one check each (support.eight_device_checks)."""
import argparse
import json
import os
import traceback

import attention_kernel_sharded
import checkpoint_sharded
import eval_tokenizer_sharded
import inception_sharded
import jax
import sampling_sharded
import tokenizer_sharded
import training_sharded

assert jax.device_count() == 8, jax.devices()
parser = argparse.ArgumentParser()
for flag in ("--micro-bundle", "--configs", "--work"):
  parser.add_argument(flag)
parser.add_argument("checks", nargs="+")
args = parser.parse_args()
CHECKS = {
    "tokenizer": lambda: tokenizer_sharded.run(args.micro_bundle),
    "inception": inception_sharded.run,
    "eval_tokenizer": lambda: eval_tokenizer_sharded.run(args.micro_bundle),
    "sampling": lambda: sampling_sharded.run(args.micro_bundle),
    "attention_kernel": attention_kernel_sharded.run,
    "training": lambda: training_sharded.run(args.configs, os.path.join(args.work, "training")),
    "checkpoint": lambda: checkpoint_sharded.run(os.path.join(args.work, "checkpoint")),
}
for name in args.checks:
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
