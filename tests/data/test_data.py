"""Tests for imagefolder_jax.data: sources, transforms, loader, image files."""
from __future__ import annotations

import io
import logging
import math
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from imagefolder_jax import data
from imagefolder_jax.data import transforms as T

RES = 32


class IndexSource:
  """label == index; image encodes the index in its pixels (tiny, in memory)."""

  def __init__(self, n: int, size: int = 12):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    i = int(i)
    image = np.full((self.size, self.size + 4, 3), i % 256, np.uint8)
    return {"image": image, "label": i, "id": f"index[{i}]"}

  def __repr__(self):
    return f"IndexSource({self.n}, {self.size})"


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, fmt)
  return buf.getvalue()


def _photo(h: int, w: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  # Smooth content so JPEG round trips stay close; exact values do not matter.
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
  return np.clip(base + rng.integers(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _eval_reference(image: np.ndarray, res: int, ratio: float = 1.125) -> np.ndarray:
  """torchvision Resize(round(res*ratio), LANCZOS) + CenterCrop(res), written out with PIL."""
  h, w = image.shape[:2]
  s = round(res * ratio)
  size = (int(s * w / h), s) if w >= h else (s, int(s * h / w))  # PIL (width, height)
  resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
  top = int(round((resized.shape[0] - res) / 2))
  left = int(round((resized.shape[1] - res) / 2))
  return resized[top:top + res, left:left + res].astype(np.float32) / 127.5 - 1


# ---------------------------------------------------------------- demo source


def test_demo_source_classes_length_and_determinism():
  src = data.DemoSource(crops_per_class=3, crop_size=24)
  assert src.class_names == ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                             "immunohistochemistry", "retina", "china", "flower")
  assert len(src) == 27 and src.num_classes == 9
  assert [src[i]["label"] for i in range(len(src))] == [i // 3 for i in range(27)]
  again = data.DemoSource(crops_per_class=3, crop_size=24)
  for i in (0, 13, 26):
    r = src[i]
    assert r["image"].shape == (24, 24, 3) and r["image"].dtype == np.uint8
    np.testing.assert_array_equal(r["image"], again[i]["image"])
  other_seed = data.DemoSource(crops_per_class=3, crop_size=24, seed=1)
  val = data.DemoSource(crops_per_class=3, crop_size=24, split="validation")
  assert not np.array_equal(src[4]["image"], other_seed[4]["image"])
  assert not np.array_equal(src[4]["image"], val[4]["image"])
  with pytest.raises(IndexError):
    src[27]


def test_demo_source_crop_matches_documented_recipe():
  src = data.DemoSource(crops_per_class=5, crop_size=20, min_side=0.4, max_side=0.6, seed=3)
  index = 7  # class 1 = chelsea
  import skimage.data
  photo = skimage.data.chelsea()
  rng = np.random.default_rng((3, 0, index))
  side = round(rng.uniform(0.4, 0.6) * min(photo.shape[:2]))
  top = rng.integers(0, photo.shape[0] - side + 1)
  left = rng.integers(0, photo.shape[1] - side + 1)
  want = np.asarray(Image.fromarray(photo[top:top + side, left:left + side]).resize(
      (20, 20), Image.Resampling.LANCZOS))
  if rng.uniform() < 0.5:
    want = want[:, ::-1]
  np.testing.assert_array_equal(src[index]["image"], want)
  assert src[index]["label"] == 1


# ---------------------------------------------------------------- decode

def test_demo_photos_equal_the_packages_own_loaders():
  """The photos are read from the wheels' files without importing scikit-image / scikit-learn:
  the same arrays as their loaders give."""
  import skimage.data
  from sklearn.datasets import load_sample_images

  from imagefolder_jax.data.sources import DEMO_PHOTOS, demo_photo
  china, flower = load_sample_images().images
  want = {"china": china, "flower": flower, **{name: getattr(skimage.data, name)() for name in DEMO_PHOTOS
                                               if name not in ("china", "flower")}}
  for name in DEMO_PHOTOS:
    np.testing.assert_array_equal(demo_photo(name), want[name][..., :3], err_msg=name)


def test_demo_photo_missing_from_the_wheel_comes_from_the_package_loader(monkeypatch):
  import importlib.util

  import skimage.data

  from imagefolder_jax.data.sources import DEMO_PHOTOS
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)   # no file found in any wheel
  np.testing.assert_array_equal(DEMO_PHOTOS["coffee"](), skimage.data.coffee())



def test_decode_converts_modes_to_rgb():
  rgb = _photo(6, 7, 0)
  gray = rgb[..., 0]
  np.testing.assert_array_equal(T.decode_image(_encode(rgb, "PNG")), rgb)
  np.testing.assert_array_equal(T.decode_image(_encode(gray, "PNG")), np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(T.decode_image(gray), np.repeat(gray[..., None], 3, -1))
  rgba = np.concatenate([rgb, np.full((6, 7, 1), 255, np.uint8)], -1)
  np.testing.assert_array_equal(T.decode_image(_encode(rgba, "PNG")), rgb)
  np.testing.assert_array_equal(T.decode_image(rgba), rgb)
  pal = Image.fromarray(rgb).quantize(colors=8)
  buf = io.BytesIO()
  pal.save(buf, "PNG")
  np.testing.assert_array_equal(T.decode_image(buf.getvalue()), np.asarray(pal.convert("RGB")))
  for bad in (b"", b"not an image", _encode(rgb, "PNG")[:40]):
    with pytest.raises(ValueError, match="image"):
      T.decode_image(bad)


# ---------------------------------------------------------------- transforms


def test_sample_crop_box_bounds():
  rng = np.random.default_rng(0)
  h, w = 50, 80
  sides = []
  for _ in range(500):
    top, left, side = T.sample_crop_box(rng, h, w, (0.8, 1.0))
    assert 0 <= top <= h - side and 0 <= left <= w - side
    # side = round(sqrt(a) * short), so a is recovered to within rounding.
    assert math.sqrt(0.8) * h - 0.5 <= side <= h
    sides.append(side)
  assert min(sides) <= round(math.sqrt(0.81) * h) and max(sides) == h
  with pytest.raises(ValueError, match="area_range"):
    T.sample_crop_box(rng, h, w, (0.0, 1.0))


def test_random_crop_flip_matches_pil_and_range():
  image = _photo(40, 56, 1)
  flips = 0
  for seed in range(8):
    out = T.random_crop_flip(image, np.random.default_rng(seed), RES)
    rng = np.random.default_rng(seed)
    area = rng.uniform(0.8, 1.0)
    side = round(math.sqrt(area) * 40)
    top, left = rng.integers(0, 40 - side + 1), rng.integers(0, 56 - side + 1)
    want = np.asarray(Image.fromarray(image[top:top + side, left:left + side]).resize(
        (RES, RES), Image.Resampling.LANCZOS))
    if rng.uniform() < 0.5:
      want, flips = want[:, ::-1], flips + 1
    np.testing.assert_array_equal(out, want)
  assert 0 < flips < 8
  element = T.RandomCropFlip(RES).random_map(
      {"image": image, "label": 3}, np.random.default_rng(0))
  x = T.ToModelInput().map(element)
  assert x["image"].shape == (RES, RES, 3) and x["image"].dtype == np.float32
  assert -1.0 <= x["image"].min() and x["image"].max() <= 1.0
  assert x["label"].dtype == np.int32 and x["label"] == 3
  np.testing.assert_allclose(x["image"], element["image"] / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 60), (70, 45), (36, 36), (30, 31)])
def test_eval_transform_matches_pil(shape):
  image = _photo(*shape, 2)
  got = T.to_model_input(T.center_crop_resize(image, RES))
  np.testing.assert_array_equal(got, _eval_reference(image, RES))
  # Official 256 px setting: Resize(288) + CenterCrop(256).
  big = _photo(300, 400, 3)
  want = np.asarray(Image.fromarray(big).resize((384, 288), Image.Resampling.LANCZOS))[16:272, 64:320]
  np.testing.assert_array_equal(T.center_crop_resize(big, 256), want)


# ---------------------------------------------------------------- image folder


@pytest.fixture
def image_folder(tmp_path):
  root = tmp_path / "imgs"
  (root / "b_dogs").mkdir(parents=True)
  (root / "a_cats" / "nested").mkdir(parents=True)
  (root / "empty_class").mkdir()
  (root / ".hidden").mkdir()
  images = {
      "a_cats/one.png": _photo(30, 40, 0),
      "a_cats/nested/two.jpg": _photo(40, 30, 1),
      "b_dogs/gray.png": _photo(36, 36, 2)[..., 0],
      "b_dogs/rgba.png": np.concatenate([_photo(33, 35, 3), np.full((33, 35, 1), 255, np.uint8)], -1),
  }
  for rel, array in images.items():
    Image.fromarray(array).save(root / rel)
  (root / "b_dogs" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  (root / "b_dogs" / "truncated.png").write_bytes(_encode(_photo(30, 30, 4), "PNG")[:60])
  (root / "b_dogs" / "notes.txt").write_text("not an image")
  Image.fromarray(_photo(8, 8, 5)).save(root / ".hidden" / "x.png")
  return root, images


def test_image_folder_source_labels_and_files(image_folder):
  root, _ = image_folder
  src = data.ImageFolderSource(root)
  assert src.class_names == ("a_cats", "b_dogs")
  rel = [os.path.relpath(f, root) for f in src.files]
  assert rel == ["a_cats/nested/two.jpg", "a_cats/one.png", "b_dogs/corrupt.jpg",
                 "b_dogs/gray.png", "b_dogs/rgba.png", "b_dogs/truncated.png"]
  assert src.labels.tolist() == [0, 0, 1, 1, 1, 1]
  assert isinstance(src[1]["image"], bytes) and src[1]["id"] == str(root / "a_cats/one.png")
  assert repr(src) == repr(data.ImageFolderSource(root))
  pickle.loads(pickle.dumps(src))


def test_image_folder_loader_skips_corrupt_and_converts_gray(image_folder, caplog):
  root, images = image_folder
  src = data.ImageFolderSource(root)
  counter = T.SkipCounter()
  loader = data.make_loader(src, batch_size=1, resolution=RES, train=False, seed=0,
                            shard_index=0, shard_count=1, skip_counter=counter)
  with caplog.at_level(logging.WARNING):
    batches = list(loader)
  assert counter.count == 2
  logged = " ".join(r.getMessage() for r in caplog.records)
  assert "corrupt.jpg" in logged and "truncated.png" in logged
  # Evaluation keeps the undecodable records as invalid rows (every process runs the same steps).
  assert len(batches) == 6 and sum(not bool(b["valid"][0]) for b in batches) == 2
  batches = [b for b in batches if bool(b["valid"][0])]
  assert [int(b["label"][0]) for b in batches] == [0, 0, 1, 1]
  gray_out = batches[2]["image"][0]
  gray_in = np.repeat(images["b_dogs/gray.png"][..., None], 3, -1)
  np.testing.assert_array_equal(gray_out, _eval_reference(gray_in, RES))
  np.testing.assert_array_equal(gray_out[..., 0], gray_out[..., 2])
  rgba_out = batches[3]["image"][0]
  np.testing.assert_array_equal(rgba_out, _eval_reference(images["b_dogs/rgba.png"][..., :3], RES))


def test_image_folder_flat_and_errors(tmp_path):
  for i in range(3):
    Image.fromarray(_photo(10, 10, i)).save(tmp_path / f"{i}.png")
  src = data.ImageFolderSource(tmp_path)
  assert len(src) == 3 and src.labels.tolist() == [0, 0, 0] and src.num_classes == 1
  with pytest.raises(FileNotFoundError, match="missing"):
    data.ImageFolderSource(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image files"):
    data.ImageFolderSource(tmp_path / "empty")


# ---------------------------------------------------------------- loader


def test_loader_batches_eval_values_in_source_order():
  src = data.DemoSource(crops_per_class=2, crop_size=40)
  loader = data.make_loader(src, batch_size=4, resolution=RES, train=False, seed=0,
                            shard_index=0, shard_count=1)
  batches = list(loader)
  assert len(batches) == 18 // 4  # remainder dropped, one epoch
  b = batches[1]
  assert b["image"].shape == (4, RES, RES, 3) and b["image"].dtype == np.float32
  assert b["label"].shape == (4,) and b["label"].dtype == np.int32
  want = np.stack([_eval_reference(src[i]["image"], RES) for i in range(4, 8)])
  np.testing.assert_array_equal(b["image"], want)
  np.testing.assert_array_equal(b["label"], [2, 2, 3, 3])


def test_loader_train_shuffles_and_augments_deterministically():
  src = data.DemoSource(crops_per_class=2, crop_size=40)
  kw = dict(batch_size=6, resolution=RES, train=True, shard_index=0, shard_count=1)
  a = next(iter(data.make_loader(src, seed=0, **kw)))
  b = next(iter(data.make_loader(src, seed=0, read_threads=1, **kw)))
  c = next(iter(data.make_loader(src, seed=1, **kw)))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])
  assert a["image"].min() >= -1 and a["image"].max() <= 1


def test_loader_per_process_sharding_disjoint_and_covering():
  src = IndexSource(20)
  seen = []
  for shard in range(2):
    loader = data.make_loader(src, batch_size=5, resolution=8, train=True, seed=0, num_epochs=1,
                              shard_index=shard, shard_count=2)
    labels = np.concatenate([b["label"] for b in loader]).tolist()
    assert len(labels) == 10 and len(set(labels)) == 10
    seen.append(set(labels))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(20))
  # Defaults come from jax: a single process reads everything.
  loader = data.make_loader(src, batch_size=5, resolution=8, train=False, seed=0)
  assert sorted(np.concatenate([b["label"] for b in loader]).tolist()) == list(range(20))


