"""bf16 sampling path: `Generator.sample(..., dtype='bfloat16')` on the official parity fixture.

The bf16 generator (matmuls in bf16, head / filtering / draws / tokenizer in float32) draws with the
same uniforms as the float32 one, so most sampled tokens are equal; a near-tie of two logits or a
top-k/top-p boundary flips a token, and later scales then see another context.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import PARITY_DIR
from imagefolder_jax.api import Tokenizer
from imagefolder_jax.convert.official import convert_tokenizer
from imagefolder_jax.convert.official_generator import convert_generator
from imagefolder_jax.generation import Generator

# Measured with bench/bench_bf16.py (README "bf16 sampling"): the fixture at batch 4 agrees on
# AGREE_MEASURED of its tokens; the bound leaves room for other CPUs' bf16 rounding.
MIN_AGREEMENT = 0.5


@pytest.fixture(scope="module")
def fixture_generator():
  arch = os.path.join(PARITY_DIR, "config.json")
  tok_config, tok_vars, _ = convert_tokenizer(os.path.join(PARITY_DIR, "tokenizer.pt"), arch)
  gen_config, gen_vars = convert_generator(os.path.join(PARITY_DIR, "generator.pt"), tok_config, arch)
  return Generator(Tokenizer(tok_config, tok_vars), gen_config, gen_vars)


def test_bf16_tokens_agree_with_float32(fixture_generator):
  labels = [1, 207, 360, 980]
  f32 = fixture_generator.sample(labels, seed=3)
  bf16 = fixture_generator.sample(labels, seed=3, dtype="bfloat16")
  a, b = f32.codes.flat(), bf16.codes.flat()
  assert a.shape == b.shape == (4, 286, 2)
  agreement = float((a == b).mean())
  assert agreement >= MIN_AGREEMENT, agreement
  # The first scale's token depends on the class embedding through a single bf16 pass: it must be
  # nearly always the same draw.
  assert float((a[:, 0] == b[:, 0]).mean()) >= 0.75
  np.testing.assert_array_less(np.abs(np.asarray(bf16.images)), 1.0 + 1e-6)
  # The float32 sampler is unchanged by the bf16 one having been compiled beside it.
  np.testing.assert_array_equal(fixture_generator.sample(labels, seed=3).codes.flat(), a)


def test_dtype_is_validated(fixture_generator):
  with pytest.raises(ValueError, match="dtype must be one of"):
    fixture_generator.sample([1], dtype="int8")
