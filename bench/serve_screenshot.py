"""Screenshots of the `imagefolder-jax serve` page for docs/ (headless Debian chromium via Playwright).

  python bench/serve_screenshot.py --bundle runs/demo/generator/bundle --out docs/serve.png

Starts the verb on a free port, samples --per-class images of the first --classes classes, then
shows the first sample scale by scale and the branch view of two demo photos (a reconstruction, a
resample that keeps one branch, a swap), and writes one screenshot per view: OUT (sampling),
OUT with _scales and _branches before the extension.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--bundle", default="runs/demo/generator/bundle")
  parser.add_argument("--out", default="docs/serve.png")
  parser.add_argument("--classes", type=int, default=3)
  parser.add_argument("--per-class", type=int, default=6)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  from playwright.sync_api import sync_playwright
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  command = [sys.executable, "-m", "imagefolder_jax.cli", "serve", "--bundle", args.bundle, "--port", "0",
             "--batch-sizes", "1,4,16"]
  server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
  line = server.stdout.readline()
  if "http://" not in line:
    server.kill()
    raise SystemExit(f"the server did not start: {line!r}")
  url = "http://" + line.split("http://")[1].split()[0]
  stem, ext = os.path.splitext(args.out)
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
      # bypass_csp: the page forbids eval, which wait_for_function uses.
      page = browser.new_page(viewport={"width": 1100, "height": 800}, bypass_csp=True)
      page.set_default_timeout(300_000)
      page.goto(url)
      page.wait_for_selector(".class-option")
      for class_id in range(args.classes):
        page.check(f".class-option[data-id='{class_id}']")
      page.fill("#count", str(args.per_class))
      page.fill("#seed", str(args.seed))
      page.click("#sample-btn")
      page.wait_for_function(f"document.querySelectorAll('#samples img').length === "
                             f"{args.classes * args.per_class}")
      page.screenshot(path=args.out, full_page=True)
      page.click("#samples img")
      page.wait_for_selector("#scales figure")
      page.wait_for_function("document.querySelectorAll('#scales img').length > 1")
      page.screenshot(path=f"{stem}_scales{ext}", full_page=True)
      page.click(".tabs button[data-tab='branches']")
      page.select_option("#demo-a", "chelsea")
      page.select_option("#demo-b", "coffee")
      page.select_option("#resample-class", "1")
      page.click("#keep-detail-btn")
      page.wait_for_selector("#resampled figure")
      page.click("#swap-btn")
      page.wait_for_selector("#swapped figure")
      page.screenshot(path=f"{stem}_branches{ext}", full_page=True)
      browser.close()
  finally:
    server.terminate()
    server.wait(timeout=60)
  print(f"wrote {args.out}, {stem}_scales{ext}, {stem}_branches{ext}")


if __name__ == "__main__":
  main()
