"""The `imagefolder-jax` command line. Thin: parses, validates, calls library functions.

Every verb prints one-line errors (`imagefolder-jax: error: ...`) and exits non-zero on bad input.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional, Sequence

PROG = "imagefolder-jax"


class CliError(Exception):
  """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- convert-official
def _add_convert(sub) -> None:
  p = sub.add_parser("convert-official", help="convert official PyTorch ImageFolder checkpoints to a bundle",
                     description="Reads the authors' released checkpoints (tensors only, never unpickling "
                                 "code) and writes a bundle that Tokenizer.load / Generator.load read.")
  p.add_argument("--tokenizer", required=True, help="official tokenizer checkpoint (.pt/.pth)")
  p.add_argument("--generator", help="official VAR checkpoint (ar-ckpt-*.pth); optional")
  p.add_argument("--config", help="architecture JSON (parity config.json format); default: released MSVR10P2-4096")
  p.add_argument("--weights", choices=("ema", "model"), default="ema",
                 help="which tokenizer weights to take (default ema, as the official AR pipeline)")
  p.add_argument("--out", required=True, help="bundle directory to write")
  p.set_defaults(run=_run_convert)


def _run_convert(args) -> None:
  from imagefolder_jax.checkpoint import save_bundle
  from imagefolder_jax.convert.official import convert_tokenizer
  for path in (args.tokenizer, args.generator, args.config):
    if path and not os.path.isfile(path):
      raise CliError(f"file not found: {path}")
  config, variables, teacher = convert_tokenizer(args.tokenizer, args.config, args.weights)
  configs = {"tokenizer": config.to_dict()}
  all_vars = {"tokenizer": variables}
  if teacher is not None:
    import dataclasses
    configs["semantic_teacher"] = dataclasses.asdict(teacher[0])
    all_vars["semantic_teacher"] = {"params": teacher[1]}
  if args.generator:
    from imagefolder_jax.convert.official_generator import convert_generator
    gen_config, gen_vars = convert_generator(args.generator, config, args.config)
    configs["generator"] = gen_config.to_dict()
    all_vars["generator"] = gen_vars
  save_bundle(args.out, configs, all_vars)
  print(f"wrote bundle {args.out} ({', '.join(sorted(configs))})")


