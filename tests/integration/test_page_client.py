"""The page through its API, as `gradio_client` sees it: the `route` event streams the answer and returns the
routing trace; the drill-down, the map pick and the counterfactual answer from the client's last run; bad input
comes back as page messages; eight simultaneous streams each equal the same request alone, unmixed."""
import base64
import hashlib
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

from explorer.routing.trace import RoutingTrace
from library_store.testing import TINY, make_tiny_library

ROOT = Path(__file__).resolve().parents[2]
DEMO = [ROOT / "assets" / "libraries" / "demo-mbc"]  # the page default (demo-private is rebuilt separately)
N_OUT = 10  # route's outputs: notice, text, grid, reference text, trace JSON, module, expert, cf expert, drill, cf
TRACE = 4  # the trace JSON's place among them


def tree_digest(root) -> dict[str, str]:
    """path -> sha256 of every file of a library folder, but SQLite's side files (-shm, -wal: a reader's
    shared memory, ignored by git; the committed index is library.sqlite alone)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and not p.name.endswith(("-shm", "-wal"))}


def array(value) -> np.ndarray:
    """A plotly JSON array: a list, or plotly 6's typed form {"dtype", "bdata" (base64), "shape"}."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return flat.reshape([int(n) for n in str(shape).split(",")]) if shape else flat
    return np.asarray(value)


def serve(base: str, libraries: list):
    from explorer.page.registry import Registry
    from explorer.page.session import Session
    from explorer.page.ui import build_demo, launch

    registry = Registry(base, libraries)
    registry.start()
    demo = build_demo(Session(registry))
    launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    return demo, registry


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    mp = pytest.MonkeyPatch()  # read-only libraries cache derived data in the user cache: a tmp one here
    mp.setenv("LORA_EXPLORER_DERIVED_CACHE", str(tmp_path_factory.mktemp("derived-cache")))
    yield make_tiny_library(tmp_path_factory.mktemp("client") / "lib", n_experts=5)
    mp.undo()


@pytest.fixture(scope="module")
def page(library):
    from gradio_client import Client

    demo, _ = serve(TINY, [library])
    yield demo.local_url, Client(demo.local_url, verbose=False)
    demo.close()


def route_args(prompt, top_k=2, max_new=4, disabled=(), chat=True, library="lib"):
    return (prompt, library, chat, top_k, 1.0, "none", "prototypes", max_new, list(disabled), "mean", "expert",
            "weight", False)


def route(client, prompt, **kw):
    out = client.predict(*route_args(prompt, **kw), api_name="/route")
    assert len(out) == N_OUT
    return out


def payload(page_html: str) -> dict:
    """The JSON an instrument panel carries for its JS (grid, map)."""
    return json.loads(html.unescape(re.search(r'data-payload="([^"]*)"', page_html).group(1)))


def test_route_returns_the_trace(page):
    _, client = page
    out = route(client, "Reverse the word: apple")
    trace = RoutingTrace.from_json(out[TRACE])
    assert out[1] == trace.text and trace.text
    assert "".join(trace.tokens).count("Reverse the word: apple") == 1
    assert trace.experts == ["add_two", "capital_city", "reverse_word", "sentiment", "sort_letters"]
    assert trace.weights.shape == (2, 4, len(trace.tokens), 5) and sum(trace.is_generated) == 4
    assert ((trace.weights > 0).sum(-1) == 2).all()
    figure = payload(out[2])["figure"]
    assert figure["data"][0]["type"] == "heatmap" and "apple" in "".join(figure["layout"]["xaxis"]["ticktext"])
    assert out[0] == ""  # no notices


