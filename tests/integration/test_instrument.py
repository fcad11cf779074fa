"""The instrument without a server, on a tiny twin + tiny library: streaming, the drill-down (no model call,
fast), the map pick's cells, the per-token counterfactual checked against the model run by hand, and every bad
click answered with a notice."""
import time

import numpy as np
import pytest
import torch

from explorer.page import callbacks as cb
from explorer.page import callbacks_cell as cc
from explorer.page.counterfactual import Counterfactual, next_token, regenerate
from explorer.page.drill import CellError, cell_detail, parse_cell
from explorer.page.registry import Registry
from explorer.page.request import RawRequest
from explorer.page.session import Session
from explorer.page.stream import stream_run
from explorer.routing.config import RouterConfig
from library_store.testing import TINY, make_tiny_library

PROMPT = "Reverse the word: apple"
ROUTE = dict(chat=True, top_k=2, temperature=1.0, centre="none", centre_scope="prototypes", max_new=6, disabled=[],
             module="mean", colour_by="expert", grid_by="weight", show_template=False)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_EXPLORER_DERIVED_CACHE", str(tmp_path_factory.mktemp("derived-cache")))
    lib = make_tiny_library(tmp_path_factory.mktemp("instrument") / "lib", n_experts=5)
    reg = Registry(TINY, [lib])
    assert reg.wait(timeout=300), reg.status()
    yield Session(reg)
    mp.undo()


@pytest.fixture(scope="module")
def state(session):
    *_, out = cb.route(session, PROMPT, "lib", *ROUTE.values())
    assert out["state"] is not None, out["notice"]
    return out["state"]


def test_stream_gives_growing_text_then_the_result(session):
    steps = list(stream_run(session, RawRequest(PROMPT, library="lib", top_k=2, max_new_tokens=6)))
    *texts, result = steps
    assert result.trace is not None and len(texts) >= 2
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[-1] == result.trace.text
    alone = session.run(RawRequest(PROMPT, library="lib", top_k=2, max_new_tokens=6)).trace
    assert alone == result.trace  # streaming changes nothing in the trace


def test_drill_shows_the_stored_cell_without_a_model_call(session, state, monkeypatch):
    trace = state.trace
    t = trace.n_prompt - 1
    monkeypatch.setattr(session.registry, "base", None)  # a click must not touch the model
    t0 = time.perf_counter()
    out = cc.drill(session, state, "lib", "mean", "", {"run": state.run_id, "layer": 1, "token": t})
    assert time.perf_counter() - t0 < 0.3
    assert out["cell"] == f"1, {t}" and out["cf_panel"].props == {"open": True}
    cells = trace.cell(1, t)
    for module, chosen in cells.items():
        for c in chosen:
            assert f'data-expert="{c.expert}"' in out["drill"]
            assert f"{c.contribution:.3f}" in out["drill"] and f"{c.score:.3f}" in out["drill"]
    detail = cell_detail(state, 1, t)
    w = trace.module_weights()[1, t]  # (E,)
    assert detail.top_weight == trace.experts[int(w.argmax())]
    assert [r.expert for r in detail.rows] == [trace.experts[i] for i in np.argsort(-w) if w[i] > 0]
    names, idx, _ = trace.top_contributor()
    assert detail.top_contribution == names[int(idx[1, t])]


@pytest.mark.parametrize("how,cell,event,library,says", [
    ("before a run", "1, 3", None, "lib", "Press Run first"),
    ("library changed", "1, 3", None, "other", "library changed"),
    ("stale grid", "", {"run": -5, "layer": 1, "token": 3}, "lib", "earlier run"),
    ("unknown layer", "7, 3", None, "lib", "Layer 7 is not in this run"),
    ("token outside", "1, 9999", None, "lib", "Token 9999 is not in this run"),
    ("nonsense", "<b>x</b>", None, "lib", "Cannot read the cell"),
])
def test_bad_clicks_are_notices(session, state, how, cell, event, library, says):
    out = cc.drill(session, None if how == "before a run" else state, library, "mean", cell, event)
    assert says in out["drill"] and "x-error" in out["drill"], how
    assert "<b>" not in out["drill"]  # quoted input stays text
    assert out["cf_panel"].props == {}


