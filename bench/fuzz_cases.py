"""Seeded generators of odd and corrupt inputs: image files, damaged bundles, damaged official checkpoints,
ADM .npz files, training workdirs, pre-tokenized codes and TorchScript files.

Shared by `tests/cli/test_reliability.py` (a representative subset) and `bench/fuzz_cli.py` (1,000 cases).
Every generator takes a `numpy.random.Generator`, so a case is reproduced from (seed, index).

Image kinds say whether our decoder must read them (`DECODABLE`) or skip them with a reason.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from typing import Callable

import numpy as np
from PIL import Image


# -------------------- images
def _noise(rng, h, w, c=3, dtype=np.uint8, high=256):
  return rng.integers(0, high, (h, w, c) if c else (h, w)).astype(dtype)


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _size(rng, lo=8, hi=80):
  return int(rng.integers(lo, hi)), int(rng.integers(lo, hi))


def _rgb_jpeg(rng):
  h, w = _size(rng)
  return _save(Image.fromarray(_noise(rng, h, w)), "JPEG", quality=int(rng.integers(30, 95)))


def _truncated(rng):
  data = _rgb_jpeg(rng) if rng.uniform() < 0.5 else _save(Image.fromarray(_noise(rng, *_size(rng))), "PNG")
  return data[:int(rng.integers(1, max(2, len(data) // 2)))]


def _png_bomb(rng):
  """A PNG whose header claims far more pixels than PIL's decompression-bomb limit (2 x 89M)."""
  side = int(rng.integers(40_000, 60_000))
  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _palette_gif(rng):
  h, w = _size(rng)
  frames = [Image.fromarray(_noise(rng, h, w, 0, high=16).astype(np.uint8), "L").convert("P") for _ in range(3)]
  buffer = io.BytesIO()
  frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], transparency=0)
  return buffer.getvalue()


# name -> (extension, generator(rng) -> bytes)
IMAGE_KINDS: dict[str, tuple[str, Callable]] = {
    "rgb_jpeg": (".jpg", _rgb_jpeg),
    "rgb_png": (".png", lambda rng: _save(Image.fromarray(_noise(rng, *_size(rng))), "PNG")),
    "cmyk_jpeg": (".jpg", lambda rng: _save(Image.fromarray(_noise(rng, *_size(rng), c=4), "CMYK"), "JPEG")),
    "rgba_png": (".png", lambda rng: _save(Image.fromarray(_noise(rng, *_size(rng), c=4), "RGBA"), "PNG")),
    "gray16_png": (".png", lambda rng: _save(Image.fromarray(_noise(rng, *_size(rng), c=0, dtype=np.uint16,
                                                                     high=65536)), "PNG")),
    "bilevel_png": (".png", lambda rng: _save(Image.fromarray(_noise(rng, *_size(rng), c=0, high=2) * 255)
                                              .convert("1"), "PNG")),
    "one_by_one": (".png", lambda rng: _save(Image.fromarray(_noise(rng, 1, 1)), "PNG")),
    "thin_strip": (".png", lambda rng: _save(Image.fromarray(_noise(rng, 1, int(rng.integers(100, 400)))), "PNG")),
    "palette_gif": (".gif", _palette_gif),
    "float_tiff": (".tif", lambda rng: _save(Image.fromarray(rng.standard_normal(_size(rng)).astype(np.float32), "F"),
                                             "TIFF")),
    "gray_bmp": (".bmp", lambda rng: _save(Image.fromarray(_noise(rng, *_size(rng), c=0), "L"), "BMP")),
    "webp": (".webp", lambda rng: _save(Image.fromarray(_noise(rng, *_size(rng))), "WEBP")),
    "truncated": (".jpg", _truncated),
    "empty": (".jpg", lambda rng: b""),
    "garbage": (".png", lambda rng: rng.integers(0, 256, int(rng.integers(1, 4096))).astype(np.uint8).tobytes()),
    "text_as_jpg": (".jpg", lambda rng: b"this is not an image\n" * int(rng.integers(1, 50))),
    "html_as_png": (".png", lambda rng: b"<!doctype html><html><body>404 Not Found</body></html>"),
    "bomb_png": (".png", _png_bomb),
    "header_only_png": (".png", lambda rng: b"\x89PNG\r\n\x1a\n"),
}
DECODABLE = frozenset({"rgb_jpeg", "rgb_png", "cmyk_jpeg", "rgba_png", "gray16_png", "bilevel_png", "one_by_one",
                       "thin_strip", "palette_gif", "float_tiff", "gray_bmp", "webp"})


