"""The HTTP API of `imagefolder-jax serve` on a tiny bundle: results equal the CLI's, bad input gets
a one-line 4xx and leaves the server serving, concurrency is batched and bounded, time limits hold."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import shlex
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from .helpers import NUM_CLASSES, SERVE_SCALES, TOP_K, TOP_P, ServerThread

NUM_TOKENS = sum(s * s for s in SERVE_SCALES)
GOOD = {"classes": [3], "count": 2, "seed": 1, "top_k": TOP_K, "top_p": TOP_P}


@pytest.fixture(scope="module")
def server(tiny_bundle):
  srv = ServerThread(tiny_bundle)
  yield srv
  srv.close()


def request(url: str, body=None, content_type: str = "application/json", method: str = "POST",
            timeout: float = 120.0) -> tuple[int, Any, bytes]:
  """(status, headers (case-insensitive), body bytes); `body` as JSON unless it is bytes."""
  data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
  req = urllib.request.Request(url, data=data, method=method if data is not None else "GET",
                               headers={"Content-Type": content_type} if data is not None else {})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, r.headers, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers, e.read()


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
  boundary = "test-boundary-7d1f"
  parts = []
  for name, value in fields.items():
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
  for name, data in files.items():
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
  return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png(width: int = 40, height: int = 36, seed: int = 0) -> bytes:
  rng = np.random.default_rng(seed)
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def bomb_png(side: int = 30000) -> bytes:
  """A valid 1-bit PNG of side x side pixels (~110 KB; 900 megapixels, ~2.7 GB as RGB)."""
  row = b"\x00" + b"\x00" * ((side + 7) // 8)
  compressor, chunks = zlib.compressobj(9), []
  for _ in range(side):
    chunks.append(compressor.compress(row))
  data = b"".join(chunks) + compressor.flush()

  def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

  header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def from_data_url(url: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))))


def sample_ok(url: str) -> dict:
  status, _, body = request(url + "/api/sample", GOOD)
  assert status == 200, body[:300]
  return json.loads(body)


# ------------------------------------------------------------------------------------ results
def test_sample_equals_cli_tokens_and_formats(server, tmp_path):
  """The page's command line, run through the CLI, writes the same ids the API returned."""
  from imagefolder_jax.cli import main
  # The largest seed: the server builds keys from int32 seeds in its program, the CLI from a Python int.
  body = {"classes": [1, "class 4"], "count": 2, "seed": 2 ** 31 - 1, "cfg": 2.0, "top_k": TOP_K,
          "top_p": TOP_P, "temperature": 0.9}
  status, _, raw = request(server.url + "/api/sample", body)
  assert status == 200, raw[:300]
  out = json.loads(raw)
  flat = np.asarray(out["ids"])
  assert flat.shape == (4, 2, NUM_TOKENS) and out["labels"] == [1, 1, 4, 4]
  words = shlex.split(out["command"])
  assert words[:2] == ["imagefolder-jax", "sample"]
  words[words.index("--out") + 1] = str(tmp_path / "grid.png")
  words[words.index("--save-npz") + 1] = str(tmp_path / "ids.npz")
  assert main(words[1:]) == 0
  cli = np.load(tmp_path / "ids.npz")
  np.testing.assert_array_equal(cli["flat"], flat)
  np.testing.assert_array_equal(cli["labels"], out["labels"])
  # The npz and PNG formats hold the same samples; the PNG grid has the CLI's layout and pixels.
  status, headers, raw = request(server.url + "/api/sample", dict(body, format="npz"))
  assert status == 200 and headers["X-Command"] == out["command"]
  np.testing.assert_array_equal(np.load(io.BytesIO(raw))["flat"], flat)
  status, headers, raw = request(server.url + "/api/sample", dict(body, format="png"))
  assert status == 200 and headers["Content-Type"] == "image/png"
  grid, cli_grid = np.asarray(Image.open(io.BytesIO(raw))), np.asarray(Image.open(tmp_path / "grid.png"))
  assert grid.shape == cli_grid.shape == (2 * 32 + 6, 2 * 32 + 6, 3)
  assert np.abs(grid.astype(int) - cli_grid).max() <= 1


