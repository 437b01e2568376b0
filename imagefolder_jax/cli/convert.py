"""Verbs that convert weights between formats: convert-official, export-official."""
from __future__ import annotations

import os

from imagefolder_jax.cli.common import CliError


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
  from imagefolder_jax.convert.official import convert_tokenizer
  from imagefolder_jax.storage.bundle import save_bundle
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


# ----------------------------------------------------------------------------- export-official
def _add_export_official(sub) -> None:
  p = sub.add_parser("export-official", help="write a bundle (or a training run) as official PyTorch checkpoints",
                     description="Writes tokenizer.pt ({'model','ema','steps'}), generator.pt (the official "
                                 "ar-ckpt layout, with trainer.var_wo_ddp and trainer.vae_local), .safetensors of "
                                 "the same state dicts and config.json (what convert-official --config reads). "
                                 "Example: imagefolder-jax export-official --bundle runs/gen/bundle --out official/")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--bundle", help="bundle directory (convert-official, export or a run's bundle/)")
  src.add_argument("--workdir", help="training workdir: its latest checkpoint (EMA weights) is exported")
  p.add_argument("--out", required=True, help="directory to write the official files into")
  p.add_argument("--teacher", help="frozen DINOv2 for semantic_model.*: a local DINOv2 file or bundle:DIR "
                                   "(default: the bundle's semantic_teacher, or the run's loss.semantic_teacher)")
  p.add_argument("--without-teacher", action="store_true",
                 help="export without semantic_model.* (loads strictly into a VQModel with semantic_guide='none')")
  p.set_defaults(run=_run_export_official)


def _run_export_official(args) -> None:
  import tempfile

  from imagefolder_jax.convert.export_official_files import export_bundle, workdir_teacher
  if args.teacher and args.without_teacher:
    raise CliError("--teacher and --without-teacher exclude each other")
  teacher = args.teacher
  if args.bundle:
    _check_bundle(args.bundle)
    paths = export_bundle(args.bundle, args.out, teacher=teacher, without_teacher=args.without_teacher)
    source = args.bundle
  else:
    from imagefolder_jax.train import trainer
    if not os.path.isdir(args.workdir):
      raise CliError(f"workdir not found: {args.workdir}")
    _, run_config = trainer.load_workdir_config(args.workdir)
    if teacher is None and not args.without_teacher:
      teacher = workdir_teacher(run_config)
    with tempfile.TemporaryDirectory() as tmp:
      bundle = os.path.join(tmp, "bundle")
      step = trainer.export(args.workdir, bundle)
      paths = export_bundle(bundle, args.out, teacher=teacher, without_teacher=args.without_teacher, step=step)
    source = f"{args.workdir} (step {step})"
  print(f"wrote {', '.join(os.path.basename(p) for p in paths)} to {args.out} from {source}")


def _check_bundle(bundle: str) -> None:
  """Refuses, in one line, a bundle whose arrays differ from its models' own init (missing, extra,
  mis-shaped, mis-typed, NaN) or whose configs are unusable, before anything is written."""
  from imagefolder_jax.cli.common import load_model
  from imagefolder_jax.inference.generator import Generator
  from imagefolder_jax.inference.tokenizer import Tokenizer
  from imagefolder_jax.storage.bundle import BundleError, read_bundle_configs
  if not os.path.isdir(bundle):
    load_model(Tokenizer, bundle)  # the one-line "not found" / "a file, not a directory" errors
  try:
    configs = read_bundle_configs(bundle)
  except BundleError as e:
    raise CliError(str(e)) from e
  load_model(Generator if "generator" in configs else Tokenizer, bundle)


VERBS = [_add_convert, _add_export_official]
