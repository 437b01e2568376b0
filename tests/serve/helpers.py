"""Helpers of the serve tests: a tiny random bundle and the app served from a thread."""
from __future__ import annotations

import jax.numpy as jnp
from support import random_variables

SERVE_SCALES = (1, 2, 3, 4)
NUM_CLASSES = 10
# The filter settings the test servers compile at start and default to. Both filters off: the program
# compiles in half the time (the filters are the library's, tested in tests/inference/test_sampling.py).
TOP_K, TOP_P = 0, 1.0


def build_tiny_bundle(path: str) -> str:
  from imagefolder_jax.inference.generator import Generator
  from imagefolder_jax.inference.tokenizer import Tokenizer
  from imagefolder_jax.models.generator import GeneratorConfig, NextScaleGenerator
  from imagefolder_jax.models.quantizer import QuantizerConfig
  from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig
  from imagefolder_jax.models.vit import ViTConfig
  tok_config = TokenizerConfig(
      vit=ViTConfig(width=32, depth=1, num_heads=2, patch_size=8, image_size=32),
      quantizer=QuantizerConfig(codebook_size=64, latent_dim=8, scales=SERVE_SCALES, num_phi=2,
                                codebook_update="gradient"),
      num_branches=2)
  gen_config = GeneratorConfig(depth=1, width=32, num_heads=2, num_classes=NUM_CLASSES, num_branches=2,
                               codebook_size=64, latent_dim=8, scales=SERVE_SCALES)
  tok_vars = random_variables(ImageFolderTokenizer(tok_config), jnp.zeros((1, 32, 32, 3)), scale=0.3, seed=1)
  n = gen_config.num_tokens
  gen_vars = random_variables(NextScaleGenerator(gen_config), jnp.zeros((1,), jnp.int32),
                              jnp.zeros((1, n - 1, 16)), scale=0.2, seed=2)
  Generator(Tokenizer(tok_config, tok_vars), gen_config, gen_vars).save(path)
  return path


class ServerThread:
  """The app under uvicorn on 127.0.0.1 (a free port) in a daemon thread of this process.

  share: another ServerThread whose generator and compiled sampler programs this one reuses (no
  compile). start: start the engine's worker (False: requests wait until their time limit)."""

  def __init__(self, bundle: str, batch_sizes=(4,), max_queue: int = 64, request_timeout: float = 120.0,
               limits=None, share=None, start: bool = True):
    import socket
    import threading
    import time

    import uvicorn

    from imagefolder_jax.inference.generator import Generator
    from imagefolder_jax.serve.app import create_app
    from imagefolder_jax.serve.classes import class_names
    from imagefolder_jax.serve.engine import Engine, EngineSettings
    from imagefolder_jax.serve.params import Limits
    self.generator = share.generator if share else Generator.load(bundle)
    settings = EngineSettings(batch_sizes=batch_sizes, max_queue=max_queue, request_timeout=request_timeout,
                              top_k=TOP_K, top_p=TOP_P)
    self.engine = Engine(self.generator, settings, sampler=share.engine.sampler if share else None)
    if start:
      self.engine.start(warm=share is None)
    names, origin = class_names(bundle, self.generator.config.num_classes)
    app = create_app(self.engine, bundle, names, origin, limits or Limits())
    self.sock = socket.create_server(("127.0.0.1", 0))
    self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started and time.monotonic() < deadline:
      time.sleep(0.05)
    assert self.server.started, "uvicorn did not start"

  def close(self) -> None:
    self.server.should_exit = True
    self.thread.join(timeout=10)
    self.engine.stop()
    self.sock.close()
