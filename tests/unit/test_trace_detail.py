"""Sparse traces and their drill-down data: the stored top-k expands to exactly the dense weights, and every
recorded score, margin, contribution and base norm equals a plain float64 computation from the experts' own
factors, for the prompt (dense path) and for generated tokens (one-token path). The model runs on
$LORA_EXPLORER_TEST_DEVICE (the CPU by default; bench/gpu_check.sh sets cuda)."""
import json

import numpy as np
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh

from explorer.routing.config import RouterConfig
from explorer.routing.device import device_for_tests
from explorer.routing.layer import RoutedLinear
from explorer.routing.model import RoutedModel
from explorer.routing.topk import TopKRoutes
from explorer.routing.trace import RoutingTrace


@pytest.fixture(scope="module", params=TWINS)
def rm(request):
    base = fresh(request.param)
    rm = RoutedModel(base, experts(base, 6, rank=[4, 2, 4, 3, 4, 1]), RouterConfig(top_k=2, temperature=0.7))
    base.model.to(device_for_tests())
    return rm


@torch.no_grad()
def reference(rm, ids) -> dict:
    """Per site, from the layer inputs of a full forward: raw scores |h·p| (t, E), weights (t, E),
    contributions ‖w_e s_e B_e A_e h‖ (t, E) and base norms (t,), all in float64 from the experts' factors."""
    inputs, handles = {}, []
    for site in rm.sites:
        mod = rm.base.model.get_submodule(site)
        handles.append(mod.register_forward_hook(lambda m, i, o, site=site: inputs.__setitem__(site, i[0])))
    try:
        with rm.capturing() as records:
            rm.logits(ids)
    finally:
        for h in handles:
            h.remove()
    weights = rm.routing_weights(records)
    out = {}
    for site in rm.sites:
        mod: RoutedLinear = rm.base.model.get_submodule(site)
        x = inputs[site].reshape(-1, inputs[site].shape[-1])  # (t, d) on the model's device
        h = x.double().cpu()
        stack = rm._stacks[site]
        scores = (h @ stack.prototypes.double().T).abs()  # (t, E)
        w = weights[site].double()  # (t, E)
        contrib = torch.stack([(w[:, e:e + 1] * stack.scaling[e].double() * (h @ stack.A[e].double().T)
                                @ stack.B[e].double().T).norm(dim=-1) for e in range(len(rm.experts))], 1)
        out[site] = dict(scores=scores, weights=w, contribution=contrib,
                         base_norm=mod.base(x).double().norm(dim=-1).cpu())
    return out