def write_image(directory: str, kind: str, rng: np.random.Generator, index: int) -> str:
  extension, make = IMAGE_KINDS[kind]
  path = os.path.join(directory, f"{index:04d}_{kind}{extension}")
  with open(path, "wb") as f:
    f.write(make(rng))
  return path


def write_images(directory: str, kinds, rng: np.random.Generator) -> list[str]:
  os.makedirs(directory, exist_ok=True)
  return [write_image(directory, kind, rng, i) for i, kind in enumerate(kinds)]


# -------------------- damaged files
def _files_under(root: str) -> list[str]:
  out = []
  for dirpath, _, names in os.walk(root):
    out += [os.path.join(dirpath, n) for n in names]
  return sorted(out)


def truncate_file(path: str, rng: np.random.Generator) -> None:
  size = os.path.getsize(path)
  os.truncate(path, int(rng.integers(0, max(1, size))))


def flip_bytes(path: str, rng: np.random.Generator, count: int = 8) -> None:
  data = bytearray(open(path, "rb").read())
  if not data:
    return
  for i in rng.integers(0, len(data), count):
    data[i] ^= int(rng.integers(1, 256))
  with open(path, "wb") as f:
    f.write(bytes(data))


def _bundle_variables(bundle: str):
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(bundle), "variables"))


def _rewrite_bundle(bundle: str, edit: Callable) -> None:
  """Loads a bundle's variables and configs, applies `edit(configs, variables)`, saves in place."""
  import jax

  from imagefolder_jax.storage.bundle import save_bundle
  with open(os.path.join(bundle, "bundle.json")) as f:
    configs = json.load(f)["configs"]
  variables = jax.tree.map(np.asarray, _bundle_variables(bundle))
  edit(configs, variables)
  save_bundle(bundle, configs, variables)


class DictKey:
  def __init__(self, key):
    self.key = key


def _pick_leaf(variables, rng, float_only=True):
  import jax
  leaves = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(variables)
            if not float_only or np.issubdtype(np.asarray(x).dtype, np.floating)]
  return leaves[int(rng.integers(0, len(leaves)))][0]


def _set_leaf(tree, path, value):
  node = tree
  for k in path[:-1]:
    node = node[getattr(k, "key", getattr(k, "idx", None))]
  last = path[-1]
  node[getattr(last, "key", getattr(last, "idx", None))] = value


def _get_leaf(tree, path):
  for k in path:
    tree = tree[getattr(k, "key", getattr(k, "idx", None))]
  return tree


def _damage_leaf(how: str, model: str = "tokenizer"):
  def edit(bundle, rng):
    def apply(configs, variables):
      path = (DictKey(model),) + _pick_leaf(variables[model], rng)
      x = np.asarray(_get_leaf(variables, path))
      if how == "nan":
        x = x.copy()
        x.flat[int(rng.integers(0, x.size))] = np.nan if rng.uniform() < 0.5 else np.inf
      elif how == "shape":
        x = np.concatenate([x, x[:1]], axis=0) if x.ndim else np.stack([x, x])
      elif how == "dtype":
        x = x.astype(np.int32)
      elif how == "missing":
        node = variables
        for k in path[:-1]:
          node = node[getattr(k, "key", None)]
        del node[getattr(path[-1], "key", None)]
        return
      _set_leaf(variables, path, x)
    _rewrite_bundle(bundle, apply)
  return edit


