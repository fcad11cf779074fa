"""The page without a server, on a tiny twin + tiny library: the request normaliser, the registry and session,
and the callbacks called directly. Bad input gives messages, never tracebacks; settings are clamped with
notices; the Library tab's data is read from the store; a page run never writes into a library."""
import hashlib
import html
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from explorer.page import callbacks as cb
from explorer.page import callbacks_cell as cc
from explorer.page import plots
from explorer.page.library_view import analyse_library, experts_table
from explorer.page.registry import Registry
from explorer.page.request import CLI_LIMITS, RawRequest, normalise
from explorer.page.session import Session
from library_store.store.library import ExpertLibrary
from library_store.testing import TASKS, TINY, make_tiny_library, make_tiny_mbc_library

EXPERTS = sorted(TASKS[:5])
ROUTE_ARGS = dict(chat=True, top_k=2, temperature=1.0, centre="none", centre_scope="prototypes", max_new=4,
                  disabled=[], module="mean", colour_by="expert", grid_by="weight", show_template=False,
                  input_centre="none", granularity=None, pick_by=None)


pytestmark = pytest.mark.usefixtures("module_derived_cache")  # an empty derived cache for this module


@pytest.fixture(scope="module")
def lib_path(tmp_path_factory):
    return make_tiny_library(tmp_path_factory.mktemp("ui") / "lib", n_experts=5)


@pytest.fixture(scope="module")
def session(lib_path):
    reg = Registry(TINY, [lib_path])
    assert reg.wait(timeout=300), reg.status()
    return Session(reg)


def raw(prompt="Reverse the word: apple", **kw):
    return RawRequest(prompt=prompt, library="lib", **{"max_new_tokens": 4, "top_k": 2, **kw})


def route(session, prompt="Reverse the word: apple", **kw):
    """The streaming route callback run to its end: its last output (every ROUTE_OUTPUTS key)."""
    args = {**ROUTE_ARGS, **kw}
    *_, last = cb.route(session, prompt, kw.pop("library", "lib"), *[args[k] for k in ROUTE_ARGS])
    return last


