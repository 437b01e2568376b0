"""imagefolder-jax: ImageFolder (autoregressive image generation with folded tokens) in JAX/Flax.

Public API::

  import imagefolder_jax as ifj
  tok = ifj.Tokenizer.load(bundle_dir)
  codes = tok.encode(images)          # ifj.Codes, ids[branch][scale] (B, n_s, n_s) int32
  images = tok.decode(codes)
  gen = ifj.Generator.load(bundle_dir)
  out = gen.sample(labels, seed=0)    # out.codes, out.images

The package, in the order of the pipeline (image -> tokens -> generator -> samples -> evaluation ->
export), then what runs it at scale:

  data/        image sources (demo photos, folders, TFDS), transforms, grain loaders, token records
  models/      Flax modules: ViT, quantizer, tokenizer, generator, DINOv2, discriminators, LPIPS, Inception
  ops/         numerics the models share: resampling, attention masks, top-k/top-p, target platform
  inference/   Tokenizer / Generator APIs, the jitted sampler, resumable sampling into a directory
  train/       one training loop, the tokenizer and generator tasks, losses, optimizers, checkpoints
  evaluation/  FID / sFID / IS / precision-recall as ADM, tokenizer and generator evaluations, probes
  convert/     official PyTorch checkpoints in, official layout out; DINOv2, LPIPS, Inception weights
  storage/     inference bundles and the integrity records of what is written to disk
  parallel/    device meshes, sharding rules, multi-process jobs
  planning/    FLOP model, compile-only plans for TPU / GPU topologies (memory, time, collectives)
  serve/       `imagefolder-jax serve`: a local web page and HTTP API over warm compiled programs
  demo/        the offline demo and its report
  cli/         the `imagefolder-jax` command (one module per group of verbs)
"""
from imagefolder_jax import _startup

_startup.import_jax()  # before anything else imports jax: quiet with the compile-only plugin extras

from imagefolder_jax.errors import ImageFolderError  # noqa: E402
from imagefolder_jax.inference.tokenizer import Codes, Tokenizer  # noqa: E402

__all__ = ["Codes", "Generator", "ImageFolderError", "Tokenizer", "load_bundle", "save_bundle"]
__version__ = "0.1.0"


def __getattr__(name):
  # The generator pulls in the sampler, bundles pull in orbax: imported on first use.
  if name == "Generator":
    from imagefolder_jax.inference.generator import Generator
    return Generator
  if name in ("load_bundle", "save_bundle"):
    from imagefolder_jax.storage import bundle
    return getattr(bundle, name)
  raise AttributeError(f"module 'imagefolder_jax' has no attribute {name!r}")