def _drop_model(name):
  def edit(bundle, rng):
    def apply(configs, variables):
      configs.pop(name, None)
      variables.pop(name, None)
    _rewrite_bundle(bundle, apply)
  return edit


def _bundle_json(text_fn):
  def edit(bundle, rng):
    with open(os.path.join(bundle, "bundle.json"), "w") as f:
      f.write(text_fn(bundle, rng))
  return edit


def _bad_config_value(bundle, rng):
  with open(os.path.join(bundle, "bundle.json")) as f:
    meta = json.load(f)
  tok = meta["configs"]["tokenizer"]
  key = ["image_size", "num_branches", "quantizer", "vit"][int(rng.integers(0, 4))]
  if key in tok:
    tok[key] = ["x", -3, None, {}][int(rng.integers(0, 4))]
  else:
    tok["vit"] = -1
  with open(os.path.join(bundle, "bundle.json"), "w") as f:
    json.dump(meta, f)


def _variables_file(how):
  def edit(bundle, rng):
    # Files orbax needs (array data, OCDBT manifests, the tree metadata), not its optional extras.
    files = [f for f in _files_under(os.path.join(bundle, "variables")) if os.path.getsize(f) > 0 and (
        f"{os.sep}d{os.sep}" in f or os.path.basename(f) in ("manifest.ocdbt", "_METADATA"))]
    path = files[int(rng.integers(0, len(files)))]
    if how == "truncate":
      truncate_file(path, rng)
    elif how == "delete":
      os.remove(path)
    else:
      flip_bytes(path, rng)
  return edit


# name -> edit(bundle_dir, rng): each leaves a bundle that a verb must refuse in one line (or, for
# byte flips that land in slack space, read correctly).
BUNDLE_DAMAGE: dict[str, Callable] = {
    "truncate_variable_file": _variables_file("truncate"),
    "delete_variable_file": _variables_file("delete"),
    "flip_variable_bytes": _variables_file("flip"),
    "no_variables_dir": lambda bundle, rng: shutil.rmtree(os.path.join(bundle, "variables")),
    "no_bundle_json": lambda bundle, rng: os.remove(os.path.join(bundle, "bundle.json")),
    "garbage_bundle_json": _bundle_json(lambda b, rng: "{not json"),
    "bundle_json_list": _bundle_json(lambda b, rng: "[1, 2, 3]"),
    "bundle_json_future_format": _bundle_json(lambda b, rng: json.dumps({"format": 99, "configs": {}})),
    "bundle_json_no_configs": _bundle_json(lambda b, rng: json.dumps({"format": 1})),
    "bad_config_value": _bad_config_value,
    "nan_tensor": _damage_leaf("nan"),
    "wrong_shape": _damage_leaf("shape"),
    "wrong_dtype": _damage_leaf("dtype"),
    "missing_tensor": _damage_leaf("missing"),
    "generator_nan_tensor": _damage_leaf("nan", "generator"),
    "generator_wrong_shape": _damage_leaf("shape", "generator"),
    "generator_wrong_dtype": _damage_leaf("dtype", "generator"),
    "generator_missing_tensor": _damage_leaf("missing", "generator"),
    "tokenizer_only": _drop_model("generator"),
    "jpeg_as_bundle": None,  # the bundle path is a JPEG file (handled by the caller)
}
# A damaged bundle may still load only when the damage hit bytes nothing reads (orbax keeps some
# redundant files): the loaded arrays must then equal the original's.


def damage_bundle(source: str, target: str, kind: str, rng: np.random.Generator) -> str:
  """Copies bundle `source` to `target` and damages it; returns the path to hand to the verb."""
  if kind == "jpeg_as_bundle":
    os.makedirs(os.path.dirname(target), exist_ok=True)
    path = target + ".jpg"
    with open(path, "wb") as f:
      f.write(_rgb_jpeg(rng))
    return path
  shutil.copytree(source, target)
  BUNDLE_DAMAGE[kind](target, rng)
  return target


