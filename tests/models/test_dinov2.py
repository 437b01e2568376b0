"""DINOv2 in Flax: parity with transformers' Dinov2Model, converters for three layouts, resampling."""
from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import PARITY_DIR

from imagefolder_jax.convert import dinov2 as convert
from imagefolder_jax.models.dinov2 import DinoV2, dinov2_config

PARITY = pathlib.Path(PARITY_DIR)
WIDTH, DEPTH, HEADS, PATCH, IMAGE = 64, 2, 2, 14, 56


@pytest.fixture(scope="module")
def hf_model():
  from transformers import Dinov2Config, Dinov2Model
  config = Dinov2Config(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                        intermediate_size=4 * WIDTH, patch_size=PATCH, image_size=IMAGE,
                        layerscale_value=0.5)
  torch.manual_seed(0)
  model = Dinov2Model(config).eval()
  # Random weights of O(1) effect everywhere, so every path (norm affines, layer scales,
  # attention patterns) moves the output.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lambda1" in name:
        p.uniform_(0.2, 0.8)
      elif "norm" in name and name.endswith("weight"):
        p.normal_(1.0, 0.2)
      elif p.ndim >= 2 and "embeddings" not in name:
        p.normal_(0.0, 1.0 / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.normal_(0.0, 0.3)
  return model


@pytest.fixture(scope="module")
def hf_state(hf_model):
  return {k: v.clone() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def pixels():
  return np.random.default_rng(0).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def hf_outputs(hf_model, pixels):
  with torch.no_grad():
    out = hf_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                   output_hidden_states=True)
  return {"tokens": out.last_hidden_state.numpy(), "cls": out.pooler_output.numpy(),
          "hidden": [h.numpy() for h in out.hidden_states]}


@pytest.fixture(scope="module")
def hf_converted(hf_state, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "pytorch_model.bin"
  torch.save(hf_state, path)
  return convert.dinov2_params_from_file(path, num_heads=HEADS)


def _apply(config, params, images, collect=()):
  return jax.jit(lambda p, x: DinoV2(config).apply({"params": p}, x, collect=collect))(params, images)


def _timm_state(hf_state: dict, facebook: bool = False) -> dict:
  """The same weights in timm (or facebookresearch, with mask_token and block chunks) names."""
  out = {"cls_token": hf_state["embeddings.cls_token"],
         "pos_embed": hf_state["embeddings.position_embeddings"],
         "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": hf_state["layernorm.weight"], "norm.bias": hf_state["layernorm.bias"]}
  for i in range(DEPTH):
    h = f"encoder.layer.{i}."
    b = f"blocks.0.{i}." if facebook else f"blocks.{i}."
    for n in ("weight", "bias"):
      out[b + f"attn.qkv.{n}"] = torch.cat([hf_state[h + f"attention.{x}_proj.{n}"] for x in "qkv"])
      out[b + f"attn.proj.{n}"] = hf_state[h + f"attention.o_proj.{n}"]
      for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
        out[b + f"{m}.{n}"] = hf_state[h + f"{m}.{n}"]
    out[b + "ls1.gamma"] = hf_state[h + "layer_scale1.lambda1"]
    out[b + "ls2.gamma"] = hf_state[h + "layer_scale2.lambda1"]
  if facebook:
    out["mask_token"] = torch.zeros(1, WIDTH)
  return out


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_matches_hf_dinov2(hf_converted, hf_outputs, pixels):
  config, params = hf_converted
  assert (config.width, config.depth, config.num_heads, config.patch_size, config.image_size,
          config.layerscale) == (WIDTH, DEPTH, HEADS, PATCH, IMAGE, True)
  out = _apply(config, params, pixels, collect=(0, 1))
  np.testing.assert_allclose(out.cls, hf_outputs["cls"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.patch_tokens, hf_outputs["tokens"][:, 1:], rtol=1e-4, atol=1e-4)
  # Intermediate outputs (the discriminator's taps): HF hidden_states = [embeddings, block 0, …].
  np.testing.assert_allclose(out.embedding, hf_outputs["hidden"][0], rtol=1e-5, atol=1e-5)
  for i in range(DEPTH):
    np.testing.assert_allclose(out.blocks[i], hf_outputs["hidden"][i + 1], rtol=1e-4, atol=1e-4)


def test_layouts_load_identically(hf_state, hf_converted, tmp_path):
  from safetensors.numpy import save_file
  _, reference = hf_converted
  # Pre-5.0 transformers names, safetensors, under the task-model prefix `dinov2.`.
  old = {}
  for k, v in hf_state.items():
    for new_name, old_name in (("q_proj", "attention.query"), ("k_proj", "attention.key"),
                               ("v_proj", "attention.value"), ("o_proj", "output.dense")):
      k = k.replace(f"attention.{new_name}", f"attention.{old_name}")
    old["dinov2." + k] = v.numpy()
  old["classifier.weight"] = np.zeros((3, 2 * WIDTH), np.float32)
  save_file(old, str(tmp_path / "hf_old.safetensors"))
  _, params = convert.dinov2_params_from_file(tmp_path / "hf_old.safetensors", num_heads=HEADS)
  _assert_trees_equal(params, reference)
  for facebook in (False, True):
    path = tmp_path / f"timm_{facebook}.pth"
    torch.save(_timm_state(hf_state, facebook), path)
    config, params = convert.dinov2_params_from_file(path, num_heads=HEADS)
    assert config.depth == DEPTH and config.layerscale
    _assert_trees_equal(params, reference)


def test_converter_errors(hf_state):
  timm = _timm_state(hf_state)
  bad = dict(timm)
  del bad["blocks.1.mlp.fc2.bias"]
  with pytest.raises(ValueError, match=r"missing tensor 'blocks\.1\.mlp\.fc2\.bias'"):
    convert.vit_params_from_state_dict(bad, num_heads=HEADS)
  bad = dict(timm)
  bad["blocks.0.attn.proj.weight"] = torch.zeros(WIDTH, WIDTH + 1)
  with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.proj\.weight' has shape \(64, 65\)"):
    convert.vit_params_from_state_dict(bad, num_heads=HEADS)
  bad = dict(hf_state)
  del bad["encoder.layer.0.attention.k_proj.weight"]
  with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.k_proj\.weight"):
    convert.vit_params_from_state_dict(bad, num_heads=HEADS)
  with pytest.raises(ValueError, match=r"register tokens"):
    convert.vit_params_from_state_dict({**timm, "register_tokens": torch.zeros(1, 4, WIDTH)})
  with pytest.raises(ValueError, match=r"unexpected tensors.*'fc_norm\.weight'"):
    convert.vit_params_from_state_dict({**timm, "fc_norm.weight": torch.zeros(WIDTH)})
  with pytest.raises(ValueError, match=r"no tensors under prefix 'semantic_model\.'"):
    convert.vit_params_from_state_dict(timm, "semantic_model")


def test_default_head_count_is_width_over_64(hf_state):
  config, _ = convert.vit_params_from_state_dict(_timm_state(hf_state))
  assert config.num_heads == WIDTH // 64 == 1


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_patch_kernel_resampling_preserves_projection(interpolation):
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(5, 3, 14, 14))
  patches = torch.from_numpy(rng.normal(size=(7, 3, 14, 14)))
  # The test's resize is torch's own (float64), the one timm builds its matrix from.
  resized = F.interpolate(patches, size=(16, 16), mode=interpolation, antialias=True).numpy()
  new_kernel = convert.resample_patch_kernel(kernel, (16, 16), interpolation)
  assert new_kernel.shape == (5, 3, 16, 16)
  before = np.einsum("nihw,oihw->no", patches.numpy(), kernel)
  after = np.einsum("nihw,oihw->no", resized, new_kernel.astype(np.float64))
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
  # The 1-D matrices themselves equal torch's antialiased resize, up and down.
  for n_in, n_out in ((14, 16), (16, 14), (16, 11)):
    # Resize along W: torch 2.13 gives wrong weights for H-only antialiased resizes
    # of 1-pixel-wide inputs.
    basis = torch.eye(n_in, dtype=torch.float64)[:, None, None, :]  # (n_in, 1, 1, n_in)
    ref = F.interpolate(basis, size=(1, n_out), mode=interpolation, antialias=True)[:, 0, 0, :].T
    np.testing.assert_allclose(convert.resize_matrix(n_in, n_out, interpolation), ref.numpy(),
                               atol=1e-12)


def test_patch16_conversion_end_to_end(hf_state, hf_outputs, pixels, tmp_path):
  path = tmp_path / "hf.pth"
  torch.save(hf_state, path)
  config, params = convert.dinov2_params_from_file(path, num_heads=HEADS, patch_size=16)
  assert (config.patch_size, config.image_size, config.grid) == (16, 64, 4)
  # Upsample every 14×14 patch to 16×16 on its own: the PI-resampled kernel then sees the
  # same projections, so the whole network reproduces the patch-14 outputs.
  b = pixels.shape[0]
  tiles = pixels.reshape(b, 4, PATCH, 4, PATCH, 3).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 3, PATCH, PATCH)
  tiles = F.interpolate(torch.from_numpy(tiles).double(), size=(16, 16), mode="bicubic",
                        antialias=True).float().numpy()
  images16 = tiles.reshape(b, 4, 4, 3, 16, 16).transpose(0, 1, 4, 2, 5, 3).reshape(b, 64, 64, 3)
  out = _apply(config, params, images16)
  np.testing.assert_allclose(out.cls, hf_outputs["cls"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.patch_tokens, hf_outputs["tokens"][:, 1:], rtol=1e-4, atol=1e-4)


def test_position_table_resampling_on_the_fly_matches_converter(hf_state, hf_converted, pixels):
  config, params = hf_converted
  small = pixels[:, :42, :42]
  on_the_fly = _apply(config, params, small)  # table 4×4 → 3×3 inside the model
  config42, params42 = convert.vit_params_from_state_dict(hf_state, num_heads=HEADS, image_size=42)
  assert params42["pos_embed"].shape == (1, 10, WIDTH)
  converted = _apply(config42, params42, small)
  np.testing.assert_allclose(on_the_fly.cls, converted.cls, rtol=1e-5, atol=1e-5)


def test_official_tokenizer_trunks_and_timm_pos_resampling():
  if not (PARITY / "tokenizer.pt").exists():
    pytest.skip("parity fixture not available")
  state = torch.load(PARITY / "tokenizer.pt", map_location="cpu", weights_only=True)["model"]
  expected = np.load(PARITY / "expected.npz")
  for prefix, with_patch in (("encoder.model.", True), ("decoder.model.", False),
                             ("semantic_model.", True)):
    config, params = convert.vit_params_from_state_dict(
        state, prefix, with_patch_embed=with_patch, num_heads=2, patch_size=16)
    assert (config.width, config.depth, config.patch_size, config.image_size) == (64, 2, 16, 256)
    assert ("patch_embed" in params) == with_patch
    np.testing.assert_array_equal(params["pos_embed"], state[prefix + "pos_embed"].numpy())
  # timm.layers.resample_abs_pos_embed(pos_embed, (11, 11), num_prefix_tokens=1) from the fixture.
  for name, prefix in (("tok_enc_pos11", "encoder.model."), ("tok_dec_pos11", "decoder.model.")):
    ours = convert.resample_pos_table(state[prefix + "pos_embed"].numpy(), 11)
    np.testing.assert_allclose(ours, expected[name], rtol=1e-5, atol=1e-6)


def test_presets():
  b16 = dinov2_config("dinov2_vitb16_256")
  assert (b16.width, b16.num_heads, b16.patch_size, b16.grid) == (768, 12, 16, 16)
  s14 = dinov2_config("dinov2_vits14", depth=2)
  assert (s14.width, s14.depth, s14.grid) == (384, 2, 37)
  assert not dinov2_config("dino_vits16").layerscale
  with pytest.raises(ValueError, match="dinov2_vitl14"):
    dinov2_config("dinov2_vitl14")


def test_converted_tree_matches_module_init(hf_converted):
  import flax.linen as nn
  config, params = hf_converted
  x = jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), np.float32)
  shapes = jax.eval_shape(DinoV2(config).init, jax.random.key(0), x)["params"]
  shapes = jax.tree.map(lambda s: s.shape, nn.meta.unbox(shapes))
  assert shapes == jax.tree.map(lambda a: a.shape, params)
  assert sorted(shapes) == ["blocks_0", "blocks_1", "cls_token", "norm", "patch_embed", "pos_embed"]
