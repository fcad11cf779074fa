"""`RouterConfig.layers`: Arrow routes at the chosen layers only, and the others run their base layers alone, on
both tiny twins; what the trace, the page and the CLI show of the layers left out; bad input."""
import re

import numpy as np
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh, reference_logits

from explorer.page.drill import CellDetail, grid_labels, highlight
from explorer.page.instrument import drill_html
from explorer.page.plots import top1_heatmap
from explorer.page.request import RawRequest, normalise
from explorer.routing.config import RouterConfig, compact_layers, describe_router, parse_layers
from explorer.routing.layer import RoutedLinear
from explorer.routing.model import RoutedModel
from library_store.expert import LoraExpert


def only_layers(exp: LoraExpert, layers) -> LoraExpert:
    """The expert with its weights at those model layers alone (the plain reference then leaves the rest alone)."""
    keep = {k: v for k, v in exp.weights.items() if int(re.search(r"\.layers\.(\d+)\.", k).group(1)) in layers}
    return LoraExpert(exp.info, keep)


@pytest.mark.parametrize("twin", TWINS)
def test_routing_at_some_layers_equals_the_experts_there_alone(twin):
    """Logits equal the plain Arrow reference over the experts' weights at those layers only; every routed linear
    of another layer returns exactly its base layer's output; naming every layer is the same as None."""
    base = fresh(twin)
    exps = experts(base, 4)
    rm = RoutedModel(base, exps, RouterConfig(top_k=2, temperature=0.7, layers=(1,)))
    want = reference_logits(fresh(twin), [only_layers(e, {1}) for e in exps], top_k=2, temperature=0.7)
    torch.testing.assert_close(rm.logits(IDS), want, atol=1e-4, rtol=0)
    seen = []

    def check(mod, inp, out):
        seen.append(mod.key[0])
        if mod.key[0] != 1:
            torch.testing.assert_close(out, mod.base(inp[0]), atol=0, rtol=0)

    hooks = [m.register_forward_hook(check) for m in base.model.modules() if isinstance(m, RoutedLinear)]
    rm.logits(IDS)
    for h in hooks:
        h.remove()
    assert set(seen) == set(rm.layers) == {0, 1}
    every = rm.logits(IDS)
    rm.set_router(RouterConfig(top_k=2, temperature=0.7))
    full = rm.logits(IDS)
    rm.set_router(RouterConfig(top_k=2, temperature=0.7, layers=tuple(rm.layers)))
    torch.testing.assert_close(rm.logits(IDS), full, atol=0, rtol=0)
    assert not torch.allclose(every, full)


def test_the_trace_has_no_routing_at_the_layers_left_out_and_the_page_says_so():
    """Layer 0 left out: no slot, no weight there; layer 1 routes as before (its input does not depend on layer 1);
    the grid leaves those cells empty, the drill-down says the layer is not routed, usage averages routed layers."""
    base = fresh(TWINS[0])
    rm = RoutedModel(base, experts(base, 4), RouterConfig(top_k=2, layers=(0,)))
    part = rm.trace("Reverse the word: apple", max_new_tokens=0)
    rm.set_router(RouterConfig(top_k=2))
    full = rm.trace("Reverse the word: apple", max_new_tokens=0)
    w, w_full = part.module_weights(), full.module_weights()  # (L, T, E)
    np.testing.assert_allclose(w[0], w_full[0], atol=1e-6)  # layer 0 comes first: the same routing
    assert (w[1] == 0).all() and (part.routes.experts[1] == -1).all()
    np.testing.assert_allclose(part.usage("all").sum(), 1.0, rtol=1e-5)  # the mean over the routed layer alone
    np.testing.assert_allclose(part.usage("all"), w[0].mean(0), rtol=1e-5)
    z = np.array(top1_heatmap(part).data[0].z, dtype=float)  # (L, T)
    assert np.isnan(z[1]).all() and not np.isnan(z[0]).any()
    assert "not routed" in top1_heatmap(part).data[0].text[1][0]
    assert all(cells == [] for cells in part.cell(1, 3).values()) and all(part.cell(0, 3).values())
    blank = CellDetail(layer=1, token=3, text="x", generated=False, rows=[])  # what cell_detail makes of it
    assert "Not routed" in drill_html(blank)
    names, idx = grid_labels(part, "mean", None)  # what the browser lights cells by: -1 is never lit
    assert (idx[1] == -1).all() and (idx[0] >= 0).all()
    lit = highlight(part, part, {name for name in part.experts})  # every expert picked on the map
    assert lit.cells and all(layer == 0 for layer, _ in lit.cells)  # never a cell of the layer left out
    rm.set_router(RouterConfig(top_k=2, layers=(0,)))
    with pytest.raises(ValueError, match=r"Layers \[1\] are not routed: this router routes layers 0"):
        with rm.overriding(rm.experts[0], layers=[1]):
            pass


def test_which_layers_decided_shows_the_routed_layers_and_their_mean_is_the_lead():
    """A per-token lean routed at layer 0 only: one bar (layer 0), whose mean is the lean's lead over the routed
    layer, not diluted by the layer left out."""
    from explorer.page.pick_plots import decision_layers

    base = fresh(TWINS[0])
    rm = RoutedModel(base, experts(base, 4), RouterConfig(top_k=2, layers=(0,)))
    trace = rm.trace("Reverse the word: apple", max_new_tokens=0)
    lean = trace.meta["lean"]
    bars = decision_layers(trace).data[0]
    assert list(bars.x) == [0] and len(lean["by_layer"]) == 2
    assert float(np.mean(bars.y)) == pytest.approx(lean["weight"] - lean["runner_weight"], abs=1e-6)