# -------------------- official checkpoints
def _torch_edit(how):
  def edit(src, dst, rng):
    import torch
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    sd = checkpoint
    for key in ("ema", "model", "state_dict"):
      if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
        sd = checkpoint[key]
        break
    names = sorted(sd)
    name = names[int(rng.integers(0, len(names)))]
    if how == "missing":
      del sd[name]
    elif how == "extra":
      sd[f"unexpected.block{int(rng.integers(0, 99))}.weight"] = torch.zeros(3)
    elif how == "shape":
      t = sd[name]
      sd[name] = torch.zeros(tuple(t.shape[:-1]) + (t.shape[-1] + 1,)) if t.ndim else torch.zeros(2)
    elif how == "nan":
      floats = [n for n in names if sd[n].is_floating_point() and sd[n].numel() > 0]
      name = floats[int(rng.integers(0, len(floats)))]
      sd[name] = sd[name].clone()
      sd[name].view(-1)[0] = float("nan")
    elif how == "not_dict":
      checkpoint = torch.zeros(4)
    elif how == "renamed":
      checkpoint = {"weights": sd}
    torch.save(checkpoint, dst)
  return edit


def _raw_edit(how):
  def edit(src, dst, rng):
    if how == "jpeg":
      data = _rgb_jpeg(rng)
    elif how == "text":
      data = b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 123\n"
    elif how == "empty":
      data = b""
    elif how == "garbage":
      data = rng.integers(0, 256, 2048).astype(np.uint8).tobytes()
    else:
      data = open(src, "rb").read()
      data = data[:int(rng.integers(1, len(data)))] if how == "truncate" else data
    with open(dst, "wb") as f:
      f.write(data)
    if how == "flip":
      flip_bytes(dst, rng, count=64)
  return edit


def _pickled_code(src, dst, rng):
  import pickle
  with open(dst, "wb") as f:
    pickle.dump({"model": {"x": Exception("a Python object, not a tensor")}}, f, protocol=2)


# name -> edit(src .pt, dst path, rng)
OFFICIAL_DAMAGE: dict[str, Callable] = {
    "missing_key": _torch_edit("missing"),
    "extra_key": _torch_edit("extra"),
    "wrong_shape": _torch_edit("shape"),
    "nan_tensor": _torch_edit("nan"),
    "not_a_dict": _torch_edit("not_dict"),
    "renamed_root": _torch_edit("renamed"),
    "jpeg": _raw_edit("jpeg"),
    "lfs_pointer_text": _raw_edit("text"),
    "empty": _raw_edit("empty"),
    "garbage": _raw_edit("garbage"),
    "truncated": _raw_edit("truncate"),
    "flipped_bytes": _raw_edit("flip"),
    "pickled_object": _pickled_code,
}
# Damage that a converter may accept: unused extra tensors; a missing tensor the converter derives
# instead of reading (the level buffers `*.lvl1LC`); flipped bytes inside tensor data that leave
# every tensor finite. The first two must convert to the same variables as the undamaged file.
OFFICIAL_MAY_SURVIVE = frozenset({"extra_key", "missing_key", "flipped_bytes"})
OFFICIAL_SAME_VARIABLES = frozenset({"extra_key", "missing_key"})


# -------------------- ADM .npz files (fid, fid-stats, eval-generator --ref)
def _features(rng, n=12, d=8):
  return rng.standard_normal((n, d)).astype(np.float32)


def _good_npz_arrays(rng) -> dict:
  """A small, valid fid-stats-like file: statistics and features of pool_3 (D=8) and spatial (D=6)."""
  pool, spatial = _features(rng), _features(rng, d=6)
  return {"mu": pool.mean(0).astype(np.float64), "sigma": np.cov(pool, rowvar=False),
          "mu_s": spatial.mean(0).astype(np.float64), "sigma_s": np.cov(spatial, rowvar=False),
          "pool_3": pool, "spatial": spatial}


