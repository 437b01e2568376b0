"""Next-scale generator: config, official initialisation, converter, teacher-forced parity, KV cache, loss."""
from __future__ import annotations

import functools
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import PARITY_DIR, relative_error

from imagefolder_jax.convert.common import ConversionError
from imagefolder_jax.convert.official import convert_tokenizer
from imagefolder_jax.convert.official_generator import (
  convert_generator,
  generator_state_dict,
  generator_variables,
  infer_generator_config,
  tokenizer_from_generator_checkpoint,
)
from imagefolder_jax.inference.sampling import SamplerSettings, make_sampler
from imagefolder_jax.models.generator import (
  GeneratorConfig,
  NextScaleGenerator,
  cache_length,
  count_params,
  flatten_ids,
  generator_loss,
  init_cache,
  unflatten_ids,
)
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer
from imagefolder_jax.ops.masks import block_causal_mask, scale_begin_ends

# Sum of the `param` rows of the official d17 state dict (tests/fixtures/official_layout/ar_state_dict.tsv; buffers
# lvl_1L, attn_bias_for_masking and zero_k_bias excluded): 375.3M in all, 362.5M in the blocks.
OFFICIAL_D17_PARAMS = 375_258_593
OFFICIAL_D17_BLOCK_PARAMS = 362_484_897


@pytest.fixture(scope="module")
def official():
  """(tokenizer config, tokenizer variables, generator config, generator variables) of the fixture."""
  tok_config, tok_vars, _ = convert_tokenizer(os.path.join(PARITY_DIR, "tokenizer.pt"),
                                              os.path.join(PARITY_DIR, "config.json"))
  gen_config, gen_vars = convert_generator(os.path.join(PARITY_DIR, "generator.pt"), tok_config,
                                           os.path.join(PARITY_DIR, "config.json"))
  return tok_config, tok_vars, gen_config, gen_vars


@pytest.fixture(scope="module")
def fixture_ids(parity_expected, official):
  """The fixture's token ids as ids[branch][scale] (B, n_s, n_s)."""
  scales = official[2].scales
  idx = parity_expected["tok_idx"]
  return [[jnp.asarray(idx[b][:, a:e].reshape(-1, s, s)) for s, (a, e) in zip(scales, scale_begin_ends(scales))]
          for b in range(idx.shape[0])]


@pytest.fixture(scope="module")
def forward():
  """Jitted teacher-forced forward returning (logits, head inputs)."""

  def fn(config, variables, labels, inputs):
    module = NextScaleGenerator(config)
    head_in, cond = module.apply(variables, labels, inputs, method=NextScaleGenerator.head_inputs)
    return module.apply(variables, labels, inputs), head_in

  return jax.jit(fn, static_argnums=0)


# ------------------------------------------------------------------------------------ config
def test_config_defaults_follow_the_var_rules():
  c = GeneratorConfig(depth=17)
  assert (c.width, c.num_heads, c.head_dim) == (1088, 17, 64)
  assert c.num_tokens == 286 and c.input_dim == 64 and c.uncond_label == 1000
  assert math.isclose(c.drop_path_rate, 0.1 * 17 / 24)
  assert math.isclose(c.init_std, math.sqrt(1 / (3 * 1088)))
  restored = GeneratorConfig.from_dict(json.loads(json.dumps(c.to_dict())))
  assert restored == c
  with pytest.raises(ValueError, match="num_heads"):
    GeneratorConfig(depth=2, width=100, num_heads=3).validate()
  with pytest.raises(ValueError, match="dtype"):
    GeneratorConfig(depth=2, dtype="float64").validate()
  with pytest.raises(ValueError, match="unknown"):
    GeneratorConfig.from_dict({"depth": 2, "bogus": 1})


def test_d17_parameter_count_equals_the_official_state_dict():
  c = GeneratorConfig(depth=17)
  shapes = jax.eval_shape(lambda: NextScaleGenerator(c).init(jax.random.key(0), jnp.zeros((1,), jnp.int32),
                                                            jnp.zeros((1, c.num_tokens - 1, c.input_dim))))
  params = nn.unbox(shapes)["params"]
  assert count_params(params) == OFFICIAL_D17_PARAMS
  assert sum(count_params(params[f"blocks_{i}"]) for i in range(17)) == OFFICIAL_D17_BLOCK_PARAMS


