"""The page's per-prompt routing (granularity "prompt"), callbacks called directly on a tiny twin + tiny
library: the notice names the pick, the grid and the drill-down show the evidence, counterfactuals intervene on
the run as it answered (the pick alone)."""
import html
import json
import re

import pytest
from test_ui import ROUTE_ARGS, route  # noqa: F401 (the same callback driver)

from explorer.page import callbacks_cell as cc
from explorer.page.registry import Registry
from explorer.page.session import Session
from library_store.testing import TINY, make_tiny_library

pytestmark = pytest.mark.usefixtures("module_derived_cache")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    reg = Registry(TINY, [make_tiny_library(tmp_path_factory.mktemp("ui-prompt") / "lib", n_experts=5)])
    assert reg.wait(timeout=300), reg.status()
    return Session(reg)


def test_per_prompt_run_shows_its_pick_and_the_evidence_grid(session):
    out = route(session, granularity="prompt", max_new=4)
    data = json.loads(out["trace_json"])
    assert data["router"]["granularity"] == "prompt" and data["evidence"]["router"]["granularity"] == "token"
    state = out["state"]
    evidence, applied = state.trace.evidence, state.trace
    picked = applied.most_used_expert()
    assert "Per prompt:" in out["notice"] and f"{picked} alone answered" in out["notice"]
    assert evidence.winner("user") == picked
    strip = re.findall(r'<span class="x-tok[^"]*" data-t="(\d+)"', out["grid"])
    assert [int(t) for t in strip] == evidence.positions("user")  # the grid draws the evidence: the user's text
    t = evidence.user_span[0]
    drilled = cc.drill(session, state, "lib", "mean", f"1, {t}")
    detail = evidence.cell(1, t)  # the evidence's cell (top-2 experts), not the applied one (the pick alone)
    names = {c.expert for m in detail.values() for c in m}
    assert len(names) >= 2 and all(html.escape(n) in drilled["drill"] for n in names)
    assert drilled["cf_expert"].props["value"] == picked  # the counterfactual starts on the expert that answered
    plain = route(session, max_new=4)  # per token: no pick notice, the grid has the generated tokens too
    assert "Per prompt:" not in plain["notice"] and json.loads(plain["trace_json"])["evidence"] is None


def test_readout_pick_without_a_fitted_readout_falls_back_to_the_mean_with_a_notice(session):
    out = route(session, granularity="prompt", pick_by="readout", max_new=2)
    assert "picked by mean weight instead" in out["notice"]
    state = out["state"]
    assert state.trace.router.per_prompt and state.trace.router.pick == "mean" == state.request.router.pick
    assert state.trace.meta["pick"]["rule"] == "mean"
    assert "instead" not in route(session, granularity="prompt", pick_by="mean", max_new=2)["notice"]


def test_counterfactuals_of_a_per_prompt_run_act_on_its_pick(session):
    """Checked against the model run by hand: "before" is the pick alone; the pick off everywhere is the base
    model; another expert forced everywhere is that expert alone; an expert the run did not use, off, changes
    nothing."""
    import torch

    from explorer.page.counterfactual import Counterfactual, next_token
    from explorer.routing.config import RouterConfig

    state = route(session, granularity="prompt", max_new=3)["state"]
    trace = state.trace
    picked, t = trace.meta["pick"]["expert"], trace.n_prompt - 1
    other = next(e for e in trace.experts if e != picked)
    reg = session.registry

    def top5(mode):
        routed.set_router(RouterConfig(mode=mode, top_k=1))
        logp = routed.logits(torch.tensor([trace.token_ids[: t + 1]]))[0, -1].float().log_softmax(-1)
        p, ids = logp.exp().topk(5)
        return routed.display_tokens(ids.tolist()), p.tolist()

    with reg.lock:
        routed = reg.attach("lib")
        results = {}
        for expert, action in ((picked, "off"), (other, "force"), (other, "off")):
            routed.set_router(trace.router)
            results[expert, action] = next_token(routed, trace, Counterfactual(1, t, expert, action, "everywhere"))
        by_hand = {m: top5(m) for m in (f"expert:{picked}", "base", f"expert:{other}")}
        routed.set_router(trace.router)
    for res in results.values():
        assert [x for x, _ in res.before] == by_hand[f"expert:{picked}"][0]
        assert [p for _, p in res.before] == pytest.approx(by_hand[f"expert:{picked}"][1], abs=1e-4)
    off, forced, unused = results[picked, "off"], results[other, "force"], results[other, "off"]
    assert [p for _, p in off.after] == pytest.approx(by_hand["base"][1], abs=1e-4) and off.kl > 0
    assert [p for _, p in forced.after] == pytest.approx(by_hand[f"expert:{other}"][1], abs=1e-4)
    assert unused.kl == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("lead, flagged", [(1.0, True), (0.0, False)])