def test_form_fields_and_json_without_its_content_type(server):
  """`curl -F`/`-d a=b` fields and `curl -d '{...}'` (sent as urlencoded) give the JSON request's ids."""
  want = sample_ok(server.url)["ids"]
  fields = {k: str(v) if not isinstance(v, list) else ",".join(map(str, v)) for k, v in GOOD.items()}
  for body, kind in ((urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded"),
                     (json.dumps(GOOD).encode(), "application/x-www-form-urlencoded"),
                     multipart(fields, {})):
    status, _, raw = request(server.url + "/api/sample", body, kind)
    assert status == 200, raw[:300]
    assert json.loads(raw)["ids"] == want


def test_scales_end_at_the_decoded_image(server):
  out = sample_ok(server.url)
  status, _, raw = request(server.url + "/api/scales", {"ids": out["ids"][0]})
  assert status == 200, raw[:300]
  scales = json.loads(raw)
  assert scales["scales"] == list(SERVE_SCALES) and len(scales["images"]) == len(SERVE_SCALES)
  last, first, final = (from_data_url(scales["images"][-1]), from_data_url(scales["images"][0]),
                        from_data_url(out["images"][0]))
  assert np.abs(last.astype(int) - final).max() <= 1
  assert np.abs(first.astype(int) - final).max() > 10  # one token per branch is not the whole image


def test_upload_reconstruct_resample_swap(server):
  image = png(seed=1)
  body, kind = multipart({}, {"image": image})
  status, _, raw = request(server.url + "/api/reconstruct", body, kind)
  assert status == 200, raw[:300]
  recon = json.loads(raw)
  assert np.isfinite(recon["psnr"]) and np.asarray(recon["ids"]).shape == (2, NUM_TOKENS)
  # Keep the detail branch of the upload, resample the semantic one (teacher-forced, paper 4.3).
  body, kind = multipart({"keep": "detail", "classes": "2", "count": "3", "seed": "5", "cfg": "1.5",
                          "top_k": str(TOP_K), "top_p": str(TOP_P)}, {"image": image})
  status, _, raw = request(server.url + "/api/resample", body, kind)
  assert status == 200, raw[:300]
  resampled = json.loads(raw)
  ids = np.asarray(resampled["ids"])
  assert ids.shape == (3, 2, NUM_TOKENS)
  np.testing.assert_array_equal(ids[:, 0], np.repeat(np.asarray(recon["ids"])[None, 0], 3, axis=0))
  assert (ids[:, 1] != np.asarray(recon["ids"])[1]).any()
  assert "--reference" in resampled["command"] and "--force detail" in resampled["command"]
  body, kind = multipart({"demo_b": "coffee"}, {"image_a": image})
  status, _, raw = request(server.url + "/api/swap", body, kind)
  assert status == 200, raw[:300]
  swapped = json.loads(raw)
  wanted = {"detail_a_semantic_b", "detail_b_semantic_a", "reconstruction_a", "reconstruction_b"}
  assert wanted <= swapped.keys()
  # The swap decodes A's detail tokens with B's semantic tokens (and the reverse).
  from imagefolder_jax.data import to_uint8
  from imagefolder_jax.data.sources import demo_photo
  from imagefolder_jax.serve.images import decode_upload, model_input
  tokenizer = server.generator.tokenizer
  a = tokenizer.encode(decode_upload(image, 32)[None]).ids
  b = tokenizer.encode(model_input(demo_photo("coffee"), 32)[None]).ids
  for key, ids in (("detail_a_semantic_b", [a[0], b[1]]), ("detail_b_semantic_a", [b[0], a[1]])):
    want = to_uint8(np.asarray(tokenizer.decode(ids))[0])
    assert np.abs(from_data_url(swapped[key]).astype(int) - want).max() <= 1, key


# ------------------------------------------------------------------------------------ bad input
class Form(dict):
  """Fields sent urlencoded (as `curl -d classes=3 ...`)."""


BIG = b"\x89PNG" + b"\x00" * (50 * 1024 * 1024)
BAD_REQUESTS = {
    "unknown class id": ("/api/sample", {"classes": [NUM_CLASSES + 1]}, 400, "unknown class id"),
    "unknown class name": ("/api/sample", {"classes": ["zebra"]}, 400, "unknown class 'zebra'"),
    "cfg below 0": ("/api/sample", dict(GOOD, cfg=-1), 400, "cfg"),
    "cfg too large": ("/api/sample", dict(GOOD, cfg=1e9), 400, "cfg"),
    "top-k negative": ("/api/sample", dict(GOOD, top_k=-1), 400, "top_k"),
    "top-k over the codebook": ("/api/sample", dict(GOOD, top_k=65), 400, "top_k"),
    "top-p zero": ("/api/sample", dict(GOOD, top_p=0), 400, "top_p"),
    "top-p over 1": ("/api/sample", dict(GOOD, top_p=1.5), 400, "top_p"),
    "temperature zero": ("/api/sample", dict(GOOD, temperature=0), 400, "temperature"),
    "temperature not a number": ("/api/sample", dict(GOOD, temperature="hot"), 400, "temperature"),
    "count zero": ("/api/sample", dict(GOOD, count=0), 400, "count"),
    "count too large": ("/api/sample", dict(GOOD, count=1000), 400, "count"),
    "seed negative": ("/api/sample", dict(GOOD, seed=-3), 400, "seed"),
    "unknown parameter": ("/api/sample", dict(GOOD, cfgg=1), 400, "unknown parameter 'cfgg'"),
    "not json": ("/api/sample", b"{classes: 1", 400, "not valid JSON"),
    "form field out of range": ("/api/sample", Form(classes="3", count="2", top_p="2"), 400, "top_p"),
    "bad ids": ("/api/scales", {"ids": [[1, 2]]}, 400, "shape"),
    "fractional ids": ("/api/scales", {"ids": [[0.5] * NUM_TOKENS] * 2}, 400, "integer token ids"),
    "non-image upload": ("/api/reconstruct", {"image": b"this is not an image"}, 400, "not an image"),
    "truncated image": ("/api/reconstruct", {"image": png(300, 300)[:2000]}, 400, "truncated"),
    "50 MB upload": ("/api/reconstruct", {"image": BIG}, 413, "larger than"),
    "30000x30000 bomb": ("/api/reconstruct", {"image": bomb_png()}, 400, "megapixels"),
    "no image": ("/api/reconstruct", {}, 400, "send an image file"),
    "client-named path": ("/api/reconstruct", {"demo": "../../etc/passwd"}, 400, "unknown demo photo"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_one_line_4xx_and_the_next_request_works(server, name):
  path, payload, want_status, want_text = BAD_REQUESTS[name]
  if path == "/api/reconstruct":
    files = {k: v for k, v in payload.items() if isinstance(v, bytes)}
    body, kind = multipart({k: v for k, v in payload.items() if isinstance(v, str)}, files)
    status, _, raw = request(server.url + path, body, kind)
  elif isinstance(payload, Form):
    status, _, raw = request(server.url + path, urllib.parse.urlencode(payload).encode(),
                             "application/x-www-form-urlencoded")
  else:
    status, _, raw = request(server.url + path, payload)
  message = json.loads(raw)["error"]
  assert status == want_status, message
  assert want_text in message and "\n" not in message and len(message) < 300
  assert len(sample_ok(server.url)["images"]) == 2


def test_paths_stay_inside_the_package(server):
  paths = ("/static/../../bundle.json", "/static/%2e%2e/%2e%2e/pyproject.toml", "/api/demo-photo/..%2Fapp.py")
  for path in paths:
    status, _, raw = request(server.url + path, method="GET")
    assert status in (400, 404), (path, status, raw[:200])
  status, headers, _ = request(server.url + "/api/demo-photo/coffee", method="GET")
  assert status == 200 and headers["Content-Type"] == "image/png"


# ------------------------------------------------------------------------------------ load
def _concurrent_samples(url: str, count: int, per_request: int) -> list[tuple[int, dict]]:
  barrier = threading.Barrier(count)

  def one(i):
    barrier.wait()
    body = {"classes": [i % NUM_CLASSES], "count": per_request, "seed": 100 + i, "top_k": TOP_K,
            "top_p": TOP_P}
    status, _, raw = request(url + "/api/sample", body)
    return status, json.loads(raw)

  with concurrent.futures.ThreadPoolExecutor(count) as pool:
    return list(pool.map(one, range(count)))


def test_32_concurrent_requests_answer_batched_with_unchanged_tokens(server):
  calls_before = server.engine.stats["sampler_calls"]
  results = _concurrent_samples(server.url, 32, 1)
  assert [s for s, _ in results] == [200] * 32
  calls = server.engine.stats["sampler_calls"] - calls_before
  assert calls < 32, f"{calls} sampler calls for 32 requests: nothing was batched"
  # Sharing a call changes no token: request 5 alone gives what it got among the 32.
  alone = request(server.url + "/api/sample", {"classes": [5], "count": 1, "seed": 105, "top_k": TOP_K,
                                               "top_p": TOP_P})
  assert np.array_equal(json.loads(alone[2])["ids"], results[5][1]["ids"])


def test_queue_bound_4_answers_busy_and_recovers(server, tiny_bundle):
  small = ServerThread(tiny_bundle, max_queue=4, share=server)
  try:
    results = _concurrent_samples(small.url, 32, 16)
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 4 and statuses.count(503) >= 1, statuses
    busy = next(body["error"] for s, body in results if s == 503)
    assert "busy" in busy and "\n" not in busy
    assert len(sample_ok(small.url)["images"]) == 2
  finally:
    small.close()


def test_time_limit_answers_504_and_a_full_queue_refuses_uploads(server, tiny_bundle):
  """A stalled worker (not started): one request fills a queue of 1 and times out; an upload meanwhile
  is refused as busy; once the worker runs, the late request is dropped unrun and the next one works."""
  stalled = ServerThread(tiny_bundle, max_queue=1, request_timeout=2.0, share=server, start=False)
  try:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      started = time.monotonic()
      waiting = pool.submit(request, stalled.url + "/api/sample", GOOD)
      while stalled.engine.queued() == 0:
        time.sleep(0.01)
      body, kind = multipart({}, {"image": png()})
      status, headers, raw = request(stalled.url + "/api/reconstruct", body, kind)
      assert status == 503 and "busy" in json.loads(raw)["error"] and headers["Retry-After"] == "1"
      status, _, raw = waiting.result()
    assert status == 504 and "2 s limit" in json.loads(raw)["error"]
    assert 2.0 <= time.monotonic() - started < 15
    stalled.engine.start(warm=False)
    assert len(sample_ok(stalled.url)["images"]) == 2
    assert stalled.engine.stats["expired"] == 1  # the late request was dropped, never computed
  finally:
    stalled.close()


# ------------------------------------------------------------------------------------ the verb
def test_cli_verb_binds_localhost_and_needs_the_extra(tiny_bundle):
  from imagefolder_jax.cli import build_parser
  assert build_parser().parse_args(["serve", "--bundle", "b"]).host == "127.0.0.1"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # Without the serve extra: --help still lists the verb; the verb itself is a one-line error, exit 2.
  missing = ("import sys; sys.modules['starlette'] = sys.modules['uvicorn'] = None; "
             "from imagefolder_jax.cli import main; print('help exit', main(['--help'])); "
             f"sys.exit(main(['serve', '--bundle', {tiny_bundle!r}]))")
  result = subprocess.run([sys.executable, "-c", missing], env=env, capture_output=True, text=True,
                          timeout=120)
  assert "help exit 0" in result.stdout and "serve" in result.stdout
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0 and 'pip install -e ".[serve]"' in result.stderr
  # The workdir holding bundle/ is accepted as --bundle (the demo's runs/demo serves its generator bundle).
  command = [sys.executable, "-m", "imagefolder_jax.cli", "serve", "--bundle", os.path.dirname(tiny_bundle),
             "--port", "0", "--no-warm"]
  proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    url = line.split("http://")[1].split("/")[0]
    status, _, raw = request(f"http://{url}/api/info", method="GET")
    info = json.loads(raw)
    assert status == 200 and info["num_classes"] == NUM_CLASSES and info["bundle"] == tiny_bundle
  finally:
    proc.terminate()
    proc.wait(timeout=30)
