"""`plan`: will a training step fit, and how fast: compiled for a TPU / GPU topology (no accelerator
needed) or on fake CPU devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from imagefolder_jax.cli.common import PROG, CliError


def _add_plan(sub) -> None:
  p = sub.add_parser(
      "plan", help="compile a training step or the sampler for a TPU/GPU topology (or fake CPU devices): "
                   "memory per chip, fits?, collectives, step time",
      description="Compiles the train step of a config (or, with --program sample, the sampler) against abstract "
                  "inputs (nothing is allocated). With --topology, the TPU or GPU compiler compiles it for "
                  "compile-only devices of that topology on this machine (needs the tpu / gpu-compile extra) "
                  "and prints per chip the arguments, outputs, "
                  "temporaries and peak against the chip's memory, FLOPs, collectives and a roofline step time. "
                  "Without it, --devices fake CPU devices (XLA:CPU's buffers) and --chip's peak at --mfu. "
                  "Examples: imagefolder-jax plan --stage generator --config configs/generator_imagenet.py "
                  "--topology v5p-64 --mesh fsdp=8 --pretokenized; imagefolder-jax plan --stage tokenizer "
                  "--config configs/tokenizer_imagenet.py --topology h100-16 --mesh fsdp=8")
  p.add_argument("--program", choices=("train", "sample"), default="train",
                 help="train: the --stage's train step; sample: the generator's batch sampler (needs --topology "
                      "and --batch; --config is a generator config)")
  p.add_argument("--stage", choices=("tokenizer", "generator"), help="--program train: which train step")
  p.add_argument("--batch", type=int, help="--program sample: samples per sampler call over all chips")
  p.add_argument("--top-k", type=int, default=750, help="--program sample: top-k of the filter (0 = off)")
  p.add_argument("--top-p", type=float, default=0.95, help="--program sample: top-p of the filter (1 = off)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="--program sample: generator compute dtype")
  p.add_argument("--config", required=True, help="config file, optionally file.py:arg (overrides: --config.a.b=v)")
  p.add_argument("--topology", help="v4-32, v5p-64, v5e-256 (v5litepod-256), v6e-64, v5p:4x4x4, h100-8, h100-16, "
                                    "h200-8, a100-8: compile with that platform's compiler")
  p.add_argument("--slices", type=int, default=1, help="--topology: this many TPU slices over DCN (dcn_data)")
  p.add_argument("--mesh", default="", help="axis sizes, e.g. data=2,fsdp=4,tensor=1 (dcn_data=... across "
                                            "slices/nodes); unset axes come from the config's mesh")
  p.add_argument("--devices", type=int, help="without --topology: devices in the mesh (fake CPU devices here)")
  p.add_argument("--chip", help="without --topology: h100|h200|a100|v4|v5e|v5p|v6e|cpu: peak FLOP/s and memory")
  p.add_argument("--mfu", type=float, default=0.4, help="without --topology: model FLOPs utilisation assumed")
  p.add_argument("--pretokenized", action="store_true", help="generator: batches of pre-tokenized codes")
  p.add_argument("--no-compile", action="store_true",
                 help="skip the compile: exact state/frozen/batch bytes in seconds, no temporaries")
  p.add_argument("--largest-batch", action="store_true",
                 help="with --topology: also find the largest global batch that fits, by a search over compiles "
                      "(from the config's batch, or --batch, each probe aims where the fitting probes' peak memory "
                      "reaches the chip's limit, with bisection as the safeguard); the plan printed is the starting "
                      "batch's")
  p.add_argument("--batch-step", type=int,
                 help="--largest-batch: granularity of the searched global batches (default 8 per batch shard of "
                      "the mesh, times train.grad_accum)")
  p.add_argument("--largest-batch-limit", type=int,
                 help="--largest-batch: the largest global batch tried (default 64 x the starting batch)")
  p.add_argument("--largest-batch-from", type=int,
                 help="--largest-batch: start the search at this global batch instead of the config's (e.g. twice "
                      "the largest batch of a topology half the size): fewer compiles when it is close")
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
  from imagefolder_jax import planning
  from imagefolder_jax.train.configuration import load_config
  if args.program == "train" and args.stage is None:
    raise CliError("plan --program train needs --stage tokenizer or --stage generator")
  if args.program == "sample" and (args.topology is None or args.batch is None):
    raise CliError("plan --program sample needs --topology and --batch")
  if args.batch is not None and args.program != "sample":
    raise CliError("--batch goes with --program sample (training batches come from --config.data.batch_size)")
  topology = None
  if args.topology:
    if args.devices is not None or args.chip is not None:
      raise CliError("--topology names the devices and the chip: leave out --devices and --chip")
    topology = planning.parse_topology(args.topology, args.slices)
    import jax
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized():
      jax.config.update("jax_platforms", "cpu")  # nothing runs; the CUDA plugin registers without CUDA
  else:
    if args.devices is None or args.chip is None:
      raise CliError("plan needs --topology NAME, or --devices N and --chip NAME (fake CPU devices)")
    if args.slices != 1:
      raise CliError("--slices goes with --topology")
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
  if args.largest_batch and (topology is None or args.no_compile):
    raise CliError("--largest-batch needs --topology and a compile (fake CPU devices' temporaries are not a "
                   "GPU or TPU plan)")
  if not args.largest_batch and any(v is not None for v in (args.batch_step, args.largest_batch_limit,
                                                              args.largest_batch_from)):
    raise CliError("--batch-step, --largest-batch-limit and --largest-batch-from go with --largest-batch")
  config = load_config(args.config, args.overrides)
  mesh_sizes = planning.parse_mesh(args.mesh)

  def plan_at(batch: int):
    if args.program == "sample":
      from imagefolder_jax.planning.sampler import plan_sampler
      return plan_sampler(config, mesh_sizes, topology, batch, top_k=args.top_k, top_p=args.top_p,
                          dtype=args.dtype)
    config.data.batch_size = batch
    return planning.plan(args.stage, config, mesh_sizes, args.devices, args.chip.lower() if args.chip else None,
                         mfu=args.mfu, pretokenized=True if args.pretokenized else None,
                         compile=not args.no_compile, topology=topology)

  start = args.batch if args.program == "sample" else int(config.data.batch_size)
  if args.largest_batch_from is not None and args.largest_batch_from < 1:
    raise CliError(f"--largest-batch-from {args.largest_batch_from}: must be >= 1")
  search_start = args.largest_batch_from or start
  if args.largest_batch_limit is not None and args.largest_batch_limit < search_start:
    raise CliError(f"--largest-batch-limit {args.largest_batch_limit}: must be at least the starting batch "
                   f"{search_start}")
  if args.batch_step is not None and args.batch_step < 1:
    raise CliError(f"--batch-step {args.batch_step}: must be >= 1")
  result = plan_at(start)
  search = None
  if args.largest_batch:
    search = _search_largest_batch(args, config, plan_at, start, result, search_start)
  if args.json:
    print(json.dumps({**result.to_dict(), **({"largest_batch": search.to_dict()} if search else {})}))
    return
  print(planning.format_plan(result))
  if search is not None:
    print(f"  largest batch   {search.describe()}")
  if topology is None:
    print(f"({'shardings' if args.no_compile else 'compiled'} on {args.devices} fake CPU devices: jax was configured "
          f"with --xla_force_host_platform_device_count={args.devices} before it started)")


def _search_largest_batch(args, config, plan_at, start: int, first, search_start: int):
  """planning.batch_search over plan_at from `search_start` (rounded down to the step), reusing the
  plan already made at `start` if the search probes it."""
  from imagefolder_jax.planning.batch_search import largest_fitting_batch
  shards = first.mesh.get("data", 1) * first.mesh.get("fsdp", 1)
  accumulation = 1 if args.program == "sample" else int(config.train.get("grad_accum", 1) or 1)
  step = args.batch_step or 8 * shards * accumulation
  if step % (shards * accumulation):
    raise CliError(f"--batch-step {step}: must be a multiple of the {shards} batch shards of the mesh"
                   + (f" times train.grad_accum={accumulation}" if accumulation > 1 else ""))
  begin = max(step, search_start // step * step)
  limit = max(args.largest_batch_limit or 64 * begin, begin)
  made = {start: first}

  def probe(batch: int):
    if batch in made:
      return made[batch]
    # One compile per probe, minutes each for large programs: say what is being compiled and what came of it.
    print(f"{PROG} plan: largest batch: compiling batch {batch} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    plan = plan_at(batch)
    peak, limit = getattr(plan, "peak_bytes", None), getattr(plan, "memory_limit", None)
    memory = f", peak {peak / 2 ** 30:.1f} of {limit / 2 ** 30:.1f} GiB per chip" if peak and limit else ""
    print(f"{PROG} plan: largest batch: batch {batch} {'fits' if plan.fits else 'does not fit'}{memory} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return plan

  return largest_fitting_batch(probe, begin, step, limit, known=made)


VERBS = [_add_plan]