def test_official_initialisation():
  c = GeneratorConfig(depth=4, width=256, num_heads=4, num_classes=10, codebook_size=512, latent_dim=8,
                      scales=(1, 2, 4))
  boxed = jax.jit(NextScaleGenerator(c).init)(jax.random.key(1), jnp.zeros((2,), jnp.int32),
                                              jnp.zeros((2, c.num_tokens - 1, c.input_dim)))["params"]
  # Every parameter carries logical axis names for the sharding rules.
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  params = jax.tree.map(np.asarray, nn.unbox(boxed))
  std = math.sqrt(1 / (3 * 256))
  block = params["blocks_0"]
  unbox = np.asarray
  np.testing.assert_allclose(unbox(params["word_embed"]["kernel"]).std(), std, rtol=0.05)
  np.testing.assert_allclose(unbox(params["head"]["kernel"]).std(), std * 0.02, rtol=0.05)
  ada = unbox(block["ada_lin"]["kernel"])
  np.testing.assert_allclose(ada[:, :2 * 256].std(), std * 1e-4, rtol=0.05)   # gates
  np.testing.assert_allclose(ada[:, 2 * 256:].std(), std * 0.5, rtol=0.05)    # scales and shifts
  np.testing.assert_allclose(unbox(block["attn"]["proj"]["kernel"]).std(), std / math.sqrt(8), rtol=0.05)
  np.testing.assert_allclose(unbox(block["ffn"]["fc2"]["kernel"]).std(), std / math.sqrt(8), rtol=0.05)
  np.testing.assert_allclose(unbox(params["head_nm"]["ada_lin"]["kernel"]).std(), std * 0.5, rtol=0.05)
  np.testing.assert_array_equal(unbox(block["attn"]["scale_mul"]), np.full(4, np.log(4.0), np.float32))
  assert not unbox(block["attn"]["q_bias"]).any() and not unbox(params["head"]["bias"]).any()


# ------------------------------------------------------------------------------------ converter
def test_converter_reads_the_architecture(official):
  _, _, c, _ = official
  assert (c.depth, c.width, c.num_heads, c.num_branches, c.codebook_size, c.latent_dim) == (2, 128, 2, 2, 4096, 32)
  assert c.scales == (1, 1, 2, 3, 3, 4, 5, 6, 8, 11) and c.num_classes == 1000 and c.attn_l2_norm


def _fixture_state_dict():
  import torch
  return torch.load(os.path.join(PARITY_DIR, "generator.pt"), map_location="cpu", weights_only=True)


def test_converter_is_strict(official):
  tok_config = official[0]
  ckpt = _fixture_state_dict()
  sd = dict(ckpt["trainer"]["var_wo_ddp"])

  def convert(tensors):
    state = generator_state_dict({"trainer": {"var_wo_ddp": tensors}}, "gen.pt")
    return generator_variables(state, infer_generator_config(state, {}, tokenizer_config=tok_config))

  missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.v_bias"}
  with pytest.raises(ConversionError, match="blocks.1.attn.v_bias"):
    convert(missing)
  misshaped = dict(sd, **{"blocks.0.ffn.fc2.bias": sd["blocks.0.ffn.fc2.bias"][:-1]})
  with pytest.raises(ConversionError, match="blocks.0.ffn.fc2.bias"):
    convert(misshaped)
  extra = dict(sd, **{"blocks.0.attn.extra": sd["blocks.0.attn.q_bias"]})
  with pytest.raises(ConversionError, match="blocks.0.attn.extra"):
    convert(extra)
  nonzero_k = dict(sd, **{"blocks.0.attn.zero_k_bias": sd["blocks.0.attn.q_bias"] + 1})
  with pytest.raises(ConversionError, match="zero_k_bias"):
    convert(nonzero_k)
  with pytest.raises(ConversionError, match="var_wo_ddp"):
    generator_state_dict({"model": {}}, "gen.pt")
  # Without an architecture JSON, heads default to depth and P to the tokenizer's branches.
  state = generator_state_dict(ckpt, "gen.pt")
  assert infer_generator_config(state, {}, tokenizer_config=tok_config).num_heads == 2
  with pytest.raises(ConversionError, match="scale_mul_1H11"):
    infer_generator_config(state, {"generator": {"num_heads": 4}})


