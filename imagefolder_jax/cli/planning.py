"""`plan`: per-device memory and step time of a training config on a mesh, compiled on fake devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from imagefolder_jax.cli.common import CliError


def _add_plan(sub) -> None:
  p = sub.add_parser(
      "plan", help="compile a training step on N fake devices: per-device memory, FLOPs, step time, fits?",
      description="Compiles the train step of a config against abstract inputs on --devices fake CPU devices "
                  "(nothing is allocated) and prints per-device bytes of parameters, optimizer state, EMA, "
                  "frozen networks and XLA temporaries, FLOPs per step, and the step time the chip's peak "
                  "gives at --mfu. Example: imagefolder-jax plan --stage generator --config "
                  "configs/generator_imagenet.py --mesh data=1,fsdp=8,tensor=1 --devices 8 --chip h100")
  p.add_argument("--stage", choices=("tokenizer", "generator"), required=True)
  p.add_argument("--config", required=True, help="config file, optionally file.py:arg (overrides: --config.a.b=v)")
  p.add_argument("--mesh", default="", help="axis sizes, e.g. data=2,fsdp=4,tensor=1 (dcn_data=... across "
                                            "slices/nodes); unset axes come from the config's mesh")
  p.add_argument("--devices", type=int, required=True, help="devices in the mesh (fake CPU devices here)")
  p.add_argument("--chip", required=True, help="h100|h200|a100|v4|v5e|v5p|v6e|cpu: peak FLOP/s and memory")
  p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step time")
  p.add_argument("--pretokenized", action="store_true", help="generator: batches of pre-tokenized codes")
  p.add_argument("--no-compile", action="store_true",
                 help="skip the compile: exact state/frozen/batch bytes in seconds, no temporaries")
  p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
  p.set_defaults(run=_run_plan, accepts_overrides=True)


def _ensure_devices(n: int) -> bool:
  """Makes this process see `n` CPU devices if jax has not started its backends yet (True), else
  False: then the caller re-runs the command in a fresh process with the flag set. Fake devices must
  be configured before jax starts (XLA_FLAGS=--xla_force_host_platform_device_count=N)."""
  import jax
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    return jax.device_count() >= n and jax.default_backend() == "cpu"
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)
  return True


def _run_plan(args) -> None:
  if args.devices < 1:
    raise CliError(f"--devices {args.devices}: must be >= 1")
  if not _ensure_devices(args.devices):
    # jax already started (e.g. called in-process after other work): a fresh process gets the flag.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(args.devices),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={args.devices}").strip())
    argv = [a for a in sys.argv[1:]] if sys.argv and "plan" in sys.argv else None
    if argv is None:
      raise CliError("plan needs a fresh process when jax has started: run `imagefolder-jax plan ...` alone")
    code = subprocess.run([sys.executable, "-m", "imagefolder_jax.cli", *argv], env=env).returncode
    if code:
      raise SystemExit(code)
    return
  from imagefolder_jax import planning
  from imagefolder_jax.train.configuration import load_config
  config = load_config(args.config, args.overrides)
  result = planning.plan(args.stage, config, planning.parse_mesh(args.mesh), args.devices, args.chip.lower(),
                         mfu=args.mfu, pretokenized=True if args.pretokenized else None,
                         compile=not args.no_compile)
  if args.json:
    print(json.dumps(result.to_dict()))
  else:
    print(planning.format_plan(result))
    print(f"({'shardings' if args.no_compile else 'compiled'} on {args.devices} fake CPU devices: jax was configured with "
          f"--xla_force_host_platform_device_count={args.devices} before it started)")


VERBS = [_add_plan]
