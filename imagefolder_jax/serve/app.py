"""The HTTP app: the page (static files) and a JSON/PNG/npz API over an `Engine`.

Routes (bodies are JSON unless an image is uploaded, then multipart/form-data):
  GET  /                     the page
  GET  /api/info             classes, scales, defaults, limits
  GET  /api/health           queue length and counters
  POST /api/sample           {classes, count, seed, cfg, top_k, top_p, temperature, format: json|png|npz}
                             (JSON, or the same fields as form fields)
  POST /api/scales           {ids: (P, L) token ids of one image, format: json|png} -> image after each scale
  POST /api/reconstruct      image (file) or demo (photo name) -> reconstruction, PSNR, ids
  POST /api/resample         image|demo, keep (detail|semantic), classes, count, seed, cfg, ... -> samples
  POST /api/swap             image_a|demo_a, image_b|demo_b -> both reconstructions and the two swaps
  GET  /api/demo-photo/NAME  a demo photo as PNG (the --reference file that reproduces a resample)
Every error is a JSON object {"error": one line} with a 4xx/5xx status: 400 bad input, 404, 413 body
too large, 503 busy (queue full), 504 over the time limit. No route reads a path the client names.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import logging
import os
import time
import urllib.parse
from typing import Any, Optional

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from imagefolder_jax.data import image_grid
from imagefolder_jax.serve.engine import Busy, Engine, TimedOut
from imagefolder_jax.serve.images import BadImage, decode_upload, model_input, png_bytes
from imagefolder_jax.serve.params import BadRequest, Limits, SampleParams, branch_name, defaults_for, sample_params
from imagefolder_jax.serve.programs import default_rows, progressive_decode

log = logging.getLogger("imagefolder_jax.serve")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# Uploads decoded at once: a 40-megapixel image takes ~120 MB as RGB while it is cropped.
DECODE_SLOTS = 2
# Bytes of an over-size body read and dropped before the 413 (HTTP clients such as curl and requests
# only read an answer once their body is sent); beyond it the connection is closed.
DRAIN_LIMIT = 512 * 1024 * 1024


class BodyTooLarge(Exception):
  pass


class LimitBody:
  """ASGI middleware: request bodies over `max_bytes` get a 413 (declared length checked first,
  streamed bodies counted), without the app ever holding more than `max_bytes` of them."""

  def __init__(self, app, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  def _message(self) -> str:
    return f"the request body is larger than the {self.max_bytes / 2 ** 20:g} MiB limit"

  @staticmethod
  async def _drain(receive) -> None:
    dropped = 0
    while dropped < DRAIN_LIMIT:
      message = await receive()
      dropped += len(message.get("body", b""))
      if message["type"] != "http.request" or not message.get("more_body"):
        return

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
      await self._drain(receive)
      response = JSONResponse({"error": self._message()}, status_code=413, headers={"Connection": "close"})
      return await response(scope, receive, send)
    seen = 0

    async def limited_receive():
      nonlocal seen
      message = await receive()
      if message["type"] == "http.request":
        seen += len(message.get("body", b""))
        if seen > self.max_bytes:
          if message.get("more_body"):
            await self._drain(receive)
          raise BodyTooLarge(self._message())
      return message

    return await self.app(scope, limited_receive, send)


def data_url(png: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def flat_ids(ids: list) -> np.ndarray:
  """ids[branch][scale] (B, n_s, n_s) -> (B, P, L) int32, as `Codes.flat`."""
  return np.stack([np.concatenate([np.asarray(s).reshape(s.shape[0], -1) for s in branch], axis=1)
                   for branch in ids], axis=1).astype(np.int32)


def unflat_ids(flat: np.ndarray, scales) -> list:
  """(B, P, L) -> ids[branch][scale] (B, n_s, n_s), as `Codes.from_flat` (host arrays)."""
  out, start = [[] for _ in range(flat.shape[1])], 0
  for side in scales:
    for p in range(flat.shape[1]):
      out[p].append(flat[:, p, start:start + side * side].reshape(-1, side, side))
    start += side * side
  return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR (dB) of two images in [-1, 1] (the CLI's `reconstruct` formula)."""
  mse = float(np.mean(((np.asarray(a) - np.asarray(b)) / 2.0) ** 2))
  return float(10 * np.log10(1.0 / max(mse, 1e-12)))