def test_tokenizer_from_the_ar_checkpoint(official, tmp_path):
  """Official inference decodes with `trainer.vae_local`; the converter reads it when present."""
  import torch
  tok_config, tok_vars = official[0], official[1]
  assert tokenizer_from_generator_checkpoint(os.path.join(PARITY_DIR, "generator.pt")) is None
  ckpt = _fixture_state_dict()
  tok_ckpt = torch.load(os.path.join(PARITY_DIR, "tokenizer.pt"), map_location="cpu", weights_only=True)
  ckpt["trainer"]["vae_local"] = tok_ckpt["ema"]
  path = str(tmp_path / "ar-ckpt.pth")
  torch.save(ckpt, path)
  config, variables = tokenizer_from_generator_checkpoint(path, os.path.join(PARITY_DIR, "config.json"))
  assert config == tok_config
  jax.tree.map(np.testing.assert_array_equal, variables, tok_vars)


# ------------------------------------------------------------------------------------ parity
def _full_logits(head_in, expected):
  """Official full logits rebuilt from the stored head inputs (bit-exact with F.linear:
  tests/fixtures/parity_tiny/README.md)."""
  import torch
  sd = _fixture_state_dict()["trainer"]["var_wo_ddp"]
  out = torch.nn.functional.linear(torch.from_numpy(head_in), sd["head.weight"], sd["head.bias"])
  return out.numpy()


