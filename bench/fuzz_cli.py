"""The big fuzz run: N seeded odd inputs through every verb that reads them, in one process.

  JAX_PLATFORMS=cpu python bench/fuzz_cli.py --cases 1000 --seed 0 --workdir /tmp/fuzz [--workers 3]

Case i draws (verb family, damage kind) from `numpy.random.default_rng((seed, i))`:
  images    -> `reconstruct` (a random mix of 1-6 odd/corrupt images, bench/fuzz_cases.IMAGE_KINDS)
  reference -> `sample --reference` (one image; decodable ones are stopped by --classes 99999)
  bundle    -> `sample` / `reconstruct` on a damaged copy of the parity bundle (BUNDLE_DAMAGE)
  official  -> `convert-official` on a damaged copy of the parity tokenizer checkpoint (OFFICIAL_DAMAGE)
  export    -> `export-official --bundle` on a damaged parity bundle (BUNDLE_DAMAGE; a tokenizer-only
               bundle exports its tokenizer)
  workdir   -> `export-official --workdir` on a damaged training workdir (WORKDIR_DAMAGE; a damaged
               newest step must fall back to step 1)
  inception -> `convert-inception --torchscript` / `--logits` on a damaged file (TORCHSCRIPT_DAMAGE)
  npz       -> `fid` with one damaged .npz (NPZ_DAMAGE), or `fid-stats --source npz:` (image kinds)
  evalref   -> `eval-generator` with a damaged `--ref` (NPZ_DAMAGE), or a good ref and a damaged or
               tokenizer-only bundle
  codes     -> `train-generator --config.data.source=codes:DIR` on damaged `pretokenize` output
               (CODES_DAMAGE)
  folder    -> `pretokenize --source folder:` over 8-16 odd images (every 10th case only: it compiles)
and calls `imagefolder_jax.cli.main` in-process. A case is a **crash** when main raises or returns
an undocumented code (not 0 or 2), **multi-line** when stderr holds a traceback or an error spread
over several lines, **half-written** when it failed but left its output behind, **wrong** when it
succeeded where it must not (an undecodable image used, a damaged bundle loaded with other values,
a damaged workdir exported from anything but its last good step).
Loaded networks that no case damages (the Inception bundle) are loaded once and shared.
Prints one summary line per family and the totals.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fuzz_cases  # noqa: E402
import numpy as np  # noqa: E402

from imagefolder_jax.cli import main  # noqa: E402

PARITY = os.path.join(ROOT, "tests", "fixtures", "parity_tiny")
FAMILIES = ("images", "reference", "bundle", "official", "export", "workdir", "inception", "npz", "evalref",
            "codes", "folder")


def _run(argv) -> tuple[object, str, str]:
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    try:
      code = main(argv)
    except BaseException as e:  # noqa: BLE001 - a crash is what we count
      code = f"raised {type(e).__name__}: {e}"
    gc.collect()  # what a case leaves for the garbage collector to report is that case's output
  return code, err.getvalue(), out.getvalue()


# Lines a case may print besides its one error line: one per skipped input, one per unusable
# checkpoint step passed over (the fallback's log line), one when FID statistics are singular.
ALLOWED = (": skipping ", "skipping unreadable image", "further skipped images are counted",
           "is unusable (", "FID: the covariance product is singular", "FID: singular covariance product")


class _CurrentStderr(logging.StreamHandler):
  """Logs to whatever sys.stderr is now (each case redirects it)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


def _multi_line(err: str) -> bool:
  lines = [l for l in err.splitlines() if l.strip()]
  other = [l for l in lines if "error:" not in l and not any(a in l for a in ALLOWED)]
  return "Traceback" in err or len([l for l in lines if "error:" in l]) > 1 or bool(other)


