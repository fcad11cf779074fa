"""The real page in a real browser: app.py as a subprocess on a tiny twin + tiny library, driven by Playwright
through Debian's Chromium. Checks the heatmap's content, the Library map, that a hostile prompt stays text, and
that no request leaves 127.0.0.1."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.page_fixtures import TASKS, TINY, make_tiny_library

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> reverse apple'
SCREENSHOT = ROOT / ".cache" / "browser-tiny.png"  # a look at the last run (ignored by git)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(args: list[str], timeout: float = 120) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise TimeoutError(f"app.py did not serve {url} within {timeout} s")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    lib = make_tiny_library(tmp_path_factory.mktemp("page") / "tiny-lib", n_experts=5)
    proc, url = start_app(["--base-model", TINY, "--library", lib])
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM,
                               args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests, dialogs = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url)
    page.wait_for_selector("#prompt textarea", timeout=60_000)
    return page, requests, dialogs


def run_prompt(page, text: str):
    page.fill("#prompt textarea", text)
    page.click("#run")
    page.wait_for_selector("#heatmap .js-plotly-plot .xtick text", timeout=120_000)
    page.wait_for_function("document.querySelector('#generated textarea').value.length > 0", timeout=60_000)


def test_route_heatmap_and_library_map(app, browser):
    page, requests, dialogs = open_page(browser, app)
    run_prompt(page, "Reverse the word: apple")
    ticks = page.locator("#heatmap .xtick text").all_text_contents()
    assert "apple" in "".join(ticks) and any("everse" in t for t in ticks)
    assert page.locator("#heatmap .legendtext").count() >= 1  # expert names in the legend
    # layers on the y axis: the tiny twin has two
    assert page.locator("#heatmap .ytick text").all_text_contents() == ["0", "1"]
    # the token strip: click a token, its layer x expert routing appears
    page.locator("#token-strip .token").nth(2).click()
    page.wait_for_selector("#token-experts .js-plotly-plot .gtitle", timeout=60_000)
    assert "Experts of token" in page.locator("#token-experts .gtitle").text_content()
    page.get_by_role("tab", name="Library").click()
    page.wait_for_selector("#similarity-map .js-plotly-plot .point", timeout=60_000)
    points = page.locator("#similarity-map .scatterlayer .point").count()
    assert points == 5  # one point per task
    labels = page.locator("#similarity-map .textpoint").all_text_contents()
    assert sorted(labels) == sorted(TASKS[:5])
    assert page.locator("#experts-table").inner_text().count("private") == 5
    page.get_by_role("tab", name="Explore").click()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    outside = [u for u in requests if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]
    assert outside == [], f"requests left 127.0.0.1: {outside}"
    assert dialogs == []


def test_hostile_prompt_is_shown_as_text_never_run(app, browser):
    page, requests, dialogs = open_page(browser, app)
    run_prompt(page, XSS)
    page.wait_for_timeout(500)
    assert page.evaluate("window.__xss") is None
    assert dialogs == []
    ticks = "".join(page.locator("#heatmap .xtick text").all_text_contents())
    assert "<img" in ticks or "img" in ticks  # the markup is visible as text on the axis
    assert page.locator("#heatmap img").count() == 0 and page.locator("#heatmap script").count() == 0
    # hover a cell: the hover label shows the token as text too
    page.locator("#heatmap").scroll_into_view_if_needed()
    box = page.locator("#heatmap .nsewdrag").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
    page.wait_for_selector("#heatmap .hoverlayer .hovertext", timeout=10_000)
    hover = page.locator("#heatmap .hoverlayer").text_content()
    assert "layer" in hover and "token" in hover
    assert page.evaluate("window.__xss") is None
    assert not [u for u in requests if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]


def test_empty_prompt_shows_a_message_not_an_error(app, browser):
    page, _, dialogs = open_page(browser, app)
    page.fill("#prompt textarea", "   ")
    page.click("#run")
    page.wait_for_selector("#notice :text('The prompt is empty')", timeout=60_000)
    assert page.locator(".toast-body.error, .error").count() == 0
    assert dialogs == []