def test_iterator_state_restore_reproduces_next_batches():
  src = data.DemoSource(crops_per_class=3, crop_size=40)
  make = lambda: data.make_loader(src, batch_size=4, resolution=RES, train=True, seed=5,
                                  shard_index=0, shard_count=1)
  it = iter(make())
  for _ in range(3):  # crosses the first epoch boundary (27 records)
    next(it)
  state = data.get_iterator_state(it)
  expected = [next(it) for _ in range(6)]
  restored = iter(make())  # a fresh loader, as after a restart
  data.set_iterator_state(restored, state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_multiprocess_workers_match_in_process():
  src = IndexSource(12)
  kw = dict(batch_size=4, resolution=8, train=True, seed=0, num_epochs=1, shard_index=0,
            shard_count=1)
  want = list(data.make_loader(src, **kw))
  got = list(data.make_loader(src, worker_count=1, **kw))
  assert len(got) == len(want) == 3
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["image"], w["image"])
    np.testing.assert_array_equal(g["label"], w["label"])


def test_make_loader_rejects_bad_arguments():
  src = IndexSource(4)
  with pytest.raises(ValueError, match="batch_size"):
    data.make_loader(src, batch_size=0, resolution=8, train=True, seed=0)
  with pytest.raises(ValueError, match="shard_index"):
    data.make_loader(src, batch_size=2, resolution=8, train=True, seed=0, shard_index=2,
                     shard_count=2)


