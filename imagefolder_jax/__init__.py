"""imagefolder-jax: ImageFolder (autoregressive image generation with folded tokens) in JAX/Flax.

Public API::

  import imagefolder_jax as ifj
  tok = ifj.Tokenizer.load(bundle_dir)
  codes = tok.encode(images)          # ifj.Codes, ids[branch][scale] (B, n_s, n_s) int32
  images = tok.decode(codes)
  gen = ifj.Generator.load(bundle_dir)
  out = gen.sample(labels, seed=0)    # out.codes, out.images
"""
from imagefolder_jax import _startup

_startup.import_jax()  # before anything else imports jax: quiet with the compile-only plugin extras

from imagefolder_jax.api import Codes, Tokenizer  # noqa: E402

__all__ = ["Codes", "Tokenizer", "Generator"]
__version__ = "0.1.0"


def __getattr__(name):
  # The generator pulls in the sampler; import it on first use.
  if name == "Generator":
    from imagefolder_jax.generation import Generator
    return Generator
  raise AttributeError(f"module 'imagefolder_jax' has no attribute {name!r}")
