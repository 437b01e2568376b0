"""The jitted sampler: guidance, filtering support, seeds, forcing, the public `Generator`, and 8 fake CPU
devices == 1 device. (Official-generator parity of the sampler lives in test_generator.py.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import MICRO_SCALES, micro_configs, micro_models, relative_error

from imagefolder_jax.inference.generator import Generator
from imagefolder_jax.inference.sampling import SamplerSettings, guidance_weights, make_sampler
from imagefolder_jax.inference.tokenizer import Codes
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer
from imagefolder_jax.ops.filtering import top_k_top_p_mask
from imagefolder_jax.ops.masks import scale_begin_ends

MICRO_TOKENIZER, MICRO_GENERATOR = micro_configs()
SETTINGS = SamplerSettings(top_k=8, top_p=0.9, guidance=True, return_logits=True)


@pytest.fixture(scope="module")
def micro():
  return micro_models()


@pytest.fixture(scope="module")
def micro_sampler(micro):
  tok, _, gen, _ = micro
  return make_sampler(gen, tok, SETTINGS)


def _run(sampler, micro, labels, seed=0, cfg=2.0, temperature=1.0, forced=None):
  tok, tok_vars, gen, gen_vars = micro
  out = sampler(gen_vars, tok_vars, jnp.asarray(labels, jnp.int32), jax.random.key(seed), jnp.float32(cfg),
                jnp.float32(temperature), forced or {})
  return jax.tree.map(np.asarray, out)


def _flat(ids):
  return np.stack([np.concatenate([s.reshape(s.shape[0], -1) for s in branch], 1) for branch in ids], -1)


# ------------------------------------------------------------------------------------ micro model
def test_guided_logits_equal_teacher_forced_formula_and_ids_in_support(micro, micro_sampler):
  """The cached sampler's guided logits == (1+t) cond - t uncond of the uncached forward fed with the
  sampled ids; every drawn id survives top-k/top-p of its logits; images decode the drawn ids."""
  tok, tok_vars, gen, gen_vars = micro
  labels = np.array([3, 7, 0, 9], np.int32)
  out = _run(micro_sampler, micro, labels, seed=0, cfg=2.0)
  ids = [[jnp.asarray(s) for s in branch] for branch in out["ids"]]

  @jax.jit
  def reference(labels, ids):
    inputs = tok.apply(tok_vars, ids, method=ImageFolderTokenizer.next_scale_inputs)
    cond = gen.apply(gen_vars, labels, inputs)
    uncond = gen.apply(gen_vars, jnp.full_like(labels, MICRO_GENERATOR.uncond_label), inputs)
    images = jnp.clip(tok.apply(tok_vars, ids, method=ImageFolderTokenizer.decode_ids), -1, 1)
    return cond, uncond, images

  cond, uncond, images = map(np.asarray, reference(jnp.asarray(labels), ids))
  weights = guidance_weights(len(MICRO_SCALES), 2.0)
  t = np.concatenate([np.full(e - a, weights[s]) for s, (a, e) in enumerate(scale_begin_ends(MICRO_SCALES))])
  want = (1 + t)[None, :, None, None] * cond - t[None, :, None, None] * uncond
  assert relative_error(out["logits"], want) < 1e-5
  np.testing.assert_allclose(out["images"], images, atol=1e-5)
  assert out["images"].shape == (4, 64, 64, 3) and np.abs(out["images"]).max() <= 1.0
  mask = np.asarray(top_k_top_p_mask(jnp.asarray(out["logits"]), SETTINGS.top_k, SETTINGS.top_p))
  drawn = _flat(out["ids"])  # (B, L, P)
  assert np.take_along_axis(mask, drawn[..., None], -1).all()
  assert 1 < mask.sum(-1).min() and mask.sum(-1).max() <= SETTINGS.top_k


def test_seeds_and_temperature(micro, micro_sampler):
  labels = np.array([1, 2, 3, 4], np.int32)
  a = _run(micro_sampler, micro, labels, seed=5)
  b = _run(micro_sampler, micro, labels, seed=5)
  c = _run(micro_sampler, micro, labels, seed=6)
  np.testing.assert_array_equal(_flat(a["ids"]), _flat(b["ids"]))
  np.testing.assert_array_equal(a["images"], b["images"])
  assert (_flat(a["ids"]) != _flat(c["ids"])).mean() > 0.2
  # Near-zero temperature: the draws become the argmax of the guided logits.
  cold = _run(micro_sampler, micro, labels, seed=5, temperature=1e-4)
  np.testing.assert_array_equal(_flat(cold["ids"]), cold["logits"].argmax(-1))


@pytest.fixture(scope="module")
def detail_ids(micro, micro_sampler):
  """Detail-branch ids of a reference sample, to force."""
  reference = _run(micro_sampler, micro, np.array([2, 2, 6, 6], np.int32), seed=11)
  return [jnp.asarray(s) for s in reference["ids"][0]]


def test_forced_branch_is_exact_and_the_other_is_sampled(micro, micro_sampler, detail_ids):
  """Teacher-forced conditional generation: detail branch (0) forced, semantic branch (1) sampled."""
  tok, tok_vars, _, _ = micro
  labels = np.array([2, 2, 6, 6], np.int32)
  runs = [_run(micro_sampler, micro, labels, seed=s, forced={0: detail_ids}) for s in (1, 2)]
  f_hat0 = jax.jit(lambda ids: tok.apply(tok_vars, ids, method=lambda m, x: m.quantizers[0].ids_to_f_hat(x)))(
      detail_ids)
  for out in runs:
    for got, want in zip(out["ids"][0], detail_ids):
      np.testing.assert_array_equal(got, np.asarray(want))
    np.testing.assert_allclose(out["f_hat"][0], np.asarray(f_hat0), atol=1e-5)
  assert (_flat(runs[0]["ids"])[..., 1] != _flat(runs[1]["ids"])[..., 1]).any()


def test_cfg_zero_equals_conditional_only_sampling(micro, micro_sampler, detail_ids):
  labels = np.array([0, 5, 5, 8], np.int32)
  guided = _run(micro_sampler, micro, labels, seed=3, cfg=0.0, forced={0: detail_ids})
  plain_sampler = make_sampler(micro[2], micro[0], SamplerSettings(top_k=8, top_p=0.9, guidance=False,
                                                                   return_logits=True))
  plain = _run(plain_sampler, micro, labels, seed=3, forced={0: detail_ids})
  np.testing.assert_array_equal(_flat(guided["ids"]), _flat(plain["ids"]))
  np.testing.assert_allclose(guided["logits"], plain["logits"], atol=1e-5)
  np.testing.assert_allclose(guided["images"], plain["images"], atol=1e-6)


# ------------------------------------------------------------------------------------ public API
def random_codes(batch: int, seed: int) -> Codes:
  rng = np.random.default_rng(seed)
  return Codes(ids=[[rng.integers(0, 64, (batch, s, s)) for s in MICRO_SCALES] for _ in range(2)])


def test_generator_api(micro, micro_bundle):
  generator = Generator.load(micro_bundle)
  assert generator.config == MICRO_GENERATOR
  # Loaded NumPy weights go to the device once, not on every sampling call.
  for leaf in jax.tree.leaves((generator.variables, generator.tokenizer.variables)):
    assert isinstance(leaf, jax.Array), type(leaf)
  labels = [1, 4]
  reference = random_codes(2, 0)
  # Forcing with Codes: the detail branch of `reference` is kept, the semantic branch sampled.
  out = generator.sample(labels, seed=0, cfg=1.5, top_k=8, top_p=0.9, force={0: reference})
  assert isinstance(out.codes, Codes) and out.images.shape == (2, 64, 64, 3)
  np.testing.assert_array_equal(out.codes.flat()[:, 0], reference.flat()[:, 0])
  assert (out.codes.flat()[:, 1] != reference.flat()[:, 1]).any()
  again = generator.sample(labels, seed=0, cfg=1.5, top_k=8, top_p=0.9, force={0: reference})
  np.testing.assert_array_equal(out.codes.flat(), again.codes.flat())
  other = generator.sample(labels, seed=1, cfg=3.0, top_k=8, top_p=0.9, force={0: reference.ids[0]})
  assert (other.codes.flat() != out.codes.flat()).any()
  # Teacher-forced logits == the module applied to the tokenizer's next-scale inputs.
  logits = np.asarray(generator.logits(labels, out.codes))
  assert logits.shape == (2, MICRO_GENERATOR.num_tokens, 2, 64) and logits.dtype == np.float32
  tok, tok_vars, gen, gen_vars = micro
  reference_logits = jax.jit(lambda labels, ids: gen.apply(
      gen_vars, labels, tok.apply(tok_vars, ids, method=ImageFolderTokenizer.next_scale_inputs)))
  np.testing.assert_allclose(logits, np.asarray(reference_logits(jnp.asarray(labels), out.codes.ids)), atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=[11]), "class id 11"), (dict(labels=[-1]), "class id -1"), (dict(labels=[[1]]), "1-D"),
    (dict(labels=[1.5]), "ints"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(cfg=-1.0), "cfg"), (dict(temperature=0.0), "temperature"),
    (dict(force={2: None}), "branch 2"), (dict(force={0: [np.zeros((1, 1, 1))]}), "expected 3"),
])
def test_generator_rejects_bad_arguments(micro_bundle, kwargs, match):
  generator = Generator.load(micro_bundle)
  kwargs = dict(dict(labels=[1]), **kwargs)
  with pytest.raises(ValueError, match=match):
    generator.sample(kwargs.pop("labels"), **kwargs)




def test_cli_sample(micro_bundle, tmp_path, capsys):
  from PIL import Image

  from imagefolder_jax.cli import main
  from imagefolder_jax.data.images import load_image_file
  out, codes = str(tmp_path / "grid.png"), str(tmp_path / "codes.npz")
  base = ["sample", "--bundle", micro_bundle, "--out", out]
  assert main(base + ["--classes", "1,2", "--per-class", "2", "--batch-size", "3", "--top-k", "8",
                      "--top-p", "0.9", "--seed", "0", "--save-npz", codes]) == 0
  saved = np.load(codes)
  assert saved["flat"].shape == (4, 2, MICRO_GENERATOR.num_tokens)
  np.testing.assert_array_equal(saved["labels"], [1, 1, 2, 2])
  # One row per class, --per-class images per row (64-pixel tiles, 2-pixel padding).
  assert Image.open(out).size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
  # The old spellings remain aliases (the same batches: the compiled sampler is reused).
  assert main(base + ["--labels", "3,1", "--per-class", "2", "--batch-size", "3", "--top-k", "8", "--top-p", "0.9",
                      "--codes-out", codes]) == 0
  np.testing.assert_array_equal(np.load(codes)["labels"], [3, 3, 1, 1])

  # --reference keeps branch 0 (detail) by default, branch 1 with --force semantic; the other is sampled.
  reference = str(tmp_path / "reference.png")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)).save(reference)
  tokenizer = Generator.load(micro_bundle).tokenizer
  ref_flat = tokenizer.encode(load_image_file(reference, tokenizer.resolution)[None]).flat()[0]
  for force, branch in ((None, 0), ("detail", 0), ("semantic", 1)):
    args = ["--classes", "1,2", "--per-class", "2", "--top-k", "8", "--reference", reference, "--save-npz", codes]
    assert main(base + args + (["--force", force] if force else [])) == 0
    flat = np.load(codes)["flat"]
    np.testing.assert_array_equal(flat[:, branch], np.broadcast_to(ref_flat[branch], flat[:, branch].shape))
    assert (flat[:, 1 - branch] != ref_flat[1 - branch]).any()
  capsys.readouterr()

  # Bad input: exit code 2 and one line `imagefolder-jax: error: ...` naming the value.
  for args, message in [
      (["--classes", "1,x"], "--classes must be comma-separated ints"),
      (["--classes", "12"], "class id 12"),
      (["--classes", "5000"], "class id 5000"),
      (["--classes", "-1"], "class id -1"),
      (["--classes", "1", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
      (["--classes", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
      (["--classes", "1", "--top-k", "-1"], "--top-k must be >= 0, got -1"),
      (["--classes", "1", "--cfg", "-1"], "--cfg"),
      (["--classes", "1", "--temperature", "0"], "--temperature"),
      (["--classes", "1", "--per-class", "0"], "--per-class"),
      (["--classes", "1", "--force", "semantic"], "--force needs --reference"),
      (["--classes", "1", "--reference", str(tmp_path / "missing.png")], "file not found"),
  ]:
    assert main(base + args) == 2, args
    err = capsys.readouterr().err
    assert err.startswith("imagefolder-jax: error: ") and err.count("\n") == 1 and message in err, (args, err)


# ------------------------------------------------------------------------------------ TPU kernels
def test_sampler_through_the_tpu_kernels_equals_xla():
  """On TPUs the sampler's cached attention (bfloat16, q and k normalized inside) and its decoder's
  attention (float32 in, bfloat16 MXU operands) run as kernels, here interpreted on CPU. With every
  id forced, the guided logits and the images equal the XLA program's to bfloat16's rounding."""
  import dataclasses

  from support import random_variables

  from imagefolder_jax.models.generator import NextScaleGenerator
  from imagefolder_jax.ops import block_causal_attention
  tok_config, gen_config = micro_configs()
  tok_config = dataclasses.replace(tok_config, vit=dataclasses.replace(tok_config.vit, width=128, num_heads=2))
  gen_config = dataclasses.replace(gen_config, width=128, num_heads=2, dtype="bfloat16")
  tok, gen = ImageFolderTokenizer(tok_config), NextScaleGenerator(gen_config)
  tok_vars = random_variables(tok, jnp.zeros((1, 64, 64, 3)), scale=0.3, seed=1)
  gen_vars = random_variables(gen, jnp.zeros((1,), jnp.int32), jnp.zeros((1, gen_config.num_tokens - 1, 16)),
                              scale=0.2, seed=2)
  rng = np.random.default_rng(0)
  forced = {b: [jnp.asarray(rng.integers(0, 64, (2, s, s)), jnp.int32) for s in MICRO_SCALES] for b in range(2)}
  sampler = make_sampler(gen, tok, SETTINGS)
  micro = (tok, tok_vars, gen, gen_vars)
  want = _run(sampler, micro, [1, 7], forced=forced)
  with block_causal_attention.kernel_interpreted():
    # A new sampler: jit's trace cache does not see the interpreter's switch.
    kernels = make_sampler(gen, tok, SETTINGS)
    program = str(kernels.trace(gen_vars, tok_vars, jnp.asarray([1, 7]), jax.random.key(0), jnp.float32(2.0),
                                jnp.float32(1.0), forced).jaxpr)
    got = _run(kernels, micro, [1, 7], forced=forced)
  assert "cached_attention" in program and "packed_attention" in program
  np.testing.assert_array_equal(_flat(got["ids"]), _flat(want["ids"]))
  assert relative_error(got["logits"], want["logits"]) < 1e-2
  np.testing.assert_allclose(got["images"], want["images"], atol=2e-2)
