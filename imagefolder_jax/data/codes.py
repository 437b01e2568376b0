"""Pre-tokenized datasets: token ids of a frozen tokenizer stored once in ArrayRecord files.

Training the generator from codes skips the tokenizer's encoder at every step. Each record holds one
image's folded ids `codes: (P, L) int16` and its `label`; a JSON sidecar (`codes.json`) records the
tokenizer's scales, branch count and codebook size so a mismatched generator config is caught early.

  imagefolder-jax pretokenize --bundle runs/tok/bundle --source demo --out runs/codes
  imagefolder-jax train-generator ... --config.data.source=codes:runs/codes
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, Iterator, Optional

import grain.python as grain
import numpy as np

from imagefolder_jax.errors import ImageFolderError

META = "codes.json"
RECORDS = "codes.array_record"


def encode_record(codes: np.ndarray, label: int, index: Optional[int] = None) -> bytes:
  """One record: codes (P, L) int16, label, and (from `pretokenize`) the source index."""
  buffer = io.BytesIO()
  extra = {} if index is None else {"index": np.int64(index)}
  np.savez(buffer, codes=np.asarray(codes, np.int16), label=np.int32(label), **extra)
  return buffer.getvalue()


def record_index(data: bytes) -> int:
  with np.load(io.BytesIO(data)) as z:
    return int(z["index"])


class CodesError(ImageFolderError):
  """A pre-tokenized codes directory is unusable (names the directory, the file or the record)."""


def decode_record(data: bytes, layout: Optional[dict] = None, where: str = "record") -> dict:
  """One record -> {'codes': int32 as stored ((num_branches, positions), see `Codes.flat`), 'label': int32};
  never unpickles.

  layout: {'positions': P, 'num_branches': L, 'codebook_size': V[, 'num_classes': C]} to check the
  record against (shape (L, P), integer ids in [0, V), an integer label in [0, C)); `CodesError` naming
  `where` otherwise."""
  if not data.startswith(b"PK\x03\x04"):  # np.savez output is a zip; np.load would guess "a pickle"
    raise CodesError(f"{where} is not a codes record (not an .npz of codes and label: {data[:16]!r})")
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      codes, label = np.asarray(z["codes"]), np.asarray(z["label"])
  except Exception as e:  # noqa: BLE001 - np.load raises ValueError, OSError, KeyError, BadZipFile, EOFError...
    raise CodesError(f"{where} is not a codes record ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
  if layout is not None:
    shape = (layout["num_branches"], layout["positions"])
    if codes.shape != shape or codes.dtype.kind not in "iu":
      raise CodesError(f"{where}: codes are {codes.dtype}{list(codes.shape)}, expected integers of shape {shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= layout["codebook_size"]):
      raise CodesError(f"{where}: token ids span [{codes.min()}, {codes.max()}], outside the codebook "
                       f"[0, {layout['codebook_size']})")
    classes = layout.get("num_classes")
    if label.shape != () or label.dtype.kind not in "iu" or label < 0 or (classes is not None and label >= classes):
      raise CodesError(f"{where}: label must be an integer in [0, {classes if classes is not None else 'inf'}), "
                       f"got {label.dtype}{list(label.shape)} {label.tolist()!r}")
  return {"codes": codes.astype(np.int32), "label": np.int32(label)}


def write_codes(directory: str, batches: Iterable, meta: dict, encoded: bool = False) -> int:
  """Writes (codes (B, P, L), labels (B,)) batches (or, with `encoded`, `encode_record` bytes);
  returns the number of records.

  Records go to a temporary file renamed into place at the end, and the JSON sidecar is written
  last, so a failure midway (a bad input, a crash) never leaves a directory that looks complete.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  created = not os.path.isdir(directory)
  os.makedirs(directory, exist_ok=True)
  final = os.path.join(directory, RECORDS)
  partial = final + ".partial"
  writer = ArrayRecordWriter(partial, "group_size:1")
  count = 0
  try:
    records = batches if encoded else (encode_record(c, int(l)) for codes, labels in batches
                                        for c, l in zip(np.asarray(codes), np.asarray(labels)))
    for record in records:
      writer.write(record)
      count += 1
    if count == 0:
      raise ValueError(f"no records to write to {directory}: the source yielded no readable example")
  except BaseException:
    writer.close()
    os.remove(partial)
    if created and not os.listdir(directory):
      os.rmdir(directory)
    raise
  writer.close()
  os.replace(partial, final)
  with open(os.path.join(directory, META + ".partial"), "w") as f:
    json.dump(dict(meta, num_records=count), f, indent=1)
  os.replace(os.path.join(directory, META + ".partial"), os.path.join(directory, META))
  return count


