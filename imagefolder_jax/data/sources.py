"""Random-access image sources for grain.

Every source has `__len__`, `__getitem__(i) -> {'image', 'label', 'id'}` and a
stable `__repr__` (grain checks `repr(source)` when an iterator state is
restored, so it must not contain object addresses):

* 'image': encoded bytes (any PIL format) or an (H, W, 3) uint8 array;
  `None` if the file could not be read (decoding then skips it).
* 'label': int class id in [0, num_classes).
* 'id': str naming the record in logs (file path, dataset index).

Sources:

* `DemoSource`: an offline demo set of crops cut from nine photos that ship
  inside scikit-image and scikit-learn; class = source photo.
* `ImageFolderSource`: `root/<class>/<image>` (sorted class folder names give
  the label ids) or a flat folder of images (label 0).
* `TfdsSource`: a TFDS dataset prepared as ArrayRecord (e.g. imagenet2012),
  read through `tfds.data_source` without TensorFlow.

`build_source(spec)` picks one from a string such as 'demo',
'folder:/data/imgs' or 'tfds:imagenet2012'.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import numpy as np

# Imported eagerly, not inside TfdsSource: TFDS's import patches
# builtins.__import__ process-wide (etils lazy_imports), which breaks imports
# running at that moment in grain's reader threads of any live loader.
import tensorflow_datasets as tfds
from PIL import Image

# Extensions PIL reads that photo folders commonly hold (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

DEMO_SPLITS = ("train", "validation")


def _package_file(package: str, parts: tuple[str, ...], fallback: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
  """A photo file inside an installed package, decoded by PIL as that package's own loader does
  (skimage.data's imageio reader and sklearn's load_sample_images both decode through PIL). The
  package is located, not imported: importing scikit-learn and scikit-image costs about a
  CPU-second per process, decoding the nine photos a few milliseconds each. A version whose wheel
  does not hold the file goes through the package's own loader (`fallback`)."""
  def load() -> np.ndarray:
    spec = importlib.util.find_spec(package)
    path = os.path.join(spec.submodule_search_locations[0], *parts) if spec and spec.submodule_search_locations else ""
    if not os.path.isfile(path):
      return fallback()
    with Image.open(path) as image:
      return np.asarray(image)
  return load


def _skimage(name: str, file: str) -> Callable[[], np.ndarray]:
  def fallback() -> np.ndarray:
    import skimage.data  # pylint: disable=g-import-not-at-top
    return getattr(skimage.data, name)()
  return _package_file("skimage", ("data", file), fallback)


def _sklearn(index: int, file: str) -> Callable[[], np.ndarray]:
  def fallback() -> np.ndarray:
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
    return load_sample_images().images[index]
  return _package_file("sklearn", ("datasets", "images", file), fallback)


# RGB photos that ship inside the wheels (no pooch download): name -> loader (tests/data/test_data.py
# checks that each equals skimage.data.<name>() or sklearn's load_sample_images()).
# skimage's `cat` is the same photo as `chelsea`, so it is left out.
DEMO_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut", "astronaut.png"),
    "chelsea": _skimage("chelsea", "chelsea.png"),
    "coffee": _skimage("coffee", "coffee.png"),
    "rocket": _skimage("rocket", "rocket.jpg"),
    "hubble_deep_field": _skimage("hubble_deep_field", "hubble_deep_field.jpg"),
    "immunohistochemistry": _skimage("immunohistochemistry", "ihc.png"),
    "retina": _skimage("retina", "retina.jpg"),
    "china": _sklearn(0, "china.jpg"),
    "flower": _sklearn(1, "flower.jpg"),
}


@functools.lru_cache(maxsize=None)
def demo_photo(name: str) -> np.ndarray:
  """One demo base photo as (H, W, 3) uint8, loaded once per process."""
  photo = np.ascontiguousarray(DEMO_PHOTOS[name]()[..., :3], dtype=np.uint8)
  photo.flags.writeable = False
  return photo


