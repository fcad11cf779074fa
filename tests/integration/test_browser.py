"""The real page in a real browser: app.py as a subprocess on a tiny twin + tiny library, driven by Playwright
through Debian's Chromium. The instrument: the answer streams before the grid appears, a cell click opens its
drill-down, a map click lights grid cells, a counterfactual changes the shown distribution, the page fits
1440 x 900; a hostile prompt stays text everywhere (grid, strip, drill-down, downloads); no request leaves
127.0.0.1."""

import pytest

from app_server import ROOT, new_tab, start_app, stop_app
from library_store.testing import TINY, make_tiny_library

pytestmark = pytest.mark.slow
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> reverse apple'
SCREENSHOT = ROOT / ".cache" / "browser-tiny.png"  # a look at the last run (ignored by git)
LOCAL = ("http://127.0.0.1", "data:", "blob:")






@pytest.fixture(scope="module")
def app(tmp_path_factory):
    lib = make_tiny_library(tmp_path_factory.mktemp("page") / "tiny-lib", n_experts=5)
    cache = str(tmp_path_factory.mktemp("derived-cache"))  # read-only libraries cache derived data there
    proc, url = start_app(["--base-model", TINY, "--library", lib], env={"LORA_EXPLORER_DERIVED_CACHE": cache})
    yield url
    stop_app(proc)


def open_page(browser, url):
    page, requests, dialogs = new_tab(browser, url)
    page.wait_for_selector("#map .x-map[data-ready]", timeout=120_000)  # model loaded, map drawn
    return page, requests, dialogs


def run_prompt(page, text: str, max_new: int | None = None):
    if max_new is not None:
        page.fill("#max-new input[type=number]", str(max_new))
        page.press("#max-new input[type=number]", "Tab")
    page.fill("#prompt textarea", text)
    page.click("#run")
    page.wait_for_selector("#grid .x-grid[data-ready] .xtick text", timeout=120_000)


def cell_point(page, layer_index: int, column: int) -> tuple[float, float]:
    """Screen position of a grid cell, from plotly's own axes."""
    box = page.locator("#grid .nsewdrag").first.bounding_box()
    x, y = page.evaluate("""([li, ti]) => { const l = document.querySelector('#grid .x-plot')._fullLayout;
        return [l.xaxis.l2p(ti), l.yaxis.l2p(li)]; }""", [layer_index, column])
    return box["x"] + x, box["y"] + y


def test_answer_streams_before_the_grid_and_the_page_fits_1440x900(app, browser):
    page, requests, dialogs = open_page(browser, app)
    page.evaluate("""() => { window.__seen = {texts: new Set()}; const t0 = performance.now();
        const iv = setInterval(() => {
            const text = document.querySelector('#generated textarea').value;
            if (text) { window.__seen.texts.add(text); window.__seen.text ??= performance.now() - t0; }
            if (document.querySelector('#grid .x-grid[data-ready]')) {
                window.__seen.grid = performance.now() - t0; clearInterval(iv); } }, 2); }""")
    run_prompt(page, "Reverse the word: apple", max_new=96)
    seen = page.evaluate("({text: window.__seen.text, grid: window.__seen.grid, n: window.__seen.texts.size})")
    assert seen["text"] is not None and seen["text"] < seen["grid"], seen  # text first, then the grid
    assert seen["n"] >= 2, seen  # it grew: more than one version of the answer was on screen
    # everything that matters is on the first screen, nothing scrolled
    assert page.evaluate("window.scrollY") == 0
    for sel in ("#prompt textarea", "#generated textarea", "#grid .x-plot", "#map .x-plot"):
        box = page.locator(sel).first.bounding_box()
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= 900 and box["x"] + box["width"] <= 1440, sel
    # the chat template is hidden by default: the strip starts with the user's own text
    assert page.locator("#grid .x-strip").inner_text().replace("␣", " ").startswith("Reverse the word")
    assert [u for u in requests if not u.startswith(LOCAL)] == [] and dialogs == []


