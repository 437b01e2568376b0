"""ViT trunk options used when training from scratch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagefolder_jax.models.vit import ViTConfig, ViTTrunk, sincos_position_init


def test_sincos_table_formula():
  table = np.asarray(sincos_position_init(None, (1, 1 + 9, 8)))
  assert table.shape == (1, 10, 8)
  np.testing.assert_array_equal(table[0, 0], 0.0)  # cls row
  omega = 1.0 / 10000 ** (np.arange(2) / 2)
  y, x = 1, 2  # grid row 1, column 2 -> token 1 + 1*3 + 2
  expected = np.concatenate([np.sin(y * omega), np.cos(y * omega), np.sin(x * omega), np.cos(x * omega)])
  np.testing.assert_allclose(table[0, 1 + 3 * y + x], expected, rtol=1e-6)


@pytest.mark.parametrize("linear_init,std_range", [("trunc_normal", (0.015, 0.025)), ("xavier", (0.07, 0.12))])
def test_linear_init_and_layerscale(linear_init, std_range):
  cfg = ViTConfig(width=64, depth=1, num_heads=2, patch_size=8, image_size=32, linear_init=linear_init,
                  layerscale_init=0.5, pos_init="sincos")
  params = nn.unbox(ViTTrunk(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  std = float(np.std(params["blocks_0"]["attn"]["qkv"]["kernel"]))
  assert std_range[0] < std < std_range[1]
  np.testing.assert_allclose(params["blocks_0"]["ls1"]["gamma"], 0.5)
  np.testing.assert_allclose(params["pos_embed"], sincos_position_init(None, (1, 17, 64)))


def test_bad_options_raise():
  with pytest.raises(ValueError, match="linear_init"):
    ViTTrunk(ViTConfig(width=32, depth=1, num_heads=2, patch_size=8, image_size=32, linear_init="he")).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
