"""export-official: bundles -> the authors' PyTorch layouts, and back.

* the parity fixture's official checkpoints -> bundle -> official: every tensor bit for bit;
* a model trained here for a few steps (gradient codebook, from a training workdir) -> official ->
  convert-official -> bundle: configs equal and every variable bit-identical;
* the export loads with `load_state_dict(strict=True)` into the plain-torch official modules
  (bench/torch_reference.py) and reproduces our ids, reconstructions and teacher-forced logits;
* options the official code cannot express are refused with a message naming the option.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference as ref  # noqa: E402
from support import FIXTURES, PARITY_DIR, ROOT, relative_error  # noqa: E402

import imagefolder_jax as ifj  # noqa: E402
from imagefolder_jax.cli import main  # noqa: E402
from imagefolder_jax.convert.export_official import (  # noqa: E402
  ExportError,
  check_tokenizer,
  official_phi_index,
  tokenizer_state_dict,
)
from imagefolder_jax.models.quantizer import QuantizerConfig  # noqa: E402
from imagefolder_jax.models.tokenizer import ImageFolderTokenizer, TokenizerConfig  # noqa: E402
from imagefolder_jax.models.vit import ViTConfig  # noqa: E402
from imagefolder_jax.storage.bundle import load_bundle, save_bundle  # noqa: E402

SCALES = (1, 2, 3, 5)  # 5 -> 3 and 5 -> 2 area windows overlap; 4 phi convs (official ticks for K = 4)


pytestmark = pytest.mark.parity


def _load(path):
  return torch.load(path, weights_only=True)


def _assert_same_tensors(expected: dict, actual: dict, ordered: bool = True):
  assert (list(actual) == list(expected)) if ordered else (sorted(actual) == sorted(expected))
  for name, e in expected.items():
    a = actual[name]
    assert a.dtype == e.dtype and tuple(a.shape) == tuple(e.shape), name
    assert torch.equal(a, e), name


def _assert_same_bundles(configs_a, vars_a, configs_b, vars_b, models):
  for m in models:
    assert configs_b[m] == configs_a[m], m
    leaves_a = jax.tree_util.tree_leaves_with_path(vars_a[m])
    leaves_b = dict(jax.tree_util.tree_leaves_with_path(vars_b[m]))
    assert len(leaves_a) == len(leaves_b), m
    for path, a in leaves_a:
      b = leaves_b[path]
      assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (m, path)


# ----------------------------------------------------------------------------- fixture checkpoints
@pytest.fixture(scope="module")
def fixture_export(parity_bundle, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("official") / "fixture")
  assert main(["export-official", "--bundle", parity_bundle, "--out", out]) == 0
  return out


def test_fixture_checkpoints_reproduced_bit_for_bit(fixture_export):
  ref_tok, ref_gen = _load(os.path.join(PARITY_DIR, "tokenizer.pt")), _load(os.path.join(PARITY_DIR, "generator.pt"))
  tok, gen = _load(os.path.join(fixture_export, "tokenizer.pt")), _load(os.path.join(fixture_export, "generator.pt"))
  _assert_same_tensors(ref_tok["model"], tok["model"])
  _assert_same_tensors(ref_tok["ema"], tok["ema"])
  assert tok["steps"] == ref_tok["steps"] == 0
  _assert_same_tensors(ref_gen["trainer"]["var_wo_ddp"], gen["trainer"]["var_wo_ddp"])
  _assert_same_tensors(ref_tok["model"], gen["trainer"]["vae_local"])
  assert gen["trainer"]["config"]["patch_nums"] == ref_gen["trainer"]["config"]["patch_nums"]
  assert gen["trainer"]["config"]["resos"] == ref_gen["trainer"]["config"]["resos"]
  for key in ("depth", "patch_nums", "product_quant", "codebook_size", "codebook_embed_dim", "num_latent_tokens"):
    assert gen["args"][key] == ref_gen["args"][key], key
  # The .safetensors files hold the same state dicts.
  from safetensors.torch import load_file
  _assert_same_tensors(tok["model"], load_file(os.path.join(fixture_export, "tokenizer.safetensors")),
                       ordered=False)  # safetensors stores names sorted
  _assert_same_tensors(gen["trainer"]["var_wo_ddp"], load_file(os.path.join(fixture_export, "generator.safetensors")),
                       ordered=False)


def _tsv(name):
  with open(os.path.join(FIXTURES, "official_layout", name)) as f:
    return [(r["name"], r["dtype"]) for r in csv.DictReader(f, delimiter="\t")]


def _normalised(rows):
  """Block indices -> '#', duplicates dropped in order: the released layout vs a smaller model's."""
  out = []
  for name, dtype in rows:
    key = (re.sub(r"blocks\.\d+\.", "blocks.#.", name), dtype)
    if key not in out:
      out.append(key)
  return out


