"""Several processes on one machine (CPU devices): training, sampling, pretokenize and failure.

Each test starts real processes through `launch/local.sh` (2 processes x 2 CPU devices) and
compares with one process: of 4 devices, or the test's own (1 device, through `cli.main`). They
use the tiny configs and the micro bundle (tests/support.py): what they test does not depend on the
model.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from support import ROOT

from imagefolder_jax.cli import main
from imagefolder_jax.storage.bundle import load_bundle

LOCAL = os.path.join(ROOT, "launch", "local.sh")
TINY_TOKENIZER = os.path.join(ROOT, "configs", "tokenizer_tiny.py")


pytestmark = pytest.mark.multiprocess


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", IFJ_PYTHON=sys.executable, IFJ_LOCAL_DEVICES=str(devices), **extra)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def _one(args, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "imagefolder_jax.cli", *args], cwd=ROOT, env=_env(devices),
                        capture_output=True, text=True, timeout=timeout)


def _local(num: int, args, devices: int = 2, timeout: int = 600, **env) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", LOCAL, str(num), *args], cwd=ROOT, env=_env(devices, **env),
                        capture_output=True, text=True, timeout=timeout)


def _ok(r: subprocess.CompletedProcess) -> None:
  assert r.returncode == 0, (r.returncode, r.stderr[-3000:])


def _said(r: subprocess.CompletedProcess, *texts: str) -> None:
  missing = [t for t in texts if t not in r.stderr]
  assert not missing, (missing, r.returncode, r.stderr[-6000:])


def _relative_l2(a, b) -> float:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in zip(la, lb)
           if np.issubdtype(np.asarray(x).dtype, np.floating)]
  num = sum(float(np.sum((x - y) ** 2)) for x, y in pairs)
  den = sum(float(np.sum(x ** 2)) for x, _ in pairs)
  return (num / den) ** 0.5


def _losses(workdir: str) -> dict:
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


TOKENIZER = ["train-tokenizer", "--config", f"{TINY_TOKENIZER}:nogan", "--config.train.num_steps=7",
             "--config.train.checkpoint_every=2", "--config.train.log_every=1"]


@pytest.fixture(scope="module")
def tokenizer_one_process(tmp_path_factory) -> str:
  """An uninterrupted tiny tokenizer run on 1 process x 4 devices (its workdir). Not the test's own
  process of 1 device: a float32 sum split 4 ways, as the 2 x 2 run splits it, flips fewer
  near-tie code assignments (one device measured 3.5e-3 apart in the loss at step 3)."""
  workdir = str(tmp_path_factory.mktemp("tok") / "single")
  _ok(_one(TOKENIZER + ["--workdir", workdir], devices=4))
  return workdir


def _assert_same_run(single: str, multi: str, model: str, steps) -> None:
  """Parameters within 1e-3 relative L2 (float32 sums are split differently over processes:
  measured ~5e-5), losses within 1e-3 relative. EMA codebook statistics are not compared: their
  near-tie code assignments flip under such differences."""
  a, b = load_bundle(os.path.join(single, "bundle"))[1], load_bundle(os.path.join(multi, "bundle"))[1]
  assert _relative_l2(a[model]["params"], b[model]["params"]) < 1e-3
  la, lb = _losses(single), _losses(multi)
  for step in steps:
    assert abs(la[step] - lb[step]) <= 1e-3 * abs(la[step]), (step, la[step], lb[step])


# Both processes exit at once; the one that notices the other gone first may say so (exit 3), or
# jax's coordination client may abort it (134) when the service reports the other task's death.
KILLED = (137, 3, 134)


def test_tokenizer_training_killed_and_resumed_on_other_process_counts(tmp_path, tokenizer_one_process, faults):
  """2 processes x 2 devices, both killed (as by kill -9) after step 3; rerun on 1 process x 4
  devices: equals the uninterrupted 1 x 4 run. (A rerun on the same 2 processes is the generator's
  test below.)"""
  multi = str(tmp_path / "multi")
  r = _local(2, TOKENIZER + ["--workdir", multi], **faults(fail_at_step=3))
  assert r.returncode in KILLED, (r.returncode, r.stderr[-3000:])
  _said(r, "step 3/7")
  # Only process 0 logs progress lines.
  assert not any(line.startswith("[1] step") for line in r.stderr.splitlines())
  assert not os.path.exists(os.path.join(multi, "bundle"))
  r = _one(TOKENIZER + ["--workdir", multi], devices=4)
  _ok(r)
  _said(r, "resumed from step 2", "re-sharded at position 16")
  _assert_same_run(tokenizer_one_process, multi, "tokenizer", steps=range(3, 8))


def test_generator_from_codes_killed_and_resumed_equals_one_process(tmp_path, tokenizer_one_process, faults):
  bundle = os.path.join(tokenizer_one_process, "bundle")
  codes = str(tmp_path / "codes")
  assert main(["pretokenize", "--bundle", bundle, "--source", "demo", "--out", codes, "--batch-size", "64"]) == 0
  common = ["train-generator", "--config", os.path.join(ROOT, "configs", "generator_tiny.py"),
            f"--config.tokenizer_bundle={bundle}", f"--config.data.source=codes:{codes}",
            "--config.train.num_steps=5", "--config.train.checkpoint_every=2", "--config.train.log_every=1"]
  single = str(tmp_path / "single")   # the reference needs no sample grid (the 2-process run's is checked)
  assert main(common + ["--workdir", single, "--config.train.image_every=0"]) == 0
  multi = str(tmp_path / "multi")
  r = _local(2, common + ["--workdir", multi], **faults(fail_at_step=3))
  assert r.returncode in KILLED, (r.returncode, r.stderr[-3000:])
  r = _local(2, common + ["--workdir", multi])
  _ok(r)
  _said(r, "resumed from step 2", "iterator state restored")
  assert not any(line.startswith("[1] step") for line in r.stderr.splitlines())
  assert os.path.isfile(os.path.join(multi, "images", "samples_latest.png"))  # grids from sharded state
  _assert_same_run(single, multi, "generator", steps=range(3, 6))


def _read_images(directory: str) -> dict:
  images = os.path.join(directory, "images")
  return {n: np.asarray(Image.open(os.path.join(images, n)), np.int16) for n in sorted(os.listdir(images))}


def test_sample_directory_two_processes_equals_one_with_uneven_work_and_resumes(tmp_path, micro_bundle, capsys):
  """`sample --out-dir` on 2 processes gives the samples of 1 process also when the processes have
  unequal work: one shard for two processes, and a rerun in which process 1's shards are finished
  and process 0's are not (each used to wait at a barrier the other never reached)."""
  from imagefolder_jax.inference.sample_runner import read_directory
  common = ["sample", "--bundle", micro_bundle, "--classes", "0,1,2,3", "--per-class", "2", "--seed", "3",
            "--cfg", "1.5", "--top-k", "20", "--top-p", "0.9"]
  one = str(tmp_path / "one")   # the test's own process, 1 device
  assert main(common + ["--out-dir", one, "--shard-size", "2", "--batch-size", "4"]) == 0
  two = str(tmp_path / "two")   # 8 samples, default --shard-size 1000: one shard, process 1 idle
  r = _local(2, common + ["--out-dir", two, "--batch-size", "2"], timeout=300)
  _ok(r)
  assert "process 0: 8 sampled" in r.stdout
  a, b = read_directory(one), read_directory(two)
  np.testing.assert_array_equal(a["indices"], np.arange(8))
  np.testing.assert_array_equal(a["labels"], np.repeat([0, 1, 2, 3], 2))
  for key in ("ids", "labels", "indices"):
    np.testing.assert_array_equal(a[key], b[key])
  ia, ib = _read_images(one), _read_images(two)
  assert sorted(ia) == sorted(ib) and len(ia) == 8 and "0000004_c0002.png" in ia
  for name in ia:  # same tokens; the decoder's float32 sums differ by batch split: <= 1 level
    assert np.abs(ia[name] - ib[name]).max() <= 1 and (ia[name] != ib[name]).mean() < 1e-3
  # The grid mode (one sampler sharded over both processes' devices) gives the same samples as the
  # directory: sample i depends on (seed, i) only.
  grid_npz = str(tmp_path / "grid.npz")
  _ok(_local(2, common + ["--out", str(tmp_path / "grid.png"), "--save-npz", grid_npz, "--batch-size", "5"]))
  np.testing.assert_array_equal(np.load(grid_npz)["flat"], a["ids"])
  # Resume: shards k are process k mod 2's; process 0's (0 and 2) were lost, process 1 has none to
  # make. They are redone (at another batch size than `one`'s), finished ones are skipped.
  import shutil
  three = str(tmp_path / "three")
  shutil.copytree(one, three)
  for name in ("shard_0000000_0000002.npz", "shard_0000004_0000006.npz"):
    os.remove(os.path.join(three, name))
  kept = {n: os.stat(os.path.join(three, n)).st_mtime_ns for n in ("shard_0000002_0000004.npz",
                                                                   "shard_0000006_0000008.npz")}
  r = _local(2, common + ["--out-dir", three, "--shard-size", "2", "--batch-size", "2"], timeout=300)
  _ok(r)
  assert "process 0: 4 sampled, 0 finished shard(s) skipped" in r.stdout
  assert kept == {n: os.stat(os.path.join(three, n)).st_mtime_ns for n in kept}   # process 1 skipped its shards
  np.testing.assert_array_equal(read_directory(three)["ids"], a["ids"])
  capsys.readouterr()
  assert main(common + ["--out-dir", three, "--shard-size", "2", "--seed", "1"]) == 2
  err = capsys.readouterr().err
  assert "other settings" in err and len(err.strip().splitlines()) == 1, err