def tree_digest(root) -> dict[str, str]:
    """path -> sha256 of every file of a library folder, but SQLite's side files (-shm, -wal: a reader's
    shared memory, ignored by git; the committed index is library.sqlite alone)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file() and not p.name.endswith(("-shm", "-wal"))}


# ---------------------------------------------------------------- the request normaliser (no model)


def test_normaliser_clamps_with_a_notice_each():
    done = normalise(RawRequest(prompt="hi", library="lib", top_k="50", temperature=0, max_new_tokens=900.0,
                                disabled=["nope", "b"]), ["a", "b", "c"])
    r = done.request.router
    assert (r.mode, r.top_k, r.temperature, r.disabled, done.request.max_new_tokens) == ("arrow", 2, 1.0, ("b",), 128)
    assert [n.split()[0] for n in done.notices] == ["temperature", "max", "Ignored", "top-k"]
    assert "clamped to 128" in done.notices[1] and "clamped to 2" in done.notices[3] and done.error is None


@pytest.mark.parametrize("settings", [dict(top_k=None, temperature=None, max_new_tokens=None),
                                      dict(top_k=3.0, temperature="1", max_new_tokens="32"),
                                      dict(top_k="3", temperature=1, max_new_tokens=32.0, disabled="")])
def test_normaliser_reads_slider_floats_strings_and_none_without_notices(settings):
    done = normalise(RawRequest(prompt="hi", **settings), ["a", "b", "c", "d"])
    assert done.notices == [] and done.error is None
    assert done.request.router.top_k == (4 if settings["top_k"] is None else 3)
    assert done.request.router.temperature == 1.0
    assert done.request.max_new_tokens == 32 and done.request.router.disabled == ()


@pytest.mark.parametrize("settings,notice", [(dict(top_k="many"), "is not a number"),
                                             (dict(top_k=2.5), "not a whole number"),
                                             (dict(top_k=0), "less than 1"),
                                             (dict(temperature=math.nan), "is not a number"),
                                             (dict(temperature=math.inf), "outside (0, inf)"),
                                             (dict(max_new_tokens=-3), "less than 0")])
def test_normaliser_notices_every_odd_value(settings, notice):
    done = normalise(RawRequest(prompt="hi", **settings), ["a", "b", "c"])
    assert done.error is None and any(notice in n for n in done.notices), done.notices
    strict = normalise(RawRequest(prompt="hi", **settings), ["a", "b", "c"], limits=CLI_LIMITS, strict=True)
    assert strict.request is None and strict.error


@pytest.mark.parametrize("settings,error", [(dict(prompt="  \n"), "The prompt is empty"),
                                            (dict(disabled=["a", "b", "c"]), "Every expert is disabled"),
                                            (dict(mode="expert:zz"), "Unknown expert 'zz'"),
                                            (dict(mode="expert:a", disabled="a"), "'a' is disabled"),
                                            (dict(mode="sideways"), "Unknown router mode")])
def test_normaliser_refuses_what_cannot_run(settings, error):
    done = normalise(RawRequest(**{"prompt": "hi", **settings}), ["a", "b", "c"])
    assert done.request is None and error in done.error


def test_strict_normaliser_refuses_what_the_page_clamps():
    done = normalise(RawRequest(prompt="hi", top_k=9, disabled="a,b"), ["a", "b", "c"], limits=CLI_LIMITS,
                     strict=True)
    assert done.error == "top_k must be between 1 and 1 (the number of enabled experts), got 9"
    ok = normalise(RawRequest(prompt="hi", top_k=1, disabled="a, b", mode="uniform", max_new_tokens=5000),
                   ["a", "b", "c"], context_length=8192, limits=CLI_LIMITS, strict=True)
    assert ok.request.router.disabled == ("a", "b") and ok.request.max_new_tokens == 5000


def test_long_prompt_is_cut_to_the_page_context(session):
    tok = session.registry.base.tokenizer
    done = normalise(raw("apple banana " * 1700), EXPERTS, tokenizer=tok, context_length=512)
    n = len(tok(done.request.prompt, add_special_tokens=False).input_ids)
    assert n <= 257 and "truncated to its first 256 tokens" in done.notices[0]
    assert "22,100 characters" in done.notices[0]


# ---------------------------------------------------------------- registry and session


def test_run_returns_a_trace_of_prompt_and_generated_tokens(session):
    result = session.run(raw())
    t = result.trace
    assert result.error is None and result.notices == []
    assert t.weights.shape == (2, 4, len(t.tokens), 5) and t.experts == EXPERTS
    assert sum(t.is_generated) == 4 and t.top_k == 2 and t.library["name"] == "lib"
    assert ((t.weights > 0).sum(-1) == 2).all()  # exactly top-k experts per token, module, layer
    np.testing.assert_allclose(t.weights.sum(-1), 1, atol=1e-5)


def test_top_k_above_the_enabled_experts_is_clamped_with_a_notice(session):
    result = session.run(raw(top_k=50))
    assert result.trace.top_k == 5 and any("clamped to 5" in n for n in result.notices)
    result = session.run(raw(top_k=4, disabled=("add_two", "sentiment")))
    assert result.trace.top_k == 3 and any("clamped to 3" in n for n in result.notices)


@pytest.mark.parametrize("request_,error", [(raw(disabled=tuple(TASKS[:5])), "Every expert is disabled"),
                                            (RawRequest("hi", library="nope"), "not available"),
                                            (raw(""), "The prompt is empty")])
def test_refused_runs_are_messages(session, request_, error):
    result = session.run(request_)
    assert result.trace is None and error in result.error


def test_intervention_removes_the_expert_and_keeps_a_reference(session):
    result = session.run(raw(disabled=("reverse_word",)))
    i = result.trace.experts.index("reverse_word")
    assert (result.trace.weights[..., i] == 0).all() and result.trace.router.disabled == ("reverse_word",)
    assert result.reference is not None and (result.reference.weights[..., i] > 0).any()


def test_same_request_gives_the_same_trace(session):
    a, b, c = session.run(raw()), session.run(raw(top_k=3)), session.run(raw())
    assert a.trace == c.trace and not np.array_equal(a.trace.weights, b.trace.weights)


def test_view_hides_the_chat_template_from_the_trace_alone(session):
    trace = session.run(raw("Reverse the word: apple")).trace
    view = session.view(trace, show_template=False)
    assert "".join(view.tokens[: view.n_prompt]) == "Reverse the word: apple"
    assert view.tokens[view.n_prompt:] == trace.tokens[trace.n_prompt:]
    assert session.view(trace, show_template=True) is trace
    no_chat = session.run(raw(chat=False)).trace
    assert session.view(no_chat, show_template=False) is no_chat


def test_compare_runs_each_baseline(session, lib_path):
    """Each text is that mode's own generation, checked against a fresh model and library outside the page."""
    from explorer.routing.config import RouterConfig
    from explorer.routing.model import RoutedModel
    from library_store.models import load_base_model

    result = session.run(raw("Add these numbers: 4 + 5", max_new_tokens=8))
    texts = session.compare(result.request, result.trace)
    top = result.trace.most_used_expert()
    assert list(texts) == ["base", "uniform merge", f"most-used expert ({top})", "arrow"]
    fresh = RoutedModel.from_library(load_base_model(TINY), ExpertLibrary.open(lib_path, readonly=True))
    try:
        for label, mode in (("base", "base"), ("uniform merge", "uniform"), (f"most-used expert ({top})",
                                                                           f"expert:{top}")):
            fresh.set_router(RouterConfig(mode=mode, top_k=1))
            assert texts[label] == fresh.generate("Add these numbers: 4 + 5", max_new_tokens=8), label
    finally:
        fresh.detach()
    assert texts["arrow"] == result.trace.text
    assert len(set(texts.values())) == 4  # four different models: four different answers


