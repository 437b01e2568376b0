"""Official ImageFolder VAR checkpoints (`ar-ckpt-*.pth`) -> `NextScaleGenerator` variables.

Layout written by the official `train.py` (README of the parity fixtures):
`{"epoch", "iter", "trainer": {"config", "var_wo_ddp": sd, "vae_local": tokenizer sd, "var_opt"}, "args"}`.
A bare VAR state dict is accepted as well. Architecture from shapes: depth (number of blocks), width,
MLP ratio, vocabulary (head rows), classes, scales (checked against `pos_1LC`). What shapes cannot
tell: heads (architecture JSON `generator.num_heads`, else = depth, the VAR rule), the number of
branches P (tokenizer config, architecture JSON, checkpoint args, else 2) and the scale list
(architecture JSON `generator.patch_nums`, checkpoint args/config, else the released list).
The official inference reads the tokenizer weights from `trainer.vae_local`:
`tokenizer_from_generator_checkpoint` converts those.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from imagefolder_jax.convert.common import ConversionError, StateDict, load_torch_file
from imagefolder_jax.convert.official import (
  RELEASED_SCALES,
  infer_tokenizer_config,
  read_arch_json,
  tokenizer_state_dict,
  tokenizer_variables,
)
from imagefolder_jax.models.generator import GeneratorConfig
from imagefolder_jax.models.tokenizer import TokenizerConfig
from imagefolder_jax.ops.masks import block_causal_mask, scale_of_position

# Buffers the official module registers; they are checked, not converted.
_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
_BLOCK_BUFFERS = ("attn.zero_k_bias",)
RELEASED_NUM_BRANCHES = 2


def generator_state_dict(checkpoint: Any, source: str) -> StateDict:
  """Picks the VAR state dict out of an official AR checkpoint (or a bare state dict)."""
  if not isinstance(checkpoint, dict):
    raise ConversionError(f"{source}: expected a dict checkpoint, got {type(checkpoint).__name__}")
  trainer = checkpoint.get("trainer")
  if isinstance(trainer, dict) and isinstance(trainer.get("var_wo_ddp"), dict):
    return StateDict(trainer["var_wo_ddp"], source)
  if "head.weight" in checkpoint and "class_emb.weight" in checkpoint:
    return StateDict(checkpoint, source)
  raise ConversionError(f"{source}: no VAR state dict found (expected checkpoint['trainer']['var_wo_ddp']; "
                        f"keys: {sorted(checkpoint)[:8]})")


def _checkpoint_hints(checkpoint: Any) -> dict:
  """Scale list and branch count recorded in the official checkpoint's `args` / `trainer.config`."""
  hints = {}
  if not isinstance(checkpoint, dict):
    return hints
  args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
  trainer = checkpoint.get("trainer") if isinstance(checkpoint.get("trainer"), dict) else {}
  tconf = trainer.get("config") if isinstance(trainer.get("config"), dict) else {}
  for source in (args, tconf):
    if "patch_nums" in source and "scales" not in hints:
      hints["scales"] = tuple(int(s) for s in source["patch_nums"])
  if "product_quant" in args:
    hints["num_branches"] = int(args["product_quant"])
  return hints