def test_pretokenize_two_processes_equals_one(tmp_path, micro_bundle):
  """Also with fewer records than processes x batch (process 1 gets no record)."""
  bundle = micro_bundle
  few = tmp_path / "few"
  few.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(few / f"im{i}.png")
  for source, one_batch, two_batch in (("demo", "5", "4"), (f"folder:{few}", "5", "4")):
    tag = source.split(":")[0]
    one, two = str(tmp_path / f"one_{tag}"), str(tmp_path / f"two_{tag}")
    assert main(["pretokenize", "--bundle", bundle, "--source", source, "--batch-size", one_batch, "--out", one]) == 0
    r = _local(2, ["pretokenize", "--bundle", bundle, "--source", source, "--batch-size", two_batch, "--out", two],
               timeout=300)
    _ok(r)
    assert sorted(os.listdir(two)) == ["codes.array_record", "codes.json"]
    for name in ("codes.array_record", "codes.json"):
      with open(os.path.join(one, name), "rb") as f, open(os.path.join(two, name), "rb") as g:
        assert f.read() == g.read(), (source, name)
  assert "wrote 3 records" in r.stdout


def _start_two(python_args: list, **env) -> list:
  """Starts `python *python_args` as processes 0 and 1 of a job (2 CPU devices each) coordinated
  on a free local port, without launch/local.sh; returns the two Popen objects."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return [subprocess.Popen([sys.executable, *python_args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=_env(2, IFJ_COORDINATOR=f"127.0.0.1:{port}", IFJ_NUM_PROCESSES="2",
                                               IFJ_PROCESS_ID=str(i), **env)) for i in range(2)]


def test_lost_process_stops_the_others_with_one_line(tmp_path, faults):
  """Process 1 dies after step 2 (os._exit, like kill -9); process 0 must stop by itself with exit
  code 3 and one line, well within the heartbeat timeout (20 s here), not hang."""
  args = ["train-tokenizer", "--config", f"{TINY_TOKENIZER}:nogan", "--config.train.num_steps=200",
          "--config.train.checkpoint_every=100", "--workdir", str(tmp_path / "run")]
  procs = _start_two(["-m", "imagefolder_jax.cli", *args], IFJ_HEARTBEAT_TIMEOUT="20",
                     **faults(fail_at_step=2, fail_process=1))
  try:
    code1 = procs[1].wait(timeout=400)
    assert code1 == 137, procs[1].stderr.read()[-3000:]
    died = time.monotonic()
    code = procs[0].wait(timeout=60)
    waited = time.monotonic() - died
    err = procs[0].stderr.read()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert code == 3, err[-3000:]
  errors = [line for line in err.splitlines() if "error" in line.lower()]
  assert len(errors) == 1 and "resume" in errors[0], err[-3000:]
  assert waited < 40, waited


BARRIERS = os.path.join(ROOT, "tests", "programs", "barriers.py")


def _barrier_job(scenario: str, *args: str, **env) -> list:
  """Runs tests/programs/barriers.py SCENARIO as processes 0 and 1 of a job; [(exit code, stdout,
  stderr)]."""
  procs = _start_two([BARRIERS, scenario, *args], **env)
  try:
    return [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _errors(stderr: str) -> list:
  return [line for line in stderr.splitlines() if "error" in line.lower()]


def test_barrier_waits_through_the_coordination_service_not_a_collective():
  """`sync` / `compile_then_sync` wait for a late process through jax's coordination service, with
  their own timeout (IFJ_BARRIER_TIMEOUT), not through a device collective (whose gloo rendezvous
  XLA:CPU abandons after a fixed minute: too short for a peer compiling on a loaded machine)."""
  for code, out, err in _barrier_job("late", "2"):
    assert code == 0 and "sum 6.0 10.0" in out and "passed" in out, (code, err[-3000:])
  code, _, err = _barrier_job("late", "3", IFJ_BARRIER_TIMEOUT="1")[0]
  assert code == 3 and "did not arrive within 1 s" in err and len(_errors(err)) == 1, err[-3000:]


def test_barriers_detect_other_paths_instead_of_waiting():
  """Processes at barriers of different names, or one that ended without coming, stop at once
  with one line each (exit 3) instead of waiting out the barrier timeout; values are exchanged;
  a program on each process's own devices needs no barrier however often each one calls it."""
  started = time.monotonic()
  for code, out, err in _barrier_job("mismatch"):
    assert code == 3 and "took different paths" in err and len(_errors(err)) == 1, (code, err[-3000:])
    assert "'sampler compiled'" in err and "'sample shards written'" in err
  code, _, err = _barrier_job("ended")[0]
  assert code == 3 and "process 1 ended without reaching barrier" in err and len(_errors(err)) == 1, err[-3000:]
  for code, out, err in _barrier_job("exchange"):
    assert code == 0 and "passed" in out, (code, err[-3000:])
  assert time.monotonic() - started < 120  # the default barrier timeout is 1800 s


@pytest.mark.parametrize("scenario", ["blocked", "collective"])
def test_sigterm_ends_processes_blocked_in_a_barrier_or_collective(scenario):
  """SIGTERM (launch/local.sh's stop, scancel) ends a process that waits for a peer within
  seconds, with one line and exit 143: jax's coordination service installs a SIGTERM handler of
  its own that swallowed the signal, and a blocked main thread never runs Python's."""
  procs = _start_two([BARRIERS, scenario, "300"])
  try:
    for p in procs:
      assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
    assert procs[0].stdout.readline().strip() == "waiting", procs[0].stderr.read()[-3000:]
    time.sleep(2)   # process 0 is in the barrier / collective, waiting for process 1
    assert procs[0].poll() is None
    sent = time.monotonic()
    for p in procs:
      p.terminate()
    codes = [p.wait(timeout=30) for p in procs]
    took = time.monotonic() - sent
    errs = [p.stderr.read() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [143, 143] and took < 15, (codes, took, errs[0][-2000:])
  for i, err in enumerate(errs):
    assert f"stopped by SIGTERM (process {i}, exit 143)" in err, err[-2000:]