class Service:
  """The request handlers over one engine (state shared by the routes)."""

  def __init__(self, engine: Engine, bundle: str, names: list[str], names_origin: str, limits: Limits):
    self.engine, self.bundle, self.limits = engine, bundle, limits
    self.names, self.names_origin = names, names_origin
    gen = engine.generator
    self.tokenizer = gen.tokenizer
    self.scales = tuple(gen.config.scales)
    self.codebook_size = gen.config.codebook_size
    self.num_branches = gen.config.num_branches
    self.resolution = self.tokenizer.resolution
    self.decode_slots = asyncio.Semaphore(DECODE_SLOTS)
    # The page's and the API's defaults are the settings whose programs were compiled at start.
    self.defaults = dict(defaults_for(self.codebook_size), top_k=engine.settings.top_k,
                         top_p=engine.settings.top_p)

  # ----------------------------------------------------------------------------- helpers
  async def _json_body(self, request: Request) -> dict:
    raw = await request.body()
    try:
      body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError) as e:
      raise BadRequest(f"the body is not valid JSON ({' '.join(str(e).split())[:80]})") from None
    if not isinstance(body, dict):
      raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body

  async def _fields_or_json(self, request: Request) -> dict:
    """The body as a dict: JSON, or form fields (`curl -F classes=207,360 -F count=4`, strings).
    `curl -d '{...}'` without a Content-Type header says urlencoded but sends JSON: read as JSON."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
      form = await request.form(max_files=0, max_fields=16, max_part_size=64 * 1024)
      return {k: v for k, v in form.items()}
    if content_type.startswith("application/x-www-form-urlencoded"):
      raw = await request.body()
      if not raw.lstrip().startswith(b"{"):
        return dict(urllib.parse.parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
    return await self._json_body(request)

  def _format(self, body: dict, allowed: tuple[str, ...]) -> str:
    fmt = body.pop("format", "json")
    if fmt not in allowed:
      raise BadRequest(f"format must be one of {', '.join(allowed)}, got {fmt!r:.40}")
    return fmt

  async def _image(self, form, field: str) -> tuple[np.ndarray, str]:
    """(image (R, R, 3) in [-1, 1], label for the CLI line) from an uploaded file `field` or a
    demo photo named by `demo` + the field's suffix."""
    self.engine.check_capacity()  # a full queue answers busy before an upload is decoded for nothing
    demo_field = "demo" + field[len("image"):]
    upload, demo = form.get(field), form.get(demo_field)
    if upload is not None and not isinstance(upload, str):
      data = await upload.read()
      async with self.decode_slots:
        image = await run_in_threadpool(decode_upload, data, self.resolution, self.limits.max_pixels)
      # The client's file name only labels the command line shown (quoted there); nothing opens it.
      return image, os.path.basename(upload.filename or "") or "YOUR_IMAGE"
    if demo:
      return model_input(_demo_photo_array(str(demo)), self.resolution), f"{demo}.png"
    raise BadRequest(f"send an image file as '{field}' or a demo photo name as '{demo_field}'")

  def _samples_json(self, params: SampleParams, out: dict, command: str, started: float) -> dict:
    flat = flat_ids(out["ids"])
    labels = params.labels
    grid = png_bytes(image_grid(out["images"], nrow=params.count))
    npz = io.BytesIO()
    np.savez(npz, flat=flat, labels=np.asarray(labels))
    return {"labels": labels, "class_names": [self.names[c] for c in labels],
            "images": [data_url(png_bytes(x)) for x in out["images"]], "ids": flat.tolist(),
            "grid_png": data_url(grid), "npz": base64.b64encode(npz.getvalue()).decode("ascii"),
            "command": command, "seconds": round(time.perf_counter() - started, 3)}

  # ----------------------------------------------------------------------------- routes
  async def info(self, request: Request) -> Response:
    from imagefolder_jax.data.sources import DEMO_PHOTOS
    limits = self.limits
    return JSONResponse({
        "bundle": self.bundle, "classes": self.names, "class_names_from": self.names_origin,
        "num_classes": len(self.names) - 1, "scales": list(self.scales), "resolution": self.resolution,
        "num_branches": self.num_branches, "codebook_size": self.codebook_size,
        "branches": ["detail", "semantic"][:self.num_branches], "defaults": self.defaults,
        "limits": {"max_per_class": limits.max_per_class, "max_samples": limits.max_samples,
                   "max_cfg": limits.max_cfg, "max_temperature": limits.max_temperature,
                   "max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels},
        "demo_photos": list(DEMO_PHOTOS), "max_batch": self.engine.settings.max_batch})

  async def health(self, request: Request) -> Response:
    engine = self.engine
    return JSONResponse({"status": "ok", "queued": engine.queued(), "max_queue": engine.settings.max_queue,
                         "stats": dict(engine.stats)})

  async def sample(self, request: Request) -> Response:
    started = time.perf_counter()
    body = await self._fields_or_json(request)
    fmt = self._format(body, ("json", "png", "npz"))
    params = sample_params(body, self.names, self.codebook_size, self.limits, self.defaults)
    rows = default_rows(params.labels, params.seed, params.cfg, params.temperature)
    out = await self.engine.sample(rows, params.top_k, params.top_p, guidance=params.cfg > 0)
    command = params.command(self.bundle)
    headers = {"X-Command": command} if command.isascii() else {}
    if fmt == "png":
      return Response(png_bytes(image_grid(out["images"], nrow=params.count)), media_type="image/png",
                      headers=headers)
    if fmt == "npz":
      buffer = io.BytesIO()
      np.savez(buffer, flat=flat_ids(out["ids"]), labels=np.asarray(params.labels))
      return Response(buffer.getvalue(), media_type="application/octet-stream",
                      headers={**headers, "Content-Disposition": 'attachment; filename="samples.npz"'})
    return JSONResponse(self._samples_json(params, out, command, started))

  async def scales_view(self, request: Request) -> Response:
    body = await self._json_body(request)
    fmt = self._format(body, ("json", "png"))
    unknown = sorted(set(body) - {"ids"})
    if unknown:
      raise BadRequest(f"unknown parameter {unknown[0]!r:.60} (known: ids, format)")
    total = sum(s * s for s in self.scales)
    try:
      flat = np.asarray(body.get("ids"))
    except (TypeError, ValueError, OverflowError):
      flat = np.asarray(None)
    if flat.dtype.kind not in "iu":  # floats would be truncated to ids silently; bools are no ids
      raise BadRequest(f"ids must be a ({self.num_branches}, {total}) list of integer token ids")
    if flat.shape != (self.num_branches, total):
      raise BadRequest(f"ids must have shape ({self.num_branches}, {total}), got {flat.shape}")
    if flat.min() < 0 or flat.max() >= self.codebook_size:
      raise BadRequest(f"ids must be in [0, {self.codebook_size}), got {flat.min()}..{flat.max()}")
    ids = unflat_ids(flat[None].astype(np.int32), self.scales)
    images = (await self.engine.run(lambda: progressive_decode(self.tokenizer, ids)))[:, 0]  # (S, H, W, 3)
    if fmt == "png":
      return Response(png_bytes(image_grid(images, nrow=len(images))), media_type="image/png")
    return JSONResponse({"scales": list(self.scales), "images": [data_url(png_bytes(x)) for x in images]})

  def _encode_decode(self, images: np.ndarray) -> tuple[list, np.ndarray]:
    codes = self.tokenizer.encode(images)
    recon = np.asarray(self.tokenizer.decode(codes))
    return [[np.asarray(s) for s in branch] for branch in codes.ids], recon

  async def reconstruct(self, request: Request) -> Response:
    form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
    image, _ = await self._image(form, "image")
    ids, recon = await self.engine.run(lambda: self._encode_decode(image[None]))
    return JSONResponse({"original": data_url(png_bytes(image)),
                         "reconstruction": data_url(png_bytes(recon[0])),
                         "psnr": round(psnr(image, recon[0]), 3), "ids": flat_ids(ids)[0].tolist()})

  async def resample(self, request: Request) -> Response:
    started = time.perf_counter()
    form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    fields = {k: v for k, v in form.items() if isinstance(v, str) and k not in ("demo", "keep")}
    keep_name = form.get("keep", "detail")
    keep = branch_name(keep_name, self.num_branches)
    params = sample_params(fields, self.names, self.codebook_size, self.limits, self.defaults)
    image, reference = await self._image(form, "image")
    ids, recon = await self.engine.run(lambda: self._encode_decode(image[None]))
    n = len(params.labels)
    forced = {keep: [np.repeat(s, n, axis=0) for s in ids[keep]]}
    rows = default_rows(params.labels, params.seed, params.cfg, params.temperature, forced)
    out = await self.engine.sample(rows, params.top_k, params.top_p, guidance=params.cfg > 0)
    command = params.command(self.bundle, reference=reference, force=keep_name)
    result = self._samples_json(params, out, command, started)
    result.update(reference=data_url(png_bytes(image)), reconstruction=data_url(png_bytes(recon[0])),
                  kept=keep_name)
    return JSONResponse(result)

  async def swap(self, request: Request) -> Response:
    form = await request.form(max_files=2, max_fields=8, max_part_size=64 * 1024)
    image_a, _ = await self._image(form, "image_a")
    image_b, _ = await self._image(form, "image_b")
    if self.num_branches != 2:
      raise BadRequest(f"swapping needs a tokenizer with 2 branches, this one has {self.num_branches}")

    def work():
      # One image per call: the batch-1 programs compiled at start serve it (no compile at run time).
      ids_a, recon_a = self._encode_decode(image_a[None])
      ids_b, recon_b = self._encode_decode(image_b[None])
      mixed = [self.tokenizer.decode([detail, semantic])
               for detail, semantic in ((ids_a[0], ids_b[1]), (ids_b[0], ids_a[1]))]
      return np.concatenate([recon_a, recon_b]), np.concatenate([np.asarray(m) for m in mixed])

    recon, mixed = await self.engine.run(work)
    return JSONResponse({
        "a": data_url(png_bytes(image_a)), "b": data_url(png_bytes(image_b)),
        "reconstruction_a": data_url(png_bytes(recon[0])), "reconstruction_b": data_url(png_bytes(recon[1])),
        "psnr_a": round(psnr(image_a, recon[0]), 3), "psnr_b": round(psnr(image_b, recon[1]), 3),
        "detail_a_semantic_b": data_url(png_bytes(mixed[0])),
        "detail_b_semantic_a": data_url(png_bytes(mixed[1]))})

  async def demo_photo(self, request: Request) -> Response:
    return Response(_demo_photo_png(request.path_params["name"]), media_type="image/png",
                    headers={"Cache-Control": "max-age=3600"})


def _demo_photo_array(name: str) -> np.ndarray:
  from imagefolder_jax.data.sources import DEMO_PHOTOS, demo_photo
  if name not in DEMO_PHOTOS:
    raise BadRequest(f"unknown demo photo {name!r:.40} (known: {', '.join(DEMO_PHOTOS)})")
  return demo_photo(name)


@functools.lru_cache(maxsize=16)
def _demo_photo_png(name: str) -> bytes:
  return png_bytes(_demo_photo_array(name))


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
  return JSONResponse({"error": " ".join(str(message).split())[:500]}, status_code=status, headers=headers)


async def _on_error(request: Request, exc: Exception) -> Response:
  if isinstance(exc, (BadRequest, BadImage)):
    return _error(400, str(exc))
  if isinstance(exc, BodyTooLarge):
    return _error(413, str(exc), {"Connection": "close"})
  if isinstance(exc, Busy):
    return _error(503, str(exc), {"Retry-After": "1"})
  if isinstance(exc, TimedOut):
    return _error(504, str(exc))
  if isinstance(exc, HTTPException):
    return _error(exc.status_code, exc.detail or "error", exc.headers)
  log.exception("serve: unexpected error on %s", request.url.path)
  return _error(500, f"internal error: {type(exc).__name__}: {exc}")


def create_app(engine: Engine, bundle: str, names: list[str], names_origin: str = "",
               limits: Limits = Limits()) -> Any:
  """The ASGI app (body-size limit outermost). `engine` must be started by the caller."""
  service = Service(engine, bundle, names, names_origin, limits)

  async def index(request: Request) -> Response:
    # Inline data: URLs are how results come back; nothing else is loaded from elsewhere.
    csp = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"
    return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Content-Security-Policy": csp})

  routes = [
      Route("/", index),
      Route("/api/info", service.info),
      Route("/api/health", service.health),
      Route("/api/sample", service.sample, methods=["POST"]),
      Route("/api/scales", service.scales_view, methods=["POST"]),
      Route("/api/reconstruct", service.reconstruct, methods=["POST"]),
      Route("/api/resample", service.resample, methods=["POST"]),
      Route("/api/swap", service.swap, methods=["POST"]),
      Route("/api/demo-photo/{name}", service.demo_photo),
      Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
  ]
  errors = (BadRequest, BadImage, BodyTooLarge, Busy, TimedOut, HTTPException, Exception)
  handlers = {e: _on_error for e in errors}
  app = Starlette(routes=routes, exception_handlers=handlers)
  return LimitBody(app, limits.max_upload_bytes)