def run_case(family: str, rng, case_dir: str, bundle: str, assets: dict) -> dict:
  os.makedirs(case_dir)
  out = os.path.join(case_dir, "out.png")
  expect_ok = None
  expect_stdout = None
  if family == "images":
    kinds = list(rng.choice(sorted(fuzz_cases.IMAGE_KINDS), int(rng.integers(1, 7))))
    paths = fuzz_cases.write_images(os.path.join(case_dir, "imgs"), kinds, rng)
    argv = ["reconstruct", "--bundle", bundle, "--out", out, "--batch-size", "8", *paths]
    expect_ok = any(k in fuzz_cases.DECODABLE for k in kinds)
    kind = "+".join(sorted(set(kinds)))
  elif family == "reference":
    kind = str(rng.choice(sorted(fuzz_cases.IMAGE_KINDS)))
    path = fuzz_cases.write_image(case_dir, kind, rng, 0)
    argv = ["sample", "--bundle", bundle, "--classes", "99999", "--reference", path, "--out", out]
    expect_ok = False
  elif family == "bundle":
    kind = str(rng.choice(sorted(fuzz_cases.BUNDLE_DAMAGE)))
    damaged = fuzz_cases.damage_bundle(bundle, os.path.join(case_dir, "bundle"), kind, rng)
    image = fuzz_cases.write_image(case_dir, "rgb_png", rng, 0)
    sample = ["sample", "--bundle", damaged, "--classes", "99999", "--reference", image, "--out", out]
    reconstruct = ["reconstruct", "--bundle", damaged, "--out", out, image]
    argv = sample if rng.uniform() < 0.5 or kind.startswith("generator_") else reconstruct
  elif family == "official":
    kind = str(rng.choice(sorted(fuzz_cases.OFFICIAL_DAMAGE)))
    bad = os.path.join(case_dir, "tokenizer.pt")
    fuzz_cases.OFFICIAL_DAMAGE[kind](os.path.join(PARITY, "tokenizer.pt"), bad, rng)
    out = os.path.join(case_dir, "converted")
    argv = ["convert-official", "--tokenizer", bad, "--config", os.path.join(PARITY, "config.json"), "--out", out]
  elif family == "export":
    kind = str(rng.choice(sorted(fuzz_cases.BUNDLE_DAMAGE)))
    damaged = fuzz_cases.damage_bundle(bundle, os.path.join(case_dir, "bundle"), kind, rng)
    out = os.path.join(case_dir, "official")
    argv = ["export-official", "--bundle", damaged, "--out", out]
    expect_ok = True if kind == "tokenizer_only" else None
  elif family == "workdir":
    kind = str(rng.choice(sorted(fuzz_cases.WORKDIR_DAMAGE)))
    workdir = os.path.join(case_dir, "run")
    shutil.copytree(assets["workdir"], workdir)
    fuzz_cases.WORKDIR_DAMAGE[kind](workdir, rng)
    out = os.path.join(case_dir, "official")
    argv = ["export-official", "--workdir", workdir, "--out", out, "--without-teacher"]
    expect_ok = kind in fuzz_cases.WORKDIR_FALLS_BACK
    expect_stdout = "(step 1)" if expect_ok else None
  elif family == "inception":
    kind = str(rng.choice(sorted(fuzz_cases.TORCHSCRIPT_DAMAGE)))
    bad = os.path.join(case_dir, "inception.pt")
    fuzz_cases.TORCHSCRIPT_DAMAGE[kind](assets["torchscript"], bad, rng)
    flag = "--torchscript" if rng.uniform() < 0.5 else "--logits"
    kind = f"{flag[2:]}:{kind}"
    out = os.path.join(case_dir, "inception")
    argv = ["convert-inception", flag, bad, "--out", out]
    expect_ok = False
  elif family == "npz":
    if rng.uniform() < 0.25:
      kind = "fid-stats:" + str(rng.choice(fuzz_cases.NPZ_IMAGE_KINDS))
      bad = os.path.join(case_dir, "bad.npz")
      fuzz_cases.NPZ_DAMAGE[kind.split(":")[1]](bad, rng)
      out = os.path.join(case_dir, "stats.npz")
      argv = ["fid-stats", "--source", f"npz:{bad}", "--inception", assets["inception"], "--out", out]
      expect_ok = False
    else:
      kind = str(rng.choice(sorted(fuzz_cases.NPZ_DAMAGE)))
      bad = os.path.join(case_dir, "bad.npz")
      fuzz_cases.NPZ_DAMAGE[kind](bad, rng)
      good = fuzz_cases.write_good_npz(os.path.join(case_dir, "good.npz"), rng)
      pair = [bad, good] if rng.uniform() < 0.5 else [good, bad]
      out = os.path.join(case_dir, "fid.json")
      argv = ["fid", *pair, "--inception", assets["inception"], "--out-json", out]
      expect_ok = None if kind in fuzz_cases.NPZ_MAY_SURVIVE else False
  elif family == "evalref":
    work = os.path.join(case_dir, "samples")
    if rng.uniform() < 0.25:
      # A good 2048-D reference and a bundle that must be refused before any sampling.
      kind = "bundle:" + str(rng.choice(sorted(set(fuzz_cases.BUNDLE_DAMAGE) - {"flip_variable_bytes"})))
      ref, target = assets["inception_ref"], fuzz_cases.damage_bundle(bundle, os.path.join(case_dir, "bundle"),
                                                                      kind.split(":")[1], rng)
    else:
      kind = str(rng.choice(sorted(fuzz_cases.NPZ_DAMAGE)))
      ref, target = os.path.join(case_dir, "ref.npz"), bundle
      fuzz_cases.NPZ_DAMAGE[kind](ref, rng)
    out = work
    argv = ["eval-generator", "--bundle", target, "--ref", ref, "--inception", assets["inception"],
            "--num-samples", "2", "--batch-size", "2", "--work-dir", work]
    expect_ok = False
  elif family == "codes":
    kind = str(rng.choice(sorted(fuzz_cases.CODES_DAMAGE)))
    codes = os.path.join(case_dir, "codes")
    shutil.copytree(assets["codes"], codes)
    fuzz_cases.CODES_DAMAGE[kind](codes, rng)
    out = os.path.join(case_dir, "run")
    argv = ["train-generator", "--config", os.path.join(ROOT, "configs", "generator_tiny.py"), "--workdir", out,
            f"--config.tokenizer_bundle={bundle}", f"--config.data.source=codes:{codes}", "--config.train.num_steps=1"]
    expect_ok = False
  else:
    kinds = list(rng.choice(sorted(fuzz_cases.IMAGE_KINDS), int(rng.integers(8, 17))))
    fuzz_cases.write_images(os.path.join(case_dir, "data", "c"), kinds, rng)
    out = os.path.join(case_dir, "codes")
    argv = ["pretokenize", "--bundle", bundle, "--source", f"folder:{os.path.join(case_dir, 'data')}",
            "--batch-size", "4", "--out", out]
    expect_ok = any(k in fuzz_cases.DECODABLE for k in kinds)
    kind = f"{len(kinds)} images"
  code, err, stdout = _run(argv)
  result = dict(family=family, kind=kind, code=code, crash=code not in (0, 2), multi_line=_multi_line(err),
                half_written=code != 0 and os.path.exists(out), wrong=False, err=err.strip()[-300:])
  if expect_ok is not None and (code == 0) != expect_ok:
    result["wrong"] = True
  if code == 0 and expect_stdout is not None and expect_stdout not in stdout:
    result["wrong"] = True
  if family == "export" and code == 0 and kind != "tokenizer_only":
    result["wrong"] = not _same_variables(bundle, os.path.join(case_dir, "bundle"))
  if family == "bundle" and code != 0 and "--classes" in err and kind != "tokenizer_only":
    result["wrong"] = not _same_variables(bundle, os.path.join(case_dir, "bundle"))
  if family == "official" and code == 0:
    result["wrong"] = kind not in fuzz_cases.OFFICIAL_MAY_SURVIVE or (
        kind in fuzz_cases.OFFICIAL_SAME_VARIABLES and not _same_variables(bundle, out, models=("tokenizer",)))
  if family == "bundle" and code == 0:
    result["wrong"] = not _same_variables(bundle, os.path.join(case_dir, "bundle"))
  return result


