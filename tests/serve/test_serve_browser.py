"""The page of `imagefolder-jax serve`, driven by a real headless browser (Debian's chromium through
Playwright; nothing downloads a browser). In CI (CI=true) a missing browser fails the tests; elsewhere
it skips them."""
from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from imagefolder_jax.data import load_image_file, to_uint8

from .helpers import NUM_CLASSES, SERVE_SCALES, TOP_K, ServerThread

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking switches chromium keeps calling out to a network that is closed.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


def _browser_missing() -> str:
  if not os.path.exists(CHROMIUM):
    return f"{CHROMIUM} is absent (apt-get install chromium)"
  try:
    import playwright.sync_api  # noqa: F401
  except ImportError:
    return "playwright is not installed (the test extra)"
  return ""


if _browser_missing() and os.environ.get("CI") != "true":
  pytest.skip(_browser_missing(), allow_module_level=True)


@pytest.fixture(scope="module")
def server(tiny_bundle):
  srv = ServerThread(tiny_bundle)
  yield srv
  srv.close()


@pytest.fixture(scope="module")
def browser():
  from playwright.sync_api import sync_playwright
  with sync_playwright() as p:
    chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield chromium
    chromium.close()


@pytest.fixture
def page(browser, server):
  # The page's Content-Security-Policy forbids eval, which Playwright's wait_for_function uses.
  context = browser.new_context(viewport={"width": 1200, "height": 900}, bypass_csp=True)
  page = context.new_page()
  page.set_default_timeout(TIMEOUT_MS)
  page.goto(server.url + "/")
  page.wait_for_selector(".class-option")
  yield page
  context.close()


def natural_sizes(page, selector: str) -> list[list[int]]:
  return page.eval_on_selector_all(selector, "els => els.map(e => [e.naturalWidth, e.naturalHeight])")


def sample_class(page, class_id: int, count: int) -> None:
  page.fill("#class-search", f"class {class_id}")
  page.check(f".class-option[data-id='{class_id}']")
  page.fill("#count", str(count))
  page.click("#sample-btn")
  page.wait_for_function(f"document.querySelectorAll('#samples img').length === {count}")


def test_a_sample_appears_for_a_chosen_class(page):
  options = page.eval_on_selector_all(".class-option", "els => els.length")
  assert options == NUM_CLASSES + 1  # and the unconditional class
  assert page.input_value("#top-k") == str(TOP_K)  # the server's warm settings are the page's defaults
  sample_class(page, 6, 3)
  assert natural_sizes(page, "#samples img") == [[32, 32]] * 3
  captions = page.eval_on_selector_all("#samples figcaption", "els => els.map(e => e.textContent)")
  assert all(c.startswith("class 6") for c in captions), captions
  command = page.inner_text("#command-text")
  assert "--classes 6 --per-class 3" in command and f"--top-k {TOP_K}" in command
  assert page.get_attribute("#download-png", "href").startswith("data:image/png")
  assert page.is_hidden("#error")
  # A bad setting shows the server's one-line message on the page; the next request works.
  page.fill("#cfg", "-1")
  page.click("#sample-btn")
  page.wait_for_selector("#error:not([hidden])")
  assert "cfg must be" in page.inner_text("#error")
  page.fill("#cfg", "2")
  page.click("#sample-btn")
  page.wait_for_selector("#error", state="hidden")


def test_the_scale_view_shows_every_scale(page):
  sample_class(page, 2, 1)
  page.click("#samples img")
  page.wait_for_function(f"document.querySelectorAll('#scales img').length === {len(SERVE_SCALES)}")
  captions = page.eval_on_selector_all("#scales figcaption", "els => els.map(e => e.textContent)")
  assert captions == [f"scale {i + 1}: {s}×{s}" for i, s in enumerate(SERVE_SCALES)]
  assert natural_sizes(page, "#scales img") == [[32, 32]] * len(SERVE_SCALES)
  assert page.is_visible("#tab-scales") and page.is_hidden("#tab-sample")


def test_an_uploaded_image_comes_back_reconstructed(page, server, tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "upload.png"
  Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
  page.click(".tabs button[data-tab='branches']")
  page.set_input_files("#upload-a", str(path))
  page.click("#reconstruct-btn")
  page.wait_for_selector("#psnr")
  assert natural_sizes(page, "#reconstruction img") == [[32, 32], [32, 32]]
  text = page.inner_text("#psnr")
  assert text.startswith("PSNR ") and text.endswith(" dB") and np.isfinite(float(text.split()[1]))
  # The reconstruction on the page is the tokenizer's reconstruction of the upload.
  src = page.get_attribute("#reconstruction figure:nth-child(2) img", "src")
  shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",")[1]))))
  tokenizer = server.generator.tokenizer
  want = to_uint8(np.asarray(tokenizer.decode(tokenizer.encode(load_image_file(path, 32)[None])))[0])
  assert np.abs(shown.astype(int) - want).max() <= 1
