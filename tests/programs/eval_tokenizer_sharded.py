"""evaluate_tokenizer on 1 and on 8 devices -> {'one': result, 'eight': result}.

Run by tests/programs/eight_devices.py with 8 fake CPU devices."""
import jax

from imagefolder_jax.data.sources import build_source
from imagefolder_jax.evaluation.tokenizer import evaluate_tokenizer
from imagefolder_jax.inference.tokenizer import Tokenizer
from imagefolder_jax.parallel import make_mesh


def run(bundle: str) -> dict:
  source = build_source("demo", split="validation", crops_per_class=2)
  out = {}
  for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    mesh = make_mesh(devices=devices)
    tok = Tokenizer.load(bundle, mesh=mesh)
    # 11 of 18 records with global batches of 8: the second batch is padded with 5 invalid rows.
    out[name] = evaluate_tokenizer(tok, source, mesh=mesh, batch_size=8, limit=11)
  return out
