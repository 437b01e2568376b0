"""Seeded generators of odd and corrupt inputs: image files, damaged bundles, damaged official checkpoints.

Shared by `tests/test_reliability.py` (a representative subset) and `bench/fuzz_cli.py` (1,000 cases).
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


# ----------------------------------------------------------------------------- images
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


# ----------------------------------------------------------------------------- damaged files
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
  from imagefolder_jax.checkpoint import save_bundle
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


# ----------------------------------------------------------------------------- official checkpoints
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
# Damage that a converter may accept: unused extra tensors; flipped bytes inside tensor data that
# leave every tensor finite.
OFFICIAL_MAY_SURVIVE = frozenset({"extra_key", "flipped_bytes"})
