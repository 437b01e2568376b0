"""Inference verbs: reconstruct, sample, pretokenize."""
from __future__ import annotations

import os
import sys

from imagefolder_jax.cli.common import PROG, CliError, load_model, psnr


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
  tok = load_model(Tokenizer, args.bundle)
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
  mean_psnr = psnr(originals, recons)
  print(f"wrote {args.out}: {len(originals)} image(s), mean PSNR {mean_psnr:.2f} dB")


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
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="generator compute dtype (default: the bundle's); bfloat16 keeps the head, "
                      "filtering and the tokenizer in float32")
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
  gen = load_model(Generator, args.bundle)
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
                     temperature=args.temperature, force=force, dtype=args.dtype)
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
  tok = load_model(Tokenizer, args.bundle)
  source = data.build_source(args.source, data_dir=args.data_dir, split=args.split)
  loader = data.make_loader(source, batch_size=args.batch_size, resolution=tok.resolution, train=False, seed=0,
                            drop_remainder=False, shard_index=0, shard_count=1)
  count = pretokenize(tok, loader, args.out, args.source)
  print(f"wrote {count} records to {args.out}")



VERBS = [_add_reconstruct, _add_sample, _add_pretokenize]