def _read_meta(directory: str) -> dict:
  path = os.path.join(directory, META)
  try:
    with open(path) as f:
      meta = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise CodesError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
  if not isinstance(meta, dict):
    raise CodesError(f"{path}: expected a JSON object (as pretokenize writes), got {type(meta).__name__}")
  scales, branches, size = meta.get("scales"), meta.get("num_branches"), meta.get("codebook_size")
  if not (isinstance(scales, list) and scales and all(isinstance(x, int) and x >= 1 for x in scales)):
    raise CodesError(f"{path}: scales must be a non-empty list of positive ints, got {scales!r}")
  for name, value in (("num_branches", branches), ("codebook_size", size), ("num_records", meta.get("num_records"))):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise CodesError(f"{path}: {name} must be a positive int, got {value!r}")
  return meta


class CodesSource:
  """Random-access source over a `pretokenize` output directory: records {'codes': (P, L), 'label'}.

  num_classes: labels must lie in [0, num_classes) (the generator's classes).
  Opening checks what is cheap to check before training: the JSON sidecar (layout, record count),
  that the ArrayRecord file opens and holds that many records, and that a few records spread over
  the file decode to the sidecar's layout. Every record is checked again as it is read (`layout`)."""

  # Records decoded and checked when the source is opened (first, last and evenly spaced between).
  CHECKED_RECORDS = 8

  def __init__(self, directory: str, num_classes: Optional[int] = None):
    path = os.path.join(directory, RECORDS)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, META)):
      raise FileNotFoundError(f"{directory}: no pre-tokenized codes here (run `imagefolder-jax pretokenize`)")
    self.meta = _read_meta(directory)
    self._directory = directory
    try:
      self._source = grain.ArrayRecordDataSource([path])
      count = len(self._source)
    except Exception as e:  # noqa: BLE001 - array_record raises RuntimeError/ValueError from C++
      raise CodesError(f"{path}: not a readable ArrayRecord file ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:200]})") from e
    if count != self.meta["num_records"]:
      raise CodesError(f"{path} holds {count} records, {META} says {self.meta['num_records']} (an incomplete copy?)")
    self.layout = {"positions": sum(s * s for s in self.meta["scales"]), "num_branches": self.meta["num_branches"],
                   "codebook_size": self.meta["codebook_size"]}
    if num_classes is not None:
      self.layout["num_classes"] = num_classes
    for index in sorted(set(np.linspace(0, count - 1, min(count, self.CHECKED_RECORDS)).astype(int).tolist())):
      self.record(int(index))

  def record(self, index: int) -> dict:
    """Record `index` decoded and checked against the layout (`CodesError` naming it)."""
    where = f"{os.path.join(self._directory, RECORDS)} record {index}"
    try:
      data = self._source[index]
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt chunk
      raise CodesError(f"{where} is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    return decode_record(data, self.layout, where)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes:
    return self._source[index]

  def __repr__(self) -> str:
    return f"CodesSource({self._directory!r})"


class _Decode(grain.MapTransform):
  def __init__(self, layout: Optional[dict] = None, where: str = "record"):
    self.layout, self.where = layout, where

  def map(self, element: bytes) -> dict:
    return decode_record(element, self.layout, self.where)


def make_codes_loader(source: CodesSource, *, batch_size: int, train: bool, seed: int,
                      num_epochs: Optional[int] = None, shard_index: int = 0, shard_count: int = 1,
                      worker_count: int = 0, global_batch_size: Optional[int] = None, batch_rows=None,
                      start_position: int = 0) -> grain.DataLoader:
  """Batches {'codes': (B, P, L) int32, 'label': (B,) int32}, shuffled when training.

  As `pipeline.make_loader`: one global order of records; this process takes rows `batch_rows`
  (default: its contiguous block) of every global batch of `global_batch_size`."""
  from imagefolder_jax.data.pipeline import GlobalBatchSampler
  shard_options = grain.ShardOptions(shard_index, shard_count, drop_remainder=True)
  global_batch_size = global_batch_size or batch_size * shard_count
  if batch_rows is None:
    batch_rows = range(shard_index * batch_size, (shard_index + 1) * batch_size)
  sampler = GlobalBatchSampler(len(source), global_batch_size=global_batch_size, batch_rows=batch_rows,
                               shard_index=shard_index, shard_count=shard_count, shuffle=train, seed=seed,
                               num_epochs=num_epochs if num_epochs is not None or train else 1,
                               start_position=start_position)
  return grain.DataLoader(data_source=source, sampler=sampler, shard_options=shard_options,
                          operations=[_Decode(getattr(source, 'layout', None), f'a record of {source!r}'),
                                      grain.Batch(batch_size, drop_remainder=train)],
                          worker_count=worker_count)


def pretokenize(tokenizer, loader, directory: str, source_spec: str) -> int:
  """Encodes every valid record of an evaluation `loader` with `tokenizer` (an `api.Tokenizer`).

  On several processes each one encodes the rows its loader yields (its share of every global
  batch, `pipeline.make_loader(..., shard_index=p, shard_count=P)`) on its own devices and writes
  them to a part file; process 0 then merges the parts in source order. The output does not depend
  on the number of processes or the batch size: record k is the k-th readable source record.
  Returns the number of records.
  """
  from imagefolder_jax import parallel
  q = tokenizer.config.quantizer
  meta = {"scales": list(q.scales), "num_branches": tokenizer.config.num_branches,
          "codebook_size": q.codebook_size, "source": source_spec, "resolution": tokenizer.resolution}
  import jax
  process, processes = jax.process_index(), jax.process_count()
  created = not os.path.isdir(directory)
  os.makedirs(directory, exist_ok=True)
  part = os.path.join(directory, f"{RECORDS}.part-{process:05d}-of-{processes:05d}")

  def encoded():
    for batch in loader:
      keep = np.asarray(batch["valid"], bool)
      codes = tokenizer.encode(batch["image"]).flat()[keep]
      for c, label, index in zip(codes, np.asarray(batch["label"])[keep], np.asarray(batch["index"])[keep]):
        yield encode_record(c, int(label), int(index))

  failure = None
  try:
    _write_records(part, encoded())
  except Exception as e:  # the others must still reach the barrier below
    failure = e
  failed = parallel.any_process(failure is not None, "pretokenize parts written")
  parts = [os.path.join(directory, f"{RECORDS}.part-{p:05d}-of-{processes:05d}") for p in range(processes)]
  try:
    if failed:
      if failure is not None:
        raise failure
      raise RuntimeError("pretokenize failed on another process")
    count = 0
    if process == 0:
      count = write_codes(directory, _merged(parts), meta, encoded=True)
    parallel.sync("pretokenize merged")
    return count if process == 0 else _count(directory)
  finally:
    for path in parts if process == 0 else []:  # process 0 alone: the others may still be reading
      if os.path.exists(path):
        os.remove(path)
    if process == 0 and created and not os.listdir(directory):
      os.rmdir(directory)


def _write_records(path: str, records: Iterable[bytes]) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(path, "group_size:1")
  try:
    for record in records:
      writer.write(record)
  finally:
    writer.close()


def _merged(parts: list[str]) -> Iterator[bytes]:
  """Records of the part files (each ascending by source index) in ascending index order."""
  import heapq
  def stream(path):
    reader = grain.ArrayRecordDataSource([path])
    for i in range(len(reader)):
      record = reader[i]
      yield record_index(record), record

  for _, record in heapq.merge(*(stream(p) for p in parts), key=lambda pair: pair[0]):
    yield record


def _count(directory: str) -> int:
  with open(os.path.join(directory, META)) as f:
    return int(json.load(f)["num_records"])