def _same_variables(a, b, models=None) -> bool:
  """Bundles a and b hold equal arrays (of `models` only, when given)."""
  import jax

  from imagefolder_jax.storage.bundle import load_bundle
  try:
    (_, va), (_, vb) = load_bundle(a), load_bundle(b)
    if models is not None:
      va, vb = ({m: v[m] for m in models} for v in (va, vb))
  except Exception:  # noqa: BLE001
    return False
  return jax.tree.structure(va) == jax.tree.structure(vb) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)))


def _share_pristine(model_cls, bundle: str) -> None:
  load, memo, pristine = model_cls.load.__func__, {}, os.path.abspath(bundle)

  def shared_load(cls, directory, **kwargs):
    if os.path.abspath(directory) != pristine or kwargs:
      return load(cls, directory, **kwargs)
    if cls not in memo:
      memo[cls] = load(cls, directory)
    return memo[cls]
  model_cls.load = classmethod(shared_load)


def _share_pristine_checks(bundle: str) -> None:
  """The undamaged bundle's variable check (an abstract init per model) and `load_bundle` (the
  generator task reads the frozen tokenizer with it) run once; damaged copies are checked afresh."""
  from imagefolder_jax.cli import common
  from imagefolder_jax.storage.bundle import load_bundle
  from imagefolder_jax.train import generator_task
  pristine = os.path.abspath(bundle)
  check, load, checked, loaded = common._check_model_variables, load_bundle, set(), {}

  def shared_check(model, directory):
    if os.path.abspath(directory) != pristine:
      return check(model, directory)
    if id(model) not in checked:   # the shared model objects (see _share_pristine) live all run
      check(model, directory)
      checked.add(id(model))

  def shared_load(directory):
    if os.path.abspath(directory) != pristine:
      return load(directory)
    if "v" not in loaded:
      loaded["v"] = load(directory)
    return loaded["v"]
  common._check_model_variables = shared_check
  generator_task.load_bundle = shared_load