@pytest.mark.parametrize("conditional", [True, False])
def test_teacher_forced_logits_match_official(official, parity_expected, forward, fixture_ids, conditional):
  tok_config, tok_vars, config, variables = official
  e = parity_expected
  tag = "cond" if conditional else "uncond"
  labels = e["gen_labels"] if conditional else np.full_like(e["gen_labels"], 1000)
  inputs = jax.jit(lambda v, ids: ImageFolderTokenizer(tok_config).apply(
      v, ids, method=ImageFolderTokenizer.next_scale_inputs))(tok_vars, fixture_ids)
  np.testing.assert_allclose(np.asarray(inputs), e["gen_var_input"], atol=1e-5)
  logits, head_in = forward(config, variables, jnp.asarray(labels), jnp.asarray(e["gen_var_input"]))
  logits = np.asarray(logits)
  assert logits.shape == (2, 286, 2, 4096) and logits.dtype == np.float32
  assert relative_error(head_in, e[f"gen_head_in_{tag}"]) < 1e-4
  reference = _full_logits(e[f"gen_head_in_{tag}"], e).reshape(2, 286, 2, 4096)
  assert relative_error(logits, reference) < 1e-4
  flat = logits.reshape(2, 286, -1)
  assert relative_error(flat[:, :, e["gen_logit_cols"]], e[f"gen_logits_{tag}_cols"]) < 1e-4
  lse = jax.scipy.special.logsumexp(logits, axis=-1)
  assert relative_error(lse, e[f"gen_logits_{tag}_lse"]) < 1e-4
  # argmax must agree wherever the official top-2 gap is resolvable at our tolerance.
  top2 = np.sort(reference, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 1e-4 * np.abs(reference).max()
  np.testing.assert_array_equal(logits.argmax(-1)[clear], e[f"gen_logits_{tag}_argmax"][clear])
  assert clear.mean() > 0.99


def _decode_scales(module, variables, labels, inputs):
  """decode_scale over every scale with a preallocated cache, teacher-forced by `inputs`:
  (logits (B, L, P, V), cache)."""
  c = module.config
  cond = module.apply(variables, labels, method=NextScaleGenerator.condition)
  cache, out = init_cache(c, labels.shape[0]), []
  n0 = c.scales[0] ** 2
  for si, (a, b) in enumerate(c.begin_ends):
    tokens = (module.apply(variables, cond, method=NextScaleGenerator.first_scale_tokens) if si == 0 else
              module.apply(variables, si, inputs[:, a - n0:b - n0], method=NextScaleGenerator.scale_tokens))
    logits, cache = module.apply(variables, si, tokens, cond, cache, method=NextScaleGenerator.decode_scale)
    out.append(logits)
  return jnp.concatenate(out, axis=1), cache


def test_kv_cached_scales_equal_the_full_forward(official, parity_expected, forward):
  """decode_scale over the scales with a preallocated cache == the masked teacher-forced forward."""
  _, _, config, variables = official
  e = parity_expected
  labels = jnp.asarray(e["gen_labels"])
  inputs = jnp.asarray(e["gen_var_input"])
  module = NextScaleGenerator(config)

  got, cache = jax.jit(functools.partial(_decode_scales, module))(variables, labels, inputs)
  want, _ = forward(config, variables, labels, inputs)
  assert relative_error(got, want) < 1e-5
  # The cache holds every scale's positions but the last's (286 - 11 x 11), all filled.
  assert cache_length(config) == 165 and cache[0]["k"].shape == (2, 165, 2 * 64)
  assert bool(jnp.all(cache[-1]["v"][:, -1] != 0))


# ------------------------------------------------------------------------------------ sampler parity
def test_teacher_forced_sampling_matches_official(official, parity_expected, fixture_ids):
  """The jitted sampler with both branches forced to the tokenizer's ids (the fixture's recorded
  `autoregressive_infer_cfg` run, cfg 3.25): guided logits of every scale from the KV-cached path,
  the final f_hat and the decoded image."""
  e = parity_expected
  tok_config, tok_vars, gen_config, gen_vars = official
  sampler = make_sampler(NextScaleGenerator(gen_config), ImageFolderTokenizer(tok_config),
                         SamplerSettings(top_k=750, top_p=0.95, guidance=True, return_logits=True))
  out = sampler(gen_vars, tok_vars, jnp.asarray(e["gen_labels"], jnp.int32), jax.random.key(0),
                jnp.float32(3.25), jnp.float32(1.0), {0: fixture_ids[0], 1: fixture_ids[1]})
  guided = np.asarray(out["logits"]).reshape(2, 286, 8192)
  assert relative_error(guided[:, :, e["gen_logit_cols"]], e["gen_guided_cols"]) < 1e-4
  assert relative_error(guided[:, 24:40], e["gen_guided_s5"]) < 1e-4
  f_hat = np.concatenate([np.asarray(f) for f in out["f_hat"]], -1).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(f_hat, e["gen_tf_infer_fhat"], atol=1e-5)
  # The official run returns (clamp(decode(f_hat)) + 1) / 2; ours stays in [-1, 1].
  np.testing.assert_allclose(np.asarray(out["images"]).transpose(0, 3, 1, 2), e["tok_recon"], atol=1e-5)
  ids = np.asarray(flatten_ids(out["ids"]))  # (B, L, P)
  np.testing.assert_array_equal(ids, e["tok_idx"].transpose(1, 2, 0))


# ------------------------------------------------------------------------------------ loss, ids, mask
def _random_generator(c: GeneratorConfig):
  """(module, labels (2,), inputs (2, L - 1, input_dim), variables) with random O(0.3) weights (not
  the official init, whose 1e-4 gates make blocks near-identity)."""
  module = NextScaleGenerator(c)
  labels = jnp.array([1, 3])
  inputs = jax.random.normal(jax.random.key(0), (2, c.num_tokens - 1, c.input_dim))
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(1), labels, inputs))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
  return module, labels, inputs, variables


def test_loss_and_label_dropout():
  c = GeneratorConfig(depth=1, width=32, num_heads=2, num_classes=5, codebook_size=16, latent_dim=4,
                      scales=(1, 2), label_dropout=1.0)
  module, labels, inputs, variables = _random_generator(c)
  apply = jax.jit(module.apply, static_argnames="train")
  logits = apply(variables, labels, inputs)
  targets = jax.random.randint(jax.random.key(3), (2, c.num_tokens, 2), 0, 16)
  x = np.asarray(logits, np.float64)
  log_probs = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  t = np.asarray(targets)
  per_branch = [-np.take_along_axis(log_probs[:, :, b], t[:, :, b, None], -1).mean() for b in range(2)]
  np.testing.assert_allclose(float(generator_loss(logits, targets)), np.mean(per_branch), rtol=1e-5)
  # label_dropout=1 replaces every label by the unconditional class, only in training.
  dropped = apply(variables, labels, inputs, train=True, rngs={"dropout": jax.random.key(4)})
  uncond = apply(variables, jnp.full((2,), c.uncond_label), inputs)
  np.testing.assert_allclose(np.asarray(dropped), np.asarray(uncond), atol=1e-6)
  assert not np.allclose(np.asarray(logits), np.asarray(uncond), atol=1e-3)