def test_compare_gives_base_merge_single_expert_and_arrow(page, library):
    """The four texts are those modes' own generations: checked against a fresh model outside the page."""
    from explorer.routing.config import RouterConfig
    from explorer.routing.model import RoutedModel
    from library_store.models import load_base_model
    from library_store.store.library import ExpertLibrary

    _, client = page
    prompt = "Add these numbers: 4 + 5"
    trace = RoutingTrace.from_json(route(client, prompt, max_new=8)[TRACE])
    texts = client.predict(api_name="/compare")
    assert len(texts) == 4 and texts[3] == trace.text
    fresh = RoutedModel.from_library(load_base_model(TINY), ExpertLibrary.open(library, readonly=True))
    try:
        expected = []
        for mode in ("base", "uniform", f"expert:{trace.most_used_expert()}"):
            fresh.set_router(RouterConfig(mode=mode, top_k=1))
            expected.append(fresh.generate(prompt, max_new_tokens=8))
    finally:
        fresh.detach()
    single = texts[2]  # an update: the value and the label naming the expert
    assert single["label"] == f"most-used expert ({trace.most_used_expert()})"
    texts = [texts[0], texts[1], single["value"], texts[3]]
    assert texts[:3] == expected
    assert len(set(texts)) == 4  # four different models, four different answers


def test_empty_prompt_is_a_message_not_an_error(page):
    _, client = page
    out = route(client, "")
    assert "The prompt is empty" in out[0] and out[TRACE] == ""


def test_long_prompt_is_truncated_with_a_visible_notice(page):
    _, client = page
    out = route(client, "x" * 20_000, max_new=1)
    assert "truncated" in out[0] and "20,000 characters" in out[0]
    assert RoutingTrace.from_json(out[TRACE]).n_prompt < 400


def test_top_k_above_the_library_is_clamped(page):
    _, client = page
    out = route(client, "hello", top_k=16)
    assert "clamped to 5" in out[0] and RoutingTrace.from_json(out[TRACE]).top_k == 5


def test_markup_in_the_prompt_comes_back_as_text(page):
    _, client = page
    out = route(client, '<img src=x onerror="alert(1)"> hi')
    assert "<img" in "".join(RoutingTrace.from_json(out[TRACE]).tokens)  # the data keeps it as text...
    at = out[2].find("<img")
    assert at < 0, out[2][at - 200: at + 50]
    assert ">&lt;</span>" in out[2]  # ...the strip shows the "<" token escaped (the tokenizer splits "<img")
    figure = payload(out[2])["figure"]
    labels = "".join(figure["layout"]["xaxis"]["ticktext"])
    assert "<img" not in labels and "&lt;img" in labels  # plotly's labels too
    hovers = json.dumps(figure["data"][0]["text"])
    assert "<img" not in hovers
    assert "<b>&lt;</b>" in hovers  # the tokenizer splits "<" from "img"; the "<" token is escaped


def test_eight_simultaneous_streams_equal_each_alone(page):
    from gradio_client import Client

    url, _ = page
    prompts = [f"Reverse the word: {w}" for w in ("apple", "pear", "plum", "fig", "kiwi", "lime", "date", "nut")]
    settings = [dict(top_k=1 + i % 4, max_new=3 + i % 3) for i in range(8)]
    alone = [route(Client(url, verbose=False), p, **s)[TRACE] for p, s in zip(prompts, settings)]
    jobs = [Client(url, verbose=False).submit(*route_args(p, **s), api_name="/route")
            for p, s in zip(prompts, settings)]
    for job, a, p in zip(jobs, alone, prompts):
        final = job.result(timeout=300)
        streamed = [o[1] for o in job.outputs()[:-1] if o[1]]
        tb = RoutingTrace.from_json(final[TRACE])
        assert RoutingTrace.from_json(a) == tb, p
        assert p.split(": ")[1] in "".join(tb.tokens)
        assert streamed and all(tb.text.startswith(text) for text in streamed), (p, streamed, tb.text)