def _assets(workdir: str, bundle: str) -> dict:
  """Undamaged inputs the cases copy and damage: a training workdir, pretokenized codes, the FID
  Inception bundle (converted once, loaded once: `InceptionFeatures.load` is memoised), a 2048-D
  reference .npz."""
  from imagefolder_jax.convert.inception import default_torchscript_path
  from imagefolder_jax.evaluation import features
  from imagefolder_jax.train.configuration import load_config
  rng = np.random.default_rng(12345)
  assets = {"torchscript": default_torchscript_path(), "inception": os.path.join(workdir, "inception")}
  assert main(["convert-inception", "--out", assets["inception"]]) == 0
  load = features.InceptionFeatures.load.__func__
  cache = {}

  def shared_load(cls, directory=None, **kwargs):
    key = (directory, tuple(sorted(kwargs.items())))
    if key not in cache:
      cache[key] = load(cls, directory, **kwargs)
    return cache[key]
  features.InceptionFeatures.load = classmethod(shared_load)
  # The undamaged parity bundle is read by most cases (images, reference, folder): loaded once, so its
  # compiled encode/decode functions are reused too. Damaged copies are always loaded afresh.
  from imagefolder_jax.inference import generator, tokenizer
  for model_cls in (tokenizer.Tokenizer, generator.Generator):
    _share_pristine(model_cls, bundle)
  _share_pristine_checks(bundle)
  # Compiles that still happen per case (a fresh model object) come from the persistent cache.
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(workdir), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  # Exportable to the official layout (256 px, patch 16); filled, not trained (see write_workdir).
  config = load_config(os.path.join(ROOT, "configs", "tokenizer_tiny.py:nogan"),
                       ["--config.model.vit.image_size=256", "--config.model.vit.patch_size=16"])
  assets["workdir"] = fuzz_cases.write_workdir(os.path.join(workdir, "workdir"), config)
  images = os.path.join(workdir, "code_images")
  for label in ("a", "b"):
    fuzz_cases.write_images(os.path.join(images, label), ["rgb_png", "rgb_jpeg"] * 3, rng)
  assets["codes"] = os.path.join(workdir, "codes")
  assert main(["pretokenize", "--bundle", bundle, "--source", f"folder:{images}", "--batch-size", "4",
               "--out", assets["codes"]]) == 0
  assets["inception_ref"] = fuzz_cases.write_inception_ref(os.path.join(workdir, "inception_ref.npz"), rng)
  return assets


