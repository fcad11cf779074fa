"""A screenshot of the instrument in use at 1440 x 900 (the whole page, the first 900 px being the screen): a
routed prompt, a clicked cell's drill-down, a map pick lighting the grid, and a counterfactual with its regenerated
answer, through Debian's Chromium.

Usage::

    python bench/page_screenshot.py                               # SmolLM2 + demo-mbc -> /tmp/instrument.png
    python bench/page_screenshot.py --out docs/screenshot.png --prompt "Add these numbers: 47 + 28"
    python bench/page_screenshot.py --base-model tiny-random-llama --library /tmp/lib
    python bench/page_screenshot.py --out docs/screenshot.png --card-out docs/report_card.png   # + the Library tab

Starts `app.py` on a free port, drives it with Playwright, stops it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.app_latency import start, stop  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--library", default=str(ROOT / "assets" / "libraries" / "demo-mbc"))
    parser.add_argument("--prompt", default="Convert this date to MM/DD/YYYY: 2021-07-04")
    parser.add_argument("--out", default="/tmp/instrument.png")
    parser.add_argument("--routing", choices=["default", "token", "prompt"], default="default",
                        help="the routing radio: the library's default, or per token / per prompt")
    parser.add_argument("--card-out", default=None, help="also a screenshot of the Library tab's report card")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    proc, url, _ = start(["--base-model", args.base_model, "--library", args.library])
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url)
            page.wait_for_selector("#map .x-map[data-ready]", timeout=300_000)
            page.fill("#max-new input[type=number]", "16")
            page.press("#max-new input[type=number]", "Tab")
            if args.routing != "default":
                page.locator("#granularity label").filter(has_text=f"per {args.routing}").click()
            page.fill("#prompt textarea", args.prompt)
            page.click("#run")
            page.wait_for_selector("#grid .x-grid[data-ready] .xtick text", timeout=300_000)
            box = page.locator("#grid .nsewdrag").first.bounding_box()
            x, y = page.evaluate("""() => { const d = JSON.parse(document.querySelector('#grid .x-grid').dataset
                .payload); const l = document.querySelector('#grid .x-plot')._fullLayout;
                const t = d.positions.length - 3, mid = Math.floor(d.layers.length / 2);  // a routed row, mid-grid
                const rows = d.layers.map((_, i) => i).filter(i => d.idx[i][t] >= 0)
                    .sort((a, b) => Math.abs(a - mid) - Math.abs(b - mid));
                return [l.xaxis.l2p(t), l.yaxis.l2p(rows.length ? rows[0] : mid)]; }""")
            page.mouse.click(box["x"] + x, box["y"] + y)
            page.wait_for_selector("#drill .x-drill", timeout=60_000)
            page.locator("#map .scatterlayer .point").first.click(force=True)
            page.wait_for_selector("#grid .x-grid[data-highlighted]", timeout=30_000)
            page.click("#cf-run")
            page.wait_for_selector("#cf-out .x-diff, #cf-out .x-error", timeout=120_000)  # the regenerated
            #                                                      answer's difference (or a refusal), not "…"
            page.evaluate("window.scrollTo(0, 0)")
            page.locator("#drill tr.x-exp").first.hover()  # its points grow on the map
            page.wait_for_timeout(500)
            page.screenshot(path=args.out, full_page=True)
            if args.card_out:
                page.get_by_role("tab", name="Library").click()
                page.wait_for_function("document.querySelector('#report-card').innerText.includes('explain')",
                                       timeout=120_000)
                page.wait_for_selector("#report-layers .js-plotly-plot", timeout=60_000)
                page.wait_for_timeout(1000)
                page.screenshot(path=args.card_out, full_page=True)
            browser.close()
    finally:
        stop(proc)
    print(f"wrote {args.out}" + (f" and {args.card_out}" if args.card_out else ""))


if __name__ == "__main__":
    main()
