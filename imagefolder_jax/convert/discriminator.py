"""Official dino-disc weights -> `DinoDiscriminator` variables.

Two sources, both local files:
* the heads: the official discriminator state dict (`reference/dinodisc_state_dict.tsv`):
  `heads.{i}.0.0.{bias,weight_orig,weight_u,weight_v}` (spectral conv k=1), `heads.{i}.0.1.{weight,bias}`
  (local BN, affine only, no running statistics), `heads.{i}.1.fn.0.*` (spectral conv k=9),
  `heads.{i}.1.fn.1.*` (BN), `heads.{i}.2.*` (spectral conv C -> 1). Head 0 is the embedding tap.
  A full `VQLoss` state dict (`discriminator.heads...`) or a checkpoint dict holding one under
  "discriminator" is accepted too.
* the frozen features: the DINO ViT-S/16 backbone (`dino_deitsmall16_pretrain.pth`, timm names
  `patch_embed.proj.*`, `blocks.{i}.*`, `norm.*`). The official zeroes the key part of every
  `attn.qkv.bias` after loading (softmax is invariant to it); `zero_key_bias` does the same.

PyTorch Conv1d weight (O, I, k) -> kernel (k, I, O); spectral-norm `weight_v` (I·k,) flattened in
(I, k) order -> our v flattened in (k, I) order; `weight_u` (O,) is u as is.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from imagefolder_jax.convert.common import ConversionError, StateDict, load_torch_file, to_numpy
from imagefolder_jax.convert.dinov2 import vit_params_from_state_dict
from imagefolder_jax.models.discriminator import FEATURES, DinoDiscConfig


def _spectral_conv(sd: StateDict, name: str, c_in: int, c_out: int, k: int) -> tuple[dict, dict]:
  weight = sd.get(f"{name}.weight_orig", (c_out, c_in, k))
  params = {"kernel": np.ascontiguousarray(weight.transpose(2, 1, 0)), "bias": sd.get(f"{name}.bias", (c_out,))}
  u = sd.get(f"{name}.weight_u", (c_out,))
  v = sd.get(f"{name}.weight_v", (c_in * k,)).reshape(c_in, k).T.reshape(-1)
  return params, {"u": u, "v": np.ascontiguousarray(v)}


def _local_bn(sd: StateDict, name: str, c: int) -> tuple[dict, dict]:
  params = {"scale": sd.get(f"{name}.weight", (c,)), "bias": sd.get(f"{name}.bias", (c,))}
  # The official local BN keeps no running statistics; start ours at the identity.
  stats = {"mean": np.zeros((c,), np.float32), "var": np.ones((c,), np.float32)}
  return params, stats


def _strip_heads_prefix(state_dict: Mapping[str, Any], source: str) -> dict:
  if "discriminator" in state_dict and isinstance(state_dict["discriminator"], Mapping):
    state_dict = state_dict["discriminator"]
  for prefix in ("", "discriminator.", "module.", "module.discriminator."):
    if any(k.startswith(prefix + "heads.") for k in state_dict):
      return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "heads.")}
  raise ConversionError(f"{source}: no 'heads.*' tensors (keys: {sorted(state_dict)[:8]})")


def convert_dino_disc_heads(state_dict: Mapping[str, Any], config: DinoDiscConfig = DinoDiscConfig(),
                            source: str = "discriminator state dict") -> dict[str, dict]:
  """Official heads -> {'params': {heads_i}, 'spectral': {heads_i}, 'batch_stats': {heads_i}}.

  Every tensor the config needs must be present with the right shape and no unexpected `heads.*`
  tensor may remain; otherwise `ConversionError` (a ValueError) names the tensor.
  """
  config.validate()
  sd = StateDict(_strip_heads_prefix(state_dict, source), source)
  c, k = config.vit.width, config.kernel_size
  params, spectral, stats = {}, {}, {}
  for i in range(config.num_taps):
    h = f"heads.{i}."
    p_block, s_block = _spectral_conv(sd, h + "0.0", c, c, 1)
    p_bn, b_bn = _local_bn(sd, h + "0.1", c)
    p_res, s_res = _spectral_conv(sd, h + "1.fn.0", c, c, k)
    p_rbn, b_rbn = _local_bn(sd, h + "1.fn.1", c)
    p_cls, s_cls = _spectral_conv(sd, h + "2", c, 1, 1)
    name = f"heads_{i}"
    params[name] = {"block": {"conv": p_block, "norm": p_bn}, "residual": {"conv": p_res, "norm": p_rbn},
                    "cls": p_cls}
    spectral[name] = {"block": {"conv": s_block}, "residual": {"conv": s_res}, "cls": s_cls}
    stats[name] = {"block": {"norm": b_bn}, "residual": {"norm": b_rbn}}
  unused = sorted(set(sd.keys()) - sd.used)
  if unused:
    raise ConversionError(f"{source}: unexpected tensor {unused[0]!r} ({len(unused)} unused; the config "
                          f"expects {config.num_taps} heads with width {c} and kernel {k})")
  return {"params": params, "spectral": spectral, "batch_stats": stats}


def convert_dino_vit_features(state_dict: Mapping[str, Any], config: DinoDiscConfig = DinoDiscConfig(),
                              zero_key_bias: bool = True, source: str = "DINO ViT state dict") -> dict:
  """DINO ViT-S/16 backbone (timm names) -> the `features` ViTTrunk params (unboxed NumPy)."""
  tensors = dict(state_dict)
  if "model" in tensors and isinstance(tensors["model"], Mapping):
    tensors = dict(tensors["model"])
  vit = config.vit
  if zero_key_bias:
    w = vit.width
    for name in list(tensors):
      if name.endswith(".attn.qkv.bias"):
        bias = np.array(to_numpy(tensors[name]), copy=True)
        if bias.shape != (3 * w,):
          raise ConversionError(f"{source}: tensor {name!r} has shape {bias.shape}, expected {(3 * w,)}")
        bias[w:2 * w] = 0.0
        tensors[name] = bias
  try:
    got, params = vit_params_from_state_dict(tensors, num_heads=vit.num_heads, norm_eps=vit.norm_eps,
                                             gelu_approximate=vit.gelu_approximate)
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from e
  for field in ("width", "depth", "mlp_ratio", "patch_size", "image_size", "layerscale"):
    if getattr(got, field) != getattr(vit, field):
      raise ConversionError(f"{source}: the ViT has {field} {getattr(got, field)}, the config expects "
                            f"{getattr(vit, field)}")
  return params


def convert_dino_discriminator(heads_state_dict: Mapping[str, Any],
                               dino_state_dict: Optional[Mapping[str, Any]],
                               config: DinoDiscConfig = DinoDiscConfig()) -> dict[str, dict]:
  """Heads (+ optionally the DINO backbone) -> full `DinoDiscriminator` variables.

  With `dino_state_dict=None` the result has no `features` entry; merge it into freshly
  initialised variables (e.g. when resuming from an official discriminator whose backbone is loaded
  separately).
  """
  variables = convert_dino_disc_heads(heads_state_dict, config)
  if dino_state_dict is not None:
    variables["params"][FEATURES] = convert_dino_vit_features(dino_state_dict, config)
  return variables


def load_dino_discriminator(heads_path: str, dino_path: Optional[str],
                            config: DinoDiscConfig = DinoDiscConfig()) -> dict[str, dict]:
  """Reads the official discriminator file and the DINO ViT-S/16 file (`torch.load(weights_only=True)`)."""
  heads = load_torch_file(heads_path)
  if not isinstance(heads, Mapping):
    raise ConversionError(f"{heads_path}: expected a state dict, got {type(heads).__name__}")
  dino = None
  if dino_path is not None:
    dino = load_torch_file(dino_path)
    if not isinstance(dino, Mapping):
      raise ConversionError(f"{dino_path}: expected a state dict, got {type(dino).__name__}")
  return convert_dino_discriminator(heads, dino, config)