def test_cell_click_map_click_and_counterfactual(app, browser):
    page, requests, dialogs = open_page(browser, app)
    run_prompt(page, "Reverse the word: apple")
    columns = page.evaluate("JSON.parse(document.querySelector('#grid .x-grid').dataset.payload).positions.length")
    page.mouse.click(*cell_point(page, 1, columns // 2))
    page.wait_for_selector("#drill .x-drill", timeout=30_000)
    drill = page.locator("#drill").inner_text()
    assert "contribution" in drill and "|h·p|" in drill and "top by contribution" in drill
    # at 1440 px the drill-down's six columns fit its column (tasks' names as experts), and no control cuts its value
    fits = page.evaluate("""() => {
        const d = document.querySelector('#drill'), m = document.querySelector('#module input');
        return {table: d.querySelector('table.x-table').scrollWidth - d.clientWidth,
                module: m.scrollWidth - m.clientWidth}; }""")
    assert fits["table"] <= 0 and fits["module"] <= 0, fits
    # hovering an expert in the drill-down lights its point on the map
    labels = ("() => [...document.querySelectorAll('#map .textpoint text')]"
              ".map(t => { const r = t.getBoundingClientRect(); return [Math.round(r.x), Math.round(r.y)]; })")
    placed = page.evaluate(labels)
    row = page.locator("#drill tr.x-exp").first
    expert = row.get_attribute("data-expert")
    row.hover()
    page.wait_for_function("e => document.querySelector('#map .x-map').dataset.hovered === e", arg=expert)
    assert int(page.locator("#map .x-map").get_attribute("data-hovered-points")) >= 1
    assert page.evaluate(labels) == placed and len(placed) >= 5  # the ring leaves every label where it was placed
    # a map click lights the grid cells (and strip tokens) whose top expert is that point's
    page.locator("#map .scatterlayer .point").first.click(force=True)
    page.wait_for_selector("#grid .x-grid[data-highlighted]", timeout=10_000)
    page.wait_for_selector("#selection :text('grid cells')", timeout=30_000)
    lit = int(page.locator("#grid .x-grid").get_attribute("data-highlighted"))
    said = page.locator("#selection").inner_text()
    assert f"{lit} grid cells" in said, (lit, said)  # the server counts what the browser lit
    # the counterfactual of the clicked cell: switch its top expert off at every layer of that token
    page.locator("#cf-scope label", has_text="every layer, this token").click()
    page.click("#cf-run")
    page.wait_for_selector("#cf-out .x-cfout", timeout=60_000)
    kl = float(page.locator("#cf-out .x-cfout").get_attribute("data-kl"))
    cells = page.locator("#cf-out table.x-cf tr td").all_text_contents()
    before, after = cells[0::4] + cells[1::4], cells[2::4] + cells[3::4]
    assert kl > 0 and before != after  # the shown distribution changed
    assert [u for u in requests if not u.startswith(LOCAL)] == [] and dialogs == []


def test_hostile_prompt_is_shown_as_text_never_run(app, browser, tmp_path):
    page, requests, dialogs = open_page(browser, app)
    run_prompt(page, XSS)
    ticks = page.locator("#grid .xtick text").all_text_contents()
    shown = "".join(ticks).replace("\u00a0", " ")
    assert shown.startswith(XSS), shown[:200]  # the prompt's own characters, quotes included, as typed
    assert XSS in page.locator("#grid .x-strip").inner_text().replace("\n", "").replace("␣", " ")
    page.mouse.click(*cell_point(page, 0, 0))  # the first token, "<", in the drill-down
    page.wait_for_selector("#drill .x-drill", timeout=30_000)
    assert page.locator("#drill .x-token").inner_text() == "<"
    page.mouse.move(*cell_point(page, 0, 0))
    page.wait_for_selector("#grid .hoverlayer .hovertext", timeout=10_000)
    assert "token < (#0, prompt)" in page.locator("#grid .hoverlayer").text_content().replace("\u00a0", " ")
    page.locator("#grid .x-key").first.hover()  # the legend lights the map
    page.wait_for_function("document.querySelector('#map .x-map').dataset.hovered !== ''")
    page.locator("#map .scatterlayer .point").first.hover(force=True)
    page.wait_for_selector("#map .hoverlayer .hovertext", timeout=10_000)
    page.get_by_text("Downloads: trace").click()
    page.get_by_role("button", name="Prepare downloads").click()
    page.wait_for_selector("a[href*='heatmap.html']", timeout=60_000)
    href = page.locator("a[href*='heatmap.html']").first.get_attribute("href")
    saved = tmp_path / "heatmap.html"
    saved.write_bytes(page.request.get(href if href.startswith("http") else app.rstrip("/") + href).body())
    download = browser.new_page()
    download.goto(saved.as_uri())
    download.wait_for_selector(".js-plotly-plot .xtick text", timeout=30_000)
    made = """() => ({xss: window.__xss ?? null, img: document.querySelectorAll('img[src="x"]').length,
        onerror: document.querySelectorAll('[onerror]').length,
        script: [...document.scripts].filter(s => s.textContent.includes('window.__xss=2')).length})"""
    assert download.evaluate(made) == {"xss": None, "img": 0, "onerror": 0, "script": 0}
    assert page.evaluate(made) == {"xss": None, "img": 0, "onerror": 0, "script": 0}
    assert dialogs == [] and [u for u in requests if not u.startswith(LOCAL)] == []
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))