def write_good_npz(path: str, rng) -> str:
  np.savez(path, **_good_npz_arrays(rng))
  return path


def _npz_arrays(edit):
  def make(path, rng):
    arrays = _good_npz_arrays(rng)
    edit(arrays, rng)
    np.savez(path, **arrays)
  return make


def _drop(*keys):
  def edit(arrays, rng):
    for k in keys:
      arrays.pop(k)
  return edit


def _set(key, value_fn):
  def edit(arrays, rng):
    arrays[key] = value_fn(arrays, rng)
  return edit


def _nonfinite(key):
  def edit(arrays, rng):
    x = np.array(arrays[key], copy=True)
    x.flat[int(rng.integers(0, x.size))] = [np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]
    arrays[key] = x
  return edit


def _pickled_npz(path, rng):
  arrays = _good_npz_arrays(rng)
  arrays["mu"] = np.array([{"not": "numbers"}, None], dtype=object)
  np.savez(path, **arrays)   # np.savez pickles object arrays; we never unpickle them


def _raw_npz(how):
  def make(path, rng):
    if how in ("truncate", "flip"):
      write_good_npz(path, rng)
      if how == "truncate":
        truncate_file(path, rng)
      else:
        flip_bytes(path, rng, count=32)
      return
    data = {"jpeg": lambda: _rgb_jpeg(rng), "empty": lambda: b"", "text": lambda: b"mu,sigma\n1,2\n",
            "garbage": lambda: rng.integers(0, 256, 4096).astype(np.uint8).tobytes()}[how]()
    with open(path, "wb") as f:
      f.write(data)
  return make


def _npy_not_npz(path, rng):
  with open(path, "wb") as f:
    np.save(f, _features(rng))


def _images_npz(edit):
  def make(path, rng):
    images = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    arrays = {"arr_0": images}
    edit(arrays, rng)
    np.savez(path, **arrays)
  return make


def _truncated_images(path, rng):
  """arr_0 whose data ends early: the zip member is rewritten with a short .npy payload."""
  images = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
  buffer = io.BytesIO()
  np.lib.format.write_array(buffer, images)
  data = buffer.getvalue()
  import zipfile
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("arr_0.npy", data[:len(data) - int(rng.integers(1, images.size))])


