"""The per-prompt pick's readout: it reads the per-layer pattern the mean weight throws away, round-trips through
the library, is applied by the engine, and is refused (nothing changed) where none was fitted."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from arrow_helpers import experts, fresh

from explorer.routing.config import RouterConfig
from explorer.routing.model import RoutedModel
from explorer.routing.prompt_level import pick
from explorer.routing.readout import Readout, features, fit_readout, readout_key
from explorer.routing.trace import RoutingTrace
from library_store.store.library import ExpertLibrary
from library_store.store.reports import read_readout, write_readout

PROMPT = "Count the words: one two three four"


def synthetic(layer0: float, rng) -> RoutingTrace:
    """2 layers, 2 experts, 3 user tokens: e0 leads the mean weight whatever `layer0` is; which of the two
    classes a trace belongs to shows only in how the weight splits between the layers."""
    w = np.zeros((2, 1, 3, 2), np.float32)
    w[0, 0, :, 0], w[1, 0, :, 0] = layer0, 1.4 - layer0  # e0: 0.7 on average either way
    w[..., 1] = 1 - w[..., 0]
    w[..., 0] += rng.normal(0, 0.01, (2, 1, 3)).astype(np.float32)
    w[..., 1] = 1 - w[..., 0]
    return RoutingTrace(tokens=list("abc"), token_ids=[0, 1, 2], is_generated=[False] * 3, layers=[0, 1],
                        modules=["q"], experts=["e0", "e1"], weights=w, user_span=(0, 3))


def test_readout_reads_the_per_layer_pattern_the_mean_weight_misses():
    rng = np.random.default_rng(0)
    traces = [synthetic(0.9, rng) for _ in range(20)] + [synthetic(0.5, rng) for _ in range(20)]
    labels = ["e0"] * 20 + ["e1"] * 20
    readout = fit_readout(traces, labels)
    assert readout.meta["train_accuracy"] == 1.0 and readout.classes == ["e0", "e1"]
    fresh_e1 = synthetic(0.5, rng)
    assert pick(fresh_e1).expert == "e0"  # by mean weight
    got = pick(fresh_e1, readout)
    assert (got.expert, got.rule, got.by_mean) == ("e1", "readout", "e0") and got.confidence > 0.5
    assert "by mean weight: e0" in got.describe()
    assert pick(synthetic(0.9, rng), readout).expert == "e0"
    back = Readout.from_tensors(*readout.to_tensors())
    np.testing.assert_allclose(back.probabilities(fresh_e1), readout.probabilities(fresh_e1), atol=1e-6)
    other = RoutingTrace(tokens=["a"], token_ids=[0], is_generated=[False], layers=[0, 1], modules=["q"],
                         experts=["e0", "x"], weights=np.full((2, 1, 1, 2), 0.5, np.float32))
    with pytest.raises(ValueError, match="fitted for other experts"):
        readout.probabilities(other)
    with pytest.raises(ValueError, match="one label per trace"):
        fit_readout(traces, labels[:3])


def always(rm, expert: str) -> Readout:
    """A readout that picks `expert` whatever the evidence."""
    E, L = len(rm.experts), len(rm.layers)
    bias = np.where(np.array(rm.experts) == expert, 5.0, 0.0)
    return Readout(list(rm.experts), list(rm.layers), list(rm.experts), np.zeros((E, L * E)), bias)


def test_engine_answers_with_the_readout_s_pick_and_refuses_without_one(tmp_path):
    base = fresh("tiny-random-llama")
    path = tmp_path / "lib"
    lib = ExpertLibrary.create(path, base)
    for e in experts(base, 4):
        lib.add(e)
    rm = RoutedModel.from_library(base, ExpertLibrary.open(path, readonly=True), RouterConfig(top_k=2))
    ids = rm.encode(PROMPT)[0]
    before = rm.logits(ids)
    wanted = RouterConfig(top_k=2, granularity="prompt", pick="readout")
    with pytest.raises(ValueError, match="No pick readout is fitted"):
        rm.set_router(wanted)
    assert rm.router == RouterConfig(top_k=2)
    torch.testing.assert_close(rm.logits(ids), before, atol=0, rtol=0)  # nothing changed
    by_mean = pick(rm.trace(PROMPT)).expert  # per token over the prompt: the mean weight's winner
    target = next(e for e in rm.experts if e != by_mean)
    write_readout(ExpertLibrary.open(path, readonly=False), readout_key(wanted), *always(rm, target).to_tensors())
    assert read_readout(ExpertLibrary.open(path, readonly=True), readout_key(wanted)) is not None
    rm.set_router(wanted)  # found in the library now
    trace = rm.trace(PROMPT, max_new_tokens=3)
    assert trace.meta["pick"]["expert"] == target and trace.meta["pick"]["rule"] == "readout"
    assert trace.meta["pick"]["by_mean"] == by_mean
    rm.set_router(RouterConfig(mode=f"expert:{target}"))
    assert trace.text == rm.trace(PROMPT, max_new_tokens=3).text
    assert readout_key(RouterConfig(top_k=3, granularity="prompt", pick="readout")) != readout_key(wanted)
    with pytest.raises(ValueError, match="No pick readout"):  # fitted under top-2: another router has none
        rm.set_router(RouterConfig(top_k=3, granularity="prompt", pick="readout"))


def test_a_readout_s_recorded_threshold_decides_which_picks_are_uncertain():
    """The threshold stored with the readout (bench/pick_confidence.py --record) is the one the pick applies, and
    it survives the library round trip; without one the default UNCERTAIN_BELOW applies."""
    from explorer.routing.prompt_level import UNCERTAIN_BELOW

    rng = np.random.default_rng(1)
    readout = fit_readout([synthetic(0.9, rng) for _ in range(10)] + [synthetic(0.5, rng) for _ in range(10)],
                          ["e0"] * 10 + ["e1"] * 10)
    trace = synthetic(0.7, rng)  # between the two classes
    p = pick(trace, readout).confidence
    assert readout.uncertain_below == UNCERTAIN_BELOW
    assert pick(trace, readout).uncertain is (p < UNCERTAIN_BELOW)
    for threshold, flagged in ((p + 0.01, True), (p - 0.01, False)):
        readout.meta["uncertain_below"] = threshold
        back = Readout.from_tensors(*readout.to_tensors())
        got = pick(trace, back)
        assert got.threshold == pytest.approx(threshold) and got.uncertain is flagged
        assert ("Uncertain pick" in got.describe()) is flagged


def test_pick_confidence_chooses_the_threshold_that_separates_wrong_picks_on_training_rows():
    from bench.pick_confidence import at, choose_threshold

    rows = [{"p": p, "right": True} for p in (0.9, 0.8, 0.7, 0.45, 0.6)] + \
        [{"p": p, "right": False} for p in (0.2, 0.3, 0.35)]
    t = choose_threshold(rows)
    assert 0.35 < t <= 0.45  # flags every wrong pick (< t) and no right one; the lowest such grid point
    got = at(rows, t)
    assert got["wrong_flagged"] == 1.0 and got["flagged"] == 3 / 8 and got["youden"] == 1.0
    assert got["accuracy_confident"][0] == 1.0 and got["accuracy_flagged"][0] == 0.0


@pytest.mark.parametrize("stored", ["high", None, 1.5, 0, [0.3]])
def test_a_stored_threshold_that_is_no_probability_falls_back_to_the_default(stored):
    from explorer.routing.prompt_level import UNCERTAIN_BELOW

    readout = Readout(["e0", "e1"], [0, 1], ["e0", "e1"], np.zeros((2, 4)), np.zeros(2), {"uncertain_below": stored})
    assert readout.uncertain_below == UNCERTAIN_BELOW


@pytest.mark.parametrize("stored", ["high", None, 1.5, 0, [0.3]])
def test_a_stored_lead_that_is_no_weight_lead_falls_back_to_the_default(stored):
    from explorer.routing.prompt_level import UNCERTAIN_LEAD

    readout = Readout(["e0", "e1"], [0, 1], ["e0", "e1"], np.zeros((2, 4)), np.zeros(2), {"uncertain_lead": stored})
    assert readout.uncertain_lead == UNCERTAIN_LEAD
    readout.meta["uncertain_lead"] = 0.04
    assert Readout.from_tensors(*readout.to_tensors()).uncertain_lead == 0.04  # survives the library round trip


def test_pick_confidence_records_the_threshold_and_the_lead_from_an_earlier_runs_rows(tmp_path):
    """`--rows FILE --record` stores both flags' values, chosen on the rows' training prompts (the lead: the smallest
    whose unflagged picks are all but 1 % right), in the library's readout for the run's router, with their
    evidence; the per-token router of the same settings then reads the lead."""
    from bench.pick_confidence import choose_threshold, main
    from explorer.routing.config import RouterConfig
    from explorer.routing.readout import find_readout, readout_key, recorded_lead
    from library_store.store.library import ExpertLibrary
    from library_store.store.reports import write_readout
    from library_store.testing import make_tiny_library

    path = make_tiny_library(tmp_path / "lib", n_experts=2)
    router = RouterConfig(top_k=1, temperature=0.5, granularity="prompt", pick="readout")
    lib = ExpertLibrary.open(path, readonly=False)
    names = lib.names()
    write_readout(lib, readout_key(router), *Readout(names, [0], names, np.zeros((2, 2)), np.zeros(2)).to_tensors())

    def row(p, right, lead, mean_right):
        return {"task": "t", "p": p, "right": right, "mean_lead": lead, "mean_right": mean_right}

    # a threshold in (0.3, 0.8]; by mean weight: 4 wrong picks lead by 0.005, 1 wrong and 4 right by 0.015, 10
    # right by 0.1. Youden's J chooses 0.01 (J 0.8 against 0.71 at 0.02), where 1 of 15 unflagged picks is wrong;
    # the lead rule 0.02, where every unflagged pick is right.
    train = [row(0.9, True, 0.1, True)] * 10 + [row(0.8, True, 0.015, True)] * 4 + \
        [row(0.3, False, 0.015, False)] + [row(0.2, False, 0.005, False)] * 4
    assert choose_threshold(train, "mean") == 0.01
    rows = {"router": router.to_dict(), "source": "test", "n": 2, "command": "python x.py", "seconds": 1.0,
            "splits": {s: {"rows": train} for s in ("train", "heldout", "paraphrase")}}
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    main(["--library", path, "--rows", str(tmp_path / "rows.json"), "--record", "--out", str(tmp_path)])
    stored = find_readout({}, ExpertLibrary.open(path), router)
    assert 0.3 < stored.uncertain_below <= 0.8 and stored.uncertain_lead == 0.02
    assert stored.meta["uncertain_lead_evidence"]["heldout"]["wrong_flagged"] == 1.0
    assert recorded_lead({}, ExpertLibrary.open(path), RouterConfig(top_k=1, temperature=0.5)) == 0.02
    out = json.loads((tmp_path / "pick_confidence-lib.json").read_text())
    assert out["mean_rule"]["chosen_on_training"] == 0.02


def test_a_pick_says_which_layers_decided_it_and_the_shares_add_up():
    """By readout: each layer's share of the logit margin over the runner-up, plus the intercepts' share, is the
    margin itself; in the synthetic class e1 the decision is carried by the layers, not by the mean weight. By mean
    weight: the layers' leads average to the pick's lead. Both reach the record as lists (JSON)."""
    rng = np.random.default_rng(0)
    traces = [synthetic(0.9, rng) for _ in range(20)] + [synthetic(0.5, rng) for _ in range(20)]
    readout = fit_readout(traces, ["e0"] * 20 + ["e1"] * 20)
    fresh = synthetic(0.5, rng)
    got = pick(fresh, readout)
    z = readout.coef @ features(fresh) + readout.intercept  # (C,) logits
    margin = z[readout.classes.index(got.expert)] - z[readout.classes.index(got.runner_up)]
    assert len(got.by_layer) == 2 and sum(got.by_layer) + got.bias == pytest.approx(margin, abs=1e-9)
    assert got.expert == "e1" and margin > 0
    by_mean = pick(fresh)
    assert np.mean(by_mean.by_layer) == pytest.approx(by_mean.margin, abs=1e-6) and by_mean.bias is None
    record = got.record()
    assert isinstance(record["by_layer"], list) and record["by_layer"] == pytest.approx(list(got.by_layer))
    alone = RoutingTrace(tokens=["a"], token_ids=[0], is_generated=[False], layers=[0], modules=["q"],
                         experts=["e0"], weights=np.ones((1, 1, 1, 1), np.float32))
    assert pick(alone).by_layer is None  # one expert: no runner-up to explain against


def test_a_pick_by_mean_weight_names_the_layers_for_and_against_it():
    """Layer 0 sends the text to e1 (0.8), layer 1 wholly to e0: e0 wins on the mean (0.6 against 0.4), and its
    per-layer shares say that layer 0 argued against it (-0.6) and layer 1 for it (+1.0)."""
    w = np.zeros((2, 1, 2, 2), np.float32)  # (L, M, T, E)
    w[0, 0, :] = [0.2, 0.8]
    w[1, 0, :] = [1.0, 0.0]
    trace = RoutingTrace(tokens=list("ab"), token_ids=[0, 1], is_generated=[False] * 2, layers=[3, 7], modules=["q"],
                         experts=["e0", "e1"], weights=w, user_span=(0, 2))
    got = pick(trace)
    assert (got.expert, got.runner_up) == ("e0", "e1")
    assert got.by_layer == pytest.approx((-0.6, 1.0), abs=1e-6)


def test_a_readout_pick_credits_the_layer_whose_weights_it_read():
    """A readout that reads only (layer 1, e0) and picks e1 when e0 is weak there: its whole margin is layer 1's
    (by_layer (0, positive)) plus the intercepts'."""
    w = np.zeros((2, 1, 2, 2), np.float32)  # (L, M, T, E)
    w[0, 0, :] = [0.5, 0.5]
    w[1, 0, :] = [0.1, 0.9]
    trace = RoutingTrace(tokens=list("ab"), token_ids=[0, 1], is_generated=[False] * 2, layers=[0, 1], modules=["q"],
                         experts=["e0", "e1"], weights=w, user_span=(0, 2))
    coef = np.zeros((2, 4))
    coef[0, 1 * 2 + 0] = 10.0  # class e0's logit: 10 x the weight of e0 at layer 1
    readout = Readout(["e0", "e1"], [0, 1], ["e0", "e1"], coef, np.array([0.0, 2.0]))
    got = pick(trace, readout)
    assert (got.expert, got.runner_up) == ("e1", "e0") and got.bias == pytest.approx(2.0)
    assert got.by_layer == pytest.approx((0.0, -1.0), abs=1e-6)  # layer 1 argued for e0: -10 x 0.1
    from explorer.page.pick_plots import decision_layers

    trace.meta["pick"] = got.record()
    title = decision_layers(trace).layout.title.text
    assert "e1 over e0" in title and "the layers alone favour e0, the intercepts decided" in title
    trace.meta["pick"] = pick(trace, replace(readout, intercept=np.array([0.0, -2.0]))).record()  # e0 wins on layers
    assert "intercepts decided" not in decision_layers(trace).layout.title.text


