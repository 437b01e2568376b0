"""The `imagefolder-jax` command line. Thin: parses, validates, calls library functions.

Every verb prints one-line errors (`imagefolder-jax: error: ...`) and exits non-zero on bad input.
Verbs live in one module per group (`convert`, `inference`, `training`); each module lists its
`VERBS` (functions that add a sub-parser), and `main` dispatches to the sub-parser's `run`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from imagefolder_jax.cli.common import PROG, CliError

__all__ = ["CliError", "PROG", "build_parser", "main"]


def _verbs() -> list[Callable]:
  from imagefolder_jax.cli import convert, evaluation, inference, training
  return [*convert.VERBS, *inference.VERBS, *training.VERBS, *evaluation.VERBS]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description="ImageFolder tokenizer and generator in JAX")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
  for add in _verbs():
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