def test_an_uncertain_pick_is_a_warning_in_the_notice(session, monkeypatch, lead, flagged):
    """The pick's line is marked ⚠️ and says "Uncertain pick" exactly when the pick is flagged (here forced both
    ways through the lead a mean-weight pick needs, as a library's readout records it)."""
    from explorer.routing import model

    monkeypatch.setattr(model, "recorded_lead", lambda *_: lead)
    out = route(session, granularity="prompt", max_new=2)
    first = out["notice"].split("\n\n")[0]
    assert out["state"].trace.meta["pick"]["uncertain"] is flagged
    assert first.startswith("⚠️" if flagged else "ℹ️") and ("Uncertain pick" in first) is flagged
    assert "Per prompt:" in first


@pytest.mark.parametrize("lead, flagged", [(1.0, True), (0.0, False)])
def test_a_per_token_run_says_what_the_text_leans_to(session, monkeypatch, lead, flagged):
    """Per token, under the grid: the expert the user's text leans to (the grid's mean over the user's text),
    marked ⚠️ and "Undecided" exactly when its lead is too small to call; a per-prompt run's grid has no such line
    (its notice names the pick)."""
    from explorer.routing import model

    monkeypatch.setattr(model, "recorded_lead", lambda *_: lead)
    out = route(session, max_new=2)
    trace = out["state"].trace
    line = re.search(r'<div class="x-lean[^"]*">([^<]*)</div>', out["grid"])
    said = line.group(1) if line else ""
    assert said.startswith("⚠️" if flagged else "ℹ️") and ("Undecided" in said) is flagged
    assert f"Per token: your text leans to {html.escape(trace.winner('user'))}" in said
    assert "x-lean" not in route(session, granularity="prompt", max_new=2)["grid"]


def test_comparison_of_a_per_prompt_run_shows_the_runner_up_s_answer(session):
    """The pick answered alone, so "most-used expert" would repeat the answer: the comparison runs the runner-up
    alone instead, checked against the model run by hand."""
    from explorer.page import callbacks as cb
    from explorer.routing.config import RouterConfig

    out = route(session, granularity="prompt", max_new=4)
    state = out["state"]
    runner = state.trace.meta["pick"]["runner_up"]
    assert runner and runner != state.trace.meta["pick"]["expert"]
    got = cb.compare(session, state)
    assert got["single_text"].props["label"] == f"runner-up ({runner})"
    with session.registry.lock:
        rm = session.registry.attach("lib")
        saved = rm.router
        rm.set_router(RouterConfig(mode=f"expert:{runner}", top_k=1))
        by_hand = rm.generate(state.request.prompt, max_new_tokens=4, chat=state.request.chat)
        rm.set_router(saved)
    assert got["single_text"].props["value"] == by_hand and got["arrow_text"] == state.trace.text


def test_the_figures_say_which_layers_decided_the_pick_or_the_lean(session):
    """"Which layers decided": one bar per evidence layer, the recorded decision's per-layer shares (here by mean
    weight: their mean is the pick's lead), coloured for the pick above zero; a per-token run explains its lean;
    a uniform merge decided nothing and says so."""
    import numpy as np

    from explorer.page import callbacks as cb

    for granularity, key in (("prompt", "pick"), ("token", "lean")):
        out = route(session, granularity=granularity, max_new=2)
        state = out["state"]
        chosen = state.trace.meta[key]
        fig = cb.figures(session, state, "mean", None, False)["decision"]
        bars = fig.data[0]
        layers = (state.trace.evidence or state.trace).layers
        assert list(bars.x) == list(layers) and np.allclose(bars.y, chosen["by_layer"])
        assert np.mean(bars.y) == pytest.approx(chosen["weight"] - chosen["runner_weight"], abs=1e-6)
        title = fig.layout.title.text
        assert f"{chosen['expert']} over {chosen['runner_up']}" in title and "mean-weight lead" in title
    from explorer.page.pick_plots import decision_layers
    from explorer.routing.config import RouterConfig

    rm = session.registry.attach("lib")
    with session.registry.lock:
        rm.set_router(RouterConfig(mode="uniform"))
        merged = rm.trace("Count the words: one two", max_new_tokens=1)
    fig = decision_layers(merged)
    assert not fig.data and "no decision to explain" in fig.layout.annotations[0].text
