"""Inference verbs: reconstruct, sample, pretokenize."""
from __future__ import annotations

import os
import sys
from typing import Optional

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

  from imagefolder_jax.data.images import load_image_file, save_image_grid
  from imagefolder_jax.inference.tokenizer import Tokenizer
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
  from imagefolder_jax import parallel
  if not parallel.is_primary():  # in a multi-process job every process computed the same: one writes
    return
  pairs = np.stack([originals, recons], axis=1).reshape(-1, *originals.shape[1:])
  save_image_grid(pairs, args.out, nrow=2)
  mean_psnr = psnr(originals, recons)
  print(f"wrote {args.out}: {len(originals)} image(s), mean PSNR {mean_psnr:.2f} dB")


# ----------------------------------------------------------------------------- sample
# Which tokenizer branch `sample --force` keeps from the reference image (paper section 4.3).
SAMPLE_FORCE_BRANCHES = {"detail": 0, "semantic": 1}


def _add_sample(sub) -> None:
  p = sub.add_parser("sample",
                     help="class-conditional sampling with the next-scale generator; a PNG grid or a directory",
                     description="Samples images of the given ImageNet classes (cfg 3.25, top-k 750, top-p 0.95 by "
                                 "default, as in the paper). With --out, one PNG grid with a row per class; with "
                                 "--out-dir, one PNG per sample plus .npz shards of token ids, split over every "
                                 "process and resumable. Sample i depends only on (seed, i, settings): the same tokens "
                                 "on any number of devices or processes and at any batch size. With "
                                 "--reference, one branch of the reference image's tokens is kept (--force detail: "
                                 "branch 0, the default; semantic: branch 1) and the other is sampled (paper "
                                 "section 4.3). Examples: imagefolder-jax sample --bundle DIR --classes 207,360 "
                                 "--per-class 8 --out grid.png; imagefolder-jax sample --bundle DIR --classes all "
                                 "--per-class 50 --out-dir samples/")
  p.add_argument("--bundle", required=True, help="bundle with a tokenizer and a generator")
  out = p.add_mutually_exclusive_group(required=True)
  out.add_argument("--out", help="output PNG grid (one row of --per-class images per class)")
  out.add_argument("--out-dir", help="directory: images/NNNNNNN_cCCCC.png per sample and shard_*.npz of ids, "
                                     "labels and global sample indices; a rerun skips finished shards")
  p.add_argument("--classes", "--labels", dest="classes", required=True,
                 help="comma-separated class ids, e.g. 207,360,387 (num_classes = unconditional), or 'all'")
  p.add_argument("--per-class", type=int, default=1, help="samples per class id")
  p.add_argument("--seed", type=int, default=0, help="PRNG seed of the whole run")
  p.add_argument("--cfg", type=float, default=3.25, help="classifier-free guidance scale (0 = conditional only)")
  p.add_argument("--top-k", type=int, default=750, help="keep the k most likely tokens per branch (0 = all)")
  p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1] (1 = off)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--batch-size", type=int, default=16,
                 help="samples per sampler call (--out: over all devices; --out-dir: per process), rounded up to "
                      "a multiple of the devices")
  p.add_argument("--shard-size", type=int, default=1000, help="--out-dir: samples per .npz shard")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="generator compute dtype (default: the bundle's); bfloat16 keeps the head, "
                      "filtering and the tokenizer in float32")
  p.add_argument("--reference", help="image whose tokens of the --force branch every sample keeps")
  p.add_argument("--force", choices=tuple(SAMPLE_FORCE_BRANCHES),
                 help="branch of --reference to keep: detail (branch 0, default) or semantic (branch 1)")
  p.add_argument("--save-npz", "--codes-out", dest="save_npz",
                 help="--out: also write the sampled token ids (.npz: flat (N, P, L) int, labels (N,))")
  p.set_defaults(run=_run_sample)


def _parse_classes(text: str) -> Optional[list[int]]:
  """Class ids of --classes; None for 'all'."""
  if text.strip() == "all":
    return None
  try:
    labels = [int(x) for x in text.split(",") if x.strip()]
  except ValueError as e:
    raise CliError(f"--classes must be comma-separated ints or 'all', got {text!r}") from e
  if not labels:
    raise CliError("--classes is empty")
  return labels