# name -> make(path, rng): each writes an .npz (or something posing as one) that `fid`, `fid-stats`
# and `eval-generator --ref` must refuse in one line.
NPZ_DAMAGE: dict[str, Callable] = {
    "no_keys": _npz_arrays(lambda a, rng: [a.pop(k) for k in list(a)] and a.update(other=np.zeros(3))),
    "labels_only": _npz_arrays(lambda a, rng: [a.pop(k) for k in list(a)] and a.update(labels=np.arange(4))),
    "mu_without_sigma": _npz_arrays(_drop("sigma", "pool_3")),
    "sigma_s_without_mu_s": _npz_arrays(_drop("mu_s", "spatial")),
    "mu_2d": _npz_arrays(_set("mu", lambda a, rng: a["mu"][None])),
    "sigma_not_square": _npz_arrays(_set("sigma", lambda a, rng: a["sigma"][:, :-1])),
    "sigma_1d": _npz_arrays(_set("sigma", lambda a, rng: np.diag(a["sigma"]))),
    "mu_sigma_disagree": _npz_arrays(_set("mu", lambda a, rng: a["mu"][:-1])),
    "pool_3_1d": _npz_arrays(_set("pool_3", lambda a, rng: a["pool_3"][0])),
    "pool_3_other_dim": _npz_arrays(_set("pool_3", lambda a, rng: a["pool_3"][:, :-2])),
    "one_feature_row": _npz_arrays(lambda a, rng: [a.pop(k) for k in ("mu", "sigma")] and None
                                   or a.update(pool_3=a["pool_3"][:1])),
    "string_mu": _npz_arrays(_set("mu", lambda a, rng: np.array(["0.1"] * 8))),
    "complex_sigma": _npz_arrays(_set("sigma", lambda a, rng: a["sigma"] * (1 + 1j))),
    "nan_mu": _npz_arrays(_nonfinite("mu")),
    "nan_sigma": _npz_arrays(_nonfinite("sigma")),
    "nan_sigma_s": _npz_arrays(_nonfinite("sigma_s")),
    "nan_pool_3": _npz_arrays(_nonfinite("pool_3")),
    "pickled_object": _pickled_npz,
    "truncated": _raw_npz("truncate"),
    "flipped_bytes": _raw_npz("flip"),
    "jpeg": _raw_npz("jpeg"),
    "empty": _raw_npz("empty"),
    "text": _raw_npz("text"),
    "garbage": _raw_npz("garbage"),
    "npy_not_npz": _npy_not_npz,
    "images_float": _images_npz(lambda a, rng: a.update(arr_0=a["arr_0"].astype(np.float32))),
    "images_gray": _images_npz(lambda a, rng: a.update(arr_0=a["arr_0"][..., 0])),
    "images_rgba": _images_npz(lambda a, rng: a.update(arr_0=np.concatenate([a["arr_0"]] * 2, -1)[..., :4])),
    "images_empty": _images_npz(lambda a, rng: a.update(arr_0=a["arr_0"][:0])),
    "images_truncated": _truncated_images,
}
# Flipped bytes may land in a zip's slack (names, padding) or flip a float to another finite value;
# such a file may still be read (then it must hold finite statistics of the right shapes).
NPZ_MAY_SURVIVE = frozenset({"flipped_bytes"})
# Kinds with images only (`fid-stats --source npz:FILE` reads these; the others hold no arr_0).
NPZ_IMAGE_KINDS = ("images_float", "images_gray", "images_rgba", "images_empty", "images_truncated",
                   "pickled_object", "truncated", "jpeg", "empty", "garbage", "npy_not_npz", "no_keys")


# -------------------- training workdirs (export-official --workdir)
def _step_dirs(workdir):
  root = os.path.join(workdir, "checkpoints")
  steps = [os.path.join(root, s) for s in os.listdir(root) if s.isdigit()]
  return sorted(steps, key=lambda p: int(os.path.basename(p)))


def _truncate_step(which):
  def edit(workdir, rng):
    steps = _step_dirs(workdir)
    for step in (steps[-1:] if which == "newest" else steps):
      files = [f for f in _files_under(os.path.join(step, "state")) if f"{os.sep}d{os.sep}" in f]
      truncate_file(max(files, key=os.path.getsize), rng)
  return edit


def _workdir_config(text_fn):
  def edit(workdir, rng):
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(text_fn(workdir, rng))
  return edit


def _config_field(edit_config):
  def edit(workdir, rng):
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
    edit_config(saved, rng)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(saved, f)
  return edit


def _no_commit_marker(workdir, rng):
  os.remove(os.path.join(_step_dirs(workdir)[-1], "commit_success.txt"))


