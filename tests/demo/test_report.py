"""The demo report's checks and panels: the colour-blind nearest-neighbour class check, the per-scale
strip and teacher-forced generation."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from imagefolder_jax.demo import report as demo_report


def stripes(rng, n, vertical, side=32):
  """(n, side, side, 3) stripes of random period, phase and two random colours, in [-1, 1]."""
  out = np.empty((n, side, side, 3), np.float32)
  coords = np.arange(side)
  for i in range(n):
    period, phase = rng.integers(4, 9), rng.uniform(0, 2 * np.pi)
    wave = (np.sin(2 * np.pi * coords / period + phase) > 0).astype(np.float32)
    mask = np.broadcast_to(wave[None, :] if vertical else wave[:, None], (side, side))
    a, b = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
    out[i] = mask[..., None] * a + (1 - mask[..., None]) * b
  return out


def test_shape_features_see_orientation_not_colour():
  rng = np.random.default_rng(0)
  ref = np.concatenate([stripes(rng, 20, True), stripes(rng, 20, False)])
  ref_labels = np.repeat([0, 1], 20)
  query = np.concatenate([stripes(rng, 10, True), stripes(rng, 10, False)])
  query_labels = np.repeat([0, 1], 10)
  feats = demo_report.shape_features(ref)
  assert feats.shape == (40, 32 * 16) and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
  got = demo_report.nearest_neighbour_labels(demo_report.shape_features(query), feats, ref_labels)
  assert (got == query_labels).all()
  # An affine change of every channel alike (brightness, contrast) leaves the features unchanged ...
  np.testing.assert_allclose(demo_report.shape_features(0.5 * query - 0.2), demo_report.shape_features(query),
                             atol=1e-4)
  # ... while transposing (the same colours, the other orientation) flips the class.
  transposed = query.transpose(0, 2, 1, 3)
  got_t = demo_report.nearest_neighbour_labels(demo_report.shape_features(transposed), feats, ref_labels)
  assert (got_t == 1 - query_labels).all()
  with pytest.raises(ValueError, match="divisible"):
    demo_report.shape_features(np.zeros((1, 30, 30, 3), np.float32))


def test_nearest_neighbour_labels_majority_then_nearest():
  ref = np.eye(4, dtype=np.float32)
  labels = np.array([0, 0, 1, 2])
  q = np.array([[0.9, 0.8, 0.1, 0.0], [0.1, 0.0, 1.0, 0.9]], np.float32)
  # k=3: row 0's neighbours are refs 0, 1 (class 0) and one more: class 0 by majority;
  # row 1's are refs 2, 3, 0 -> classes 1, 2, 0 all tied: the nearest (ref 2, class 1) wins.
  np.testing.assert_array_equal(demo_report.nearest_neighbour_labels(q, ref, labels, k=3), [0, 1])
  np.testing.assert_array_equal(demo_report.nearest_neighbour_labels(q, ref, labels, k=1), [0, 1])


def test_per_scale_images_end_at_the_full_decode():
  from imagefolder_jax.inference.tokenizer import Tokenizer
  from imagefolder_jax.models.quantizer import QuantizerConfig
  from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig
  from imagefolder_jax.models.vit import ViTConfig
  config = TokenizerConfig(vit=ViTConfig(width=32, depth=1, num_heads=2, patch_size=8, image_size=32,
                                                 layerscale=False),
                           quantizer=QuantizerConfig(codebook_size=32, latent_dim=4, scales=(1, 2, 4), num_phi=2),
                           num_branches=2)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  variables = nn.unbox(ImageFolderTokenizer(config).init({"params": jax.random.key(1)}, x[:1]))
  variables.pop("intermediates", None)
  # Unit-scale codebooks and no LayerScale: at init (rows U(-1/V, 1/V), gammas 1e-5) the latents
  # barely move the decode.
  for b in range(2):
    book = variables["codebook"][f"quantizer_{b}"]
    book["embedding"] = jax.random.normal(jax.random.key(2 + b), book["embedding"].shape)
  tok = Tokenizer(config, variables)
  codes = tok.encode(x)
  one = [[np.asarray(s)[1:2] for s in b] for b in codes.ids]
  strip = demo_report.per_scale_images(tok, one)
  assert strip.shape == (3, 32, 32, 3) and strip.min() >= -1 and strip.max() <= 1
  np.testing.assert_allclose(strip[-1], np.asarray(tok.decode(codes))[1], atol=1e-4)
  # Each scale adds something: no two consecutive images are equal.
  assert all(np.abs(strip[i + 1] - strip[i]).max() > 1e-4 for i in range(2))


def test_teacher_forced_keeps_the_forced_branch(micro_bundle):
  from imagefolder_jax.inference.generator import Generator
  gen = Generator.load(micro_bundle)
  r = gen.tokenizer.resolution
  image = np.asarray(jax.random.uniform(jax.random.key(0), (r, r, 3), minval=-1, maxval=1))
  out = demo_report.teacher_forced(gen, image, 1, 2, seed=0, cfg=1.5, top_k=0, top_p=1.0)
  assert out["kept_tokens_equal"]
  assert out["samples"].shape == (2, r, r, 3) and out["recon"].shape == (r, r, 3)
  assert out["psnr_db"].shape == (2,) and np.isfinite(out["psnr_db"]).all()
  # The other branch is sampled: the two samples differ.
  assert np.abs(out["samples"][0] - out["samples"][1]).max() > 1e-3


def test_patch_skip_is_off_by_default_and_needs_equal_grids():
  from imagefolder_jax.models.quantizer import QuantizerConfig
  from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig
  from imagefolder_jax.models.vit import ViTConfig
  vit = ViTConfig(width=32, depth=1, num_heads=2, patch_size=8, image_size=32)
  q = QuantizerConfig(codebook_size=32, latent_dim=4, scales=(1, 2, 4), num_phi=2)
  assert not TokenizerConfig(vit=vit, quantizer=q).patch_skip
  with pytest.raises(ValueError, match="patch_skip"):
    TokenizerConfig(vit=vit, quantizer=QuantizerConfig(scales=(1, 2, 4, 8)), patch_skip=True).validate()
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  outs = {}
  for skip in (False, True):
    m = ImageFolderTokenizer(TokenizerConfig(vit=vit, quantizer=q, patch_skip=skip))
    v = nn.unbox(m.init({"params": jax.random.key(1)}, x[:1]))   # the same parameters either way
    outs[skip] = m.apply(v, x, method=ImageFolderTokenizer.latents)
  # With LayerScale 1e-5 the blocks barely act: without the shortcut a latent hardly depends on the
  # image; with it, it is (through the shared 1x1 conv) its own patch's embedding.
  spread = lambda lat: float(np.std(np.asarray(lat[0][0]) - np.asarray(lat[0][1])))  # noqa: E731
  assert spread(outs[True]) > 100 * spread(outs[False])
