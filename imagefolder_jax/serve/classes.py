"""Class names for the page's class picker, in class-id order.

Bundles store model configs only (no class names), so the names come from, in order:
1. `--class-names FILE` (one name per line, the operator's file);
2. `class_names.txt` inside the bundle directory (same format);
3. the run the bundle belongs to: `config.json` beside `bundle/` (what `train-*` writes) whose data
   source is `demo` -> the demo's photo names; or the demo's `report.json` beside `bundle/` (its
   class list);
4. 1000 classes -> the ImageNet-1k names shipped in `imagenet_classes.tsv` (converted official
   bundles);
5. otherwise "class 0", "class 1", ...
The unconditional id (num_classes) is listed last as "unconditional".
"""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Optional

IMAGENET_FILE = "imagenet_classes.tsv"


def imagenet_names() -> list[str]:
  """The 1000 ImageNet-1k class names (first WordNet lemma, then the others in parentheses)."""
  text = resources.files("imagefolder_jax.serve").joinpath(IMAGENET_FILE).read_text(encoding="utf-8")
  names = []
  for line in text.splitlines():
    if not line or line.startswith("#"):
      continue
    _, lemmas = line.split("\t", 1)
    first, *rest = [x.strip() for x in lemmas.split(",")]
    names.append(f"{first} ({', '.join(rest)})" if rest else first)
  if len(names) != 1000:
    raise ValueError(f"{IMAGENET_FILE} holds {len(names)} classes, expected 1000")
  return names


def _read_names_file(path: str, num_classes: int) -> list[str]:
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  if len(names) != num_classes:
    raise ValueError(f"{path} holds {len(names)} class names, the generator has {num_classes} classes")
  return names


def _training_source(bundle_dir: str) -> Optional[str]:
  """The data source recorded by the training run whose `bundle/` this is, if any."""
  path = os.path.join(os.path.dirname(os.path.abspath(bundle_dir)), "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None
  config = saved.get("config", saved) if isinstance(saved, dict) else None
  data = config.get("data") if isinstance(config, dict) else None
  source = data.get("source") if isinstance(data, dict) else None
  return source if isinstance(source, str) else None


def _demo_report_classes(bundle_dir: str) -> Optional[list[str]]:
  path = os.path.join(os.path.dirname(os.path.abspath(bundle_dir)), "report.json")
  try:
    with open(path, encoding="utf-8") as f:
      classes = json.load(f)["class_consistency"]["classes"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return [str(c) for c in classes] if isinstance(classes, list) else None


def class_names(bundle_dir: str, num_classes: int, names_file: Optional[str] = None) -> tuple[list[str], str]:
  """(names for ids 0..num_classes, where they came from); the last name is "unconditional"."""
  if names_file:
    names, origin = _read_names_file(names_file, num_classes), names_file
  elif os.path.isfile(os.path.join(bundle_dir, "class_names.txt")):
    path = os.path.join(bundle_dir, "class_names.txt")
    names, origin = _read_names_file(path, num_classes), path
  else:
    names, origin = None, ""
    if _training_source(bundle_dir) == "demo":
      from imagefolder_jax.data import DemoSource
      demo = list(DemoSource(crops_per_class=1).class_names)
      if len(demo) == num_classes:
        names, origin = demo, "demo photos, from the training run's data source"
    reported = _demo_report_classes(bundle_dir)
    if names is None and reported is not None and len(reported) == num_classes:
      names, origin = reported, "the demo's report.json"
    if names is None and num_classes == 1000:
      names, origin = imagenet_names(), "ImageNet-1k (imagenet_classes.tsv)"
    if names is None:
      names, origin = [f"class {i}" for i in range(num_classes)], "numbered (no names found)"
  return [*names, "unconditional"], origin