# name -> edit(workdir, rng). WORKDIR_FALLS_BACK: the newest step is damaged, an older one is fine:
# export must succeed from the older step (and say which); the others must be refused in one line.
WORKDIR_DAMAGE: dict[str, Callable] = {
    "truncate_newest": _truncate_step("newest"),
    "newest_without_commit_marker": _no_commit_marker,
    "truncate_all": _truncate_step("all"),
    "no_checkpoints": lambda w, rng: shutil.rmtree(os.path.join(w, "checkpoints")),
    "no_config_json": lambda w, rng: os.remove(os.path.join(w, "config.json")),
    "garbage_config_json": _workdir_config(lambda w, rng: "{not json"),
    "config_json_list": _workdir_config(lambda w, rng: "[1, 2]"),
    "config_json_without_config": _workdir_config(lambda w, rng: json.dumps({"stage": "tokenizer"})),
    "unknown_stage": _config_field(lambda s, rng: s.update(stage="discriminator")),
    "other_architecture": _config_field(lambda s, rng: s["config"]["model"]["vit"].update(
        width=2 * s["config"]["model"]["vit"]["width"])),
    "bad_model_value": _config_field(lambda s, rng: s["config"]["model"]["vit"].update(depth="two")),
}
WORKDIR_FALLS_BACK = frozenset({"truncate_newest", "newest_without_commit_marker"})


# -------------------- pre-tokenized codes (train-generator codes:DIR)
def _rewrite_records(edit_record):
  """Rewrites every record of a codes directory through `edit_record(codes, label, rng) -> bytes`."""
  def edit(directory, rng):
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from imagefolder_jax.data.codes import RECORDS
    path = os.path.join(directory, RECORDS)
    reader = ArrayRecordReader(path)
    records = [reader.read() for _ in range(reader.num_records())]
    reader.close()
    writer = ArrayRecordWriter(path, "group_size:1")
    for data in records:
      with np.load(io.BytesIO(data)) as z:
        writer.write(edit_record(np.array(z["codes"]), np.array(z["label"]), rng))
    writer.close()
  return edit


def _record(codes, label=None, **extra) -> bytes:
  buffer = io.BytesIO()
  arrays = dict(codes=codes, **extra)
  if label is not None:
    arrays["label"] = label
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def _codes_meta(edit_meta):
  def edit(directory, rng):
    path = os.path.join(directory, "codes.json")
    with open(path) as f:
      meta = json.load(f)
    edit_meta(meta, rng)
    with open(path, "w") as f:
      json.dump(meta, f)
  return edit


def _codes_meta_text(text):
  def edit(directory, rng):
    with open(os.path.join(directory, "codes.json"), "w") as f:
      f.write(text)
  return edit


def _codes_records_raw(how):
  def edit(directory, rng):
    path = os.path.join(directory, "codes.array_record")
    if how == "truncate":
      truncate_file(path, rng)
    elif how == "garbage":
      with open(path, "wb") as f:
        f.write(rng.integers(0, 256, int(rng.integers(1, 4096))).astype(np.uint8).tobytes())
    elif how == "empty":
      open(path, "wb").close()
    elif how == "delete":
      os.remove(path)
  return edit


# name -> edit(codes_dir, rng): a `pretokenize` output damaged; train-generator must refuse it in one
# line before it trains (or creates its workdir).
CODES_DAMAGE: dict[str, Callable] = {
    "no_codes_json": lambda d, rng: os.remove(os.path.join(d, "codes.json")),
    "garbage_codes_json": _codes_meta_text("{not json"),
    "codes_json_list": _codes_meta_text("[1, 2, 3]"),
    "other_scales": _codes_meta(lambda m, rng: m.update(scales=m["scales"][:-1])),
    "other_codebook_size": _codes_meta(lambda m, rng: m.update(codebook_size=2 * m["codebook_size"])),
    "scales_not_a_list": _codes_meta(lambda m, rng: m.update(scales="1,2,3")),
    "num_records_mismatch": _codes_meta(lambda m, rng: m.update(num_records=m["num_records"] + 5)),
    "no_records_file": _codes_records_raw("delete"),
    "truncated_records": _codes_records_raw("truncate"),
    "garbage_records": _codes_records_raw("garbage"),
    "empty_records": _codes_records_raw("empty"),
    "records_not_npz": _rewrite_records(lambda c, l, rng: b"not an npz record"),
    "records_pickled": _rewrite_records(lambda c, l, rng: _record(np.array([None] * c.size, object), l)),
    "records_missing_position": _rewrite_records(lambda c, l, rng: _record(c[:, :-1], l)),
    "records_one_branch": _rewrite_records(lambda c, l, rng: _record(c[:1], l)),
    "records_transposed": _rewrite_records(lambda c, l, rng: _record(c.T, l)),
    "records_float": _rewrite_records(lambda c, l, rng: _record(c.astype(np.float32) + 0.5, l)),
    "records_ids_too_large": _rewrite_records(lambda c, l, rng: _record(c.astype(np.int32) + 30000, l)),
    "records_negative_ids": _rewrite_records(lambda c, l, rng: _record(-1 - c.astype(np.int32), l)),
    "records_without_label": _rewrite_records(lambda c, l, rng: _record(c)),
    "records_negative_label": _rewrite_records(lambda c, l, rng: _record(c, np.int32(-3))),
    "records_label_too_large": _rewrite_records(lambda c, l, rng: _record(c, np.int32(100000))),
}


