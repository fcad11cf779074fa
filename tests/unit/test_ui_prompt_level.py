"""The page's per-prompt routing (granularity "prompt"), callbacks called directly on a tiny twin + tiny
library: the notice names the pick, the grid and the drill-down show the evidence, counterfactuals are refused."""
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


def test_per_prompt_run_shows_its_pick_and_the_evidence_grid_and_refuses_counterfactuals(session):
    out = route(session, granularity="prompt", max_new=4)
    data = json.loads(out["trace_json"])
    assert data["router"]["granularity"] == "prompt" and data["evidence"]["router"]["granularity"] == "token"
    state = out["state"]
    evidence, applied = state.trace.evidence, state.trace
    picked = applied.most_used_expert()
    assert "Routed per prompt:" in out["notice"] and f"every token used {picked} alone" in out["notice"]
    assert evidence.winner("user") == picked
    strip = re.findall(r'<span class="x-tok[^"]*" data-t="(\d+)"', out["grid"])
    assert [int(t) for t in strip] == evidence.positions("user")  # the grid draws the evidence: the user's text
    t = evidence.user_span[0]
    drilled = cc.drill(session, state, "lib", "mean", f"1, {t}")
    detail = evidence.cell(1, t)  # the evidence's cell (top-2 experts), not the applied one (the pick alone)
    names = {c.expert for m in detail.values() for c in m}
    assert len(names) >= 2 and all(html.escape(n) in drilled["drill"] for n in names)
    cf = list(cc.counterfactual(session, state, "lib", f"1, {t}", picked, "off", "cell"))
    assert len(cf) == 1 and "picked one expert for the whole prompt" in cf[0]["cf_out"]
    plain = route(session, max_new=4)  # per token: no pick notice, the grid has the generated tokens too
    assert "Routed per prompt" not in plain["notice"] and json.loads(plain["trace_json"])["evidence"] is None
