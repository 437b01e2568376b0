"""Throughput of `imagefolder-jax serve` under concurrent load vs `Generator.sample` called directly.

  python bench/serve_throughput.py --bundle runs/demo/generator/bundle

Direct: `Generator.sample` on batches of --batch labels (images copied to the host, as the server
does), back to back. Served: the verb in a subprocess (`--batch-sizes 1,BATCH`), --concurrency
client threads each sending single-image `POST /api/sample` requests (format png, a new seed each),
so the engine fills sampler calls of up to BATCH rows. Both use the same bundle and settings. The two
alternate for --rounds rounds (the machine may be shared: the ratio is the median of the rounds'
paired ratios), then the latency of one single-image request on the idle server is measured.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np


def direct_rate(gen, batch: int, seconds: float, settings: dict) -> float:
  """Images per second of `gen.sample` on `batch` labels, back to back for about `seconds`."""
  labels = np.arange(batch) % gen.config.num_classes
  np.asarray(gen.sample(labels, seed=0, **settings).images)  # compile
  done, start, seed = 0, time.perf_counter(), 1
  while time.perf_counter() - start < seconds:
    np.asarray(gen.sample(labels, seed=seed, **settings).images)
    done, seed = done + batch, seed + 1
  return done / (time.perf_counter() - start)


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[int, bytes]:
  conn.request("POST", "/api/sample", json.dumps(body), {"Content-Type": "application/json"})
  response = conn.getresponse()
  return response.status, response.read()


def served_rate(port: int, concurrency: int, seconds: float, num_classes: int, settings: dict,
                seed_base: int) -> tuple[float, int]:
  """(images per second, non-200 answers) of `concurrency` threads posting single-image requests."""
  stop_at = time.perf_counter() + seconds
  counts, failures, lock = [0], [0], threading.Lock()

  def client(worker: int):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    i = 0
    while time.perf_counter() < stop_at:
      body = {"classes": [(worker + i) % num_classes], "count": 1, "seed": seed_base + worker * 100000 + i,
              "format": "png", **settings}
      status, _ = post(conn, body)
      with lock:
        if status == 200:
          counts[0] += 1
        else:
          failures[0] += 1
      i += 1
    conn.close()

  start = time.perf_counter()
  threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return counts[0] / (time.perf_counter() - start), failures[0]


def start_server(bundle: str, batch: int, max_queue: int) -> tuple[subprocess.Popen, int]:
  command = [sys.executable, "-m", "imagefolder_jax.cli", "serve", "--bundle", bundle, "--port", "0",
             "--batch-sizes", f"1,{batch}", "--max-queue", str(max_queue)]
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  if "http://" not in line:
    proc.kill()
    raise SystemExit(f"the server did not start: {line!r}")
  return proc, int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--bundle", default="runs/demo/generator/bundle")
  parser.add_argument("--batch", type=int, default=16, help="sampler batch (direct) = largest server call")
  parser.add_argument("--concurrency", type=int, default=32, help="client threads against the server")
  parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--cfg", type=float, default=3.25)
  parser.add_argument("--top-k", type=int, default=None, help="default: min(750, codebook size)")
  parser.add_argument("--top-p", type=float, default=0.95)
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import imagefolder_jax as ifj
  gen = ifj.Generator.load(args.bundle)
  top_k = args.top_k if args.top_k is not None else min(750, gen.config.codebook_size)
  settings = {"cfg": args.cfg, "top_k": top_k, "top_p": args.top_p}
  started = time.perf_counter()
  proc, port = start_server(args.bundle, args.batch, max_queue=4 * args.concurrency)
  startup = time.perf_counter() - started
  try:
    direct, served, failures = [], [], 0
    for r in range(args.rounds):
      direct.append(direct_rate(gen, args.batch, args.seconds, settings))
      rate, failed = served_rate(port, args.concurrency, args.seconds, gen.config.num_classes, settings,
                                 seed_base=r * 10 ** 7)
      served.append(rate)
      failures += failed
      print(f"round {r + 1}: direct {direct[-1]:.2f} img/s, served {rate:.2f} img/s", file=sys.stderr)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    latencies = []
    for i in range(10):
      t = time.perf_counter()
      status, _ = post(conn, {"classes": [i % gen.config.num_classes], "count": 1, "seed": i, "format": "png",
                              **settings})
      latencies.append(time.perf_counter() - t)
      assert status == 200, status
    conn.request("GET", "/api/health")
    stats = json.loads(conn.getresponse().read())["stats"]
    conn.close()
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
  cpu = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "unknown")
  print(json.dumps({
      "bundle": args.bundle, "batch": args.batch, "concurrency": args.concurrency, "settings": settings,
      "direct_images_per_s": round(statistics.median(direct), 3),
      "served_images_per_s": round(statistics.median(served), 3),
      # Each round pairs a direct and a served measurement taken one after the other: the median of the
      # paired ratios follows the shared machine's load less than a ratio of separate medians.
      "ratio": round(statistics.median([s / d for s, d in zip(served, direct)]), 3),
      "ratios_per_round": [round(s / d, 3) for s, d in zip(served, direct)],
      "non_200": failures, "single_request_latency_s_median": round(statistics.median(latencies), 4),
      "server_startup_s": round(startup, 1), "cpu": cpu, "cores": os.cpu_count(),
      "date": time.strftime("%Y-%m-%d"),
      "rows_per_sampler_call": round(stats["sampler_rows"] / max(stats["sampler_calls"], 1), 2),
      "padded_rows_per_call": round(stats["sampler_padded_rows"] / max(stats["sampler_calls"], 1), 2)}))


if __name__ == "__main__":
  main()