# -------------------- TorchScript (convert-inception)
def _torchscript_damage(how):
  def make(src, dst, rng):
    if how == "state_dict":
      import torch
      torch.save({"conv.weight": torch.zeros(3, 3)}, dst)
      return
    if how == "zip_not_torchscript":
      import zipfile
      with zipfile.ZipFile(dst, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
      return
    _raw_edit(how)(src, dst, rng)
  return make


# name -> make(default_1.pt path, dst, rng): files `convert-inception --torchscript` (and --logits)
# must refuse in one line.
TORCHSCRIPT_DAMAGE: dict[str, Callable] = {
    "truncated": _torchscript_damage("truncate"),
    "flipped_bytes": _torchscript_damage("flip"),
    "jpeg": _torchscript_damage("jpeg"),
    "empty": _torchscript_damage("empty"),
    "garbage": _torchscript_damage("garbage"),
    "lfs_pointer_text": _torchscript_damage("text"),
    "state_dict": _torchscript_damage("state_dict"),
    "zip_not_torchscript": _torchscript_damage("zip_not_torchscript"),
    "pickled_object": _pickled_code,
}


def write_workdir(workdir: str, config, steps=(1, 2), seed: int = 0, stage: str = "tokenizer") -> str:
  """A training workdir as `train` leaves it (config.json, sealed checkpoints at `steps`) without
  training: the state is the task's abstract state filled with small seeded values. Enough for
  `export` / `export-official --workdir`, in seconds instead of a compile and a few steps."""
  import jax

  from imagefolder_jax.train import checkpointing, trainer
  from imagefolder_jax.train.loop import config_fingerprint
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"stage": stage, "model": config_fingerprint(config),
               "config": json.loads(config.to_json_best_effort())}, f, indent=1)
  from imagefolder_jax import parallel
  mesh, rules = parallel.mesh_from_config({"rules": None})
  _, abstract, _ = trainer._workdir_task(workdir, stage, config, mesh, rules)
  rng = np.random.default_rng(seed)

  def fill(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key(int(rng.integers(0, 2**31)))
    if np.issubdtype(x.dtype, np.floating):
      return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)
    return np.zeros(x.shape, x.dtype)
  manager = checkpointing.make_manager(workdir, keep=len(steps), async_save=False)
  for step in steps:
    checkpointing.save(manager, step, jax.tree.map(fill, abstract), {"data_iterators": ['{"step": %d}' % step]})
  manager.wait_until_finished()
  manager.close()
  return workdir


def write_inception_ref(path: str, rng, count: int = 4) -> str:
  """A valid reference of Inception's dimensions (pool_3 2048, spatial 2023) from random features."""
  from imagefolder_jax.models.inception import POOL_FEATURES, SPATIAL_FEATURES
  np.savez(path, pool_3=rng.standard_normal((count, POOL_FEATURES)).astype(np.float32),
           spatial=rng.standard_normal((count, SPATIAL_FEATURES)).astype(np.float32))
  return path
