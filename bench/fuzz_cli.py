"""The big fuzz run: N seeded odd inputs through every verb that reads them, in one process.

  JAX_PLATFORMS=cpu python bench/fuzz_cli.py --cases 1000 --seed 0 --workdir /tmp/fuzz

Case i draws (verb family, damage kind) from `numpy.random.default_rng((seed, i))`:
  images    -> `reconstruct` (a random mix of 1-6 odd/corrupt images, tests/fuzz_cases.IMAGE_KINDS)
  reference -> `sample --reference` (one image; decodable ones are stopped by --classes 99999)
  bundle    -> `sample` / `reconstruct` on a damaged copy of the parity bundle (BUNDLE_DAMAGE)
  official  -> `convert-official` on a damaged copy of the parity tokenizer checkpoint (OFFICIAL_DAMAGE)
  folder    -> `pretokenize --source folder:` over 8-16 odd images (every 10th case only: it compiles)
and calls `imagefolder_jax.cli.main` in-process. A case is a **crash** when main raises or returns
an undocumented code (not 0 or 2), **multi-line** when stderr holds a traceback or an error spread
over several lines, **half-written** when it failed but left its output behind, **wrong** when it
succeeded where it must not (an undecodable image used, a damaged bundle loaded with other values).
Prints one summary line per family and the totals.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402

import fuzz_cases  # noqa: E402
from imagefolder_jax.cli import main  # noqa: E402

PARITY = os.path.join(ROOT, "tests", "fixtures", "parity_tiny")
FAMILIES = ("images", "reference", "bundle", "official", "folder")


def _run(argv) -> tuple[object, str]:
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      code = main(argv)
    except BaseException as e:  # noqa: BLE001 - a crash is what we count
      code = f"raised {type(e).__name__}: {e}"
  return code, err.getvalue()


# Lines a case may print besides its one error line: one per skipped input.
ALLOWED = (": skipping ", "skipping unreadable image", "further skipped images are counted")


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


def run_case(family: str, rng, case_dir: str, bundle: str) -> dict:
  os.makedirs(case_dir)
  out = os.path.join(case_dir, "out.png")
  expect_ok = None
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
    argv = (["sample", "--bundle", damaged, "--classes", "99999", "--reference", image, "--out", out]
            if rng.uniform() < 0.5 or kind.startswith("generator_") else ["reconstruct", "--bundle", damaged, "--out", out, image])
  elif family == "official":
    kind = str(rng.choice(sorted(fuzz_cases.OFFICIAL_DAMAGE)))
    bad = os.path.join(case_dir, "tokenizer.pt")
    fuzz_cases.OFFICIAL_DAMAGE[kind](os.path.join(PARITY, "tokenizer.pt"), bad, rng)
    out = os.path.join(case_dir, "converted")
    argv = ["convert-official", "--tokenizer", bad, "--config", os.path.join(PARITY, "config.json"), "--out", out]
  else:
    kinds = list(rng.choice(sorted(fuzz_cases.IMAGE_KINDS), int(rng.integers(8, 17))))
    fuzz_cases.write_images(os.path.join(case_dir, "data", "c"), kinds, rng)
    out = os.path.join(case_dir, "codes")
    argv = ["pretokenize", "--bundle", bundle, "--source", f"folder:{os.path.join(case_dir, 'data')}",
            "--batch-size", "4", "--out", out]
    expect_ok = any(k in fuzz_cases.DECODABLE for k in kinds)
    kind = f"{len(kinds)} images"
  code, err = _run(argv)
  result = dict(family=family, kind=kind, code=code, crash=code not in (0, 2), multi_line=_multi_line(err),
                half_written=code != 0 and os.path.exists(out), wrong=False, err=err.strip()[-300:])
  if expect_ok is not None and (code == 0) != expect_ok:
    result["wrong"] = True
  if family == "bundle" and code != 0 and "--classes" in err and kind != "tokenizer_only":
    result["wrong"] = not _same_variables(bundle, os.path.join(case_dir, "bundle"))
  if family == "official" and code == 0:
    result["wrong"] = kind not in fuzz_cases.OFFICIAL_MAY_SURVIVE
  if family == "bundle" and code == 0:
    result["wrong"] = not _same_variables(bundle, os.path.join(case_dir, "bundle"))
  return result


def _same_variables(a, b) -> bool:
  import jax
  from imagefolder_jax.checkpoint import load_bundle
  try:
    (_, va), (_, vb) = load_bundle(a), load_bundle(b)
  except Exception:  # noqa: BLE001
    return False
  return jax.tree.structure(va) == jax.tree.structure(vb) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)))


def main_fuzz() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="/tmp/imagefolder_fuzz")
  parser.add_argument("--keep", action="store_true", help="keep every case directory")
  args = parser.parse_args()
  # Before main() configures logging: our handler follows each case's redirected stderr.
  logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_CurrentStderr()])
  shutil.rmtree(args.workdir, ignore_errors=True)
  bundle = os.path.join(args.workdir, "parity_bundle")
  assert main(["convert-official", "--tokenizer", os.path.join(PARITY, "tokenizer.pt"), "--generator",
               os.path.join(PARITY, "generator.pt"), "--config", os.path.join(PARITY, "config.json"),
               "--out", bundle]) == 0
  results, t0 = [], time.perf_counter()
  for i in range(args.cases):
    rng = np.random.default_rng((args.seed, i))
    family = "folder" if i % 10 == 9 else str(rng.choice(FAMILIES[:4]))
    case_dir = os.path.join(args.workdir, f"case{i:05d}")
    r = run_case(family, rng, case_dir, bundle)
    results.append(r)
    bad = r["crash"] or r["multi_line"] or r["half_written"] or r["wrong"]
    if bad:
      print(f"case {i} {family} {r['kind']}: code={r['code']} {dict((k, r[k]) for k in ('crash', 'multi_line', 'half_written', 'wrong'))} {r['err']!r}")
    elif not args.keep:
      shutil.rmtree(case_dir, ignore_errors=True)
  for family in FAMILIES:
    rs = [r for r in results if r["family"] == family]
    print(f"{family:10s} cases={len(rs):4d} ok={sum(r['code'] == 0 for r in rs):4d} "
          f"one-line-errors={sum(r['code'] == 2 and not r['multi_line'] for r in rs):4d} "
          f"crashes={sum(r['crash'] for r in rs)} multi-line={sum(r['multi_line'] for r in rs)} "
          f"half-written={sum(r['half_written'] for r in rs)} wrong={sum(r['wrong'] for r in rs)}")
  print(f"total cases={len(results)} crashes={sum(r['crash'] for r in results)} "
        f"multi-line={sum(r['multi_line'] for r in results)} half-written={sum(r['half_written'] for r in results)} "
        f"wrong={sum(r['wrong'] for r in results)} in {time.perf_counter() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main_fuzz())