def infer_generator_config(sd: StateDict, arch: dict, *, hints: Optional[dict] = None,
                           tokenizer_config: Optional[TokenizerConfig] = None) -> GeneratorConfig:
  """Builds the GeneratorConfig from tensor shapes, the architecture JSON and checkpoint hints."""
  hints = hints or {}
  gen_arch = arch.get("generator", {})
  tok_arch = arch.get("tokenizer", {})
  if any(k.startswith("shared_ada_lin.") for k in sd.keys()):
    raise ConversionError(f"{sd.source}: shared AdaLN (shared_aln=True) checkpoints are not supported")
  depth = sd.count("blocks.")
  if depth == 0:
    raise ConversionError(f"{sd.source}: missing tensor 'blocks.0.attn.mat_qkv.weight'")
  num_rows, width = sd.shape("class_emb.weight")
  hidden = sd.shape("blocks.0.ffn.fc1.weight")[0]
  vocab_total, head_width = sd.shape("head.weight")
  if head_width != width:
    raise ConversionError(f"{sd.source}: head.weight has width {head_width}, class_emb has {width}")
  if tokenizer_config is not None:
    num_branches = tokenizer_config.num_branches
  elif "product_quant" in tok_arch:
    num_branches = int(tok_arch["product_quant"])
  else:
    num_branches = int(hints.get("num_branches", RELEASED_NUM_BRANCHES))
  if num_branches < 1 or vocab_total % num_branches:
    raise ConversionError(f"{sd.source}: head has {vocab_total} rows, not divisible by {num_branches} branches")
  codebook_size = vocab_total // num_branches
  input_dim = sd.shape("word_embed.weight")[1]
  if input_dim % num_branches:
    raise ConversionError(f"{sd.source}: word_embed reads {input_dim} channels, not divisible by "
                          f"{num_branches} branches")
  latent_dim = input_dim // num_branches
  if tokenizer_config is not None:
    q = tokenizer_config.quantizer
    if (q.codebook_size, q.latent_dim) != (codebook_size, latent_dim):
      raise ConversionError(f"{sd.source}: generator expects codebooks {codebook_size}x{latent_dim} per branch, "
                            f"the tokenizer has {q.codebook_size}x{q.latent_dim}")
  scales = tuple(gen_arch.get("patch_nums", hints.get("scales",
                                                       tokenizer_config.quantizer.scales if tokenizer_config
                                                       else RELEASED_SCALES)))
  if tokenizer_config is not None and scales != tuple(tokenizer_config.quantizer.scales):
    raise ConversionError(f"{sd.source}: generator scales {scales} differ from the tokenizer's "
                          f"{tuple(tokenizer_config.quantizer.scales)}")
  num_tokens = sd.shape("pos_1LC")[1]
  if num_tokens != sum(s * s for s in scales):
    raise ConversionError(f"{sd.source}: pos_1LC has {num_tokens} positions, scales {scales} give "
                          f"{sum(s * s for s in scales)} (pass an architecture JSON with generator.patch_nums)")
  num_heads = int(gen_arch.get("num_heads", depth))
  if width % num_heads:
    raise ConversionError(f"{sd.source}: width {width} is not divisible by num_heads {num_heads}")
  attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in sd
  if attn_l2_norm and sd.shape("blocks.0.attn.scale_mul_1H11") != (1, num_heads, 1, 1):
    raise ConversionError(f"{sd.source}: blocks.0.attn.scale_mul_1H11 has shape "
                          f"{sd.shape('blocks.0.attn.scale_mul_1H11')}, expected (1, {num_heads}, 1, 1) "
                          "(num_heads from the architecture JSON or = depth)")
  defaults = GeneratorConfig(depth=depth)
  config = GeneratorConfig(
      depth=depth, width=width, num_heads=num_heads, mlp_ratio=hidden / width, num_classes=num_rows - 1,
      num_branches=num_branches, codebook_size=codebook_size, latent_dim=latent_dim, scales=scales,
      norm_eps=float(gen_arch.get("norm_eps", defaults.norm_eps)), attn_l2_norm=attn_l2_norm,
      max_scale_mul=float(gen_arch.get("max_scale_mul", defaults.max_scale_mul)),
      label_dropout=float(gen_arch.get("cond_drop_rate", defaults.label_dropout)),
      drop_path_rate=float(gen_arch.get("drop_path_rate", defaults.drop_path_rate)))
  if round(config.width * config.mlp_ratio) != hidden:
    raise ConversionError(f"{sd.source}: FFN hidden width {hidden} is not round({width} * {config.mlp_ratio})")
  recorded = arch.get("imagefolder_jax", {}).get("generator")
  if recorded is not None:
    config = _recorded_generator_config(sd, config, recorded)
  config.validate()
  return config


def _recorded_generator_config(sd: StateDict, inferred: GeneratorConfig, recorded: dict) -> GeneratorConfig:
  """The full config an `export-official` JSON records, checked against what the shapes say
  (it restores initialisers, dtype and the like, which the official layout has no place for)."""
  try:
    rec = GeneratorConfig.from_dict(recorded)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"architecture JSON imagefolder_jax.generator: {e}") from e
  for field in ("depth", "width", "num_heads", "num_classes", "num_branches", "codebook_size", "latent_dim",
                "scales", "attn_l2_norm"):
    if getattr(rec, field) != getattr(inferred, field):
      raise ConversionError(f"{sd.source}: generator {field} is {getattr(inferred, field)}, the architecture "
                            f"JSON's imagefolder_jax record says {getattr(rec, field)}")
  if round(rec.width * rec.mlp_ratio) != round(inferred.width * inferred.mlp_ratio):
    raise ConversionError(f"{sd.source}: generator FFN width {round(inferred.width * inferred.mlp_ratio)} differs "
                          f"from the record's mlp_ratio {rec.mlp_ratio}")
  return rec