def test_flatten_ids_and_block_causal_mask():
  scales = (1, 2, 3)
  ids = [[jnp.full((2, s, s), 10 * b + i) for i, s in enumerate(scales)] for b in range(2)]
  flat = flatten_ids(ids)
  assert flat.shape == (2, 14, 2)
  np.testing.assert_array_equal(np.asarray(flat[0, :, 1]), [10] + [11] * 4 + [12] * 9)
  back = unflatten_ids(flat, scales)
  jax.tree.map(np.testing.assert_array_equal, back, ids)
  mask = block_causal_mask(scales)
  assert mask.shape == (14, 14) and mask[0].sum() == 1 and mask[1].sum() == 5 and mask[-1].all()


def test_official_mask_buffer_matches(official):
  config = official[2]
  bias = _fixture_state_dict()["trainer"]["var_wo_ddp"]["attn_bias_for_masking"].numpy()[0, 0]
  np.testing.assert_array_equal(bias == 0, block_causal_mask(config.scales))


@pytest.mark.parametrize("width,kernel", [(128, "lane_dense_attention"), (64, "splash_mha")])
def test_teacher_forcing_through_the_tpu_attention_kernel(width, kernel):
  """On TPUs the teacher-forced trunk takes a fused block-causal kernel (here interpreted on CPU):
  the lane-dense one where the heads make whole 128-lane columns, else splash attention. The same
  logits and parameter gradients as XLA's masked attention."""
  from imagefolder_jax.ops import block_causal_attention
  c = GeneratorConfig(depth=1, width=width, num_heads=2, num_classes=5, codebook_size=16, latent_dim=4,
                      scales=(1, 1, 2, 3))
  module, labels, inputs, variables = _random_generator(c)
  loss = lambda v: jnp.sum(module.apply(v, labels, inputs) ** 2)
  want, want_grads = jax.value_and_grad(loss)(variables)
  with block_causal_attention.kernel_interpreted():
    assert kernel in str(jax.make_jaxpr(jax.grad(loss))(variables))
    got, got_grads = jax.value_and_grad(loss)(variables)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  errors = jax.tree.leaves(jax.tree.map(relative_error, got_grads, want_grads))
  assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("l2_norm", [True, False])
def test_cached_decoding_through_the_tpu_cached_attention_kernel(l2_norm):
  """On TPUs in bfloat16 each cached scale attends through the cached-attention kernel (here
  interpreted on CPU), which l2-normalizes q and the cached k itself: the same logits as XLA's
  attention over the cache's prefix."""
  from imagefolder_jax.ops import block_causal_attention
  c = GeneratorConfig(depth=2, width=128, num_heads=2, num_classes=5, codebook_size=16, latent_dim=4,
                      scales=(1, 1, 2, 3), dtype="bfloat16", attn_l2_norm=l2_norm)
  module, labels, inputs, variables = _random_generator(c)

  decode = lambda variables: _decode_scales(module, variables, labels, inputs)[0]
  want = decode(variables)
  with block_causal_attention.kernel_interpreted():
    assert "cached_attention" in str(jax.make_jaxpr(decode)(variables))
    got = decode(variables)
  assert got.dtype == jnp.float32 and relative_error(got, want) < 1e-3


def test_a_cache_that_does_not_reach_the_scale_is_refused():
  """The cache holds every scale but the last; a scale past the cache's end (a cache made for other
  scales) is an error, not attention over missing keys."""
  c = GeneratorConfig(depth=1, width=32, num_heads=2, num_classes=5, codebook_size=16, latent_dim=4, scales=(1, 2, 3))
  module, labels, _, variables = _random_generator(c)
  assert cache_length(c) == 5 and init_cache(c, 2)[0]["k"].shape == (2, 5, 32)
  cond = module.apply(variables, labels, method=NextScaleGenerator.condition)
  tokens = jnp.zeros((2, 9, c.width))
  short = [{name: x[:, :3] for name, x in block.items()} for block in init_cache(c, 2)]
  with pytest.raises(ValueError, match=r"KV cache of 3 positions: positions \[5, 14\)"):
    module.apply(variables, 2, tokens, cond, short, method=NextScaleGenerator.decode_scale)