class DemoSource:
  """Offline demo dataset: deterministic square crops of nine bundled photos.

  Record `i` belongs to class `i // crops_per_class` (one class per photo, in
  `class_names` order). Its crop is drawn from
  `np.random.default_rng((seed, split_index, i))`: side fraction
  `U(min_side, max_side)` of the photo's shorter side, uniform position, a
  horizontal flip with probability 0.5; then resized to `crop_size` square
  with LANCZOS. Crops are computed on access (base photos cached per process),
  so construction is free and workers rebuild them identically.

  'image' is (crop_size, crop_size, 3) uint8.
  """

  def __init__(
      self,
      crops_per_class: int = 64,
      *,
      crop_size: int = 128,
      min_side: float = 0.3,
      max_side: float = 0.9,
      seed: int = 0,
      split: str = "train",
  ):
    if crops_per_class < 1:
      raise ValueError(f"crops_per_class must be >= 1, got {crops_per_class}")
    if crop_size < 1:
      raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    if not 0.0 < min_side <= max_side <= 1.0:
      raise ValueError(f"need 0 < min_side <= max_side <= 1, got {min_side}, {max_side}")
    if split not in DEMO_SPLITS:
      raise ValueError(f"unknown demo split {split!r}; expected one of {DEMO_SPLITS}")
    self.crops_per_class = crops_per_class
    self.crop_size = crop_size
    self.min_side = min_side
    self.max_side = max_side
    self.seed = seed
    self.split = split
    self.class_names: tuple[str, ...] = tuple(DEMO_PHOTOS)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return self.num_classes * self.crops_per_class

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"demo index {index} out of range [0, {len(self)})")
    label = index // self.crops_per_class
    photo = demo_photo(self.class_names[label])
    rng = np.random.default_rng((self.seed, DEMO_SPLITS.index(self.split), index))
    h, w = photo.shape[:2]
    side = max(1, round(rng.uniform(self.min_side, self.max_side) * min(h, w)))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    crop = crop.resize((self.crop_size, self.crop_size), Image.Resampling.LANCZOS)
    image = np.asarray(crop)
    if rng.uniform() < 0.5:
      image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": label, "id": f"demo/{self.split}[{index}]"}

  def __repr__(self) -> str:
    return (f"DemoSource(crops_per_class={self.crops_per_class}, crop_size={self.crop_size}, "
            f"min_side={self.min_side}, max_side={self.max_side}, seed={self.seed}, "
            f"split={self.split!r})")


def _is_image_file(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolderSource:
  """A folder of images: `root/<class_name>/**/<file>` or flat `root/<file>`.

  Class folders (non-hidden subdirectories) are sorted by name and numbered
  from 0; files inside are found recursively and sorted. If `root` has no
  subdirectories with images, its own image files form one class (label 0,
  class name = the folder's name). Files are read on access; a file that
  cannot be read yields 'image' None and is skipped by the decoder.

  'image' is the file's encoded bytes.
  """

  def __init__(self, root: str | os.PathLike[str]):
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
    self.root = root
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files: list[str] = []
    labels: list[int] = []
    class_names: list[str] = []
    for name in subdirs:
      found = _list_images(os.path.join(root, name))
      if found:
        labels += [len(class_names)] * len(found)
        class_names.append(name)
        files += found
    if not files:
      files = sorted(os.path.join(root, e.name) for e in os.scandir(root)
                     if e.is_file() and _is_image_file(e.name))
      labels = [0] * len(files)
      class_names = [os.path.basename(root)]
    if not files:
      raise ValueError(
          f"image folder {root!r} holds no image files (extensions {', '.join(IMAGE_EXTENSIONS)})")
    self.files: tuple[str, ...] = tuple(files)
    self.labels = np.asarray(labels, np.int32)
    self.class_names: tuple[str, ...] = tuple(class_names)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.files[int(index)]
    record = {"label": int(self.labels[int(index)]), "id": path}
    try:
      with open(path, "rb") as f:
        record["image"] = f.read()
    except OSError as e:
      record["image"] = None
      record["error"] = f"{type(e).__name__}: {e}"
    return record

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={self.root!r}, num_files={len(self.files)})"