def test_library_analysis_reads_map_similarity_clusters_and_table(lib_path):
    lib = ExpertLibrary.open(lib_path, readonly=True)
    an = analyse_library(lib, "lib")
    assert an.tasks == TASKS[:5] and an.coords.shape == (5, 2) and an.similarity.shape == (5, 5)
    assert an.cluster_of["reverse_word"] == "cluster-0" and an.cluster_of["add_two"] == "cluster-1"
    table = experts_table(lib)
    assert list(table.columns) == ["name", "kind", "tasks", "cluster", "rank", "parameters", "steps", "final loss"]
    assert len(table) == 5 and (table["rank"] == 4).all() and (table["parameters"] > 0).all()


def test_library_without_mbc_data_gets_a_note(tmp_path):
    path = make_tiny_library(tmp_path / "plain", n_experts=3, with_map=False)
    an = analyse_library(ExpertLibrary.open(path, readonly=True), "plain")
    assert an.coords is None and "no MBC map" in an.note
    assert "no MBC map" in plots.similarity_map(an).layout.annotations[0].text


def test_mismatched_library_is_reported_not_fatal(tmp_path, lib_path):
    from library_store.models import load_base_model

    ExpertLibrary.create(tmp_path / "phi", load_base_model("tiny-random-phi"))
    session = Session(Registry(TINY, [lib_path, tmp_path / "phi"]))
    progress = []
    out = cb.library(session, "phi", progress=lambda frac, what: progress.append((frac, what)))
    assert "phi" in session.registry.problems and "another base model" in session.registry.problems["phi"]
    assert "unavailable" in out["status"] and out["disabled"].props["choices"] == []
    assert "not available" in session.run(RawRequest("hi", library="phi")).error


def test_libraries_attach_through_from_library_only(monkeypatch, lib_path):
    from explorer.routing.model import RoutedModel

    calls = []
    original = RoutedModel.from_library.__func__
    monkeypatch.setattr(RoutedModel, "from_library",
                        classmethod(lambda cls, base, lib, *a, **k: calls.append(lib.root) or original(cls, base, lib,
                                                                                                         *a, **k)))
    reg = Registry(TINY, [lib_path])
    assert reg.wait(timeout=300) and Session(reg).run(raw()).trace is not None
    assert [Path(p).name for p in calls] == ["lib"] and reg.attached == "lib"


def test_mbc_library_routes_over_cluster_experts_and_maps_the_warmups(tmp_path):
    mbc = make_tiny_mbc_library(tmp_path / "mbc", n_tasks=6, k=2)
    plain = make_tiny_library(tmp_path / "private", n_experts=6, with_map=False)
    session = Session(Registry(TINY, [mbc, plain]))
    assert session.registry.wait(timeout=300), session.registry.status()
    assert session.registry.expert_names("mbc") == ["cluster-0", "cluster-1"]  # warm-ups are the map's data
    trace = session.run(RawRequest("Add these numbers: 4 + 5", library="mbc", top_k=2, max_new_tokens=2)).trace
    assert trace.experts == ["cluster-0", "cluster-1"]
    an = session.registry.analysis("mbc")
    assert an.tasks == TASKS[:6] and an.coords.shape == (6, 2)
    assert an.cluster_of == {t: f"cluster-{i % 2}" for i, t in enumerate(TASKS[:6])}
    assert (an.experts["kind"] == "warmup").sum() == 6  # the table lists every adapter
    # the private library has no clusters of its own: it borrows the MBC library's (same task names)
    groups = session.registry.groups("private")
    assert groups["reverse_word"] == "cluster-0" and groups["add_two"] == "cluster-1"
    out = route(session, "hi", library="private", colour_by="cluster", max_new=1)
    legend = re.findall(r'class="x-key" data-label="([^"]*)"', out["grid"])
    assert legend and set(legend) <= {"cluster-0", "cluster-1"}
    # no MBC map of its own: the map beside the grid is its experts' ΔW map, coloured like the grid's clusters
    linked = cb.library(session, "private")["linked_map"]
    payload = json.loads(html.unescape(re.search(r'data-payload="([^"]*)"', linked).group(1)))
    points = [p for curve in payload["points"] for p in curve]
    assert sorted(p["task"] for p in points) == sorted(session.registry.expert_names("private"))
    assert all(p["expert"] == p["task"] and p["cluster"] == groups[p["task"]] for p in points)
    picked = cc.highlight(session, out["state"], "private", "mean", "expert", "weight", False,
                          "reverse_word")
    assert picked["selection"].startswith("**reverse\\_word** → reverse\\_word")  # a point is an expert


