"""The Library tab's report card in a real browser (issue 13): a tiny private library is evaluated by the real
`bench/eval_routing.py --sweep --record` (twin model, a few prompts), then app.py shows what it recorded: the
verdict with the own-text accuracy, S5, the command, the default router chosen by the sweep with its rule, and
the task x expert confusion and per-layer curve as plots. Nothing is computed by the page."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: bench/

from app_server import new_tab, start_app, stop_app  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from bench import eval_routing
    from bench.eval_common import quick_libraries
    from library_store.store.library import ExpertLibrary
    from library_store.store.reports import read_default_router, read_report

    root = tmp_path_factory.mktemp("report-card")
    lib = quick_libraries(root)["private"]
    flags = eval_routing.QUICK + ["--out", str(root / "out"), "--figures", str(root / "fig"), "--docs", "",
                                  "--record"]
    eval_routing.run(str(lib), eval_routing.parse(flags)[1], label="card")
    stored = ExpertLibrary.open(lib)
    report, default = read_report(stored), read_default_router(stored)
    assert report is not None and default is not None
    env = {"LORA_EXPLORER_DERIVED_CACHE": str(root / "cache"), "LORA_EXPLORER_DATA": str(root / "user-data")}
    proc, url = start_app(["--base-model", "tiny-random-llama", "--library", str(lib)], env=env)
    yield url, report, default
    stop_app(proc)


def test_page_starts_with_the_recorded_default_router(evaluated, browser):
    url, _, default = evaluated
    page, _, _ = new_tab(browser, url)  # the controls are set once the model is ready (the libraries load with it)
    want = str(default.router["top_k"])
    page.wait_for_function(f"document.querySelector('#top-k input[type=number]')?.value === '{want}'",
                           timeout=120_000)
    assert float(page.locator("#temperature input[type=number]").input_value()) == default.router["temperature"]
    centre = default.router.get("input_centre", "none")
    assert page.locator(f"#input-centre input[value='{centre}']").is_checked()


def test_report_card_shows_the_recorded_evaluation(evaluated, browser):
    url, report, default = evaluated
    page, _, _ = new_tab(browser, url)
    page.get_by_role("tab", name="Library").click()
    page.wait_for_function("document.querySelector('#report-card').innerText.includes('routing explain')",
                           timeout=120_000)
    card = page.locator("#report-card").inner_text()
    assert "Not evaluated yet" not in card
    assert f"{report.accuracy['user']:.0%}" in card and f"{report.accuracy['user']:.1%}" in card
    s5 = (report.s5 or {}).get("overall")  # None on the twin when no own expert answers anything right
    assert (f"(S5): {float(s5):.2f}" in card) if s5 is not None else "(S5)" not in card
    assert f"Produced by {report.command}" in card and f"Chosen by {default.command}" in card  # with its command
    assert f"top-k {default.router['top_k']}" in card and "highest own-text routing accuracy" in card
    page.wait_for_selector("#report-confusion .js-plotly-plot", timeout=60_000)
    page.wait_for_selector("#report-layers .js-plotly-plot", timeout=60_000)
    ticks = " ".join(page.locator("#report-confusion .js-plotly-plot .xtick, "
                                  "#report-confusion .js-plotly-plot .ytick").all_text_contents())
    assert all(t in ticks for t in report.tasks)  # one row per evaluated task
    assert page.locator("#report-layers .js-plotly-plot .scatterlayer .trace").count() >= 1
    for plot in ("#report-confusion", "#report-layers"):  # each title fits its half of the row, not cut off
        fits = page.evaluate(f"""() => {{
            const svg = document.querySelector('{plot} .js-plotly-plot .main-svg');
            const box = svg.getBoundingClientRect();
            return [...document.querySelectorAll('{plot} .js-plotly-plot .gtitle')].every(t => {{
                const r = t.getBoundingClientRect(); return r.width > 0 && r.right <= box.right + 1; }});
        }}""")
        assert fits, f"the title of {plot} runs past its plot"
