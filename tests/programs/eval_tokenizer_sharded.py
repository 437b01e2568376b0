"""evaluate_tokenizer on 1 and on 8 devices: argv BUNDLE; prints RESULT<json {'one': ..., 'eight':
...}>. Run by tests with 8 fake CPU devices."""
import json
import sys

import jax

from imagefolder_jax.data.sources import build_source
from imagefolder_jax.evaluation.tokenizer import evaluate_tokenizer
from imagefolder_jax.inference.tokenizer import Tokenizer
from imagefolder_jax.parallel import make_mesh

assert jax.device_count() == 8, jax.devices()
source = build_source("demo", split="validation", crops_per_class=2)
out = {}
for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
  mesh = make_mesh(devices=devices)
  tok = Tokenizer.load(sys.argv[1], mesh=mesh)
  # 11 of 18 records with global batches of 8: the second batch is padded with 5 invalid rows.
  out[name] = evaluate_tokenizer(tok, source, mesh=mesh, batch_size=8, limit=11)
print("RESULT" + json.dumps(out))