# ---------------------------------------------------------------- callbacks, called directly


def test_route_callback_streams_then_fills_every_output(session):
    args = {**ROUTE_ARGS, "max_new": 6}
    steps = list(cb.route(session, "Reverse the word: apple", "lib", *[args[k] for k in ROUTE_ARGS]))
    texts = [step["text"] for step in steps[:-1]]
    out = steps[-1]
    assert tuple(out) == cb.ROUTE_OUTPUTS and out["notice"] == ""
    trace = out["state"].trace
    assert texts and all(set(s) == {"text"} for s in steps[:-1])  # the answer first, alone
    assert all(out["text"].startswith(t) for t in texts) and texts[-1] == out["text"] == trace.text
    assert json.loads(out["trace_json"])["tokens"] == trace.tokens
    assert out["expert"].props == {"choices": EXPERTS, "value": trace.most_used_expert()}
    strip = re.findall(r'<span class="x-tok[^"]*" data-t="(\d+)"[^>]*>([^<]*)</span>', out["grid"])
    shown = "".join(t for _, t in strip).replace("␣", " ")
    assert shown.startswith("Reverse the word: apple")  # the template's tokens are hidden
    assert [int(t) for t, _ in strip] == trace.positions("user+generated")  # columns carry full positions
    legend = re.findall(r'class="x-key" data-label="([^"]*)"', out["grid"])
    assert legend and set(legend) <= set(EXPERTS)


def test_route_callback_carries_input_centring_into_the_trace(session):
    out = route(session, input_centre="base", max_new=0)
    assert out["notice"] == "" and json.loads(out["trace_json"])["router"]["input_centre"] == "base"
    out = route(session, input_centre="median", max_new=0)
    assert "Unknown input centring &#x27;median&#x27;" in out["notice"]  # escaped: a notice is HTML
    assert json.loads(out["trace_json"])["router"]["input_centre"] == "none"
    args = {**ROUTE_ARGS, "max_new": 0}  # an API client from before input centring: 13 values, the default
    *_, out = cb.route(session, "hi", "lib", *[args[k] for k in ROUTE_ARGS][:-3])
    assert json.loads(out["trace_json"])["router"]["input_centre"] == "none"


def test_route_callback_turns_refusals_into_escaped_messages(session):
    out = route(session, "   ")
    assert "The prompt is empty" in out["notice"] and out["state"] is None and out["trace_json"] == ""
    out = route(session, library="<b>x</b>")
    assert "&lt;b&gt;x&lt;/b&gt;" in out["notice"] and "<b>" not in out["notice"]


def test_view_changes_need_no_model(session, monkeypatch):
    """View changes and clicks re-draw from the stored trace: no tokenizer, no model call."""
    state = route(session)["state"]
    monkeypatch.setattr(session.registry, "base", None)
    out = cb.figures(session, state, "q_proj", "add_two", False)
    assert tuple(out) == cb.FIGURE_OUTPUTS and "add_two" in out["expert_plot"].layout.title.text
    shown = cb.grid(session, state, "mean", "expert", "weight", True)["grid"]
    assert shown.count('class="x-tok') == len(state.trace.tokens)  # the template shown again
    by_contribution = cb.grid(session, state, "q_proj", "cluster", "contribution", False)["grid"]
    assert "by contribution" in by_contribution and "q_proj" in by_contribution
    assert "Experts of token" in cc.token(session, state, "mean", "0, 2")["token_plot"].layout.title.text
    assert "x-drill" in cc.drill(session, state, "lib", "mean", "1, 2")["drill"]


