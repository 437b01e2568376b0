"""Class names for the page and the --bundle argument (no model needed)."""
from __future__ import annotations

import json

import pytest

from imagefolder_jax.serve.classes import class_names, imagenet_names
from imagefolder_jax.serve.params import BadRequest, resolve_class


def test_imagenet_names_in_index_order():
  names = imagenet_names()
  assert len(names) == 1000
  assert names[0].startswith("tench") and names[207].startswith("golden retriever")
  assert names[360].startswith("otter") and names[999].startswith("toilet tissue")


def test_name_sources_in_order(tmp_path):
  bundle = tmp_path / "generator" / "bundle"
  bundle.mkdir(parents=True)
  assert class_names(str(bundle), 3) == (["class 0", "class 1", "class 2", "unconditional"],
                                         "numbered (no names found)")
  names, origin = class_names(str(bundle), 1000)
  assert names[207].startswith("golden retriever") and names[-1] == "unconditional" and "ImageNet" in origin
  # The training run beside bundle/ (what `train-generator` and `demo` write) trained on the demo photos.
  (tmp_path / "generator" / "config.json").write_text(json.dumps({"stage": "generator",
                                                                  "config": {"data": {"source": "demo"}}}))
  names, origin = class_names(str(bundle), 9)
  assert names[:2] == ["astronaut", "chelsea"] and len(names) == 10 and "demo" in origin
  (bundle / "class_names.txt").write_text("cat\ndog\nfox\n")
  assert class_names(str(bundle), 3)[0] == ["cat", "dog", "fox", "unconditional"]
  names_file = tmp_path / "names.txt"
  names_file.write_text("a\nb\n")
  with pytest.raises(ValueError, match="holds 2 class names, the generator has 3"):
    class_names(str(bundle), 3, str(names_file))


def test_classes_resolve_by_id_or_name():
  names = [*imagenet_names(), "unconditional"]
  assert resolve_class("golden retriever", names) == 207
  assert resolve_class("Golden Retriever", names) == 207
  assert resolve_class(" 207 ", names) == 207 and resolve_class(1000, names) == 1000
  for bad, match in (("golden", "unknown class 'golden'"), (1001, "unknown class id 1001"),
                     (True, "an id or a name"), (2.5, "an id or a name")):
    with pytest.raises(BadRequest, match=match):
      resolve_class(bad, names)


def test_bundle_argument_accepts_a_workdir(tmp_path):
  from imagefolder_jax.serve.cli import _resolve_bundle
  generator = tmp_path / "demo" / "generator" / "bundle"
  generator.mkdir(parents=True)
  (generator / "bundle.json").write_text("{}")
  demo = tmp_path / "demo"
  assert _resolve_bundle(str(generator)) == str(generator)
  assert _resolve_bundle(str(demo)) == str(generator)
  assert _resolve_bundle(str(demo / "bundle")) == str(generator)  # absent: the demo's generator bundle
  assert _resolve_bundle(str(tmp_path / "nothing")) == str(tmp_path / "nothing")  # load_model says why
