"""Official ImageFolder (github.com/lxa9867/ImageFolder) checkpoints -> imagefolder-jax variables.

Tokenizer checkpoint: `{"model": sd, "ema": sd, ...}` (the AR pipeline uses "ema"). Architecture
is read from tensor shapes where possible; what shapes cannot tell (attention heads, scale list) comes
from an architecture JSON in the format of the parity fixtures' `config.json`, else from the released
MSVR10P2-4096 defaults.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import numpy as np

from imagefolder_jax.convert.common import ConversionError, StateDict, load_torch_file
from imagefolder_jax.convert.dinov2 import vit_params_from_state_dict
from imagefolder_jax.models.quantizer import QuantizerConfig, phi_index_per_scale
from imagefolder_jax.models.tokenizer import TokenizerConfig
from imagefolder_jax.models.vit import ViTConfig

RELEASED_SCALES = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)
RELEASED_PHI_RATIO = 0.5


def read_arch_json(path: Optional[str]) -> dict:
  """The architecture description (parity `config.json` format) or {} when no path is given."""
  if path is None:
    return {}
  if not os.path.isfile(path):
    raise FileNotFoundError(f"architecture config not found: {path}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path}: not valid JSON ({e})") from e


def tokenizer_state_dict(checkpoint: Any, source: str, weights: str = "ema") -> StateDict:
  """Picks the state dict out of an official tokenizer (or AR) checkpoint.

  weights: 'ema' (what the AR pipeline uses; falls back to 'model' when absent) or 'model'.
  """
  if not isinstance(checkpoint, dict):
    raise ConversionError(f"{source}: expected a dict checkpoint, got {type(checkpoint).__name__}")
  for key in ((weights, "model", "state_dict") if weights == "ema" else (weights, "state_dict")):
    if key in checkpoint and isinstance(checkpoint[key], dict):
      return StateDict(checkpoint[key], source)
  if "trainer" in checkpoint and isinstance(checkpoint["trainer"], dict) and "vae_local" in checkpoint["trainer"]:
    return StateDict(checkpoint["trainer"]["vae_local"], source)
  if any(k.startswith("encoder.") for k in checkpoint):
    return StateDict(checkpoint, source)
  raise ConversionError(f"{source}: no tokenizer state dict found (keys: {sorted(checkpoint)[:8]})")


def official_vit(sd: StateDict, prefix: str, num_heads: Optional[int], *, with_patch_embed: bool = True,
                 patch_size: Optional[int] = None) -> tuple[ViTConfig, dict]:
  """The timm-layout ViT under `prefix` (e.g. 'encoder.model.') -> (ViTConfig read from shapes, params).

  num_heads: from the architecture JSON; None = width // 64 (the DINOv2 ViT-B convention of the release).
  with_patch_embed / patch_size: as in `convert.dinov2.vit_params_from_state_dict` (the decoder has no
  patch embedding).
  """
  try:
    return vit_params_from_state_dict(sd.under(prefix), prefix, with_patch_embed=with_patch_embed,
                                      num_heads=num_heads, patch_size=patch_size)
  except ValueError as e:
    # ConversionError included: it names the tensor but not the file (nor, for heads, the remedy).
    hint = " (architecture JSON / --config: tokenizer.vit.num_heads)" if "num_heads" in str(e) else ""
    raise ConversionError(f"{sd.source}: {prefix}*: {e}{hint}") from e


_VIT_SHAPE_FIELDS = ("width", "depth", "num_heads", "mlp_ratio", "patch_size", "image_size", "layerscale")


def _check_vit_shape(sd: StateDict, name: str, got: ViTConfig, expected: ViTConfig) -> None:
  for field in _VIT_SHAPE_FIELDS:
    if getattr(got, field) != getattr(expected, field):
      raise ConversionError(f"{sd.source}: {name} has {field} {getattr(got, field)}, the tokenizer config "
                            f"expects {getattr(expected, field)}")


def infer_tokenizer_config(sd: StateDict, arch: dict) -> TokenizerConfig:
  """Builds the TokenizerConfig from tensor shapes plus the optional architecture JSON."""
  tok_arch = arch.get("tokenizer", {})
  vit_arch = tok_arch.get("vit", {})
  vit, _ = official_vit(sd, "encoder.model.", vit_arch.get("num_heads"))
  num_branches = sd.count("quantizes.")
  if num_branches == 0:
    raise ConversionError(f"{sd.source}: missing tensor 'quantizes.0.embedding.weight'")
  codebook_size, latent_dim = sd.shape("quantizes.0.embedding.weight")
  num_phi = sd.count("quantizes.0.quant_resi.qresi_ls.")
  if num_phi == 0:
    raise ConversionError(f"{sd.source}: missing tensor 'quantizes.0.quant_resi.qresi_ls.0.weight'")
  scales = tuple(tok_arch.get("v_patch_nums", RELEASED_SCALES))
  n_latent = sd.shape("encoder.latent_tokens")[1]
  if n_latent != num_branches * scales[-1] ** 2:
    raise ConversionError(
        f"{sd.source}: encoder.latent_tokens has {n_latent} tokens, expected {num_branches} branches x "
        f"{scales[-1]}^2 for scales {scales} (pass --config with the right v_patch_nums)")
  expected_phi = tok_arch.get("phi_index_per_scale")
  if expected_phi is not None and tuple(expected_phi) != phi_index_per_scale(len(scales), num_phi):
    raise ConversionError(f"phi_index_per_scale {expected_phi} in the config differs from the official rule "
                          f"{phi_index_per_scale(len(scales), num_phi)}")
  quantizer = QuantizerConfig(
      codebook_size=codebook_size, latent_dim=latent_dim, scales=scales, num_phi=num_phi,
      phi_ratio=float(tok_arch.get("quant_resi", RELEASED_PHI_RATIO)),
      beta=float(tok_arch.get("commit_loss_beta", 0.25)), codebook_update="gradient")
  config = TokenizerConfig(vit=vit, quantizer=quantizer, num_branches=num_branches,
                           dropout_start=int(tok_arch.get("start_drop", 3)),
                           dropout_fraction=float(tok_arch.get("codebook_drop", 0.1)))
  recorded = arch.get("imagefolder_jax", {}).get("tokenizer")
  if recorded is not None:
    config = _recorded_tokenizer_config(sd, config, recorded)
  config.validate()
  return config


def _recorded_tokenizer_config(sd: StateDict, inferred: TokenizerConfig, recorded: dict) -> TokenizerConfig:
  """The full config an `export-official` JSON records, checked against what the shapes say.

  Shapes decide the architecture; the record only restores what the official layout has no place
  for (initialisers, EMA settings). The checkpoint holds a gradient-mode codebook whatever the record.
  """
  try:
    rec = TokenizerConfig.from_dict(recorded)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"architecture JSON imagefolder_jax.tokenizer: {e}") from e
  checks = {"vit.width": (rec.vit.width, inferred.vit.width), "vit.depth": (rec.vit.depth, inferred.vit.depth),
            "vit.num_heads": (rec.vit.num_heads, inferred.vit.num_heads),
            "vit.mlp hidden": (int(rec.vit.width * rec.vit.mlp_ratio),
                               int(inferred.vit.width * inferred.vit.mlp_ratio)),
            "vit.patch_size": (rec.vit.patch_size, inferred.vit.patch_size),
            "vit.image_size": (rec.vit.image_size, inferred.vit.image_size),
            "vit.layerscale": (rec.vit.layerscale, inferred.vit.layerscale),
            "num_branches": (rec.num_branches, inferred.num_branches),
            "quantizer.codebook_size": (rec.quantizer.codebook_size, inferred.quantizer.codebook_size),
            "quantizer.latent_dim": (rec.quantizer.latent_dim, inferred.quantizer.latent_dim),
            "quantizer.scales": (tuple(rec.quantizer.scales), tuple(inferred.quantizer.scales)),
            "quantizer.num_phi": (rec.quantizer.num_phi, inferred.quantizer.num_phi)}
  for field, (want, got) in checks.items():
    if want != got:
      raise ConversionError(f"{sd.source}: tokenizer {field} is {got}, the architecture JSON's "
                            f"imagefolder_jax record says {want}")
  return dataclasses.replace(rec, quantizer=dataclasses.replace(rec.quantizer, codebook_update="gradient"))


def tokenizer_variables(sd: StateDict, config: TokenizerConfig, usage_steps: int = 0) -> dict:
  """Official tokenizer state dict -> {'params': ..., 'quantizer_stats': ...} for `ImageFolderTokenizer`.

  usage_steps: steps the usage counters have seen (the checkpoint's `steps`; it picks their EMA decay).
  """
  c = config
  w = c.vit.width
  q = c.quantizer
  n2 = q.grid ** 2
  encoder_vit, encoder_params = official_vit(sd, "encoder.model.", c.vit.num_heads)
  _check_vit_shape(sd, "encoder.model", encoder_vit, c.vit)
  encoder = {
      "model": encoder_params,
      "latent_tokens": sd.get("encoder.latent_tokens", (1, c.num_branches * n2, w)),
      "lvl_embed": {"embedding": sd.get("encoder.lvl_embed.weight", (c.num_branches + 1, w))},
  }
  if "decoder.model.patch_embed.proj.weight" in sd:
    raise ConversionError(f"{sd.source}: decoder.model.patch_embed.proj.weight present; the official "
                          "DINOv2 decoder has none (is this an ImageFolder tokenizer?)")
  decoder_vit, decoder_params = official_vit(sd, "decoder.model.", c.vit.num_heads, with_patch_embed=False,
                                             patch_size=c.vit.patch_size)
  _check_vit_shape(sd, "decoder.model", decoder_vit, c.vit)
  decoder = {
      "model": decoder_params,
      "mask_token": sd.get("decoder.mask_token", (1, 1, w)),
      "lvl_embed": {"embedding": sd.get("decoder.lvl_embed.weight", (2, w))},
      "to_pixel": sd.linear("decoder.to_pixel.model", w, c.vit.patch_size ** 2 * 3),
  }
  params = {
      "encoder": encoder,
      "decoder": decoder,
      "quant_conv": sd.conv1x1_as_linear("quant_conv", w, q.latent_dim),
      "post_quant_conv": sd.conv1x1_as_linear("post_quant_conv", c.num_branches * q.latent_dim, w),
  }
  stats = {}
  for b in range(c.num_branches):
    prefix = f"quantizes.{b}."
    branch = {"embedding": sd.get(prefix + "embedding.weight", (q.codebook_size, q.latent_dim))}
    for k in range(q.num_phi):
      branch[f"phi_{k}"] = {"conv": sd.conv(f"{prefix}quant_resi.qresi_ls.{k}", q.latent_dim, q.latent_dim, 3)}
    params[f"quantizer_{b}"] = branch
    usage_name = prefix + "ema_vocab_hit_SV"
    usage = (sd.get(usage_name, (len(q.scales), q.codebook_size)) if usage_name in sd
             else np.zeros((len(q.scales), q.codebook_size), np.float32))
    stats[f"quantizer_{b}"] = {"usage": usage.astype(np.float32), "usage_steps": np.array(usage_steps, np.int32)}
  return {"params": params, "quantizer_stats": stats}


def convert_tokenizer(path: str, arch_json: Optional[str] = None, weights: str = "ema"):
  """Reads an official tokenizer checkpoint. Returns (TokenizerConfig, variables, teacher or None)."""
  arch = read_arch_json(arch_json)
  checkpoint = load_torch_file(path)
  sd = tokenizer_state_dict(checkpoint, path, weights)
  config = infer_tokenizer_config(sd, arch)
  steps = checkpoint.get("steps", 0) if isinstance(checkpoint, dict) else 0
  variables = tokenizer_variables(sd, config, usage_steps=steps if isinstance(steps, int) and steps > 0 else 0)
  teacher = None
  if "semantic_model.pos_embed" in sd:
    vit_arch = arch.get("tokenizer", {}).get("vit", {})
    teacher = official_vit(sd, "semantic_model.", vit_arch.get("num_heads"))
  return config, variables, teacher