def test_names_order_and_dtypes_follow_the_released_layout(fixture_export):
  tok = _load(os.path.join(fixture_export, "tokenizer.pt"))["model"]
  var = _load(os.path.join(fixture_export, "generator.pt"))["trainer"]["var_wo_ddp"]
  dtype = lambda t: str(t.dtype).replace("torch.", "")
  assert _normalised((k, dtype(v)) for k, v in tok.items()) == _normalised(_tsv("tokenizer_state_dict.tsv"))
  assert _normalised((k, dtype(v)) for k, v in var.items()) == _normalised(_tsv("ar_state_dict.tsv"))


# ----------------------------------------------------------------------------- a model trained here
@pytest.fixture(scope="module")
def trained(parity_bundle, tmp_path_factory):
  """Tokenizer (gradient codebook, semantic loss against the fixture's DINOv2) and generator, 3 steps each,
  trained through `trainer.train` (workdirs with orbax checkpoints and bundles). 256 px / patch 16 as the
  official constructors; ViT and VAR shrunk as in the parity fixture."""
  from imagefolder_jax.train import trainer
  from imagefolder_jax.train.configuration import load_config
  root = tmp_path_factory.mktemp("trained")
  tok = load_config(os.path.join(ROOT, "configs", "tokenizer_tiny.py"),
                    [f"--config.loss.semantic_teacher=bundle:{parity_bundle}"])
  tok.model.vit = dict(width=64, depth=2, num_heads=2, mlp_ratio=4.0, patch_size=16, image_size=256,
                       layerscale_init=0.5, pos_init="sincos", linear_init="xavier")
  tok.model.quantizer = dict(codebook_size=64, latent_dim=8, scales=SCALES, num_phi=4, phi_ratio=0.5, beta=0.25,
                             codebook_update="gradient")
  tok.model.dropout_start = 1
  tok.loss.update(lpips=0.0, gan=0.0, semantic=0.1)
  tok.data.update(batch_size=2, crops_per_class=1)
  tok.train.update(num_steps=3, log_every=3, checkpoint_every=3, keep_checkpoints=1, image_every=0)
  tok_dir = str(root / "tok")
  trainer.train("tokenizer", tok, tok_dir)
  gen = load_config(os.path.join(ROOT, "configs", "generator_tiny.py"),
                    [f"--config.tokenizer_bundle={os.path.join(tok_dir, 'bundle')}"])
  gen.model.update(depth=2, width=64, num_heads=2, mlp_ratio=4.0)
  gen.data.update(batch_size=2, crops_per_class=1)
  gen.train.update(num_steps=3, log_every=3, checkpoint_every=3, keep_checkpoints=1, image_every=0)
  gen_dir = str(root / "gen")
  trainer.train("generator", gen, gen_dir)
  return {"tok_dir": tok_dir, "gen_dir": gen_dir, "root": root}


@pytest.fixture(scope="module")
def trained_export(trained, parity_bundle):
  out = str(trained["root"] / "official")
  # The generator run's bundle holds no teacher: it comes from --teacher.
  assert main(["export-official", "--bundle", os.path.join(trained["gen_dir"], "bundle"),
               "--teacher", f"bundle:{parity_bundle}", "--out", out]) == 0
  return out


def test_workdir_export_round_trip_is_bit_identical(trained, tmp_path):
  out, back = str(tmp_path / "official"), str(tmp_path / "back")
  # No --teacher: the run's loss.semantic_teacher (bundle:...) supplies semantic_model.*.
  assert main(["export-official", "--workdir", trained["tok_dir"], "--out", out]) == 0
  assert any(k.startswith("semantic_model.") for k in _load(os.path.join(out, "tokenizer.pt"))["model"])
  assert main(["convert-official", "--tokenizer", os.path.join(out, "tokenizer.pt"),
               "--config", os.path.join(out, "config.json"), "--out", back]) == 0
  configs_a, vars_a = load_bundle(os.path.join(trained["tok_dir"], "bundle"))
  configs_b, vars_b = load_bundle(back)
  assert int(vars_b["tokenizer"]["quantizer_stats"]["quantizer_0"]["usage_steps"]) == 3
  _assert_same_bundles(configs_a, vars_a, configs_b, vars_b, ["tokenizer"])