def test_empty_prompt_shows_a_message_not_an_error(app, browser):
    page, _, dialogs = open_page(browser, app)
    page.fill("#prompt textarea", "   ")
    page.click("#run")
    page.wait_for_selector("#notice :text('The prompt is empty')", timeout=60_000)
    assert page.locator(".toast-body.error, .error").count() == 0
    assert dialogs == []


def test_per_prompt_routing_names_its_pick_and_draws_the_evidence(app, browser):
    page, requests, dialogs = open_page(browser, app)
    page.locator("#granularity label", has_text="per prompt").click()
    run_prompt(page, "Reverse the word: apple", max_new=4)
    page.wait_for_selector("#notice :text('Per prompt:')", timeout=30_000)
    notice = page.locator("#notice").inner_text()
    picked = notice.split(" alone answered")[0].split(" ")[-1]
    for sel in ("#grid .x-plot", "#map .x-plot"):  # with the notice shown, grid and map still fit the screen
        box = page.locator(sel).first.bounding_box()
        assert box and box["y"] + box["height"] <= 900, (sel, box)
    strip = page.locator("#grid .x-strip").inner_text().replace("␣", " ")
    assert strip.strip().startswith("Reverse the word") and strip.strip().endswith("apple")  # the evidence: no answer
    assert len(page.locator("#grid .x-key").all()) >= 2  # the per-token evidence mixes experts, unlike the pick
    page.mouse.click(*cell_point(page, 1, 1))
    page.wait_for_selector("#drill .x-drill", timeout=30_000)
    page.click("#cf-run")  # the counterfactual starts on the pick: switched off at that cell
    page.wait_for_selector("#cf-out .x-cfout", timeout=60_000)
    assert picked in page.locator("#cf-out").inner_text()
    page.locator("#pick-by label", has_text="readout").click()  # no readout fitted for the tiny library
    page.click("#run")
    page.wait_for_selector("#notice :text('picked by mean weight instead')", timeout=60_000)
    assert picked and [u for u in requests if not u.startswith(LOCAL)] == [] and dialogs == []


def test_more_figures_show_which_layers_decided_the_pick(app, browser):
    """After a per-prompt run, "More figures" draws one bar per routed layer for the pick over its runner-up,
    titled with both names (the page's pick notice names the same expert)."""
    page, requests, dialogs = open_page(browser, app)
    page.locator("#granularity label", has_text="per prompt").click()
    run_prompt(page, "Reverse the word: apple", max_new=4)
    page.wait_for_selector("#notice :text('Per prompt:')", timeout=30_000)
    picked = page.locator("#notice").inner_text().split(" alone answered")[0].split(" ")[-1]
    page.get_by_text("More figures: which layers decided").click()
    page.wait_for_selector("#decision .js-plotly-plot .bars .point", timeout=60_000)
    title = page.locator("#decision .gtitle").text_content()
    assert title.startswith(f"Which layers decided: {picked} over ")
    n_layers = page.evaluate("document.querySelector('#decision .js-plotly-plot').data[0].x.length")
    assert page.locator("#decision .bars .point").count() == n_layers >= 2
    assert [u for u in requests if not u.startswith(LOCAL)] == [] and dialogs == []


def test_routed_layers_leave_rows_empty_that_no_map_click_lights(app, browser):
    """Routed at layer 1 only: layer 0's cells carry no winner (-1) and stay empty, and a map click lights cells
    of layer 1 alone; "all" routes every layer again."""
    page, requests, dialogs = open_page(browser, app)
    box = page.locator("#route-layers textarea, #route-layers input").first
    assert box.input_value() == "all"  # the tiny library records no default router
    box.fill("1")
    run_prompt(page, "Reverse the word: apple")
    idx = page.evaluate("JSON.parse(document.querySelector('#grid .x-grid').dataset.payload).idx")
    assert all(k == -1 for k in idx[0]) and all(k >= 0 for k in idx[1])
    lit_rows = set()
    for point in page.locator("#map .scatterlayer .point").all():
        point.click(force=True)
        page.wait_for_selector("#grid .x-grid[data-highlighted]", timeout=10_000)
        lit_rows |= set(page.evaluate("""() => { const r = document.querySelector('#grid .x-grid');
            return r.querySelector('.x-plot').data[r._hi].y; }"""))
    assert lit_rows == {1}  # the points' experts win cells of layer 1, never of the empty layer 0
    box.fill("all")
    run_prompt(page, "Reverse the word: apple")
    page.wait_for_function("!JSON.parse(document.querySelector('#grid .x-grid').dataset.payload).idx[0]"
                           ".includes(-1)")
    assert [u for u in requests if not u.startswith(LOCAL)] == [] and dialogs == []
