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
  from imagefolder_jax.cli import convert, inference, training
  return [*convert.VERBS, *inference.VERBS, *training.VERBS]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description="ImageFolder tokenizer and generator in JAX")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  group = parser.add_argument_group(
      "multi-process jobs", "One process per host (or per GPU) runs the same command; launch/local.sh, "
      "launch/slurm.sbatch and launch/tpu_pod.sh set these through the environment (IFJ_COORDINATOR, "
      "IFJ_NUM_PROCESSES, IFJ_PROCESS_ID; timeouts IFJ_INIT_TIMEOUT, IFJ_HEARTBEAT_TIMEOUT).")
  group.add_argument("--coordinator", help="host:port of process 0's coordination service")
  group.add_argument("--num-processes", type=int, help="processes in the job")
  group.add_argument("--process-id", type=int, help="this process's id in [0, num-processes)")
  group.add_argument("--heartbeat-timeout", type=int,
                     help="seconds without a heartbeat before a process is declared dead and the job stops "
                          "(default 60)")
  sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
  for add in _verbs():
    add(sub)
  return parser


def _start_distributed(args) -> None:
  """Joins the multi-process job described by flags or environment (before any device is used)."""
  from imagefolder_jax import parallel
  timeouts = {}
  if args.heartbeat_timeout is not None:
    timeouts["heartbeat_timeout_seconds"] = args.heartbeat_timeout
  parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id, **timeouts)
  if not parallel.is_primary() and not args.verbose:
    logging.getLogger().setLevel(logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
  # TensorFlow (imported by clu/tfds) prints C++ banners at import unless told otherwise.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  from imagefolder_jax.convert.common import ConversionError
  from imagefolder_jax import multihost
  from imagefolder_jax.multihost import DistributedError
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
    _start_distributed(args)
    args.run(args)
  except (CliError, ConversionError, FileNotFoundError, ValueError, DistributedError) as e:
    # ValueError covers config, bundle and checkpoint errors: all name the offending value.
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return _leave(2)
  except KeyboardInterrupt:
    print(f"{PROG}: interrupted", file=sys.stderr)
    return _leave(130)
  except Exception as e:  # pylint: disable=broad-except
    lost = multihost.peer_failure(e)
    if lost is None:
      raise
    print(f"{PROG}: error: {lost}; rerun the same command on every host to resume from the last checkpoint",
          file=sys.stderr)
    return _leave(multihost.EXIT_PEER_LOST)
  return 0


def _leave(code: int) -> int:
  from imagefolder_jax import multihost
  if multihost.is_multiprocess():
    multihost.abandon(code)
  return code
