"""`plan --topology`: compile-only TPU / GPU devices, the compiled programs' memory, collectives and
verdicts (the tpu and gpu-compile extras; no accelerator needed). Small models, small batches."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from support import ROOT

from imagefolder_jax import planning
from imagefolder_jax.planning import hlo
from imagefolder_jax.train.configuration import load_config

TINY_GENERATOR = os.path.join(ROOT, "configs", "generator_tiny.py")
TINY_TOKENIZER = os.path.join(ROOT, "configs", "tokenizer_tiny.py")


def test_topology_names_as_sold():
  cases = {"v4-32": ("v4", (2, 2, 4)), "v5p-64": ("v5p", (2, 4, 4)), "v5p-128": ("v5p", (4, 4, 4)),
           "v5e-256": ("v5e", (16, 16)), "v5litepod-8": ("v5e", (2, 4)), "v6e-64": ("v6e", (8, 8)),
           "v5e-1": ("v5e", (1, 1)), "v5p:4x4x8": ("v5p", (4, 4, 8)), "h100-16": ("h100", (2, 8)),
           "a100-8": ("a100", (1, 8))}
  for name, (chip, shape) in cases.items():
    t = planning.parse_topology(name)
    assert (t.chip.name, t.shape) == (chip, shape), name
  assert planning.parse_topology("v5p-64", slices=2).chips == 64
  for bad, message in (("v7-8", "expected NAME-COUNT"), ("v5p-63", "TensorCores"), ("h100-12", "whole nodes"),
                       ("v5e:2x2x2", "2 sides"), ("v5e-12", "power-of-two")):
    with pytest.raises(planning.PlanError, match=message):
      planning.parse_topology(bad)
  with pytest.raises(planning.PlanError, match="--slices"):
    planning.parse_topology("h100-8", slices=2)


def _compiled_collectives(devices, fn, *shapes):
  mesh = Mesh(np.asarray(devices), ("x",))
  body = jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
  args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, P("x"))) for s in shapes]
  from jax._src import config as jax_config
  with jax_config.enable_compilation_cache(False):   # compile-only programs cannot be cached
    return hlo.collectives(jax.jit(body).lower(*args).compile().as_text(), devices)


@pytest.mark.parametrize("topology", ["v5e-4", "h100-4"])
def test_collectives_read_from_the_compiled_program(topology):
  devices = planning.compile_only_devices(planning.parse_topology(topology))
  assert len(devices) == 4 and jax.default_backend() == "cpu"   # compile-only, on a CPU-only host

  def loop(x):  # three all-reduces of (256,) float32 inside a loop: the trip count is read
    return jax.lax.fori_loop(0, 3, lambda i, a: a + jax.lax.psum(a, "x"), x)

  found = _compiled_collectives(devices, loop, (1024,))
  assert found["all-reduce"]["count"] == 3 and found["all-reduce"]["bytes"] == 3 * 256 * 4, found
  found = _compiled_collectives(devices, lambda x: jax.lax.all_gather(x, "x", tiled=True), (1024, 8))
  assert found["all-gather"]["count"] == 1 and found["all-gather"]["bytes"] == 1024 * 8 * 4, found
  assert found["all-gather"]["group_sizes"] == [4]
  # A matmul over a sharded contraction into a row-sharded result: the partitioner's all-reduce and
  # slice, which the TPU compiler fuses into a reduce-scatter (an `all-reduce-scatter` fusion).
  mesh = Mesh(np.asarray(devices), ("x",))
  a = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "x")))
  b = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
  from jax._src import config as jax_config
  with jax_config.enable_compilation_cache(False):
    text = jax.jit(lambda a, b: a @ b, out_shardings=NamedSharding(mesh, P("x"))).lower(a, b).compile().as_text()
  found = hlo.collectives(text, devices)
  assert list(found) == ["reduce-scatter"] and found["reduce-scatter"]["bytes"] == 256 * 256 * 2, found
  assert found["reduce-scatter"]["wire_bytes"] == 3 * 256 * 256 * 2


def _plan(stage, topology, mesh="", slices=1, *overrides, config=None):
  config = load_config(config or (TINY_GENERATOR if stage == "generator" else TINY_TOKENIZER), list(overrides))
  return planning.plan(stage, config, planning.parse_mesh(mesh), topology=planning.parse_topology(topology, slices),
                       pretokenized=stage == "generator" or None)


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "imagefolder_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                        env=env or dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)


@pytest.fixture(scope="module")
def generator_data_plan():
  """`plan --json` of the tiny generator's step on v5e-4 (data=4), from a fresh CLI process: (the
  JSON object, the process's stderr)."""
  r = _cli("plan", "--stage", "generator", "--config", TINY_GENERATOR, "--topology", "v5e-4", "--pretokenized",
           "--mesh", "data=4", "--json")
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout), r.stderr


