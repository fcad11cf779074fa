"""The README's screenshot: the real page, a real run, in Debian's Chromium.

Usage::

    python bench/page_screenshot.py                         # SmolLM2 + the demo libraries -> docs/screenshot.png
    python bench/page_screenshot.py --library /tmp/lib --base-model tiny-random-llama --out /tmp/page.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.test_browser import CHROMIUM, start_app  # noqa: E402  (one way to start the page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--library", action="append", default=None)
    parser.add_argument("--prompt", default="Reverse the letters of this word: garden")
    parser.add_argument("--max-new", type=int, default=12)
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--height", type=int, default=1750, help="pixels of the page to keep, from the top")
    args = parser.parse_args()
    app_args = ["--base-model", args.base_model]
    for lib in args.library or []:
        app_args += ["--library", lib]
    from playwright.sync_api import sync_playwright

    proc, url = start_app(app_args, timeout=300)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": args.height}, device_scale_factor=1)
            page.goto(url)
            page.wait_for_selector("#status :text('ready')", timeout=300_000)
            page.fill("#prompt textarea", args.prompt)
            page.locator("input[aria-label='number input for max new tokens']").fill(str(args.max_new))
            page.locator("input[aria-label='number input for max new tokens']").press("Enter")
            page.click("#run")
            page.wait_for_selector("#heatmap .js-plotly-plot .xtick text", timeout=600_000)
            page.wait_for_function("document.querySelector('#generated textarea').value.length > 0")
            page.wait_for_timeout(1500)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, clip={"x": 0, "y": 0, "width": 1400, "height": args.height})
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
