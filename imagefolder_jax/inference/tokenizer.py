"""Public tokenizer API: `Codes` and `Tokenizer` (see README "Python API")."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig
from imagefolder_jax.parallel import Mesh, put_global, replicated, shard_batch, to_host
from imagefolder_jax.storage.bundle import BundleError, load_bundle, save_bundle


@dataclasses.dataclass
class Codes:
  """Token ids of a batch: `ids[branch][scale]` is an int32 array (B, n_s, n_s).

  Branch 0 is the detail branch and branch 1 the semantic branch of the paper's P = 2 tokenizer.
  Constructible from plain (nested) arrays or lists, so codes made elsewhere can be decoded.
  """
  ids: list

  def __post_init__(self):
    if isinstance(self.ids, (np.ndarray, jax.Array)) or not isinstance(self.ids, (list, tuple)):
      raise TypeError("Codes(ids=...) takes a list over branches of lists over scales of (B, n, n) arrays")
    ids = []
    for b, branch in enumerate(self.ids):
      if not isinstance(branch, (list, tuple)):
        raise TypeError(f"Codes.ids[{b}] must be a list over scales, got {type(branch).__name__}")
      ids.append([jnp.asarray(s, jnp.int32) for s in branch])
    self.ids = ids

  @property
  def num_branches(self) -> int:
    return len(self.ids)

  @property
  def batch_size(self) -> int:
    return int(self.ids[0][0].shape[0])

  def flat(self) -> np.ndarray:
    """(B, P, L) int32: every branch's ids over all scales, row-major within a scale.

    With a mesh over several processes this gathers the ids (a collective: call it on all)."""
    ids = to_host(self.ids)
    return np.stack([np.concatenate([s.reshape(s.shape[0], -1) for s in branch], axis=1)
                     for branch in ids], axis=1)

  @classmethod
  def from_flat(cls, flat: np.ndarray, scales: Sequence[int]) -> "Codes":
    """Inverse of `flat`: (B, P, L) -> Codes."""
    flat = np.asarray(flat)
    if flat.ndim != 3 or flat.shape[2] != sum(s * s for s in scales):
      raise ValueError(f"flat codes must be (B, P, {sum(s * s for s in scales)}), got {flat.shape}")
    out, start = [], 0
    bounds = []
    for s in scales:
      bounds.append((start, start + s * s, s))
      start += s * s
    for p in range(flat.shape[1]):
      out.append([flat[:, p, a:e].reshape(-1, s, s) for a, e, s in bounds])
    return cls(ids=out)

  def validate(self, config: TokenizerConfig) -> None:
    """Raises ValueError naming the first mismatch between these codes and a tokenizer."""
    scales = config.quantizer.scales
    if self.num_branches != config.num_branches:
      raise ValueError(f"codes have {self.num_branches} branches, the tokenizer has {config.num_branches}")
    for b, branch in enumerate(self.ids):
      if len(branch) != len(scales):
        raise ValueError(f"codes branch {b} has {len(branch)} scales, the tokenizer has {len(scales)}")
      for s, (ids, side) in enumerate(zip(branch, scales)):
        if ids.ndim != 3 or ids.shape[1:] != (side, side) or ids.shape[0] != self.batch_size:
          raise ValueError(f"codes[{b}][{s}] has shape {tuple(ids.shape)}, "
                           f"expected ({self.batch_size}, {side}, {side})")
        lo, hi = int(jnp.min(ids)), int(jnp.max(ids))
        if lo < 0 or hi >= config.quantizer.codebook_size:
          raise ValueError(f"codes[{b}][{s}] holds ids outside [0, {config.quantizer.codebook_size}): {lo}..{hi}")


class Tokenizer:
  """A loaded tokenizer: encode images to `Codes`, decode `Codes` to images.

  Images are float32 (B, H, W, 3) in [-1, 1] with H = W = the model's resolution. Every method is
  jit-compiled once per input shape; matmuls run at highest precision so ids match the float32
  reference on accelerators too.
  """

  def __init__(self, config: TokenizerConfig, variables: Any, mesh: Optional[Mesh] = None):
    """mesh: optional device mesh; the batch is then sharded over its ('data', 'fsdp') axes and the
    variables replicated (the tokenizer is small next to activations)."""
    config.validate()
    self.config = config
    self.mesh = mesh
    # On the device once: NumPy trees (what `load_bundle` returns) would be copied in on every call.
    self.variables = (put_global(variables, jax.tree.map(lambda _: replicated(mesh), variables))
                      if mesh is not None else jax.device_put(variables))
    self.module = ImageFolderTokenizer(config)

  @classmethod
  def load(cls, bundle_dir: str, mesh: Optional[Mesh] = None) -> "Tokenizer":
    configs, variables = load_bundle(bundle_dir)
    if "tokenizer" not in configs:
      raise BundleError(f"{bundle_dir}: the bundle holds no tokenizer (models: {sorted(configs)})")
    return cls(TokenizerConfig.from_dict(configs["tokenizer"]), variables["tokenizer"], mesh=mesh)

  def _place(self, tree):
    """Shards the batch axis of every leaf over the mesh (when there is one)."""
    return shard_batch(self.mesh, tree) if self.mesh is not None else tree

  def save(self, bundle_dir: str) -> None:
    save_bundle(bundle_dir, {"tokenizer": self.config.to_dict()}, {"tokenizer": self.variables})

  @property
  def resolution(self) -> int:
    return self.config.image_size

  def _check_images(self, images) -> jax.Array:
    images = jnp.asarray(images, jnp.float32)
    r = self.resolution
    if images.ndim != 4 or images.shape[1:] != (r, r, 3):
      raise ValueError(f"images must be (B, {r}, {r}, 3) float32 in [-1, 1], got shape {tuple(images.shape)}")
    return self._place(images)

  @functools.cached_property
  def _jitted(self):
    m = self.module

    def run(method):
      def fn(variables, x):
        with jax.default_matmul_precision("highest"):
          return m.apply(variables, x, method=method)
      return jax.jit(fn)

    return dict(
        encode=run(ImageFolderTokenizer.encode_ids),
        latents=run(ImageFolderTokenizer.latents),
        decode=run(lambda mod, ids: jnp.clip(mod.decode_ids(ids), -1.0, 1.0)),
        reconstruct=run(lambda mod, x: jnp.clip(mod.decode_ids(mod.encode_ids(x)), -1.0, 1.0)),
    )

  def encode(self, images) -> Codes:
    """images (B, H, W, 3) in [-1, 1] -> Codes (ids[branch][scale] (B, n_s, n_s) int32)."""
    return Codes(ids=self._jitted["encode"](self.variables, self._check_images(images)))

  def decode(self, codes: Codes) -> jax.Array:
    """Codes -> images (B, H, W, 3) float32 in [-1, 1] (clamped)."""
    if not isinstance(codes, Codes):
      codes = Codes(ids=codes)
    codes.validate(self.config)
    return self._jitted["decode"](self.variables, self._place(codes.ids))

  def reconstruct(self, images) -> jax.Array:
    """encode + decode in one compiled program: (B, H, W, 3) -> (B, H, W, 3) in [-1, 1]."""
    return self._jitted["reconstruct"](self.variables, self._check_images(images))

  def latents(self, images) -> list[jax.Array]:
    """Continuous latents before quantization: list over branches of (B, n, n, Cq) float32."""
    return self._jitted["latents"](self.variables, self._check_images(images))