# ----------------------------------------------------------------------------- reconstruct
def _add_reconstruct(sub) -> None:
  p = sub.add_parser("reconstruct", help="encode and decode images; write originals|reconstructions as a PNG grid")
  p.add_argument("--bundle", required=True, help="bundle directory (convert-official or export)")
  p.add_argument("--out", required=True, help="output PNG (two columns per image: original, reconstruction)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("images", nargs="+", help="image files (any size/format PIL reads)")
  p.set_defaults(run=_run_reconstruct)


def _run_reconstruct(args) -> None:
  import numpy as np
  from imagefolder_jax.api import Tokenizer
  from imagefolder_jax.data.images import load_image_file, save_image_grid
  if args.batch_size < 1:
    raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
  tok = _load(Tokenizer, args.bundle)
  loaded = []
  for path in args.images:
    try:
      loaded.append(load_image_file(path, tok.resolution))
    except (OSError, ValueError) as e:
      print(f"{PROG}: skipping {path}: {e}", file=sys.stderr)
  if not loaded:
    raise CliError("no readable image among the inputs")
  originals = np.stack(loaded)
  recons = []
  for start in range(0, len(originals), args.batch_size):
    chunk = originals[start:start + args.batch_size]
    pad = args.batch_size - len(chunk) if len(originals) > args.batch_size else 0
    batch = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
    recons.append(np.asarray(tok.reconstruct(batch))[:len(chunk)])
  recons = np.concatenate(recons)
  pairs = np.stack([originals, recons], axis=1).reshape(-1, *originals.shape[1:])
  save_image_grid(pairs, args.out, nrow=2)
  psnr = _psnr(originals, recons)
  print(f"wrote {args.out}: {len(originals)} image(s), mean PSNR {psnr:.2f} dB")


def _psnr(a, b) -> float:
  import numpy as np
  mse = np.mean(((np.asarray(a) - np.asarray(b)) / 2.0) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def _load(cls, bundle: str):
  from imagefolder_jax.checkpoint import BundleError
  if not os.path.isdir(bundle):
    raise CliError(f"bundle directory not found: {bundle}")
  try:
    return cls.load(bundle)
  except BundleError as e:
    raise CliError(str(e)) from e


# ----------------------------------------------------------------------------- training
def _add_train(sub, verb: str, stage: str, example: str) -> None:
  p = sub.add_parser(verb, help=f"train the {stage} (resumes automatically from --workdir)",
                     description=f"Trains the {stage} from an ml_collections config file; rerunning the "
                                 f"same command resumes from the last checkpoint. Overrides: "
                                 f"--config.a.b=value. Example: {example}")
  p.add_argument("--config", required=True, help="config file, optionally file.py:arg")
  p.add_argument("--workdir", required=True, help="checkpoints, logs, TensorBoard events and images")
  p.set_defaults(run=lambda args: _run_train(args, stage), accepts_overrides=True)


def _run_train(args, stage: str) -> None:
  from imagefolder_jax.train import trainer
  from imagefolder_jax.train.configuration import load_config
  config = load_config(args.config, args.overrides)
  trainer.train(stage, config, args.workdir)


def _add_export(sub) -> None:
  p = sub.add_parser("export", help="write an inference bundle from a training workdir (EMA weights)")
  p.add_argument("--workdir", required=True, help="a train-tokenizer or train-generator workdir")
  p.add_argument("--out", required=True, help="bundle directory to write")
  p.set_defaults(run=_run_export)


def _run_export(args) -> None:
  from imagefolder_jax.train import trainer
  step = trainer.export(args.workdir, args.out)
  print(f"wrote bundle {args.out} from step {step} of {args.workdir}")


# ----------------------------------------------------------------------------- sample
# Which tokenizer branch `sample --force` keeps from the reference image (paper section 4.3).
SAMPLE_FORCE_BRANCHES = {"detail": 0, "semantic": 1}


def _add_sample(sub) -> None:
  p = sub.add_parser("sample", help="class-conditional sampling with the next-scale generator; writes a PNG grid",
                     description="Samples images of the given ImageNet classes (cfg 3.25, top-k 750, top-p 0.95 by "
                                 "default, as in the paper); the grid has one row per class. With --reference, one "
                                 "branch of the reference image's tokens is kept (--force detail: branch 0, the "
                                 "default; semantic: branch 1) and the other branch is sampled (paper section "
                                 "4.3). Example: imagefolder-jax sample --bundle DIR --classes 207,360 "
                                 "--per-class 8 --out grid.png")
  p.add_argument("--bundle", required=True, help="bundle with a tokenizer and a generator")
  p.add_argument("--out", required=True, help="output PNG grid (one row of --per-class images per class)")
  p.add_argument("--classes", "--labels", dest="classes", required=True,
                 help="comma-separated class ids, e.g. 207,360,387 (num_classes = unconditional)")
  p.add_argument("--per-class", type=int, default=1, help="samples per class id")
  p.add_argument("--seed", type=int, default=0, help="batch i of the run uses seed + i")
  p.add_argument("--cfg", type=float, default=3.25, help="classifier-free guidance scale (0 = conditional only)")
  p.add_argument("--top-k", type=int, default=750, help="keep the k most likely tokens per branch (0 = all)")
  p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1] (1 = off)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--reference", help="image whose tokens of the --force branch every sample keeps")
  p.add_argument("--force", choices=tuple(SAMPLE_FORCE_BRANCHES),
                 help="branch of --reference to keep: detail (branch 0, default) or semantic (branch 1)")
  p.add_argument("--save-npz", "--codes-out", dest="save_npz",
                 help="also write the sampled token ids (.npz: flat (N, P, L) int, labels (N,))")
  p.set_defaults(run=_run_sample)


def _run_sample(args) -> None:
  import math
  import numpy as np
  from imagefolder_jax.data.images import load_image_file, save_image_grid
  from imagefolder_jax.generation import Generator
  try:
    labels = [int(x) for x in args.classes.split(",") if x.strip()]
  except ValueError as e:
    raise CliError(f"--classes must be comma-separated ints, got {args.classes!r}") from e
  if not labels:
    raise CliError("--classes is empty")
  if args.per_class < 1 or args.batch_size < 1:
    raise CliError(f"--per-class and --batch-size must be >= 1, got {args.per_class} and {args.batch_size}")
  # Checked before the bundle loads so that a typo fails at once.
  if args.top_k < 0:
    raise CliError(f"--top-k must be >= 0, got {args.top_k}")
  if not 0.0 < args.top_p <= 1.0:
    raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")
  if not (args.cfg >= 0.0 and math.isfinite(args.cfg)):
    raise CliError(f"--cfg must be a finite number >= 0, got {args.cfg}")
  if not (args.temperature > 0.0 and math.isfinite(args.temperature)):
    raise CliError(f"--temperature must be a finite number > 0, got {args.temperature}")
  if args.force and not args.reference:
    raise CliError("--force needs --reference")
  if args.reference and not os.path.isfile(args.reference):
    raise CliError(f"file not found: {args.reference}")
  gen = _load(Generator, args.bundle)
  num_classes = gen.config.num_classes
  bad = [c for c in labels if not 0 <= c <= num_classes]
  if bad:
    raise CliError(f"--classes: class id {bad[0]} is outside [0, {num_classes}] ({num_classes} = unconditional)")
  all_labels = np.repeat(np.asarray(labels), args.per_class)
  force_codes, branch = None, None
  if args.reference:
    branch = SAMPLE_FORCE_BRANCHES[args.force or "detail"]
    branches = gen.tokenizer.config.num_branches
    if branch >= branches:
      raise CliError(f"--force {args.force} needs branch {branch}; the bundle's tokenizer has {branches} branch(es)")
    force_codes = gen.tokenizer.encode(load_image_file(args.reference, gen.tokenizer.resolution)[None])
  images, flats = [], []
  for i, start in enumerate(range(0, len(all_labels), args.batch_size)):
    chunk = all_labels[start:start + args.batch_size]
    # Pad the last batch so every batch reuses one compiled sampler.
    batch = len(chunk) if len(all_labels) <= args.batch_size else args.batch_size
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk))])
    force = None
    if force_codes is not None:
      force = {branch: [np.repeat(np.asarray(s), batch, axis=0) for s in force_codes.ids[branch]]}
    out = gen.sample(padded, seed=args.seed + i, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                     temperature=args.temperature, force=force)
    images.append(np.asarray(out.images)[:len(chunk)])
    flats.append(out.codes.flat()[:len(chunk)])
  images = np.concatenate(images)
  save_image_grid(images, args.out, nrow=args.per_class)
  if args.save_npz:
    np.savez(args.save_npz, flat=np.concatenate(flats), labels=all_labels)
  print(f"wrote {args.out}: {len(images)} sample(s) of class(es) {','.join(map(str, labels))}")


