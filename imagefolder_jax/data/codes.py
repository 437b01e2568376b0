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


def decode_record(data: bytes) -> dict:
  with np.load(io.BytesIO(data)) as z:
    return {"codes": z["codes"].astype(np.int32), "label": np.int32(z["label"])}


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


class CodesSource:
  """Random-access source over a `pretokenize` output directory: records {'codes': (P, L), 'label'}."""

  def __init__(self, directory: str):
    path = os.path.join(directory, RECORDS)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, META)):
      raise FileNotFoundError(f"{directory}: no pre-tokenized codes here (run `imagefolder-jax pretokenize`)")
    with open(os.path.join(directory, META)) as f:
      self.meta = json.load(f)
    self._directory = directory
    self._source = grain.ArrayRecordDataSource([path])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes:
    return self._source[index]

  def __repr__(self) -> str:
    return f"CodesSource({self._directory!r})"


class _Decode(grain.MapTransform):
  def map(self, element: bytes) -> dict:
    return decode_record(element)


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
                          operations=[_Decode(), grain.Batch(batch_size, drop_remainder=train)],
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
  failed = parallel.any_process(failure is not None)
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