def _summary(results, wall: float) -> None:
  for family in FAMILIES:
    rs = [r for r in results if r["family"] == family]
    print(f"{family:10s} cases={len(rs):4d} ok={sum(r['code'] == 0 for r in rs):4d} "
          f"one-line-errors={sum(r['code'] == 2 and not r['multi_line'] for r in rs):4d} "
          f"crashes={sum(r['crash'] for r in rs)} multi-line={sum(r['multi_line'] for r in rs)} "
          f"half-written={sum(r['half_written'] for r in rs)} wrong={sum(r['wrong'] for r in rs)} "
          f"time={sum(r['seconds'] for r in rs):.0f}s")
  print(f"total cases={len(results)} crashes={sum(r['crash'] for r in results)} "
        f"multi-line={sum(r['multi_line'] for r in results)} half-written={sum(r['half_written'] for r in results)} "
        f"wrong={sum(r['wrong'] for r in results)} in {wall:.0f} s")


def _run_shard(args, shard: int) -> None:
  """Cases i with i % workers == shard, in this process; results as JSON lines in the workdir."""
  workdir = os.path.join(args.workdir, f"worker{shard}")
  # Before main() configures logging: our handler follows each case's redirected stderr.
  logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_CurrentStderr()])
  bundle = os.path.join(workdir, "parity_bundle")
  assert main(["convert-official", "--tokenizer", os.path.join(PARITY, "tokenizer.pt"), "--generator",
               os.path.join(PARITY, "generator.pt"), "--config", os.path.join(PARITY, "config.json"),
               "--out", bundle]) == 0
  assets = _assets(workdir, bundle)
  with open(os.path.join(workdir, "results.jsonl"), "w") as log:
    for i in range(shard, args.cases, args.workers):
      rng = np.random.default_rng((args.seed, i))
      family = "folder" if i % 10 == 9 else str(rng.choice(FAMILIES[:-1]))
      case_dir = os.path.join(workdir, f"case{i:05d}")
      t_case = time.perf_counter()
      r = run_case(family, rng, case_dir, bundle, assets)
      code = r["code"] if isinstance(r["code"], int) else str(r["code"])
      r.update(seconds=time.perf_counter() - t_case, index=i, code=code)
      log.write(json.dumps(r) + "\n")
      log.flush()
      if not (r["crash"] or r["multi_line"] or r["half_written"] or r["wrong"] or args.keep):
        shutil.rmtree(case_dir, ignore_errors=True)


def main_fuzz() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="/tmp/imagefolder_fuzz")
  parser.add_argument("--workers", type=int, default=1,
                      help="processes sharing the cases (case i runs in worker i %% workers; same results)")
  parser.add_argument("--keep", action="store_true", help="keep every case directory")
  parser.add_argument("--shard", type=int, help=argparse.SUPPRESS)  # internal: one worker's share
  args = parser.parse_args()
  if args.shard is not None:
    _run_shard(args, args.shard)
    return 0
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  t0 = time.perf_counter()
  argv = [sys.executable, os.path.abspath(__file__), "--cases", str(args.cases), "--seed", str(args.seed),
          "--workdir", args.workdir, "--workers", str(args.workers)] + (["--keep"] if args.keep else [])
  logs = [open(os.path.join(args.workdir, f"worker{k}.log"), "w") for k in range(args.workers)]
  procs = [subprocess.Popen(argv + ["--shard", str(k)], stdout=subprocess.DEVNULL, stderr=logs[k])
           for k in range(args.workers)]
  codes = [p.wait() for p in procs]
  results = []
  for k in range(args.workers):
    path = os.path.join(args.workdir, f"worker{k}", "results.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        results += [json.loads(line) for line in f]
  results.sort(key=lambda r: r["index"])
  for r in results:
    if r["crash"] or r["multi_line"] or r["half_written"] or r["wrong"]:
      print(f"case {r['index']} {r['family']} {r['kind']}: code={r['code']} "
            f"{dict((k, r[k]) for k in ('crash', 'multi_line', 'half_written', 'wrong'))} {r['err']!r}")
  _summary(results, time.perf_counter() - t0)
  if any(codes) or len(results) != args.cases:
    print(f"workers exited {codes}; {len(results)} of {args.cases} cases ran (see {args.workdir}/worker*.log)")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main_fuzz())