def test_parse_cell_reads_the_forms_the_page_and_the_api_send():
    assert parse_cell("3, 7") == parse_cell("layer 3, token 7") == parse_cell([3, 7]) == (3, 7)
    assert parse_cell({"layer": 3, "token": 7}) == (3, 7)
    with pytest.raises(CellError):
        parse_cell("three")


def test_highlight_lights_the_cells_whose_top_expert_was_picked(session, state):
    trace = state.trace
    view = session.view(trace, False)
    names, idx, _ = view.top_expert()
    picked = names[int(idx[0, 0])]
    out = cc.highlight(session, state, "lib", "mean", "expert", "weight", False, picked)
    positions = trace.positions("user+generated")
    want = sorted((view.layers[li], positions[ti]) for li, ti in zip(*np.nonzero(idx == names.index(picked))))
    assert sorted(map(tuple, out["selection_json"]["cells"])) == want and want
    assert f"{len(want)} grid cells" in out["selection"]
    cluster = session.registry.groups("lib")[picked]
    by_cluster = cc.highlight(session, state, "lib", "mean", "cluster", "weight", False, cluster)
    assert len(by_cluster["selection_json"]["cells"]) >= len(want)  # the cluster holds the expert and more
    assert "no expert, task or cluster" in cc.highlight(session, state, "lib", "mean", "expert", "weight", False,
                                                        "zz")["selection"]
    assert "Press Run" in cc.highlight(session, None, "lib", "mean", "expert", "weight", False, picked)["selection"]


def _logits(routed, ids):
    return routed.logits(torch.tensor([ids]))[0].float().log_softmax(-1)  # (t, V)


def test_counterfactual_matches_the_model_run_by_hand(session, state):
    """"everywhere" + off is the run with that expert disabled: the after distribution and the regenerated
    answer equal the model's own, with the router set by hand."""
    trace = state.trace
    t = trace.n_prompt - 1  # the prompt's last token predicts the answer's first
    expert = trace.most_used_expert()
    reg = session.registry
    with reg.lock:
        routed = reg.attach("lib")
        routed.set_router(trace.router)
        cf = Counterfactual(layer=trace.layers[0], token=t, expert=expert, action="off", scope="everywhere")
        res = regenerate(routed, trace, next_token(routed, trace, cf))
        before = _logits(routed, trace.token_ids[: t + 1])[-1]
        routed.set_router(RouterConfig(mode="arrow", top_k=2, disabled=(expert,)))
        after = _logits(routed, trace.token_ids[: t + 1])[-1]
        text = routed.generate(PROMPT, max_new_tokens=len(trace.tokens) - trace.n_prompt)
        routed.set_router(trace.router)
    top_before = before.exp().topk(5)
    assert [p for _, p in res.before] == pytest.approx(top_before.values.tolist(), abs=1e-4)
    assert [p for _, p in res.after] == pytest.approx(after.exp().topk(5).values.tolist(), abs=1e-4)
    kl = float((before.exp() * (before - after)).sum())
    assert res.kl == pytest.approx(kl, rel=1e-3, abs=1e-6) and res.kl > 0
    assert res.text_after == text and res.text_before == trace.text