# ---------------------------------------------------------------- image files


def test_grid_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  tiles = rng.integers(0, 256, (5, 6, 7, 3)).astype(np.float32) / 127.5 - 1
  path = tmp_path / "sub" / "grid.png"
  data.save_image_grid(tiles, path, nrow=3, padding=2)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (2 * (6 + 2) + 2, 3 * (7 + 2) + 2, 3)
  for i in range(5):
    r, c = divmod(i, 3)
    top, left = 2 + r * 8, 2 + c * 9
    np.testing.assert_allclose(grid[top:top + 6, left:left + 7] / 127.5 - 1, tiles[i], atol=1e-6)
  assert (grid[0] == 255).all() and (grid[8:16, 2 + 2 * 9:] == 255).all()  # border, empty slot
  np.testing.assert_array_equal(data.to_uint8(np.array([-1.5, -1.0, 0.0, 1.0, 2.0])),
                                [0, 0, 128, 255, 255])


def test_load_image_file(tmp_path):
  image = _photo(50, 70, 7)
  Image.fromarray(image).save(tmp_path / "x.png")
  got = data.load_image_file(tmp_path / "x.png", RES)
  np.testing.assert_array_equal(got, _eval_reference(image, RES))
  (tmp_path / "bad.png").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="bad.png"):
    data.load_image_file(tmp_path / "bad.png", RES)
  with pytest.raises(FileNotFoundError, match="nope.png"):
    data.load_image_file(tmp_path / "nope.png", RES)


