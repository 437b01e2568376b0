"""Generator trainer on a tiny tokenizer: learning, pre-tokenized codes, export -> load -> sample."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import ROOT

import imagefolder_jax as ifj
from imagefolder_jax.cli import main
from imagefolder_jax.train.configuration import load_config
from imagefolder_jax.train.generator_task import GeneratorTask

CONFIGS = os.path.join(ROOT, "configs")


def _batch(n=8):
  from imagefolder_jax import data
  it = iter(data.make_loader(data.DemoSource(crops_per_class=2, crop_size=48), batch_size=n, resolution=32,
                             train=False, seed=0))
  return jax.tree.map(jnp.asarray, next(it))


def test_steps_lower_the_loss(tiny_tokenizer_bundle):
  task = GeneratorTask(load_config(os.path.join(CONFIGS, "generator_tiny.py"),
                                   [f"--config.tokenizer_bundle={tiny_tokenizer_bundle}"]))
  batch = _batch()
  state = jax.jit(task.init_state)(jax.random.key(0), batch)
  step = jax.jit(task.train_step)
  losses = []
  for _ in range(6):
    state, m = step(state, task.frozen, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] and int(state["skipped"]) == 0
  # Pre-tokenized codes give the same loss as on-the-fly tokenization.
  tok = ifj.Tokenizer.load(tiny_tokenizer_bundle)
  codes = tok.encode(np.asarray(batch["image"])).flat()
  _, m_img = step(state, task.frozen, batch)
  state2 = jax.jit(task.init_state)(jax.random.key(0), batch)
  for _ in range(6):
    state2, _ = step(state2, task.frozen, {"codes": jnp.asarray(codes), "label": batch["label"]})
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state2["params"])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_cli_pretokenize_train_export_sample(tiny_tokenizer_bundle, tmp_path):
  codes_dir = str(tmp_path / "codes")
  assert main(["pretokenize", "--bundle", tiny_tokenizer_bundle, "--out", codes_dir, "--batch-size", "64"]) == 0
  from imagefolder_jax.data.codes import CodesSource
  source = CodesSource(codes_dir)
  assert len(source) > 0 and source.meta["scales"] == [1, 2, 4]
  workdir = str(tmp_path / "gen")
  assert main(["train-generator", "--config", os.path.join(CONFIGS, "generator_tiny.py"), "--workdir", workdir,
               f"--config.tokenizer_bundle={tiny_tokenizer_bundle}", f"--config.data.source=codes:{codes_dir}",
               "--config.train.tensorboard=True"]) == 0
  assert os.path.isfile(os.path.join(workdir, "images", "samples_latest.png"))
  # TensorBoard (off in the tiny configs, on by default): the logged scalars and the sample grid.
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  events = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]
  assert len(events) == 1, os.listdir(workdir)
  tags = {(e.step, v.tag) for e in EventFileLoader(os.path.join(workdir, events[0])).Load() for v in e.summary.value}
  assert {(2, "loss"), (4, "loss"), (4, "mfu"), (4, "samples")} <= tags, sorted(tags)
  # MFU in metrics.jsonl: the analytic FLOPs of the step (pre-tokenized codes: no encoder) at batch 8.
  import json

  from imagefolder_jax.planning import flops
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  config = load_config(os.path.join(CONFIGS, "generator_tiny.py"),
                       [f"--config.tokenizer_bundle={tiny_tokenizer_bundle}"])
  expected = flops.train_flops_per_example(GeneratorTask(config, load_frozen=False), pretokenized=True)
  assert "tokenizer_encode" not in expected
  later = [m for m in logged if m["step"] > 1]
  assert later and all(m["model_tflops_per_step"] == pytest.approx(8 * expected["total"] / 1e12) for m in later)
  assert all(0 < m["mfu"] < 1 and m["tflops_per_device"] > 0 for m in later)
  out = str(tmp_path / "exported")
  assert main(["export", "--workdir", workdir, "--out", out]) == 0
  gen = ifj.Generator.load(out)
  samples = gen.sample([0, 3], seed=1, cfg=1.0, top_k=10, top_p=0.9)
  assert samples.images.shape == (2, 32, 32, 3)
  assert float(np.abs(samples.images).max()) <= 1.0
  again = gen.sample([0, 3], seed=1, cfg=1.0, top_k=10, top_p=0.9)
  np.testing.assert_array_equal(samples.codes.flat(), again.codes.flat())


def test_missing_tokenizer_bundle_is_one_line_error(tmp_path, capsys):
  code = main(["train-generator", "--config", os.path.join(CONFIGS, "generator_tiny.py"),
               "--workdir", str(tmp_path / "g"), "--config.tokenizer_bundle=/nope"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "/nope" in err and len(err.splitlines()) == 1