def test_pick_confidence_chooses_the_weak_routing_strength_on_training_rows_and_the_threshold_with_it():
    """The weak-routing strength is the training rows' 5th percentile, rounded down to 0.01; the threshold is then
    chosen with that flag in place (it already catches the wrong pick of high probability); rows without a
    strength (an older run's) choose none."""
    from bench.pick_confidence import at, choose_threshold, choose_weak

    rows = [{"p": 0.9, "right": True, "strength": 1.0 + 0.01 * i} for i in range(18)] + \
        [{"p": 0.9, "right": False, "strength": 0.2}, {"p": 0.3, "right": False, "strength": 1.0}]
    weak = choose_weak(rows)
    assert weak == np.floor(np.percentile([r["strength"] for r in rows], 5) * 100) / 100 and 0.2 < weak < 1.0
    got = at(rows, choose_threshold(rows, weak=weak), weak=weak)
    assert got["wrong_flagged"] == 1.0 and got["flagged"] == 2 / 20  # both wrong picks, no right one
    assert at(rows, 0.5)["wrong_flagged"] == 0.5  # by probability alone the confident wrong pick passes
    assert choose_weak([{"p": 0.9, "right": True}]) is None
    from bench.pick_confidence import choose_lead

    mean = [{"mean_lead": 0.1, "mean_right": True, "strength": 1.0}] * 98 + \
        [{"mean_lead": 0.05, "mean_right": False, "strength": 0.1}] * 2  # wrong picks that lead, but route weakly
    assert choose_lead(mean, weak=0.5) == 0.01 and choose_lead(mean) == 0.06  # the weak flag already catches them


def test_the_report_card_states_the_weak_routing_flag():
    from explorer.page.report_plots import _uncertain_text

    lines = _uncertain_text({"weak_below": 0.44, "weak_evidence": {"heldout": {"flagged": 0.05}}})
    assert any("routing strength" in x and "0.44" in x for x in lines) \
        and any("5% of picks flagged" in x for x in lines)
    assert _uncertain_text({"weak_below": "x"}) == []