def _run_sample(args) -> None:
  import math

  import numpy as np

  from imagefolder_jax import parallel
  from imagefolder_jax.data.images import load_image_file, save_image_grid
  from imagefolder_jax.inference.generator import Generator
  labels = _parse_classes(args.classes)
  if args.per_class < 1 or args.batch_size < 1 or args.shard_size < 1:
    raise CliError(f"--per-class, --batch-size and --shard-size must be >= 1, got {args.per_class}, "
                   f"{args.batch_size} and {args.shard_size}")
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
  if args.save_npz and args.out_dir:
    raise CliError("--save-npz goes with --out (--out-dir writes the ids into its shards)")
  # A grid is one job over every device of every process; a directory is split into shards that
  # each process samples on its own devices.
  mesh = parallel.local_mesh() if args.out_dir else parallel.make_mesh()
  gen = load_model(Generator, args.bundle, mesh=mesh)
  num_classes = gen.config.num_classes
  if labels is None:
    labels = list(range(num_classes))
  bad = [c for c in labels if not 0 <= c <= num_classes]
  if bad:
    raise CliError(f"--classes: class id {bad[0]} is outside [0, {num_classes}] ({num_classes} = unconditional)")
  shards = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
  all_labels = np.repeat(np.asarray(labels), args.per_class)
  batch = -(-min(args.batch_size, all_labels.size) // shards) * shards
  force_codes, branch = None, None
  force = None
  if args.reference:
    branch = SAMPLE_FORCE_BRANCHES[args.force or "detail"]
    branches = gen.tokenizer.config.num_branches
    if branch >= branches:
      raise CliError(f"--force {args.force} needs branch {branch}; the bundle's tokenizer has {branches} branch(es)")
    reference = load_image_file(args.reference, gen.tokenizer.resolution)[None]
    force_codes = gen.tokenizer.encode(np.repeat(reference, shards, axis=0))
    force = {branch: [np.repeat(parallel.to_host(s)[:1], batch, axis=0) for s in force_codes.ids[branch]]}
  settings = dict(seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                  dtype=args.dtype)
  if args.out_dir:
    from imagefolder_jax.inference.sample_runner import DirectoryRun, sample_to_directory
    run = DirectoryRun(labels=tuple(int(c) for c in all_labels), shard_size=args.shard_size, **settings)
    done = sample_to_directory(gen, run, args.out_dir, batch_size=batch, bundle=args.bundle, force=force)
    if parallel.is_primary():
      print(f"wrote {args.out_dir}: {all_labels.size} sample(s) of {len(labels)} class(es) "
            f"(process 0: {done['written']} sampled, {done['skipped']} finished shard(s) skipped)")
    return
  images, flats = [], []
  for start in range(0, all_labels.size, batch):
    numbers = np.arange(start, start + batch)       # past the end: drawn on idle devices, dropped
    keep = numbers < all_labels.size
    out = gen.sample(all_labels[np.minimum(numbers, all_labels.size - 1)], force=force, indices=numbers,
                     **settings)
    images.append(parallel.to_host(out.images)[keep])
    flats.append(out.codes.flat()[keep])
  if not parallel.is_primary():
    return
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
  p.add_argument("--batch-size", type=int, default=64,
                 help="images per step and process (rounded up to a multiple of its devices)")
  p.add_argument("--out", required=True, help="output directory")
  p.set_defaults(run=_run_pretokenize)


def _run_pretokenize(args) -> None:
  from imagefolder_jax import data
  from imagefolder_jax.data.codes import pretokenize
  from imagefolder_jax.inference.tokenizer import Tokenizer
  if args.batch_size < 1:
    raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
  import jax

  from imagefolder_jax import parallel
  tok = load_model(Tokenizer, args.bundle, mesh=parallel.local_mesh())
  source = data.build_source(args.source, data_dir=args.data_dir, split=args.split)
  devices, processes = jax.local_device_count(), jax.process_count()
  batch = -(-args.batch_size // devices) * devices
  # Each process encodes its rows of every global batch on its own devices (no collectives).
  loader = data.make_loader(source, batch_size=batch, resolution=tok.resolution, train=False, seed=0,
                            drop_remainder=False, shard_index=jax.process_index(), shard_count=processes)
  count = pretokenize(tok, loader, args.out, args.source)
  if parallel.is_primary():
    print(f"wrote {count} records to {args.out}")



VERBS = [_add_reconstruct, _add_sample, _add_pretokenize]
