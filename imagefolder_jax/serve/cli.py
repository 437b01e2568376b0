"""The `serve` verb: `imagefolder-jax serve --bundle DIR [--host 127.0.0.1] [--port 8000]`.

Only argparse runs at import (the CLI collects every verb's parser for --help); the web stack
(the `serve` extra: starlette, uvicorn, python-multipart) is imported when the verb runs, and its
absence is a one-line error naming the install command.
"""
from __future__ import annotations

import logging
import socket

from imagefolder_jax.cli.common import PROG, CliError, load_model

EXTRA_HINT = 'pip install -e ".[serve]"'


def _add_serve(sub) -> None:
  p = sub.add_parser(
      "serve", help="a local web page and HTTP API: sample, decode scale by scale, explore the two branches",
      description="Serves a page (class-conditional sampling, the image after each scale, reconstruction, "
                  "teacher-forced resampling of one branch, branch swaps) and an HTTP API (POST /api/sample "
                  "-> JSON, PNG or .npz; see docs/serving.md) over warm compiled programs. Concurrent "
                  "requests share sampler calls of up to the largest --batch-sizes entry; beyond --max-queue "
                  "requests the answer is 503 busy. Binds 127.0.0.1 unless --host says otherwise. Needs "
                  f"the serve extra: {EXTRA_HINT}")
  p.add_argument("--bundle", required=True,
                 help="bundle with a tokenizer and a generator (or a demo / train-generator workdir "
                      "holding one)")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--batch-sizes", default="1,2,4,8,16",
                 help="compiled sampler batch sizes (calls are padded up to the next; the largest is the "
                      "most rows one call takes)")
  p.add_argument("--max-queue", type=int, default=64, help="requests admitted at once; more get 503 busy")
  p.add_argument("--request-timeout", type=float, default=120.0,
                 help="seconds a request may take (504 after)")
  p.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body in MiB (413 above)")
  p.add_argument("--max-megapixels", type=float, default=40.0,
                 help="largest uploaded image (width x height), checked from its header before decoding")
  p.add_argument("--max-samples", type=int, default=64, help="samples one request may ask for")
  p.add_argument("--class-names",
                 help="text file: one class name per line, in class-id order (default: from the bundle's "
                      "training run, ImageNet for 1000 classes, else numbers)")
  p.add_argument("--no-warm", action="store_true", help="compile on first use instead of at start")
  p.set_defaults(run=_run_serve)


def _resolve_bundle(path: str) -> str:
  """The bundle itself, or the generator bundle inside a demo / training workdir given instead
  (`--bundle runs/demo` serves runs/demo/generator/bundle). A missing `WORKDIR/bundle` also falls
  back to `WORKDIR/generator/bundle`, where the demo writes the bundle that has a generator."""
  import os
  candidates = [path, os.path.join(path, "bundle"), os.path.join(path, "generator", "bundle")]
  if not os.path.exists(path) and os.path.basename(os.path.normpath(path)) == "bundle":
    candidates.append(os.path.join(os.path.dirname(os.path.normpath(path)), "generator", "bundle"))
  for candidate in candidates:
    if os.path.isfile(os.path.join(candidate, "bundle.json")):
      return candidate
  return path  # load_model names what is wrong with it


def _parse_batch_sizes(text: str) -> tuple[int, ...]:
  try:
    sizes = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise CliError(f"--batch-sizes must be comma-separated ints, got {text!r}") from None
  if not sizes or min(sizes) < 1:
    raise CliError(f"--batch-sizes must be positive ints, got {text!r}")
  return sizes


def _run_serve(args) -> None:
  try:
    import python_multipart  # noqa: F401  # the form parser starlette uses for uploads
    import starlette  # noqa: F401
    import uvicorn
  except ImportError as e:
    raise CliError(f"serve needs the serve extra ({e.name or e} is not installed): {EXTRA_HINT}") from None
  from imagefolder_jax.inference.generator import Generator
  from imagefolder_jax.serve.app import create_app
  from imagefolder_jax.serve.classes import class_names
  from imagefolder_jax.serve.engine import Engine, EngineSettings
  from imagefolder_jax.serve.params import Limits, defaults_for

  sizes = _parse_batch_sizes(args.batch_sizes)
  for flag, value in (("--max-queue", args.max_queue), ("--request-timeout", args.request_timeout),
                      ("--max-upload-mb", args.max_upload_mb), ("--max-megapixels", args.max_megapixels),
                      ("--max-samples", args.max_samples)):
    if not value > 0:
      raise CliError(f"{flag} must be > 0, got {value}")
  if not 0 <= args.port < 65536:
    raise CliError(f"--port must be in [0, 65535], got {args.port}")
  limits = Limits(max_samples=args.max_samples, max_per_class=min(16, args.max_samples),
                  max_upload_bytes=int(args.max_upload_mb * 2 ** 20),
                  max_pixels=int(args.max_megapixels * 1e6))
  # Bound before the (slow) compiles so that a port in use fails at once.
  try:
    sock = socket.create_server((args.host, args.port), reuse_port=False)
  except OSError as e:
    raise CliError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
  try:
    bundle = _resolve_bundle(args.bundle)
    gen = load_model(Generator, bundle)
    names, origin = class_names(bundle, gen.config.num_classes, args.class_names)
    defaults = defaults_for(gen.config.codebook_size)  # the CLI's sample defaults: what gets compiled
    engine = Engine(gen, EngineSettings(batch_sizes=sizes, max_queue=args.max_queue,
                                        request_timeout=args.request_timeout, top_k=defaults["top_k"],
                                        top_p=defaults["top_p"]))
    log = logging.getLogger("imagefolder_jax.serve")
    log.setLevel(logging.INFO)
    log.info("serve: compiling the sampler for batch sizes %s and the tokenizer programs...",
             ",".join(map(str, engine.settings.batch_sizes)))
    engine.start(warm=not args.no_warm)
    app = create_app(engine, bundle, names, origin, limits)
    host, port = sock.getsockname()[:2]
    print(f"{PROG} serve: http://{host if ':' not in host else f'[{host}]'}:{port}/ (bundle {bundle}, "
          f"{gen.config.num_classes} classes, names: {origin}; Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning", server_header=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
  finally:
    sock.close()
    if "engine" in locals():
      engine.stop()


VERBS = [_add_serve]
