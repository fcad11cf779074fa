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
