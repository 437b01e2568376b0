"""Linear probe: learns a separable toy problem (and not a random one), and the verb runs on the demo."""
import json

import numpy as np
import pytest

from imagefolder_jax.evaluation.probe import EvalInputError, ProbeSettings, train_linear_probe


def blobs(seed, n, num_classes=3, dim=6, spread=0.3):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(0, 2, (num_classes, dim)) + 5.0   # offset: standardisation matters
  y = rng.integers(0, num_classes, n)
  return centres[y] + rng.normal(0, spread, (n, dim)), y


def test_probe_learns_separable_toy_problem():
  (tx, ty), (vx, vy) = blobs(0, 90), blobs(1, 60)
  out = train_linear_probe(tx, ty, vx, vy, 3, ProbeSettings(steps=200))
  assert out["top1"] == 1.0 and out["train_top1"] == 1.0 and out["train_loss"] < 0.1
  again = train_linear_probe(tx, ty, vx, vy, 3, ProbeSettings(steps=200))
  assert again == out                                    # seeded, deterministic
  # Shuffled training labels: nothing to learn, validation top-1 near chance (1/3).
  shuffled = np.random.default_rng(2).permutation(ty)
  chance = train_linear_probe(tx, shuffled, vx, vy, 3, ProbeSettings(steps=200))
  assert chance["top1"] < 0.6


def test_probe_refuses_bad_inputs():
  x, y = blobs(0, 10)
  with pytest.raises(EvalInputError, match=r"\[0, 2\)"):
    train_linear_probe(x, y, x, y, 2)
  with pytest.raises(EvalInputError, match="steps"):
    train_linear_probe(x, y, x, y, 3, ProbeSettings(steps=0))
  with pytest.raises(EvalInputError, match=r"\(10, 6\) and \(10, 5\)"):
    train_linear_probe(x, y, x[:, :5], y, 3)


def test_probe_verb_on_demo(parity_bundle, tmp_path, capsys):
  from imagefolder_jax.cli import main
  out = tmp_path / "probe.json"
  assert main(["probe", "--bundle", parity_bundle, "--source", "demo", "--limit", "18", "--limit-val", "9",
               "--batch-size", "32", "--steps", "50", "--out-json", str(out)]) == 0
  result = json.loads(out.read_text())
  # --limit spreads the records evenly over the class-sorted demo: every one of its 9 classes.
  assert result["num_train"] == 18 and result["num_val"] == 9 and result["num_classes"] == 9
  for name in ("detail", "semantic", "both"):
    assert 0.0 <= result[name]["top1"] <= 1.0 and np.isfinite(result[name]["train_loss"])
  assert "f_hat" in result["features"]
  capsys.readouterr()
  assert main(["probe", "--bundle", parity_bundle, "--source", "demo", "--steps", "0"]) == 2
  assert "--steps" in capsys.readouterr().err


def test_demo_evaluation_without_inception_says_why(parity_bundle):
  from imagefolder_jax.data import DemoSource
  from imagefolder_jax.demo import report as demo_report
  from imagefolder_jax.inference.tokenizer import Tokenizer
  tok = Tokenizer.load(parity_bundle)
  images = np.zeros((2, 256, 256, 3), np.float32)
  out = demo_report.demo_evaluation(tok, images, images, images, (DemoSource(2, split="train"),
                                    DemoSource(1, split="validation")), inception=None,
                                    absent_reason="no bundle here", probe_steps=20)
  assert out["fid"] is None and out["rfid"] is None and out["absent"] == "no bundle here"
  assert set(out["linear_probe"]) == {"detail", "semantic", "both"}
  assert out["linear_probe_num_train"] == 18 and out["linear_probe_chance"] == pytest.approx(1 / 9)
  text = demo_report.markdown(out)
  assert "absent (no bundle here)" in text and "small-sample" in text
  net, why = demo_report.load_inception_or_reason("/nonexistent/inception")
  assert net is None and "convert-inception" in why
