"""The evaluation's choice of routed layers (bench/eval_sweep.py, `choose_layers`): on training prompts only,
by the accuracy of the mean weight over the kept layers, adopted only when routing them alone beats every layer."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import eval_routing, eval_sweep  # noqa: E402
from bench.layer_subset import accuracy, eliminate  # noqa: E402

# (L=3, E=2) mean weights of a task-a and a task-b prompt, every layer routed: layer 1 sends both the wrong way
FULL = {"a": [[1, 0], [0, 1], [0.4, 0.6]], "b": [[0, 1], [1, 0], [0.4, 0.6]]}


def test_elimination_drops_the_layer_that_misleads():
    data = (np.array([FULL["a"], FULL["b"]], float), np.array([0, 1]))
    assert accuracy(data, [0, 1, 2]) == 0.5 and accuracy(data, [0, 2]) == 1.0
    kept = eliminate(data, [0, 1, 2])
    assert 1 not in kept and accuracy(data, kept) == 1.0


@pytest.mark.parametrize("alone_right, adopted", [(True, True), (False, False)])
def test_the_subset_is_adopted_only_when_routing_it_alone_beats_every_layer(monkeypatch, alone_right, adopted):
    from explorer.routing.config import RouterConfig

    class Stub:
        layers, experts = [0, 1, 2], ["a", "b"]
        router = RouterConfig(top_k=1, granularity="prompt", pick="readout")
        seen = []

        def set_router(self, r):
            self.seen.append(r.layers)
            self.router = r

    stub = Stub()

    def fake_route(rm, base, texts, max_tokens):  # each "trace": (its task, the router's layers)
        return [(text, rm.router.layers) for text in texts]

    def fake_features(trace):
        task, layers = trace
        rows = FULL[task] if layers is None or alone_right else FULL["b" if task == "a" else "a"]
        return np.array(rows, float).ravel()

    monkeypatch.setattr(eval_routing, "route_prompts", fake_route)
    monkeypatch.setattr("explorer.routing.readout.features", fake_features)
    tasks = [SimpleNamespace(name=t, train=[SimpleNamespace(input=t)] * 3) for t in ("a", "b")]
    winner = {"top_k": 1, "temperature": 1.0, "centre": "none", "centre_scope": "prototypes", "input_centre": "none"}
    got = eval_sweep.choose_layers(stub, None, tasks, {"a": ["a"], "b": ["b"]}, winner, 3)
    assert got["every"] == 0.5 and got["read"] == 1.0 and 1 not in got["subset"] and got["split"] == "train"
    assert got["alone"] == (1.0 if alone_right else 0.0)
    assert got["layers"] == (got["subset"] if adopted else None)
    assert stub.seen[:2] == [None, tuple(got["subset"])] and stub.router.pick == "readout"  # the start router again


@pytest.mark.parametrize("best_k, unchanged", [(2, True), (4, False)])
def test_the_resweep_scores_every_recorded_setting_at_the_routed_layers(monkeypatch, best_k, unchanged):
    """bench/sweep_at_layers.py: the recorded grid of the default's centring, scored again with its routed layers
    (per token), the same winner rule, and the start router back; rows of another centring are left out."""
    from bench.sweep_at_layers import resweep
    from explorer.routing.config import RouterConfig

    layers = [0, 2]
    recorded = SimpleNamespace(
        router={**RouterConfig(top_k=2, temperature=0.3, centre="mean", input_centre="base", granularity="prompt",
                               pick="readout", layers=tuple(layers)).to_dict()},
        evidence={"winner": {"user": 0.8}, "rows": [
            {"centre": "mean", "centre_scope": "prototypes", "input_centre": "base", "top_k": k, "temperature": t,
             "user": 0.5} for k, t in ((1, 0.1), (2, 0.3), (4, 0.3))] + [
            {"centre": "none", "centre_scope": "prototypes", "input_centre": "base", "top_k": 2, "temperature": 0.3,
             "user": 0.9}, {"centre": "mean", "centre_scope": "prototypes", "input_centre": "base", "refused": "x"}]})

    class Stub:
        router = RouterConfig(top_k=1)
        seen = []

        def set_router(self, r):
            self.seen.append(r)
            self.router = r

    def fake_score(rm, base, prompts, own, em, max_tokens=4096):  # best_k routes best; k 1 is decisive too
        r = rm.router
        return {"user": 0.9 if r.top_k == best_k else 0.6, "prompt": 0.5, "margin_median": 0.2, "em": 0.4}

    monkeypatch.setattr(eval_sweep, "score_setting", fake_score)
    stub = Stub()
    tasks = [SimpleNamespace(name="a", metric="exact_match", train=[SimpleNamespace(input="a")] * 3)]
    got = resweep(stub, None, tasks, {"a": ["a"]}, recorded, 2, 1)
    scored = stub.seen[:-1]
    assert [(r.top_k, r.temperature) for r in scored] == [(1, 0.1), (2, 0.3), (4, 0.3)]
    assert all(r.layers == tuple(layers) and r.granularity == "token" and r.centre == "mean"
               and r.input_centre == "base" for r in scored)
    assert stub.seen[-1].top_k == 1 and stub.seen[-1].layers is None  # the start router again
    assert got["winner"]["top_k"] == best_k and got["unchanged"] is unchanged
    assert got["recorded"] == {"top_k": 2, "temperature": 0.3} and len(got["recorded_rows"]) == 3
