"""Adding an expert from the real page in a real browser (issue 16): app.py as a subprocess on the tiny twin and a
tiny library, driven by Playwright through Debian's Chromium. A good adapter is uploaded and shows up in the
experts table, on the ΔW map and as the winner of a prompt of its task; then every hostile or bad upload shows a
message and leaves the library folder byte-identical."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared upload fixtures
from upload_fixtures import aligned_adapter, hostile_uploads, tree_digest  # noqa: E402

from app_server import new_tab, start_app, stop_app  # noqa: E402
from library_store.testing import TASKS, TINY, make_tiny_library  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "Shout: hello there, friend"
LOCAL = ("http://127.0.0.1", "data:", "blob:")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from library_store.models import load_base_model

    root = tmp_path_factory.mktemp("upload-page")
    lib = make_tiny_library(root / "tiny-lib", n_experts=5, with_map=False)  # no MBC map: the ΔW map is shown
    good = aligned_adapter(load_base_model(TINY), PROMPT, root / "good")  # the app's twin has the same weights
    env = {"LORA_EXPLORER_DERIVED_CACHE": str(root / "cache"), "LORA_EXPLORER_DATA": str(root / "user-data")}
    proc, url = start_app(["--base-model", TINY, "--library", lib], env=env)
    yield url, Path(lib), good, root
    stop_app(proc)


def library_tab(browser, url):
    page, requests, dialogs = new_tab(browser, url)
    page.get_by_role("tab", name="Library").click()
    page.wait_for_selector("#similarity-map .js-plotly-plot .point", timeout=120_000)
    return page, requests, dialogs


def add(page, files: list[str], name: str, tasks: str = "") -> str:
    """Upload `files` as `name` and return the message the page shows."""
    page.locator("#upload-files input[type=file]").set_input_files(files)
    for f in files:  # gradio has received every file
        page.wait_for_selector(f'#upload-files td.filename[aria-label="{Path(f).name}"]', timeout=60_000)
    page.locator("#upload-name input, #upload-name textarea").first.fill(name)
    page.locator("#upload-tasks input, #upload-tasks textarea").first.fill(tasks)
    page.click("#upload-button")
    page.wait_for_function("(() => { const t = document.querySelector('#edit-msg').innerText;"
                           " return /ℹ️|⚠️/.test(t) && !t.includes('processing'); })()", timeout=120_000)
    return page.locator("#edit-msg").inner_text().strip()


def test_upload_a_good_adapter_then_every_hostile_one(setup, browser):
    from test_browser import run_prompt

    url, lib, good, root = setup
    page, requests, dialogs = library_tab(browser, url)
    assert sorted(page.locator("#similarity-map .textpoint").all_text_contents()) == sorted(TASKS[:5])
    assert "Not evaluated yet" in page.locator("#report-card").inner_text()

    message = add(page, [str(good / "adapter_config.json"), str(good / "adapter_model.safetensors")], "shouter",
                  "shout")
    assert "Added expert shouter" in message, message
    page.wait_for_function("document.querySelector('#experts-table').innerText.includes('shouter')",
                           timeout=60_000)
    page.wait_for_function("[...document.querySelectorAll('#similarity-map .textpoint')]"
                           ".some(t => t.textContent === 'shouter')", timeout=60_000)
    assert len(page.locator("#similarity-map .textpoint").all_text_contents()) == 6

    before = tree_digest(lib)
    for label, (files, name, expected) in hostile_uploads(good, root / "bad").items():
        page, _, more_dialogs = library_tab(browser, url)
        message = add(page, files, name)
        assert message.startswith("⚠️") and re.search(expected, message), (label, message)
        assert page.locator("#experts-table").inner_text().count("imported") == 1, label  # only shouter's row
        dialogs += more_dialogs
        page.close()
    assert tree_digest(lib) == before

    # it wins a prompt of its task: the page's comparison names the most-used expert
    page, _, more_dialogs = library_tab(browser, url)
    dialogs += more_dialogs
    page.get_by_role("tab", name="Explore").click()
    run_prompt(page, PROMPT)  # the Explore tab's own helper: waits for the routing grid
    page.get_by_text("The same prompt three other ways").click()
    page.click("#compare")
    page.wait_for_selector(":text('most-used expert (shouter)')", timeout=120_000)

    assert dialogs == [] and not [u for u in requests if not u.startswith(LOCAL)]
