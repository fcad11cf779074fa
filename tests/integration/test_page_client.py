"""The page through its API, as `gradio_client` sees it: the `route` event returns the routing trace; bad input
comes back as page messages; eight simultaneous requests each equal the same request alone."""
import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from explorer.routing.trace import RoutingTrace
from tests.page_fixtures import TINY, make_tiny_library

ROOT = Path(__file__).resolve().parents[2]
DEMO = [ROOT / "assets" / "libraries" / "demo-mbc", ROOT / "assets" / "libraries" / "demo-private"]
N_OUT = 12  # route's outputs: notice, text, 5 figures, token strip, reference text, trace JSON, module, expert
TRACE = 9  # the trace JSON's place among them


def array(value) -> np.ndarray:
    """A plotly JSON array: a list, or plotly 6's typed form {"dtype", "bdata" (base64), "shape"}."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = value.get("shape")
        return flat.reshape([int(n) for n in str(shape).split(",")]) if shape else flat
    return np.asarray(value)


def serve(base: str, libraries: list):
    from explorer.page.session import Explorer
    from explorer.page.ui import build_demo, launch

    explorer = Explorer(base, libraries)
    explorer.start()
    demo = build_demo(explorer)
    launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    return demo, explorer


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from gradio_client import Client

    lib = make_tiny_library(tmp_path_factory.mktemp("client") / "lib", n_experts=5)
    demo, explorer = serve(TINY, [lib])
    yield demo.local_url, Client(demo.local_url, verbose=False)
    demo.close()


def route(client, prompt, top_k=2, max_new=4, disabled=(), chat=True, library="lib"):
    out = client.predict(prompt, library, chat, top_k, 1.0, max_new, list(disabled), "mean", "expert", None,
                         False, api_name="/route")
    assert len(out) == N_OUT
    return out


def test_route_returns_the_trace(page):
    _, client = page
    out = route(client, "Reverse the word: apple")
    trace = RoutingTrace.from_json(out[TRACE])
    assert out[1] == trace.text and trace.text
    assert "".join(trace.tokens).count("Reverse the word: apple") == 1
    assert trace.experts == ["add_two", "capital_city", "reverse_word", "sentiment", "sort_letters"]
    assert trace.weights.shape == (2, 4, len(trace.tokens), 5) and sum(trace.is_generated) == 4
    assert ((trace.weights > 0).sum(-1) == 2).all()
    figure = json.loads(out[2]["plot"])
    assert figure["data"][0]["type"] == "heatmap" and "apple" in "".join(figure["layout"]["xaxis"]["ticktext"])
    assert out[0] == ""  # no notices


def test_compare_follows_route_in_the_same_session(page):
    _, client = page
    route(client, "Add these numbers: 4 + 5")
    texts = client.predict("Add these numbers: 4 + 5", "lib", True, 4, [], api_name="/compare")
    assert len(texts) == 4 and all(isinstance(t, (str, dict)) for t in texts)


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
    figure = json.loads(out[2]["plot"])
    labels = "".join(figure["layout"]["xaxis"]["ticktext"])
    assert "<img" not in labels and "&lt;img" in labels  # ...the figure escapes it
    hovers = json.dumps(figure["data"][0]["text"])
    assert "<img" not in hovers
    assert "<b>&lt;</b>" in hovers  # the tokenizer splits "<" from "img"; the "<" token is escaped


def test_eight_simultaneous_requests_equal_each_alone(page):
    from gradio_client import Client

    url, _ = page
    prompts = [f"Reverse the word: {w}" for w in ("apple", "pear", "plum", "fig", "kiwi", "lime", "date", "nut")]
    settings = [dict(top_k=1 + i % 4, max_new=3 + i % 3) for i in range(8)]
    alone = [route(Client(url, verbose=False), p, **s)[TRACE] for p, s in zip(prompts, settings)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda ps: route(Client(url, verbose=False), ps[0], **ps[1])[TRACE],
                                 zip(prompts, settings)))
    for a, b, p in zip(alone, together, prompts):
        ta, tb = RoutingTrace.from_json(a), RoutingTrace.from_json(b)
        assert ta == tb, p
        assert p.split(": ")[1] in "".join(tb.tokens)


def test_intervention_shows_the_change(page):
    _, client = page
    out = route(client, "Reverse the word: apple", disabled=["reverse_word"])
    trace = RoutingTrace.from_json(out[TRACE])
    assert (trace.weights[..., trace.experts.index("reverse_word")] == 0).all()
    assert "Intervention" in out[0] and "reverse_word" in out[0]
    change = json.loads(out[6]["plot"])["data"][0]  # total variation per token x layer vs the plain run
    assert change["type"] == "heatmap" and array(change["z"]).max() > 0
    assert isinstance(out[8], str) and out[8]  # the text with no expert disabled, for comparison


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
    assert csv.splitlines()[0] == "token_index,token,is_generated,layer,module,expert,weight"


@pytest.mark.slow
@pytest.mark.skipif(not all((p / "library.sqlite").exists() for p in DEMO), reason="demo libraries not built yet")
def test_smollm2_with_the_demo_libraries():
    from gradio_client import Client

    demo, explorer = serve("smollm2-135m-instruct", DEMO)
    try:
        client = Client(demo.local_url, verbose=False)
        status = client.predict("demo-mbc", api_name="/library")
        assert "ready" in status[0]
        out = route(client, "Reverse the letters of this word: garden", top_k=4, max_new=12, library="demo-mbc")
        trace = RoutingTrace.from_json(out[TRACE])
        assert len(trace.layers) == 30 and trace.modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
        np.testing.assert_allclose(trace.weights.sum(-1), 1, atol=1e-4)
        mapfig = json.loads(status[4]["plot"])
        points = [x for d in mapfig["data"] if d["x"] != [None] for x in array(d["x"])]
        assert len(points) == len(explorer.analysis("demo-mbc").tasks) >= 16  # one point per task
    finally:
        demo.close()