@pytest.mark.slow
def test_generator_step_on_tpu_fsdp_and_slices(generator_data_plan):
  data = types.SimpleNamespace(**generator_data_plan[0])
  assert data.compiler == "tpu" and data.fits and data.devices == 4
  assert 0 < data.compiled_peak_bytes < data.memory_limit and data.argument_bytes > 0
  assert data.collectives["all-reduce"]["count"] >= 1                  # the gradient reduction
  assert data.roofline["seconds"] > 0 and data.images_per_second > 0
  assert data.optimal_seconds is None or data.optimal_seconds > 0      # never a negative time
  # Compiled for TPUs, the teacher-forced attention is the fused kernel, priced beside XLA's count.
  assert data.kernel_flops_per_device > 0 and data.roofline["flops_per_chip"] >= data.xla_flops_per_device
  # Two slices of 4 chips, FSDP inside each (one compile for both properties; with
  # train.attention_kernel=xla: XLA's attention, no kernel). The rules shard the model width over
  # fsdp: parameters (and their Adam moments) per chip shrink, and are gathered for use.
  two = _plan("generator", "v5e-4", "data=1,fsdp=4", 2, "--config.data.batch_size=16",
              "--config.train.attention_kernel=xla")
  assert two.devices == 8 and two.mesh == {"data": 2, "fsdp": 4, "tensor": 1} and two.fits
  assert two.kernel_flops_per_device == 0
  assert two.params_bytes < 0.5 * data.params_bytes and two.opt_state_bytes < 0.5 * data.opt_state_bytes
  assert two.argument_bytes < data.argument_bytes      # the same 2 images per chip
  assert two.collectives["all-gather"]["count"] >= 1                   # parameters gathered for use
  # Data parallel across the slices (dcn_data=2): only the gradient reduction crosses DCN.
  assert two.collectives["dcn-all-reduce"]["count"] >= 1
  assert all(v["cross_bytes"] == 0 for k, v in two.collectives.items()
             if isinstance(v, dict) and not k.startswith("dcn-")), two.collectives
  assert two.roofline["dcn_seconds"] > 0


@pytest.mark.slow
def test_generator_step_on_two_h100_nodes():
  p = _plan("generator", "h100-16", "fsdp=8", 1, "--config.data.batch_size=16")
  assert p.compiler == "gpu" and p.devices == 16 and p.mesh == {"data": 2, "fsdp": 8, "tensor": 1} and p.fits
  assert p.compiler_options == {"xla_gpu_enable_triton_gemm": False}
  # FSDP inside a node (all-gather / reduce-scatter over 8), data parallel across the 2 nodes.
  assert p.collectives["all-gather"]["cross_bytes"] == 0 and p.collectives["reduce-scatter"]["cross_bytes"] == 0
  assert p.collectives["all-reduce"]["cross_bytes"] > 0
  assert p.optimal_seconds is None and "no cost model" in p.optimal_note
  assert p.kernel_flops_per_device == 0                                # the TPU kernel is for TPUs only
  assert "DOES NOT FIT" not in planning.format_plan(p)


@pytest.mark.slow
def test_tokenizer_step_compiles_for_tpu_and_gpu():
  for topology in ("v5e-4", "h100-4"):
    p = _plan("tokenizer", topology, "data=4")
    assert p.fits and p.compiled_peak_bytes > p.argument_bytes > 0, topology