def test_intervention_shows_the_change(page):
    _, client = page
    out = route(client, "Reverse the word: apple", disabled=["reverse_word"])
    trace = RoutingTrace.from_json(out[TRACE])
    assert (trace.weights[..., trace.experts.index("reverse_word")] == 0).all()
    assert "Intervention" in out[0] and "reverse_word" in out[0]
    figs = client.predict("mean", None, False, api_name="/figures")
    change = json.loads(figs[3]["plot"])["data"][0]  # total variation per token x layer vs the plain run
    assert change["type"] == "heatmap" and array(change["z"]).max() > 0
    decided = json.loads(figs[4]["plot"])  # added last: the positions above hold for older clients
    lean = trace.meta["lean"]
    assert decided["layout"]["title"]["text"].startswith(f"Which layers decided: {lean['expert']} over ")
    assert len(decided["data"][0]["x"]) == len(trace.layers)
    assert isinstance(out[3], str) and out[3]  # the text with no expert disabled, for comparison


def test_drill_highlight_and_counterfactual_through_the_api(page):
    _, client = page
    trace = RoutingTrace.from_json(route(client, "Reverse the word: apple", max_new=4)[TRACE])
    t = trace.n_prompt - 1
    drill = client.predict("lib", "mean", f"1, {t}", api_name="/drill")
    assert "x-drill" in drill[0] and drill[1] == f"1, {t}"
    for c in trace.cell(1, t)["q_proj"]:
        assert f'data-expert="{c.expert}"' in drill[0]
    top = drill[2]["value"] if isinstance(drill[2], dict) else drill[2]
    lit = client.predict("lib", "mean", "expert", "weight", False, top, api_name="/highlight")
    assert lit[1]["cells"] and all(layer in trace.layers for layer, _ in lit[1]["cells"])
    out = client.predict("lib", f"1, {t}", top, "off", "cell", api_name="/counterfactual")
    assert float(re.search(r'data-kl="([0-9.]+)"', out).group(1)) > 0
    bad = client.predict("lib", f"1, {t}", "no-such-expert", "off", "cell", api_name="/counterfactual")
    assert "Unknown expert 'no-such-expert'" in bad
    stale = client.predict("lib", "mean", "1, 99999", api_name="/drill")
    assert "Token 99999 is not in this run" in stale[0]


def test_export_gives_csv_json_and_standalone_html(page):
    _, client = page
    route(client, "Reverse the word: apple")
    files = client.predict("mean", "expert", None, False, "lib", api_name="/export")
    names = sorted(Path(f).name for f in files)
    assert {"trace.csv", "trace.json", "heatmap.html", "similarity-map.html", "cosine-matrix.html"} <= set(names)
    for f in files:
        if f.endswith(".html"):
            text = Path(f).read_text()
            assert '<script src="http' not in text and len(text) > 1_000_000
    csv = next(Path(f).read_text() for f in files if f.endswith("trace.csv"))
    assert csv.splitlines()[0] == "token_index,token,is_generated,layer,module,expert,weight,routed"


@pytest.mark.slow
@pytest.mark.skipif(not all((p / "library.sqlite").exists() for p in DEMO), reason="demo libraries not built yet")
def test_smollm2_with_the_demo_libraries():
    from gradio_client import Client

    before = {p: tree_digest(p) for p in DEMO}
    demo, registry = serve("smollm2-135m-instruct", DEMO)
    try:
        client = Client(demo.local_url, verbose=False)
        status = client.predict("demo-mbc", api_name="/library")
        assert "ready" in status[0]
        out = route(client, "Write the plural of this noun: garden", top_k=4, max_new=12, library="demo-mbc")
        trace = RoutingTrace.from_json(out[TRACE])
        assert len(trace.layers) == 30 and trace.modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
        np.testing.assert_allclose(trace.weights.sum(-1), 1, atol=1e-4)
        points = [p for curve in payload(status[3])["points"] for p in curve]
        assert len(points) == len(registry.analysis("demo-mbc").tasks) >= 16  # one point per task
        assert all(p["expert"] in trace.experts for p in points)  # every task maps to the expert serving it
        client.predict(api_name="/compare")
    finally:
        demo.close()
    assert {p: tree_digest(p) for p in DEMO} == before  # the committed libraries are read-only in use