def test_compare_and_token_before_any_run(session):
    assert cb.compare(session, None) == dict.fromkeys(cb.COMPARE_OUTPUTS, "")
    assert "Press Run" in cc.token(session, None, "mean", "0, 0")["token_plot"].layout.annotations[0].text
    assert "Press Run" in cb.grid(session, None, "mean", "expert", "weight", False)["grid"]


def test_compare_callback_labels_the_single_expert_and_caches(session, monkeypatch):
    state = route(session)["state"]
    out = cb.compare(session, state)
    top = state.trace.most_used_expert()
    assert tuple(out) == cb.COMPARE_OUTPUTS and out["single_text"].props["label"] == f"most-used expert ({top})"
    assert out["arrow_text"] == state.trace.text
    monkeypatch.setattr(session.registry, "attach", None)  # a second ask is served from the cache
    assert cb.compare(session, state) == out and session.compared(state.request, state.trace)["arrow"] == out[
        "arrow_text"]


def test_export_writes_to_a_temp_folder(session, lib_path):
    before = tree_digest(lib_path)
    files = cb.export(session, route(session)["state"], "mean", "expert", None, False, "lib")["files"]
    assert [Path(f).name for f in files] == ["trace.csv", "trace.json", "heatmap.html", "contribution.html",
                                             "expert.html", "entropy.html", "usage.html", "change.html",
                                             "decision.html", "similarity-map.html", "cosine-matrix.html"]
    assert all(Path(f).exists() and not Path(f).is_relative_to(Path(lib_path)) for f in files)
    assert tree_digest(lib_path) == before


def test_a_page_run_leaves_the_library_byte_identical(tmp_path, lib_path, monkeypatch):
    monkeypatch.setenv("LORA_EXPLORER_DERIVED_CACHE", str(tmp_path / "cache"))  # empty: prototypes are computed
    copy = Path(shutil.copytree(lib_path, tmp_path / "lib"))
    before = tree_digest(copy)
    session = Session(Registry(TINY, [copy]))
    cb.library(session, "lib")
    state = route(session, disabled=["add_two"])["state"]
    cb.compare(session, state)
    assert tree_digest(copy) == before and any((tmp_path / "cache").rglob("*.safetensors"))


def test_build_demo_wires_every_event_with_an_api_name(session):
    from explorer.page.ui import build_demo

    demo = build_demo(session, examples=[{"family": "free text", "prompt": "hi"}])
    config = demo.get_config_file()
    names = [dep.get("api_name") for dep in config["dependencies"]]
    assert all(names), names
    assert {"route", "compare", "library", "status", "export", "token", "view_module", "drill", "highlight",
            "counterfactual", "figures", "view_grid", "example"} <= set(names)
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    route_dep = next(d for d in config["dependencies"] if d["api_name"] == "route")
    assert len(route_dep["outputs"]) == len(cb.ROUTE_OUTPUTS)
    assert [ids[i] for i in route_dep["outputs"][:3]] == ["notice", "generated", "grid"]
    assert [ids[i] for i in route_dep["inputs"][-5:]] == ["input-centre", "granularity", "pick-by", "route-layers",
                                                          "expert-scales"]  # last: older API clients keep positions
    defaults_dep = next(d for d in config["dependencies"] if d["api_name"] == "router_defaults")
    assert [ids[i] for i in defaults_dep["outputs"]][-7:] == ["centre", "centre-scope", "input-centre", "granularity",
                                                               "pick-by", "route-layers", "expert-scales"]
    radio = next(c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == "input-centre")
    assert [ch[0] for ch in radio["choices"]] == ["none", "base"] and radio["label"] == "input centring"
    warm = next(d for d in config["dependencies"] if d["api_name"] == "warm_maps")  # opening the Library tab
    tabs = {c["id"]: c.get("props", {}).get("label") for c in config["components"] if c.get("type") == "tabitem"}
    assert [(tabs.get(i), event) for i, event in warm["targets"]] == [("Library", "select")]
    documented = Path(__file__).resolve().parents[2] / "docs" / "page_api.md"
    assert all(f"`/{name}`" in documented.read_text() for name in names), "docs/page_api.md lists every api_name"


def test_examples_cover_the_task_families():
    from explorer.page.ui import load_examples

    examples = load_examples()
    assert any(e["family"] == "free text" for e in examples)
    assert all(e["prompt"].strip() for e in examples)
    assert len({e["family"] for e in examples}) == len(examples)  # one per family
    json.dumps(examples)
