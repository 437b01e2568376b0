"""Writing official-layout checkpoints from a bundle (the I/O half of `convert.export_official`).

`export_bundle(bundle, out)` reads a bundle, resolves the frozen semantic teacher (the official
tokenizer state dict holds it as `semantic_model.*`), builds the state dicts and writes the files
listed in `convert.export_official`. Tensors are written with `torch.save` (read back with
`torch.load(weights_only=True)`) and, the same state dicts, with safetensors.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from imagefolder_jax.convert.export_official import (
  CONFIG_FILE,
  GENERATOR_FILE,
  TOKENIZER_FILE,
  ExportError,
  ar_checkpoint_args,
  architecture_json,
  check_generator,
  check_tokenizer,
  generator_state_dict,
  tokenizer_state_dict,
)
from imagefolder_jax.models.generator import GeneratorConfig
from imagefolder_jax.models.tokenizer import TokenizerConfig
from imagefolder_jax.models.vit import ViTConfig

TEACHER_HINT = ("pass --teacher DINOV2_FILE (or bundle:DIR holding a semantic_teacher), or --without-teacher "
                "to export for a VQModel built with semantic_guide='none'")


def load_teacher(spec: str, encoder: ViTConfig) -> tuple[ViTConfig, dict]:
  """A frozen DINOv2 teacher from a local file (timm / facebookresearch / HF layout) or 'bundle:DIR'.

  Files are resampled to the encoder's patch size and resolution, as the official
  `create_model(encoder_model, img_size=256, patch_size=16)` does on load.
  """
  if spec.startswith("bundle:"):
    from imagefolder_jax.storage.bundle import load_bundle
    directory = spec[len("bundle:"):]
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"teacher bundle not found: {directory}")
    configs, variables = load_bundle(directory)
    if "semantic_teacher" not in configs:
      raise ExportError(f"{spec}: the bundle holds no semantic_teacher")
    return ViTConfig(**configs["semantic_teacher"]), variables["semantic_teacher"]["params"]
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"teacher weights not found: {spec}")
  from imagefolder_jax.convert.dinov2 import dinov2_params_from_file
  return dinov2_params_from_file(spec, patch_size=encoder.patch_size, image_size=encoder.image_size,
                                 num_heads=encoder.num_heads)


def resolve_teacher(configs: dict, variables: dict, encoder: ViTConfig, *, teacher: Optional[str],
                    without_teacher: bool, source: str) -> Optional[tuple[ViTConfig, dict]]:
  """The teacher to export: --teacher, else the bundle's, else None with --without-teacher, else an error."""
  if teacher and without_teacher:
    raise ExportError("--teacher and --without-teacher exclude each other")
  if without_teacher:
    return None
  if teacher:
    return load_teacher(teacher, encoder)
  if "semantic_teacher" in configs:
    return ViTConfig(**configs["semantic_teacher"]), variables["semantic_teacher"]["params"]
  raise ExportError(f"{source}: no semantic teacher to write as semantic_model.* (the official tokenizer "
                    f"checkpoint holds the frozen DINOv2); {TEACHER_HINT}")


def _torch():
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("writing PyTorch checkpoints needs torch: pip install torch") from e
  return torch


def _as_torch(sd: dict[str, np.ndarray]) -> dict:
  torch = _torch()
  return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}


def official_checkpoints(configs: dict, variables: dict, *, teacher: Optional[tuple[ViTConfig, dict]],
                         step: int = 0) -> dict[str, Any]:
  """The official checkpoint objects (torch tensors) and the architecture JSON, keyed by file name.

  step: the generator's training step (AR checkpoint `iter`); the tokenizer's `steps` entry is its
  usage-counter step count, which `convert-official` restores.
  """
  if "tokenizer" not in configs:
    raise ExportError(f"the bundle holds no tokenizer (models: {sorted(configs)})")
  tok_config = TokenizerConfig.from_dict(configs["tokenizer"])
  check_tokenizer(tok_config)
  tok_vars = variables["tokenizer"]
  tok_sd = _as_torch(tokenizer_state_dict(tok_config, tok_vars, teacher))
  usage_steps = [int(np.asarray(s.get("usage_steps", 0))) for s in tok_vars.get("quantizer_stats", {}).values()]
  out: dict[str, Any] = {TOKENIZER_FILE: {"model": tok_sd, "ema": tok_sd, "steps": max(usage_steps, default=0)},
                         "tokenizer.safetensors": tok_sd}
  gen_config = None
  if "generator" in configs:
    gen_config = GeneratorConfig.from_dict(configs["generator"])
    check_generator(gen_config, tok_config)
    var_sd = _as_torch(generator_state_dict(gen_config, variables["generator"]))
    scales = tuple(gen_config.scales)
    out[GENERATOR_FILE] = {
        "epoch": 0, "iter": int(step),
        # VARTrainer.get_config(): `load_state_dict(strict=True)` compares these.
        "trainer": {"config": {"patch_nums": scales, "resos": tuple(s * scales[-1] for s in scales),
                               "label_smooth": 0.0, "prog_it": 0, "last_prog_si": -1, "first_prog": True},
                    "var_wo_ddp": var_sd, "vae_local": tok_sd},
        "args": ar_checkpoint_args(tok_config, gen_config, teacher is not None),
    }
    out["generator.safetensors"] = var_sd
  out[CONFIG_FILE] = architecture_json(tok_config, gen_config, with_teacher=teacher is not None)
  return out


def write_checkpoints(out_dir: str, files: dict[str, Any]) -> list[str]:
  """Writes `official_checkpoints(...)` into `out_dir`. Returns the paths written."""
  torch = _torch()
  from safetensors.torch import save_file
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, content in files.items():
    path = os.path.join(out_dir, name)
    if name.endswith(".json"):
      with open(path, "w") as f:
        json.dump(content, f, indent=1)
    elif name.endswith(".safetensors"):
      save_file(content, path)
    else:
      torch.save(content, path)
    paths.append(path)
  return paths


def export_bundle(bundle_dir: str, out_dir: str, *, teacher: Optional[str] = None, without_teacher: bool = False,
                  step: int = 0) -> list[str]:
  """Bundle -> official checkpoints in `out_dir` (see `convert.export_official`). Returns the paths."""
  from imagefolder_jax.storage.bundle import load_bundle
  configs, variables = load_bundle(bundle_dir)
  if "tokenizer" not in configs:
    raise ExportError(f"{bundle_dir}: the bundle holds no tokenizer (models: {sorted(configs)})")
  encoder = TokenizerConfig.from_dict(configs["tokenizer"]).vit
  chosen = resolve_teacher(configs, variables, encoder, teacher=teacher, without_teacher=without_teacher,
                           source=bundle_dir)
  files = official_checkpoints(configs, variables, teacher=chosen, step=step)
  files[CONFIG_FILE]["exported_from"] = os.path.abspath(bundle_dir)
  return write_checkpoints(out_dir, files)


def workdir_teacher(workdir_config) -> Optional[str]:
  """The run's semantic teacher spec when it names weights on disk (a file or bundle:DIR), else None."""
  loss = workdir_config.get("loss", {})
  spec = loss.get("semantic_teacher", "") if loss.get("semantic", 0) else ""
  if not spec or spec == "random":
    return None
  return spec