def test_generator_bundle_round_trip_is_bit_identical(trained, trained_export, parity_bundle, tmp_path):
  back = str(tmp_path / "back")
  assert main(["convert-official", "--tokenizer", os.path.join(trained_export, "tokenizer.pt"),
               "--generator", os.path.join(trained_export, "generator.pt"),
               "--config", os.path.join(trained_export, "config.json"), "--out", back]) == 0
  configs_a, vars_a = load_bundle(os.path.join(trained["gen_dir"], "bundle"))
  configs_b, vars_b = load_bundle(back)
  _assert_same_bundles(configs_a, vars_a, configs_b, vars_b, ["tokenizer", "generator"])
  teacher_configs, teacher_vars = load_bundle(parity_bundle)
  _assert_same_bundles(teacher_configs, teacher_vars, configs_b, vars_b, ["semantic_teacher"])


def test_strict_load_into_official_modules_computes_our_function(trained, trained_export, parity_expected):
  bundle = os.path.join(trained["gen_dir"], "bundle")
  configs, _ = load_bundle(bundle)
  g = configs["generator"]
  shape = ref.OfficialShape(var_depth=g["depth"], var_width_override=g["width"], var_heads=g["num_heads"],
                            vit_width=64, vit_depth=2, vit_heads=2, num_classes=g["num_classes"], codebook_size=64,
                            latent_dim=8, scales=SCALES, num_phi=4)
  checkpoint = _load(os.path.join(trained_export, "generator.pt"))
  tok = ref.load_tokenizer(shape, checkpoint["trainer"]["vae_local"])  # strict=True, semantic_model included
  var = ref.Var(shape).eval()
  var.load_state_dict(checkpoint["trainer"]["var_wo_ddp"], strict=True)

  images = parity_expected["images"]  # (2, 3, 256, 256) in [-1, 1]
  ours_tok, ours_gen = ifj.Tokenizer.load(bundle), ifj.Generator.load(bundle)
  codes = ours_tok.encode(images.transpose(0, 2, 3, 1))
  ids, _ = tok.encode(torch.from_numpy(images))
  for b in range(2):
    for s, side in enumerate(SCALES):
      np.testing.assert_array_equal(ids[b][s].numpy(), np.asarray(codes.ids[b][s]).reshape(2, side * side))
  recon = np.asarray(ours_tok.reconstruct(images.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
  assert relative_error(tok.reconstruct(torch.from_numpy(images)).numpy(), recon) <= 1e-5
  labels = np.array([3, 7])
  logits = np.asarray(ours_gen.logits(labels, codes))  # (B, L, P, V)
  with torch.no_grad():
    theirs = var(torch.from_numpy(labels), tok.var_input(ids)).numpy()  # (B, L, P*V)
  assert relative_error(theirs, logits.reshape(theirs.shape)) <= 1e-5


# ----------------------------------------------------------------------------- refusals and options
def _small(**changes) -> TokenizerConfig:
  vit = ViTConfig(width=16, depth=1, num_heads=2, patch_size=4, image_size=16)
  # 4 scales, so that every one of the 4 phi convs is used (an unused one is never created).
  q = QuantizerConfig(codebook_size=16, latent_dim=4, scales=(1, 2, 3, 4), num_phi=4, codebook_update="gradient")
  config = TokenizerConfig(vit=vit, quantizer=q, num_branches=2, dropout_start=1)
  vit_changes = {k[4:]: v for k, v in changes.items() if k.startswith("vit_")}
  q_changes = {k[2:]: v for k, v in changes.items() if k.startswith("q_")}
  rest = {k: v for k, v in changes.items() if not k.startswith(("vit_", "q_"))}
  return dataclasses.replace(config, vit=dataclasses.replace(vit, **vit_changes),
                             quantizer=dataclasses.replace(q, **q_changes), **rest)


@pytest.mark.parametrize("changes, option", [
    ({"vit_layerscale": False}, "layerscale"),
    ({"vit_norm_eps": 1e-5}, "norm_eps"),
    ({"vit_gelu_approximate": True}, "gelu_approximate"),
    ({"vit_image_size": 32}, "image_size"),
    ({"num_branches": 1}, "num_branches"),
    ({"q_num_phi": 1}, "num_phi"),
    ({"q_num_phi": 3, "q_scales": (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)}, "num_phi"),
    ({"q_phi_ratio": 0.0}, "phi_ratio"),
])
def test_options_the_official_code_cannot_express_are_refused(changes, option):
  with pytest.raises(ExportError, match=option):
    check_tokenizer(_small(**changes))


def test_official_phi_rule():
  # K = 4: linspace(1/12, 11/12, 4), the released mapping; K = 3 uses 1/(2K) margins.
  assert official_phi_index(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
  assert official_phi_index(10, 3) == (0, 0, 0, 0, 1, 1, 1, 2, 2, 2)


def _random_bundle(directory, config: TokenizerConfig) -> dict:
  import flax.linen as nn
  import jax.numpy as jnp
  size = config.image_size
  variables = nn.unbox(ImageFolderTokenizer(config).init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                                         ))
  variables = jax.tree.map(np.asarray, variables)
  save_bundle(directory, {"tokenizer": config.to_dict()}, {"tokenizer": variables})
  return variables


def test_ema_codebook_exports_as_the_gradient_tensor(tmp_path):
  config = _small(q_codebook_update="ema")
  variables = _random_bundle(str(tmp_path / "ema"), config)
  sd = tokenizer_state_dict(config, variables)
  for b in range(2):
    np.testing.assert_array_equal(sd[f"quantizes.{b}.embedding.weight"],
                                  variables["codebook"][f"quantizer_{b}"]["embedding"])
  out, back = str(tmp_path / "official"), str(tmp_path / "back")
  assert main(["export-official", "--bundle", str(tmp_path / "ema"), "--without-teacher", "--out", out]) == 0
  assert main(["convert-official", "--tokenizer", os.path.join(out, "tokenizer.pt"),
               "--config", os.path.join(out, "config.json"), "--out", back]) == 0
  # Back as a gradient-mode model whose codebook parameter is the EMA codebook and whose other
  # parameters are unchanged: the same function (both modes look up and embed the same rows).
  configs_b, vars_b = load_bundle(back)
  assert configs_b["tokenizer"]["quantizer"]["codebook_update"] == "gradient"
  params_b = vars_b["tokenizer"]["params"]
  for b in range(2):
    np.testing.assert_array_equal(params_b[f"quantizer_{b}"].pop("embedding"),
                                  variables["codebook"][f"quantizer_{b}"]["embedding"])
  _assert_same_bundles({"t": 0}, {"t": variables["params"]}, {"t": 0}, {"t": params_b}, ["t"])


def test_four_branches_round_trip_and_load_strictly(tmp_path):
  config = _small(num_branches=4)
  _random_bundle(str(tmp_path / "p4"), config)
  out, back = str(tmp_path / "official"), str(tmp_path / "back")
  assert main(["export-official", "--bundle", str(tmp_path / "p4"), "--without-teacher", "--out", out]) == 0
  sd = _load(os.path.join(out, "tokenizer.pt"))["model"]
  assert not any(k.startswith("semantic_model.") for k in sd)
  shape = ref.OfficialShape(vit_width=16, vit_depth=1, vit_heads=2, num_branches=4, codebook_size=16, latent_dim=4,
                            scales=(1, 2, 3, 4), num_phi=4, image_size=16, patch_size=4)
  tok = ref.load_tokenizer(shape, sd)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  ours = ifj.Tokenizer.load(str(tmp_path / "p4"))
  ids, _ = tok.encode(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  codes = ours.encode(images)
  for b in range(4):
    np.testing.assert_array_equal(ids[b][-1].numpy(), np.asarray(codes.ids[b][-1]).reshape(2, -1))
  assert main(["convert-official", "--tokenizer", os.path.join(out, "tokenizer.pt"),
               "--config", os.path.join(out, "config.json"), "--out", back]) == 0
  configs_a, vars_a = load_bundle(str(tmp_path / "p4"))
  configs_b, vars_b = load_bundle(back)
  _assert_same_bundles(configs_a, vars_a, configs_b, vars_b, ["tokenizer"])


def test_cli_errors_are_one_line(tmp_path, capsys):
  _random_bundle(str(tmp_path / "b"), _small())
  out = str(tmp_path / "out")
  assert main(["export-official", "--bundle", str(tmp_path / "b"), "--out", out]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "--without-teacher" in err and "--teacher" in err
  assert main(["export-official", "--bundle", str(tmp_path / "missing"), "--out", out]) == 2
  assert "bundle directory not found" in capsys.readouterr().err
  _random_bundle(str(tmp_path / "ls"), _small(vit_layerscale=False))
  assert main(["export-official", "--bundle", str(tmp_path / "ls"), "--without-teacher", "--out", out]) == 2
  assert "layerscale" in capsys.readouterr().err
  assert main(["export-official", "--bundle", str(tmp_path / "b"), "--teacher", "x.pth", "--without-teacher",
               "--out", out]) == 2
