"""The plain-PyTorch baseline of bench/bench_vs_official.py computes the official function.

bench/torch_reference.py is what the speed comparison times as "the official sampler"; these tests pin
it to the official fixture (weights loaded strict=True from the official checkpoints): teacher-forced
logits, guided logits of every scale and the final f_hat of the recorded teacher-forced
`autoregressive_infer_cfg` run, top-k/top-p masks, and the decoded image.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference as ref  # noqa: E402
from support import PARITY_DIR, relative_error  # noqa: E402

TINY = ref.OfficialShape(var_depth=2, vit_width=64, vit_depth=2, vit_heads=2)


pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def modules():
  gen = torch.load(os.path.join(PARITY_DIR, "generator.pt"), weights_only=True)
  tok = torch.load(os.path.join(PARITY_DIR, "tokenizer.pt"), weights_only=True)
  return ref.load(TINY, gen["trainer"]["var_wo_ddp"], tok["ema"])


def _forced_ids(e):
  """tok_idx (P, B, 286) -> ids[branch][scale] (B, n_s^2) int64."""
  idx = torch.from_numpy(e["tok_idx"])
  out, begin = [[] for _ in range(TINY.num_branches)], 0
  for side in TINY.scales:
    for b in range(TINY.num_branches):
      out[b].append(idx[b, :, begin:begin + side * side])
    begin += side * side
  return out


@pytest.mark.parametrize("conditional", [True, False])
def test_teacher_forced_logits(modules, parity_expected, conditional):
  var, _ = modules
  e = parity_expected
  labels = torch.from_numpy(e["gen_labels"] if conditional else np.full_like(e["gen_labels"], 1000))
  logits = var(labels, torch.from_numpy(e["gen_var_input"])).numpy()
  tag = "cond" if conditional else "uncond"
  assert relative_error(logits[:, :, e["gen_logit_cols"]], e[f"gen_logits_{tag}_cols"]) < 1e-5


def test_cached_sampler_guided_logits_and_f_hat(modules, parity_expected):
  var, tok = modules
  e = parity_expected
  record: list = []
  out = ref.autoregressive_infer_cfg(var, tok, torch.from_numpy(e["gen_labels"]), cfg=3.25,
                                     forced=_forced_ids(e), record=record)
  guided = torch.cat(record, dim=1).numpy()
  assert relative_error(guided[:, :, e["gen_logit_cols"]], e["gen_guided_cols"]) < 1e-5
  begin, end = 24, 40
  assert relative_error(guided[:, begin:end], e["gen_guided_s5"]) < 1e-5
  assert relative_error(out["f_hat"].numpy(), e["gen_tf_infer_fhat"]) < 1e-5
  assert relative_error(out["images"].numpy(), (e["tok_recon"] + 1) / 2) < 1e-5


def test_filter_masks(parity_expected):
  e = parity_expected
  for b in range(2):
    part = torch.from_numpy(e["gen_guided_s5"][..., b * 4096:(b + 1) * 4096].copy())
    probs = ref.sample_with_top_k_top_p_(part, 750, 0.95, None, return_p=True)
    np.testing.assert_array_equal(probs.numpy() > 0, e["gen_filter_mask_s5"][..., b * 4096:(b + 1) * 4096])


def test_sampled_ids_in_support_and_seeded(modules, parity_expected):
  var, tok = modules
  labels = torch.from_numpy(parity_expected["gen_labels"])
  record: list = []
  a = ref.autoregressive_infer_cfg(var, tok, labels, seed=3, record=record, decode=False)
  b = ref.autoregressive_infer_cfg(var, tok, labels, seed=3, decode=False)
  for branch_a, branch_b in zip(a["ids"], b["ids"]):
    for x, y in zip(branch_a, branch_b):
      assert torch.equal(x, y)
  logits = record[5]
  for br in range(2):
    part = logits[..., br * 4096:(br + 1) * 4096].clone()
    mask = ref.sample_with_top_k_top_p_(part, 750, 0.95, None, return_p=True) > 0
    assert bool(mask.gather(-1, a["ids"][br][5][..., None]).all())


def test_tokenizer_encoder_path(parity_expected):
  """The whole official VQModel (encoder, quant_conv, quantizers, decoder, teacher) from the fixture,
  strict=True: tokens, latents, ids, f_hat and reconstruction of `img_to_reconstructed_img`."""
  e = parity_expected
  tok = ref.load_tokenizer(TINY, torch.load(os.path.join(PARITY_DIR, "tokenizer.pt"), weights_only=True)["ema"])
  images = torch.from_numpy(e["images"])
  with torch.no_grad():
    assert relative_error(tok.encoder(images).numpy(), e["tok_enc_tokens"]) < 1e-5
    latents = tok.latents(images)
  assert relative_error(np.stack([f.numpy() for f in latents]), e["tok_latent"]) < 1e-5
  ids, f_hat = tok.encode(images)
  np.testing.assert_array_equal(np.stack([torch.cat(i, 1).numpy() for i in ids]), e["tok_idx"])
  assert relative_error(f_hat.numpy(), np.concatenate(list(e["tok_fhat"]), axis=1)) < 1e-5
  assert relative_error(tok.reconstruct(images).numpy(), e["tok_recon"]) < 1e-5
  assert relative_error(tok.var_input(ids).numpy(), e["gen_var_input"]) < 1e-5