def _list_images(directory: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    found += [os.path.join(dirpath, f) for f in filenames if _is_image_file(f)]
  return sorted(found)


def _tfds_prepare_hint(name: str, data_dir: str) -> str:
  return (f"prepare it with `tfds build {name} --data_dir {data_dir} --file_format array_record"
          + (" --manual_dir <dir with ILSVRC2012_img_{train,val}.tar>`" if name.startswith("imagenet")
             else "`"))


class TfdsSource:
  """A TFDS dataset prepared in ArrayRecord format, read without TensorFlow.

  Images are passed on still encoded (`SkipDecoding`) so that our PIL
  decoder handles them and can skip corrupt records. 'id' is the dataset's
  'file_name' feature when it has one, else '<name>/<split>[<index>]'.

  Args:
    name: TFDS name, optionally with config/version ('imagenet2012:5.1.0').
    data_dir: the TFDS data dir the dataset was prepared into; None uses
      TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    split: TFDS split string ('train', 'validation', 'train[:1%]', ...).
    image_key, label_key: feature names to read.

  Raises:
    FileNotFoundError: the data dir or the prepared dataset is missing.
    ValueError: the dataset was prepared in a format without random access.
  """

  def __init__(
      self,
      name: str,
      data_dir: str | os.PathLike[str] | None = None,
      split: str = "train",
      *,
      image_key: str = "image",
      label_key: str = "label",
  ):
    if data_dir is None:
      data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    data_dir = os.path.abspath(os.fspath(data_dir))
    self.name, self.data_dir, self.split = name, data_dir, split
    self.image_key, self.label_key = image_key, label_key
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(
          f"TFDS data dir {data_dir!r} does not exist; {_tfds_prepare_hint(name, data_dir)}")
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError etc. when the name is unknown and not on disk
      raise FileNotFoundError(
          f"TFDS dataset {name!r} not found in {data_dir!r} "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
          f"{_tfds_prepare_hint(name, data_dir)}") from e
    if not os.path.isfile(os.path.join(os.fspath(builder.data_dir), "dataset_info.json")):
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {os.fspath(builder.data_dir)!r}; "
          f"{_tfds_prepare_hint(name, data_dir)}")
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format not in ("array_record", "parquet"):
      raise ValueError(
          f"TFDS dataset {name!r} in {os.fspath(builder.data_dir)!r} is stored as {file_format}, "
          f"which has no random access; rebuild with --file_format array_record")
    features = builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise ValueError(f"TFDS dataset {name!r} has no feature {key!r}; features: {list(features)}")
    self._has_file_name = "file_name" in features
    self._source = builder.as_data_source(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    label_feature = features[label_key]
    names = getattr(label_feature, "names", None)
    self.class_names: tuple[str, ...] = tuple(names) if names else ()

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[int(index)]
    if self._has_file_name:
      record_id = example["file_name"]
      record_id = record_id.decode() if isinstance(record_id, bytes) else str(record_id)
    else:
      record_id = f"{self.name}/{self.split}[{int(index)}]"
    return {"image": example[self.image_key], "label": int(example[self.label_key]),
            "id": record_id}

  def __repr__(self) -> str:
    return f"TfdsSource(name={self.name!r}, data_dir={self.data_dir!r}, split={self.split!r})"


SPEC_KINDS = {"demo": "demo", "folder": "folder:<path>", "tfds": "tfds:<name>", "npz": "npz:<file>"}


def parse_spec(spec: str, kinds: Sequence[str] = ("demo", "folder", "tfds")) -> tuple[str, str]:
  """'kind:arg' -> (kind, arg), for the `kinds` a caller reads: 'demo' (no argument), 'folder:<path>',
  'tfds:<name>', 'npz:<file>' (an ADM batch's `arr_0`, evaluation only). One line naming the spec
  otherwise."""
  kind, _, arg = spec.partition(":")
  if kind in kinds and (not arg if kind == "demo" else bool(arg)):
    return kind, arg
  expected = ", ".join(f"'{SPEC_KINDS[k]}'" for k in kinds)
  raise ValueError(f"unknown dataset spec {spec!r}; expected one of {expected}")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """What `build_source` reads from a config (any object or mapping with these fields).

  spec: 'demo', 'folder:<path>' or 'tfds:<name>'.
  data_dir: TFDS data dir (tfds only).
  split: 'train' / 'validation' (demo), any TFDS split string (tfds).
  seed: demo crop seed.
  crops_per_class: demo size.
  """

  spec: str
  data_dir: str | None = None
  split: str = "train"
  seed: int = 0
  crops_per_class: int = 64


def build_source(
    spec: str | Mapping[str, Any] | Any,
    *,
    data_dir: str | None = None,
    split: str = "train",
    seed: int = 0,
    crops_per_class: int = 64,
) -> DemoSource | ImageFolderSource | TfdsSource:
  """Builds a source from a spec string or a config.

  Args:
    spec: 'demo', 'folder:<path>' or 'tfds:<name>' (e.g. 'tfds:imagenet2012');
      or a mapping / ml_collections config with a 'spec' field and optional
      'data_dir', 'split', 'seed', 'crops_per_class' (which then override the
      keyword arguments).
    data_dir: TFDS data dir (tfds only).
    split: 'train' or 'validation' for demo; a TFDS split string for tfds;
      ignored for folders.
    seed: demo crop seed.
    crops_per_class: demo records per class.

  Raises:
    ValueError: unknown or malformed spec.
    FileNotFoundError: a folder or TFDS dataset does not exist.
  """
  if not isinstance(spec, str):
    fields = dict(spec) if isinstance(spec, Mapping) else {
        f.name: getattr(spec, f.name) for f in dataclasses.fields(SourceSpec) if hasattr(spec, f.name)}
    if "spec" not in fields:
      raise ValueError(f"data config has no 'spec' field: {spec!r}")
    unknown = set(fields) - {f.name for f in dataclasses.fields(SourceSpec)}
    if unknown:
      raise ValueError(f"unknown data config fields {sorted(unknown)}")
    cfg = SourceSpec(**{**dict(data_dir=data_dir, split=split, seed=seed,
                                crops_per_class=crops_per_class), **fields})
    return build_source(cfg.spec, data_dir=cfg.data_dir, split=cfg.split, seed=cfg.seed,
                        crops_per_class=cfg.crops_per_class)
  kind, arg = parse_spec(spec)
  if kind == "demo":
    return DemoSource(crops_per_class, seed=seed, split=split)
  if kind == "folder":
    return ImageFolderSource(arg)
  if kind == "tfds":
    return TfdsSource(arg, data_dir, split)
  raise ValueError(f"dataset spec {spec!r}: {kind!r} holds images for evaluation only, not a training set")