# ---------------------------------------------------------------- tfds / build_source


def test_tfds_source_missing_dir_message(tmp_path):
  missing = tmp_path / "no_tfds_here"
  with pytest.raises(FileNotFoundError) as e:
    data.TfdsSource("imagenet2012", data_dir=missing, split="train")
  msg = str(e.value)
  assert str(missing) in msg and "tfds build imagenet2012" in msg
  assert "--manual_dir" in msg and "array_record" in msg
  # The dir exists but the dataset was never prepared there.
  with pytest.raises(FileNotFoundError, match="not prepared"):
    data.TfdsSource("imagenet2012", data_dir=tmp_path, split="train")


def test_tfds_source_reads_array_record(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class ImagefolderJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["zero", "one", "two"]),
          "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        yield i, {"image": io.BytesIO(_encode(_photo(20, 24, i), "PNG")), "label": i % 3,
                  "file_name": f"img{i}.png"}

  ImagefolderJaxTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = data.build_source("tfds:imagefolder_jax_tiny_images", data_dir=str(tmp_path), split="train")
  assert len(src) == 6 and src.class_names == ("zero", "one", "two")
  record = src[0]
  i = int(record["id"][3])
  assert record["id"] == f"img{i}.png" and record["label"] == i % 3
  np.testing.assert_array_equal(T.decode_image(record["image"]), _photo(20, 24, i))
  loader = data.make_loader(src, batch_size=3, resolution=16, train=False, seed=0,
                            shard_index=0, shard_count=1)
  assert [b["image"].shape for b in loader] == [(3, 16, 16, 3)] * 2


def test_build_source_specs_and_errors(tmp_path):
  demo = data.build_source("demo", crops_per_class=2, seed=4, split="validation")
  assert isinstance(demo, data.DemoSource) and len(demo) == 18
  assert (demo.seed, demo.split) == (4, "validation")
  Image.fromarray(_photo(8, 8, 0)).save(tmp_path / "a.png")
  assert isinstance(data.build_source(f"folder:{tmp_path}"), data.ImageFolderSource)
  from_config = data.build_source({"spec": "demo", "crops_per_class": 1})
  assert len(from_config) == 9
  for bad in ("bogus", "folder:", "tfds:", "demo:5", ""):
    with pytest.raises(ValueError, match="unknown dataset spec"):
      data.build_source(bad)
  with pytest.raises(ValueError, match="unknown data config fields"):
    data.build_source({"spec": "demo", "crops": 3})
  with pytest.raises(ValueError, match="unknown demo split"):
    data.build_source("demo", split="test")
