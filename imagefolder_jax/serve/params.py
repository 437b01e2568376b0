"""Validation of request parameters: every bad value is a `BadRequest` with one line naming it.

The ranges are those the CLI accepts (`imagefolder-jax sample`), with upper bounds added where a
client could otherwise ask for unbounded work (counts) or meaningless values (cfg, temperature).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import shlex
from typing import Any, Mapping, Optional, Sequence

# The CLI's defaults (cfg 3.25, top-k 750, top-p 0.95: the paper's settings).
DEFAULTS = {"count": 1, "seed": 0, "cfg": 3.25, "top_k": 750, "top_p": 0.95, "temperature": 1.0}
SEED_LIMIT = 2 ** 31  # seeds are int32 on the device without jax_enable_x64
BRANCH_NAMES = ("detail", "semantic")


class BadRequest(ValueError):
  """A client error (HTTP 400): the message names the offending value."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-request limits. max_per_class: samples per class; max_samples: samples per request;
  max_cfg, max_temperature: upper bounds of those settings; max_upload_bytes: request body size;
  max_pixels: width x height of an uploaded image."""
  max_per_class: int = 16
  max_samples: int = 64
  max_cfg: float = 50.0
  max_temperature: float = 10.0
  max_upload_bytes: int = 16 * 1024 * 1024
  max_pixels: int = 40_000_000


@dataclasses.dataclass(frozen=True)
class SampleParams:
  """A validated sampling request: labels (class ids, one per sample, classes x count in order)."""
  classes: tuple[int, ...]
  count: int
  seed: int
  cfg: float
  top_k: int
  top_p: float
  temperature: float

  @property
  def labels(self) -> list[int]:
    return [c for c in self.classes for _ in range(self.count)]

  def command(self, bundle: str, out: str = "samples.png", npz: Optional[str] = "samples.npz",
              reference: Optional[str] = None, force: Optional[str] = None) -> str:
    """The `imagefolder-jax sample` command line that gives the same tokens."""
    words = ["imagefolder-jax", "sample", "--bundle", bundle, "--classes", ",".join(map(str, self.classes)),
             "--per-class", str(self.count), "--seed", str(self.seed), "--cfg", repr(self.cfg),
             "--top-k", str(self.top_k), "--top-p", repr(self.top_p), "--temperature", repr(self.temperature)]
    if reference is not None:
      words += ["--reference", reference, "--force", force or "detail"]
    words += ["--out", out]
    if npz:
      words += ["--save-npz", npz]
    return " ".join(shlex.quote(w) for w in words)


def _int(name: str, value: Any, low: int, high: int) -> int:
  # bool is an int subclass; "true" for a count is a client bug worth naming.
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
      value = int(value.strip())
    else:
      raise BadRequest(f"{name} must be an integer, got {value!r:.60}")
  if not low <= value <= high:
    raise BadRequest(f"{name} must be in [{low}, {high}], got {value}")
  return int(value)


def _float(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
  if isinstance(value, bool):
    raise BadRequest(f"{name} must be a number, got {value!r}")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise BadRequest(f"{name} must be a number, got {value!r:.60}") from None
  below = number <= low if low_open else number < low
  if not math.isfinite(number) or below or number > high:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    raise BadRequest(f"{name} must be a finite number in {interval}, got {value!r:.60}")
  return number


def resolve_class(value: Any, names: Sequence[str]) -> int:
  """A class id from an int (or its decimal string) or a name (case-insensitive, exact); names[-1]
  is the unconditional class."""
  num_classes = len(names) - 1
  if isinstance(value, str) and not value.strip().isdigit():
    wanted = value.strip().casefold()
    for i, name in enumerate(names):
      if name.casefold() == wanted or name.split(" (")[0].casefold() == wanted:
        return i
    raise BadRequest(f"unknown class {value!r:.80}")
  if isinstance(value, str):
    value = int(value.strip())
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise BadRequest(f"a class must be an id or a name, got {value!r:.60}")
  if not 0 <= value <= num_classes:
    raise BadRequest(f"unknown class id {value}: ids are 0..{num_classes - 1} "
                     f"({num_classes} = unconditional)")
  return int(value)


def defaults_for(codebook_size: int) -> dict:
  """DEFAULTS with top-k at most the codebook size V (k >= V keeps every token, as k = 0 does)."""
  return dict(DEFAULTS, top_k=min(DEFAULTS["top_k"], codebook_size))


def sample_params(body: Mapping[str, Any], names: Sequence[str], codebook_size: int, limits: Limits,
                  defaults: Optional[Mapping[str, Any]] = None) -> SampleParams:
  """Validates {classes, count, seed, cfg, top_k, top_p, temperature}; missing values come from
  `defaults` (None: `defaults_for(codebook_size)`). top_k is in [0, V]: every k >= V is the same
  filter and would only compile another program."""
  if not isinstance(body, Mapping):
    raise BadRequest(f"the request must be a JSON object, got {type(body).__name__}")
  known = {"classes", *DEFAULTS}
  unknown = sorted(set(body) - known)
  if unknown:
    raise BadRequest(f"unknown parameter {unknown[0]!r:.60} (known: {', '.join(sorted(known))})")
  classes = body.get("classes")
  if isinstance(classes, (str, int)) and not isinstance(classes, bool):
    classes = [c for c in str(classes).split(",") if c.strip()] if isinstance(classes, str) else [classes]
  if not isinstance(classes, (list, tuple)) or not classes:
    raise BadRequest("classes must be a non-empty list of class ids or names")
  ids = tuple(resolve_class(c, names) for c in classes)
  defaults = defaults_for(codebook_size) if defaults is None else defaults
  get = lambda key: body.get(key, defaults[key])  # noqa: E731
  count = _int("count", get("count"), 1, limits.max_per_class)
  if len(ids) * count > limits.max_samples:
    raise BadRequest(f"{len(ids)} classes x count {count} = {len(ids) * count} samples, more than the "
                     f"{limits.max_samples} a request may ask for")
  return SampleParams(
      classes=ids, count=count,
      seed=_int("seed", get("seed"), 0, SEED_LIMIT - 1),
      cfg=_float("cfg", get("cfg"), 0.0, limits.max_cfg),
      top_k=_int("top_k", get("top_k"), 0, codebook_size),
      top_p=_float("top_p", get("top_p"), 0.0, 1.0, low_open=True),
      temperature=_float("temperature", get("temperature"), 0.0, limits.max_temperature, low_open=True))


def branch_name(value: Any, num_branches: int) -> int:
  """'detail' -> 0, 'semantic' -> 1 (the CLI's --force names)."""
  if value not in BRANCH_NAMES[:num_branches]:
    raise BadRequest(f"keep must be one of {', '.join(BRANCH_NAMES[:num_branches])}, got {value!r:.40}")
  return BRANCH_NAMES.index(value)
