"""The `imagefolder-jax` command line. Thin: parses, validates, calls library functions.

Every error is one line on stderr (`imagefolder-jax: error: ...`); `-v` adds the traceback above it.
Exit codes: 0 success; 2 bad input (arguments, config, files, bundles, checkpoints: the message
names the offending value); 1 an unexpected exception (its type and message, "run with -v");
3 another process of a multi-process job was lost or took another path (`multihost`); 130
interrupted; 143 stopped by SIGTERM (multi-process jobs). Verbs live in one module per group (`convert`,
`inference`, `training`, `evaluation`, `planning`); each module lists its `VERBS` (functions that add a
sub-parser), and `main` dispatches to the sub-parser's `run`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from typing import Callable, Optional, Sequence

from imagefolder_jax.cli.common import PROG, CliError

__all__ = ["CliError", "PROG", "EXIT_BAD_INPUT", "EXIT_UNEXPECTED", "build_parser", "main"]

EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# Longest message printed; library messages name values, never need more.
MAX_MESSAGE = 600


class _Parser(argparse.ArgumentParser):
  """argparse with one-line usage errors (the default prints the whole usage block first)."""

  def error(self, message: str):
    self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _verbs() -> list[Callable]:
  from imagefolder_jax.cli import convert, evaluation, inference, planning, training
  from imagefolder_jax.serve import cli as serve  # argparse only; the web stack is imported when it runs
  return [*convert.VERBS, *inference.VERBS, *training.VERBS, *evaluation.VERBS, *planning.VERBS,
          *serve.VERBS]


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description="ImageFolder tokenizer and generator in JAX")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
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
  sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_Parser)
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


# grain appends this banner to the message of an exception raised inside a data pipeline (a codes
# record that fails its check mid-run); it says nothing about the input.
_GRAIN_BANNER = "\n--------------------\nFor simplicity, Grain has removed"


def one_line(message: object) -> str:
  """`message` as a single line: whitespace runs (newlines included) become one space."""
  text = " ".join(str(message).split(_GRAIN_BANNER)[0].split())
  return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def _input_errors() -> tuple[type, ...]:
  from imagefolder_jax.errors import ImageFolderError
  # The library's own errors name the offending value; ValueError and OSError cover what the libraries
  # below raise for bad input (files that cannot be read or written: missing, permissions, a full disk).
  return (ImageFolderError, ValueError, OSError)


def main(argv: Optional[Sequence[str]] = None) -> int:
  # TensorFlow (imported by clu/tfds) prints C++ banners at import unless told otherwise.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  # A failed orbax restore (a damaged bundle or checkpoint) leaves its per-array read coroutines
  # unawaited; Python reports each at garbage collection, later than the one line that explains it.
  warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
  from imagefolder_jax.parallel import multihost
  parser = build_parser()
  try:  # argparse exits on bad arguments and --help; in-process callers get the code back
    args, extra = parser.parse_known_args(argv)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
  if not args.verbose:
    # orbax/absl/jax log every checkpoint step and backend probe at INFO; users want our lines only.
    for name in ("absl", "orbax", "jax._src.xla_bridge", "jax"):
      logging.getLogger(name).setLevel(logging.ERROR)
  if extra and not getattr(args, "accepts_overrides", False):
    print(f"{PROG}: error: unrecognized arguments: {' '.join(extra)} (see {PROG} --help)", file=sys.stderr)
    return EXIT_BAD_INPUT
  args.overrides = extra
  try:
    _start_distributed(args)
    args.run(args)
  except KeyboardInterrupt:
    print(f"{PROG}: interrupted", file=sys.stderr)
    return _leave(EXIT_INTERRUPTED)
  except Exception as e:  # every failure ends as one line; -v shows where it came from
    if args.verbose:
      traceback.print_exc()
    if isinstance(e, multihost.BarrierError):
      print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
      return _leave(multihost.EXIT_PEER_LOST)
    lost = multihost.peer_failure(e)
    if lost is not None:
      print(f"{PROG}: error: {one_line(lost)}; rerun the same command on every host to resume from the "
            "last checkpoint", file=sys.stderr)
      return _leave(multihost.EXIT_PEER_LOST)
    if isinstance(e, _input_errors()):
      print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
      return _leave(EXIT_BAD_INPUT)
    print(f"{PROG}: error: {one_line(f'{type(e).__name__}: {e}')} (run with -v for the traceback)",
          file=sys.stderr)
    return _leave(EXIT_UNEXPECTED)
  return 0


def _leave(code: int) -> int:
  from imagefolder_jax.parallel import multihost
  if multihost.is_multiprocess():
    multihost.abandon(code)
  return code
