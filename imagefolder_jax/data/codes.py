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
from typing import Iterable, Optional

import grain.python as grain
import numpy as np

META = "codes.json"
RECORDS = "codes.array_record"


def encode_record(codes: np.ndarray, label: int) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, codes=np.asarray(codes, np.int16), label=np.int32(label))
  return buffer.getvalue()


def decode_record(data: bytes) -> dict:
  with np.load(io.BytesIO(data)) as z:
    return {"codes": z["codes"].astype(np.int32), "label": np.int32(z["label"])}


def write_codes(directory: str, batches: Iterable[tuple[np.ndarray, np.ndarray]], meta: dict) -> int:
  """Writes (codes (B, P, L), labels (B,)) batches; returns the number of records.

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
    for codes, labels in batches:
      for c, l in zip(np.asarray(codes), np.asarray(labels)):
        writer.write(encode_record(c, int(l)))
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
  """Encodes every batch of an evaluation `loader` with `tokenizer` (an `api.Tokenizer`)."""
  q = tokenizer.config.quantizer
  meta = {"scales": list(q.scales), "num_branches": tokenizer.config.num_branches,
          "codebook_size": q.codebook_size, "source": source_spec, "resolution": tokenizer.resolution}
  def batches():
    for batch in loader:
      keep = np.asarray(batch["valid"], bool) if "valid" in batch else slice(None)
      yield tokenizer.encode(batch["image"]).flat()[keep], np.asarray(batch["label"])[keep]
  return write_codes(directory, batches(), meta)