def generator_variables(sd: StateDict, config: GeneratorConfig) -> dict:
  """Official VAR state dict -> {'params': ...} for `NextScaleGenerator`; every tensor is checked."""
  c = config
  w, h = c.width, round(c.width * c.mlp_ratio)
  n0 = c.scales[0] ** 2
  params = {
      "class_emb": {"embedding": sd.get("class_emb.weight", (c.num_classes + 1, w))},
      "lvl_embed": {"embedding": sd.get("lvl_embed.weight", (c.num_scales, w))},
      "pos_start": sd.get("pos_start", (1, n0, w)),
      "pos_1LC": sd.get("pos_1LC", (1, c.num_tokens, w)),
      "word_embed": sd.linear("word_embed", c.input_dim, w),
      "head_nm": {"ada_lin": sd.linear("head_nm.ada_lin.1", w, 2 * w)},
      "head": sd.linear("head", w, c.num_branches * c.codebook_size),
  }
  for i in range(c.depth):
    p = f"blocks.{i}."
    attn = {
        "mat_qkv": {"kernel": sd.get(p + "attn.mat_qkv.weight", (3 * w, w)).T},
        "q_bias": sd.get(p + "attn.q_bias", (w,)),
        "v_bias": sd.get(p + "attn.v_bias", (w,)),
        "proj": sd.linear(p + "attn.proj", w, w),
    }
    if c.attn_l2_norm:
      attn["scale_mul"] = sd.get(p + "attn.scale_mul_1H11", (1, c.num_heads, 1, 1)).reshape(c.num_heads)
    zero_k = p + "attn.zero_k_bias"
    if zero_k in sd and np.any(sd.get(zero_k, (w,)) != 0):
      raise ConversionError(f"{sd.source}: tensor {zero_k!r} is not all zeros (the official k bias is fixed at 0)")
    params[f"blocks_{i}"] = {
        "attn": attn,
        "ffn": {"fc1": sd.linear(p + "ffn.fc1", w, h), "fc2": sd.linear(p + "ffn.fc2", h, w)},
        "ada_lin": sd.linear(p + "ada_lin.1", w, 6 * w),
    }
  _check_buffers(sd, c)
  unused = sorted(k for k in sd.keys() if k not in sd.used)
  if unused:
    raise ConversionError(f"{sd.source}: unexpected tensors {unused[:6]}{' ...' if len(unused) > 6 else ''} "
                          f"(not part of a depth-{c.depth} VAR with attn_l2_norm={c.attn_l2_norm})")
  return {"params": params}


def _check_buffers(sd: StateDict, c: GeneratorConfig) -> None:
  if "lvl_1L" in sd:
    lvl = sd.get("lvl_1L", (1, c.num_tokens))
    if not np.array_equal(lvl[0], scale_of_position(c.scales)):
      raise ConversionError(f"{sd.source}: tensor 'lvl_1L' does not match scales {c.scales}")
  if "attn_bias_for_masking" in sd:
    # The official mask is 0 / -inf, so the finiteness check that guards weights is off here.
    bias = sd.get("attn_bias_for_masking", allow_non_finite=True)
    if bias.ndim != 4 or bias.shape[-1] < c.num_tokens:
      raise ConversionError(f"{sd.source}: tensor 'attn_bias_for_masking' has shape {bias.shape}")
    # xformers builds pad the mask to a multiple of 8; only the first L x L block is used.
    if not np.array_equal(bias[0, 0, :c.num_tokens, :c.num_tokens] == 0, block_causal_mask(c.scales)):
      raise ConversionError(f"{sd.source}: tensor 'attn_bias_for_masking' is not block-causal over {c.scales}")


def convert_generator(path: str, tokenizer_config: Optional[TokenizerConfig] = None,
                      arch_json: Optional[str] = None) -> tuple[GeneratorConfig, dict]:
  """Reads an official AR checkpoint. Returns (GeneratorConfig, {'params': ...}).

  tokenizer_config: the tokenizer the generator runs with (gives P and checks V, Cq and scales).
  arch_json: optional architecture JSON (parity `config.json` format).
  """
  checkpoint = load_torch_file(path)
  arch = read_arch_json(arch_json)
  sd = generator_state_dict(checkpoint, path)
  config = infer_generator_config(sd, arch, hints=_checkpoint_hints(checkpoint), tokenizer_config=tokenizer_config)
  return config, generator_variables(sd, config)


def has_tokenizer(checkpoint: Any) -> bool:
  """Whether an AR checkpoint carries the tokenizer weights (`trainer.vae_local`)."""
  return (isinstance(checkpoint, dict) and isinstance(checkpoint.get("trainer"), dict)
          and isinstance(checkpoint["trainer"].get("vae_local"), dict))


def tokenizer_from_generator_checkpoint(path: str, arch_json: Optional[str] = None
                                        ) -> Optional[tuple[TokenizerConfig, dict]]:
  """(TokenizerConfig, variables) from the AR checkpoint's `trainer.vae_local`, or None when absent.

  The official `inference.py` decodes with these weights, not with the tokenizer checkpoint's.
  """
  checkpoint = load_torch_file(path)
  if not has_tokenizer(checkpoint):
    return None
  sd = tokenizer_state_dict({"trainer": checkpoint["trainer"]}, f"{path}:trainer.vae_local")
  config = infer_tokenizer_config(sd, read_arch_json(arch_json))
  return config, tokenizer_variables(sd, config)