def check_detail(rm, routes: TopKRoutes, ref: dict, tokens: slice, rtol: float, exact: bool = True):
    for site, want in ref.items():
        layer, mi = rm._keys[site]
        li = rm.layers.index(layer)
        ids = torch.as_tensor(routes.experts[li, mi, tokens].astype(np.int64))  # (t, k)
        k = ids.shape[1]
        got_w = routes.dense()[li, mi, tokens]
        if exact:  # the same forward: exactly the dense weights
            np.testing.assert_array_equal(got_w, want["weights"].float().numpy())
        else:  # one-token steps sum in another order than a full forward
            np.testing.assert_allclose(got_w, want["weights"].float().numpy(), atol=1e-5, rtol=0)
        for name in ("scores", "contribution"):
            np.testing.assert_allclose(getattr(routes, name)[li, mi, tokens].astype(np.float64),
                                       want[name].gather(1, ids).numpy(), rtol=rtol, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(routes.base_norm[li, mi, tokens], want["base_norm"].numpy(), rtol=rtol)
        left_out = want["scores"].scatter(1, ids, -1.0).max(dim=1).values  # best expert not chosen
        np.testing.assert_allclose(routes.runner_up[li, mi, tokens], left_out.numpy(), rtol=rtol, atol=1e-6)
        assert k == 2  # (an all-zero hidden state, e.g. the pad embedding at layer 0, gives 0 contributions)


def test_records_equal_a_plain_float64_computation(rm):
    ref = reference(rm, IDS)
    with rm.capturing() as records:
        rm.logits(IDS)
    routes = rm._assemble(records, IDS.shape[1])  # stored compactly (float16 where it fits)
    check_detail(rm, routes, ref, slice(None), rtol=2e-3)
    exact = TopKRoutes(**{**routes.__dict__, "contribution": None})  # weights stay float32: exact
    assert exact.weights.dtype == np.float32 and routes.contribution.dtype == np.float16


def test_generated_tokens_detail_equals_a_full_forward(rm):
    # generated tokens go through the one-token path (top-k rows only): same detail as the dense path
    trace = rm.trace("Count: one two", max_new_tokens=4)
    ref = reference(rm, torch.tensor([trace.token_ids]))
    check_detail(rm, trace.routes, ref, slice(None), rtol=2e-3, exact=False)


def test_cell_and_top_contributor(rm):
    trace = rm.trace("Reverse the word: apple", max_new_tokens=2)
    layer, t = trace.layers[-1], len(trace.tokens) - 1
    cell = trace.cell(layer, t)
    assert list(cell) == trace.modules
    li = trace.layers.index(layer)
    for mi, (module, chosen) in enumerate(cell.items()):
        assert len(chosen) == 2 and chosen[0].weight >= chosen[1].weight
        dense = trace.weights[li, mi, t]
        assert [c.weight for c in chosen] == [dense[trace.experts.index(c.expert)] for c in chosen]
        assert sum(c.weight for c in chosen) == pytest.approx(1.0, abs=1e-6)
        assert chosen[0].margin == pytest.approx(chosen[0].score - chosen[1].score, abs=1e-6)
        assert chosen[1].margin == pytest.approx(chosen[1].score - float(trace.routes.runner_up[li, mi, t]), abs=1e-6)
        base = float(trace.routes.base_norm[li, mi, t])
        assert all(c.relative == pytest.approx(c.contribution / base) for c in chosen)
    names, idx, value = trace.top_contributor()
    contrib = trace.routes.dense("contribution").mean(axis=1)  # (L, T, E), the slow obvious way
    np.testing.assert_array_equal(idx, contrib.argmax(-1))
    np.testing.assert_allclose(value, contrib.max(-1), rtol=1e-6)
    names_q, idx_q, _ = trace.top_contributor(module=trace.modules[0], relative=True)
    with np.errstate(invalid="ignore"):  # a zero hidden state (the pad embedding) has a zero base output
        rel = np.nan_to_num(trace.routes.dense("contribution")[:, 0] / trace.routes.base_norm[:, 0, :, None])
    np.testing.assert_array_equal(idx_q, rel.argmax(-1))
    _, gidx, _ = trace.top_contributor(groups={e: "all" for e in trace.experts})
    assert (gidx == 0).all()
    with pytest.raises(ValueError, match=r"Unknown layer 99"):
        trace.cell(99, 0)
    with pytest.raises(ValueError, match=r"token 999 is outside"):
        trace.cell(layer, 999)


def test_json_round_trip_keeps_detail_and_reads_old_dense_traces(rm):
    trace = rm.trace("hi there", max_new_tokens=2)
    again = RoutingTrace.from_json(trace.to_json(dense=False))
    assert again == trace and again.routes.has_detail
    assert again.cell(trace.layers[0], 1) == trace.cell(trace.layers[0], 1)
    old = json.loads(trace.to_json())  # a trace saved before sparse routes had dense weights only
    del old["routes"]
    legacy = RoutingTrace.from_dict(old)
    np.testing.assert_array_equal(legacy.weights, trace.weights)
    assert not legacy.routes.has_detail and legacy.cell(trace.layers[0], 1)["q_proj"][0].contribution is None
    with pytest.raises(ValueError, match="no contribution data"):
        legacy.top_contributor()
    cropped = trace.crop("user+generated")
    np.testing.assert_array_equal(cropped.weights, trace.weights[:, :, trace.positions("user+generated")])
    assert cropped.cell(trace.layers[0], 0) == trace.cell(trace.layers[0], trace.user_span[0])


def test_modes_record_their_experts(rm):
    try:
        rm.set_router(RouterConfig(mode="uniform", disabled=("e1",)))
        t = rm.trace("hi", max_new_tokens=1)
        assert t.routes.k == 5 and np.allclose(t.weights[..., [0, 2, 3, 4, 5]], 0.2) and (t.weights[..., 1] == 0).all()
        chosen = t.cell(t.layers[0], 0)["q_proj"]
        assert [c.score for c in chosen] == sorted([c.score for c in chosen], reverse=True)
        rm.set_router(RouterConfig(mode="expert:e3"))
        t = rm.trace("hi", max_new_tokens=1)
        assert t.routes.k == 1 and (t.routes.experts == 3).all() and (t.routes.contribution > 0).mean() > 0.9
        rm.set_router(RouterConfig(mode="base"))
        t = rm.trace("hi", max_new_tokens=1)
        assert t.routes.k == 0 and (t.weights == 0).all() and t.cell(t.layers[0], 0)["q_proj"] == []
    finally:
        rm.set_router(RouterConfig(top_k=2, temperature=0.7))


def test_from_dense_round_trip_is_exact_and_smaller():
    rng = np.random.default_rng(0)
    w = rng.random((3, 2, 50, 64)).astype(np.float32)
    w[w < 0.95] = 0  # about 3 of 64 non-zero per row, some rows empty
    routes = TopKRoutes.from_dense(w)
    np.testing.assert_array_equal(routes.dense(), w)
    assert routes.experts.dtype == np.int16 and routes.nbytes < w.nbytes / 4
    again = TopKRoutes.from_dict(json.loads(json.dumps(routes.to_dict())))
    assert again == routes
    empty = TopKRoutes.from_dense(np.zeros((2, 2, 0, 3)))
    assert TopKRoutes.from_dict(json.loads(json.dumps(empty.to_dict()))).shape == (2, 2, 0, 3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_json_floats_are_short_and_read_back_to_the_same_values(dtype):
    """The trace's JSON writes each float16/32 value as the shortest decimal that reads back to it (the float64
    repr of a float16 runs to 17 digits), NaN as null; reading it as `from_dict` does gives the same bits."""
    from explorer.routing.topk import json_floats

    info = np.finfo(dtype)
    edge = [0.0, -0.0, 1.0, -1.0, 0.1, 1 / 3, float(info.max), -float(info.max), float(info.tiny),
            float(info.smallest_subnormal), float("nan"), 0.0123443603515625]
    rng = np.random.default_rng(1)
    x = np.concatenate([np.array(edge), rng.standard_normal(404) * 10.0 ** rng.integers(-6, 4, 404)]).astype(dtype)
    x = x.reshape(2, 2, -1, 4)  # (L, M, T, k) like the routes
    text = json.dumps(json_floats(x))
    back = np.array(json.loads(text), dtype=np.float64).astype(dtype)  # null -> NaN, as from_dict reads it
    assert back.shape == x.shape
    np.testing.assert_array_equal(back.view(np.uint16 if dtype == np.float16 else np.uint32),
                                  x.view(np.uint16 if dtype == np.float16 else np.uint32))
    exact = json.dumps(np.where(np.isnan(x), None, x.astype(np.float64).astype(object)).tolist())
    assert len(text) < 0.75 * len(exact)
    assert "NaN" not in text and "null" in text