@pytest.mark.slow
def test_oversized_config_is_a_verdict_not_an_error(capsys):
  """The TPU compiler's RESOURCE_EXHAUSTED becomes 'does not fit' with its numbers, exit 0; so does
  `--largest-batch` when even its smallest probe is refused (the bisection itself:
  tests/planning/test_batch_search.py)."""
  p = _plan("generator", "v5e-1", "", 1, "--config.data.batch_size=131072")
  assert not p.fits and "GiB available" in p.out_of_memory
  text = planning.format_plan(p)
  assert "DOES NOT FIT" in text and "15.75" in text
  from imagefolder_jax.cli import main
  args = ["plan", "--stage", "generator", "--config", TINY_GENERATOR, "--pretokenized", "--topology", "v5e-1",
          "--config.data.batch_size=4096", "--largest-batch", "--batch-step", "1024"]
  assert main(args + ["--json"]) == 0
  captured = capsys.readouterr()
  search = json.loads(captured.out.strip().splitlines()[-1])["largest_batch"]
  assert search == {"largest": None, "smallest_refused": 1024, "step": 1024, "limit": 64 * 4096, "compiles": 3,
                    "tried": {"4096": False, "2048": False, "1024": False}, "at_largest": None}
  # one line before and one after each compile (the config's batch, 4096, was compiled for the plan)
  progress = [line for line in captured.err.splitlines() if "largest batch:" in line]
  assert [line.split("largest batch: ")[1].split(" (")[0].split(",")[0] for line in progress] == [
      "compiling batch 2048 ...", "batch 2048 does not fit", "compiling batch 1024 ...", "batch 1024 does not fit"]
  # The search from another batch than the config's (the plan printed is still the config's).
  assert main(args + ["--largest-batch-from", "1024", "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["global_batch"] == 4096 and not out["fits"]
  assert out["largest_batch"] == {"largest": None, "smallest_refused": 1024, "step": 1024, "limit": 64 * 1024,
                                  "compiles": 1, "tried": {"1024": False}, "at_largest": None}
  for extra, message in ((["--largest-batch-limit", "2048"], "must be at least the starting batch 4096"),
                         (["--largest-batch-from", "8192", "--largest-batch-limit", "4096"],
                          "must be at least the starting batch 8192"),
                         (["--largest-batch-from", "0"], "--largest-batch-from 0: must be >= 1")):
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
  assert main(args[:-3] + ["--batch-step", "8"]) == 2
  assert "go with --largest-batch" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_plan_topology_json_and_errors(generator_data_plan, capsys):
  out, stderr = generator_data_plan
  for key in ("compiler", "topology", "chips", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
              "peak_bytes", "chip_memory", "fits", "roofline_seconds", "optimal_seconds", "flops_per_chip",
              "collectives"):
    assert key in out, key
  assert out["compiler"] == "tpu" and out["chips"] == 4 and out["fits"] is True and out["roofline_seconds"] > 0
  assert out["optimal_seconds"] is None or out["optimal_seconds"] > 0
  assert not stderr.strip(), stderr   # libtpu's start-up lines are filtered
  from imagefolder_jax.cli import main
  for args, message in ((["--topology", "v7-8"], "expected NAME-COUNT"),
                        (["--topology", "v5e-4", "--devices", "4"], "leave out --devices"),
                        (["--devices", "2"], "needs --topology NAME, or --devices N and --chip"),
                        (["--topology", "v5e-4", "--config.train.attention_kernel=flash"],
                         "train.attention_kernel='flash' must be one of ('auto', 'xla')")):
    assert main(["plan", "--stage", "generator", "--config", TINY_GENERATOR, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_the_compiler_extras_leave_other_commands_quiet():
  """With libtpu and the CUDA plugin installed, importing the library (with or without
  JAX_PLATFORMS) prints nothing: the CUDA plugin's import-time log and libtpu's start-up errors
  are filtered, and a host without TPU chips does not start libtpu."""
  code = "import imagefolder_jax, jax; print(jax.devices()[0].platform)"
  for platforms in ("cpu", None):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    if platforms:
      env["JAX_PLATFORMS"] = platforms
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "cpu" and r.stderr == "", (platforms, r.stderr)


@pytest.mark.slow
def test_sampler_compiles_for_tpu(tiny_tokenizer_bundle):
  """`plan --program sample`: the generator's batch sampler (guidance, top-k / top-p) over 4 v5e
  chips, the tokenizer's decode included; in bfloat16 with two 64-wide heads its attention runs
  in the cached-attention kernel, which the cost model prices by the kernel's estimate."""
  from imagefolder_jax.planning.sampler import plan_sampler
  config = load_config(TINY_GENERATOR, [f"--config.tokenizer_bundle={tiny_tokenizer_bundle}",
                                        "--config.model.width=128"])
  p = plan_sampler(config, {}, planning.parse_topology("v5e-4"), 8, top_k=20, top_p=0.9, dtype="bfloat16")
  assert p.stage == "sampler" and p.fits and p.mesh["data"] == 4 and p.global_batch == 8
  assert p.params_bytes > 0 and p.compiled_peak_bytes > p.argument_bytes > 0
  assert p.roofline["seconds"] > 0 and p.optimal_seconds is None    # its filter loops: no cost-model time
  assert p.kernel_flops_per_device == p.kernel_bytes_per_device == 0
  accessed = p.bytes_accessed * (p.loop_scale or {}).get("bytes", 1.0)
  bandwidth = planning.parse_topology("v5e-4").chip.memory_bandwidth
  assert p.roofline["memory_seconds"] == pytest.approx(accessed / bandwidth)
  assert "per image" in planning.format_plan(p)
  with pytest.raises(planning.PlanError, match="--batch 6"):
    plan_sampler(config, {}, planning.parse_topology("v5e-4"), 6)