def test_router_config_layers_round_trip_and_words():
    r = RouterConfig(layers=[5, 1, 2, 3, 1])
    assert r.layers == (1, 2, 3, 5) and RouterConfig.from_dict(r.to_dict()) == r
    assert "layers" not in RouterConfig().to_dict()  # a router of every layer is written as before
    assert describe_router(r.to_dict()).endswith("routed at layers 1-3, 5")
    assert compact_layers([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and parse_layers("0-2, 5, 7-8") == (0, 1, 2, 5, 7, 8)
    assert parse_layers("all") is None and parse_layers("") is None


@pytest.mark.parametrize("value, message", [
    ("1,2", "layers must be a list of layer numbers"), ([], "non-empty list"), ([-1], "non-empty list"),
    ([1.5], "non-empty list"), (True, "list of layer numbers")])
def test_bad_layers_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(layers=value)


def test_layers_the_model_does_not_route_are_refused_or_dropped_with_a_notice():
    base = fresh(TWINS[0])
    rm = RoutedModel(base, experts(base, 3), RouterConfig(top_k=2))
    with pytest.raises(ValueError, match=r"Cannot route at layers \[7\]: the routed layers are 0-1"):
        rm.set_router(RouterConfig(top_k=2, layers=(1, 7)))
    assert rm.router.layers is None  # refused: nothing changed
    with pytest.raises(ValueError, match="look like"):
        parse_layers("1-x")
    page = normalise(RawRequest("hi", layers="1, 7"), rm.experts, model_layers=rm.layers)
    assert page.request.router.layers == (1,) and "Ignored layers [7]" in page.notices[0]
    assert "Cannot route at layers [7]" in normalise(RawRequest("hi", layers="1, 7"), rm.experts,
                                                     model_layers=rm.layers, strict=True).error
    assert normalise(RawRequest("hi", layers="oops"), rm.experts).request.router.layers is None  # notice, all
    recorded = normalise(RawRequest("hi"), rm.experts, defaults={"layers": [1]}).request.router
    assert recorded.layers == (1,)  # the library's recorded default fills the gap
    assert normalise(RawRequest("hi", layers="all"), rm.experts, defaults={"layers": [1]}).request.router.layers is None


def test_the_report_card_says_which_layers_route_and_why():
    from explorer.page.report_plots import report_card
    from library_store.store.reports import DefaultRouter

    router = RouterConfig(top_k=2, layers=(0, 1, 2, 5)).to_dict()
    evidence = {"rule": "r", "layers": {"every": 0.82, "alone": 0.97, "subset": [0, 1, 2, 5], "layers": [0, 1, 2, 5]}}
    card = report_card(None, DefaultRouter(router, evidence, "c"), "lib", "path")
    assert "routed at layers 0-2, 5" in card and "82% with every layer, 97% routed at layers 0-2, 5 alone: adopted" \
        in card
    evidence["layers"]["layers"] = None
    assert "not adopted" in report_card(None, DefaultRouter(router, evidence, "c"), "lib", "path")


def test_the_figures_leave_the_layers_not_routed_empty():
    """The expert-weight, entropy, routing-change and one-token figures leave a layer the router does not route at
    empty (NaN), as the grid does, and say so in the title: an entropy of 0 there would read as a decided cell."""
    from explorer.page.plots import diff_heatmap, entropy_heatmap, expert_heatmap, token_experts

    base = fresh(TWINS[0])
    rm = RoutedModel(base, experts(base, 4), RouterConfig(top_k=2, layers=(0,)))
    trace = rm.trace("Reverse the word: apple", max_new_tokens=0)
    rm.set_router(RouterConfig(top_k=2, layers=(0,), disabled=(rm.experts[0],)))
    after = rm.trace("Reverse the word: apple", max_new_tokens=0)
    for fig in (expert_heatmap(trace, trace.experts[0]), entropy_heatmap(trace), diff_heatmap(trace, after)):
        z = np.array(fig.data[0].z, dtype=float)  # (L, T)
        assert np.isnan(z[1]).all() and not np.isnan(z[0]).any(), fig.layout.title.text
        assert "empty rows: 1 layers not routed" in fig.layout.title.text
    z = np.array(token_experts(trace, 2).data[0].z, dtype=float)  # (L, E)
    assert np.isnan(z[1]).all() and not np.isnan(z[0]).any()
    rm.set_router(RouterConfig(top_k=2))
    every = rm.trace("Reverse the word: apple", max_new_tokens=0)
    assert not np.isnan(np.array(entropy_heatmap(every).data[0].z, dtype=float)).any()
    assert "not routed" not in entropy_heatmap(every).layout.title.text


def test_the_csv_download_says_which_rows_were_not_routed():
    """The long table marks each (layer, module, token, expert) row routed or not: a 0 at a layer left out is no
    routing, while a routed layer's zeros are experts outside the top-k."""
    base = fresh(TWINS[0])
    rm = RoutedModel(base, experts(base, 4), RouterConfig(top_k=2, layers=(0,)))
    frame = rm.trace("Reverse the word: apple", max_new_tokens=0).to_frame()
    first, second = frame[frame.layer == rm.layers[0]], frame[frame.layer == rm.layers[1]]
    assert first.routed.all() and not second.routed.any() and (second.weight == 0).all()
    assert (first.weight == 0).any()  # top-2 of 4: the others are routed rows with weight 0
    assert list(frame.columns)[-1] == "routed" and len(frame) == len(frame.drop_duplicates(
        ["token_index", "layer", "module", "expert"]))