def test_counterfactual_at_one_cell_changes_only_that_token(session, state):
    trace = state.trace
    t = trace.n_prompt - 1
    w = trace.module_weights()[0, t]
    top = trace.experts[int(w.argmax())]
    outs = list(cc.counterfactual(session, state, "lib", f"{trace.layers[0]}, {t}", top, "off", "cell"))
    assert len(outs) == 2 and 'data-kl="' in outs[0]["cf_out"] and "Regenerating" in outs[0]["cf_out"]
    kl = float(outs[0]["cf_out"].split('data-kl="')[1].split('"')[0])
    assert kl > 0  # switching the cell's top expert off moves the next-token distribution
    assert "Regenerating" not in outs[1]["cf_out"]
    forced = list(cc.counterfactual(session, state, "lib", f"{trace.layers[0]}, {t}", top, "force", "token"))[0]
    assert 'data-kl="' in forced["cf_out"]


@pytest.mark.parametrize("args,says", [(("1, 3", "nope", "off", "cell"), "Unknown expert 'nope'"),
                                       (("1, 3", "add_two", "explode", "cell"), "Unknown action"),
                                       (("1, 3", "add_two", "off", "galaxy"), "Unknown scope"),
                                       (("1, 999", "add_two", "off", "cell"), "Token 999")])
def test_counterfactual_refusals_are_notices(session, state, args, says):
    outs = list(cc.counterfactual(session, state, "lib", *args))
    assert len(outs) == 1 and says in outs[0]["cf_out"] and "x-error" in outs[0]["cf_out"]


def test_counterfactual_refuses_other_modes(session):
    *_, out = cb.route(session, PROMPT, "lib", *{**ROUTE, "max_new": 2}.values())
    state = out["state"]
    from dataclasses import replace

    uniform = replace(state, trace=replace(state.trace, router=RouterConfig(mode="uniform")))
    outs = list(cc.counterfactual(session, uniform, "lib", "1, 3", "add_two", "off", "cell"))
    assert "mode 'uniform'" in outs[0]["cf_out"]


def test_hostile_tokens_stay_text_in_grid_strip_legend_drill_and_counterfactual(session, state):
    from dataclasses import replace

    from explorer.page import instrument
    from explorer.page.counterfactual import CounterfactualResult

    hostile = '<img src=x onerror="alert(1)">'
    trace = state.trace
    evil = replace(state, trace=replace(trace, tokens=[hostile] * len(trace.tokens)))
    grid = cb.grid(session, evil, "mean", "expert", "weight", True)["grid"]
    drill = cc.drill(session, evil, "lib", "mean", "1, 3")["drill"]
    cf = instrument.counterfactual_html(CounterfactualResult(
        Counterfactual(1, 3, "add_two"), [(hostile, 0.5)], [(hostile, 0.4)], 0.1, 0.01, text_before=hostile,
        text_after=hostile + " changed"))
    for page in (grid, drill, cf):
        assert "<img" not in page and "&lt;img" in page
    assert grid.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;</span>") == 0  # quotes as typed in text
    assert 'onerror="alert(1)"&gt;</span>' in grid and 'onerror="alert(1)"&gt;</code>' in drill


def test_switching_off_an_unchosen_expert_at_a_cell_changes_nothing(session):
    """With top-1 routing, some expert is chosen by no module of a layer: switching it off there leaves the
    routing, hence the distribution, exactly as it was (the KV-cache path must see token t once)."""
    *_, out = cb.route(session, PROMPT, "lib", *{**ROUTE, "top_k": 1}.values())
    state = out["state"]
    trace = state.trace
    t = trace.n_prompt - 1
    chosen = {c.expert for cells in trace.cell(trace.layers[0], t).values() for c in cells}
    idle = next(e for e in trace.experts if e not in chosen)
    reg = session.registry
    with reg.lock:
        routed = reg.attach("lib")
        routed.set_router(trace.router)
        res = next_token(routed, trace, Counterfactual(trace.layers[0], t, idle, "off", "cell"))
        plain = _logits(routed, trace.token_ids[: t + 1])[-1].exp().topk(5).values.tolist()
    assert res.kl < 1e-6 and res.before == res.after
    assert [p for _, p in res.before] == pytest.approx(plain, abs=1e-4)
