"""Verbs that convert weights between formats: convert-official."""
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



VERBS = [_add_convert]