# ----------------------------------------------------------------------------- pretokenize
def _add_pretokenize(sub) -> None:
  p = sub.add_parser("pretokenize", help="encode a dataset once with a tokenizer bundle (ArrayRecord codes)",
                     description="Writes token ids for train-generator --config.data.source=codes:OUT")
  p.add_argument("--bundle", required=True, help="tokenizer bundle")
  p.add_argument("--source", default="demo", help="demo | folder:/path | tfds:imagenet2012")
  p.add_argument("--data-dir", help="TFDS data dir (for tfds: sources)")
  p.add_argument("--split", default="train")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--out", required=True, help="output directory")
  p.set_defaults(run=_run_pretokenize)


def _run_pretokenize(args) -> None:
  from imagefolder_jax import data
  from imagefolder_jax.api import Tokenizer
  from imagefolder_jax.data.codes import pretokenize
  if args.batch_size < 1:
    raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
  tok = _load(Tokenizer, args.bundle)
  source = data.build_source(args.source, data_dir=args.data_dir, split=args.split)
  loader = data.make_loader(source, batch_size=args.batch_size, resolution=tok.resolution, train=False, seed=0,
                            drop_remainder=False, shard_index=0, shard_count=1)
  count = pretokenize(tok, loader, args.out, args.source)
  print(f"wrote {count} records to {args.out}")


# ----------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
  p = sub.add_parser("demo", help="offline demo: train a small tokenizer + generator on built-in photos, "
                                  "write reconstructions.png, samples.png, report.json/md")
  p.add_argument("--workdir", default="runs/demo", help="where both runs and the results go (resumable)")
  p.add_argument("--tokenizer-steps", type=int, help="override the tokenizer's training steps")
  p.add_argument("--generator-steps", type=int, help="override the generator's training steps")
  p.add_argument("--samples-per-class", type=int, default=8)
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.set_defaults(run=_run_demo)


def _run_demo(args) -> None:
  from imagefolder_jax.train.demo import run_demo
  tok = [f"--config.train.num_steps={args.tokenizer_steps}"] if args.tokenizer_steps else []
  gen = [f"--config.train.num_steps={args.generator_steps}"] if args.generator_steps else []
  for name in ("tokenizer_steps", "generator_steps", "samples_per_class"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  report = run_demo(args.workdir, tok, gen, samples_per_class=args.samples_per_class, seed=args.seed)
  print(f"demo done in {report['total_minutes']:.1f} min: {args.workdir}/reconstructions.png, samples.png, "
        f"report.md (val PSNR {report['tokenizer']['val_psnr_db']:.2f} dB, sample class accuracy "
        f"{report['class_consistency']['accuracy_on_samples']:.0%})")


# ----------------------------------------------------------------------------- main
VERBS: list[Callable] = [
    _add_convert, _add_reconstruct, _add_sample,
    lambda sub: _add_train(sub, "train-tokenizer", "tokenizer",
                           "imagefolder-jax train-tokenizer --config configs/tokenizer_demo.py --workdir runs/tok"),
    lambda sub: _add_train(sub, "train-generator", "generator",
                           "imagefolder-jax train-generator --config configs/generator_demo.py --workdir runs/gen "
                           "--config.tokenizer_bundle=runs/tok_bundle"),
    _add_export, _add_pretokenize, _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description="ImageFolder tokenizer and generator in JAX")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
  for add in VERBS:
    add(sub)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  # TensorFlow (imported by clu/tfds) prints C++ banners at import unless told otherwise.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  from imagefolder_jax.convert.common import ConversionError
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
  if not args.verbose:
    # orbax/absl/jax log every checkpoint step and backend probe at INFO; users want our lines only.
    for name in ("absl", "orbax", "jax._src.xla_bridge", "jax"):
      logging.getLogger(name).setLevel(logging.ERROR)
  if extra and not getattr(args, "accepts_overrides", False):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.overrides = extra
  try:
    args.run(args)
  except (CliError, ConversionError, FileNotFoundError, ValueError) as e:
    # ValueError covers config, bundle and checkpoint errors: all name the offending value.
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{PROG}: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
