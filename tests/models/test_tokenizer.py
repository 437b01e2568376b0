"""The converted official tiny tokenizer reproduces the official PyTorch outputs (parity_tiny)."""
import os

import numpy as np
import pytest
from support import PARITY_DIR, nchw, relative_error

import imagefolder_jax as ifj
from imagefolder_jax.convert.common import ConversionError
from imagefolder_jax.convert.official import convert_tokenizer

TOL = 1e-4


pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def tok(parity_bundle):
  return ifj.Tokenizer.load(parity_bundle)


@pytest.fixture(scope="module")
def images(parity_expected):
  return parity_expected["images"].transpose(0, 2, 3, 1)


def test_config_inferred(tok):
  c = tok.config
  assert (c.vit.width, c.vit.depth, c.vit.num_heads, c.vit.patch_size) == (64, 2, 2, 16)
  assert c.quantizer.scales == (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
  assert c.quantizer.phi_index == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
  assert c.num_branches == 2 and c.quantizer.codebook_size == 4096


def test_latents(tok, images, parity_expected):
  latents = tok.latents(images)
  for b in range(2):
    assert relative_error(nchw(latents[b]), parity_expected["tok_latent"][b]) < TOL


def test_ids_identical(tok, images, parity_expected):
  codes = tok.encode(images)
  np.testing.assert_array_equal(codes.flat(), parity_expected["tok_idx"].transpose(1, 0, 2))


def test_f_hat_per_scale(tok, images, parity_expected):
  from imagefolder_jax.models.tokenizer import ImageFolderTokenizer
  latents = tok.latents(images)
  outs = tok.module.apply(tok.variables, latents, method=ImageFolderTokenizer.quantize)
  ids = [o["ids"] for o in outs]
  for b in range(2):
    for s in range(10):
      f_hat = tok.module.apply(tok.variables, ids[b][:s + 1],
                               method=lambda m, i: m.quantizers[b].ids_to_f_hat(i))
      assert relative_error(nchw(f_hat), parity_expected["tok_fhat_scales"][s, b]) < TOL, (b, s)


def test_reconstruction(tok, images, parity_expected):
  recon = tok.reconstruct(images)
  assert relative_error(nchw(recon), parity_expected["tok_recon"]) < TOL
  assert float(np.abs(recon).max()) <= 1.0


def test_decode_official_ids(tok, parity_expected):
  codes = ifj.Codes.from_flat(parity_expected["tok_idx"].transpose(1, 0, 2), tok.config.quantizer.scales)
  assert relative_error(nchw(tok.decode(codes)), parity_expected["tok_recon"]) < TOL


def test_unclamped_decoder(tok, parity_expected):
  from imagefolder_jax.models.tokenizer import ImageFolderTokenizer
  f_hats = [np.asarray(f).transpose(0, 2, 3, 1) for f in parity_expected["tok_fhat"]]
  out = tok.module.apply(tok.variables, f_hats, method=ImageFolderTokenizer.decode)
  assert relative_error(nchw(out), parity_expected["tok_recon_preclamp"]) < TOL
  assert float(np.abs(out).max()) > 1.0  # the fixture exercises the clamp


def test_latent_position_embedding(tok, parity_expected):
  from imagefolder_jax.models.tokenizer import latent_position_embedding
  for side, key in (("encoder", "tok_enc_pos11"), ("decoder", "tok_dec_pos11")):
    table = tok.variables["params"][side]["model"]["pos_embed"]
    pos = latent_position_embedding(table, 16, 11)
    assert relative_error(pos, parity_expected[key][:, 1:]) < 1e-5


def test_truncated_checkpoint_names_tensor(tmp_path):
  import torch
  ckpt = torch.load(os.path.join(PARITY_DIR, "tokenizer.pt"), weights_only=True)
  sd = dict(ckpt["ema"])
  del sd["decoder.model.blocks.1.mlp.fc2.weight"]
  path = str(tmp_path / "broken.pt")
  torch.save({"model": sd}, path)
  with pytest.raises(ConversionError, match="decoder.model.blocks.1.mlp.fc2.weight"):
    convert_tokenizer(path, os.path.join(PARITY_DIR, "config.json"))


def test_misshaped_tensor_named(tmp_path):
  import torch
  ckpt = torch.load(os.path.join(PARITY_DIR, "tokenizer.pt"), weights_only=True)
  sd = dict(ckpt["ema"])
  sd["quant_conv.weight"] = sd["quant_conv.weight"][:16]
  path = str(tmp_path / "broken.pt")
  torch.save({"ema": sd}, path)
  with pytest.raises(ConversionError, match="quant_conv"):
    convert_tokenizer(path, os.path.join(PARITY_DIR, "config.json"))


def test_codes_validation(tok):
  bad = ifj.Codes(ids=[[np.zeros((1, s, s), np.int32) for s in (1, 1, 2)]] * 2)
  with pytest.raises(ValueError, match="scales"):
    tok.decode(bad)
