"""Per-prompt routing (RouterConfig granularity "prompt"): the pick is the per-token routing's winner over the
user's text, every token then runs with that expert alone, and the trace keeps the evidence."""
import numpy as np
import pytest
import torch
from arrow_helpers import TWINS, experts, fresh

from explorer.routing.config import RouterConfig
from explorer.routing.model import RoutedModel
from explorer.routing.prompt_level import PromptPick, lean, pick
from explorer.routing.trace import RoutingTrace

PROMPT = "Count the words: one two three four"


def routed(twin, **router):
    base = fresh(twin)
    return RoutedModel(base, experts(base, 4), RouterConfig(top_k=2, temperature=0.5, **router))


@pytest.mark.parametrize("twin", TWINS)
def test_prompt_level_answers_with_the_per_token_winner_alone(twin):
    rm = routed(twin, granularity="prompt")
    trace = rm.trace(PROMPT, max_new_tokens=4)
    rm.set_router(RouterConfig(top_k=2, temperature=0.5))
    per_token = rm.trace(PROMPT, max_new_tokens=4)
    winner = per_token.winner("user")
    assert trace.evidence is not None and trace.evidence.router.granularity == "token"
    assert trace.evidence.tokens == per_token.tokens[: per_token.n_prompt]  # the prompt alone
    np.testing.assert_allclose(trace.evidence.weights, per_token.weights[:, :, : per_token.n_prompt], atol=1e-6)
    assert pick(trace.evidence).expert == winner
    rm.set_router(RouterConfig(mode=f"expert:{winner}"))
    alone = rm.trace(PROMPT, max_new_tokens=4)
    assert trace.token_ids == alone.token_ids and trace.text == alone.text
    w = trace.weights  # (L, M, T, E): the pick alone, weight 1, at every token and layer
    assert (w[..., trace.experts.index(winner)] == 1).all() and w.sum() == w[..., trace.experts.index(winner)].sum()
    assert rm.generate(PROMPT, max_new_tokens=4) == alone.text


@pytest.mark.parametrize("twin", TWINS)
def test_generate_follows_the_pick_and_the_router_is_restored(twin):
    rm = routed(twin, granularity="prompt")
    text = rm.generate(PROMPT, max_new_tokens=5)
    expert = pick(rm.trace(PROMPT).evidence).expert
    assert rm.router.granularity == "prompt" and rm._state.mode == "arrow" and rm._state.fixed is None
    rm.set_router(RouterConfig(mode=f"expert:{expert}"))
    assert text == rm.generate(PROMPT, max_new_tokens=5)


def test_prompt_level_differs_from_per_token_routing():
    """Guard against a prompt-level run that silently routes per token (the feature off)."""
    rm = routed("tiny-random-llama", granularity="prompt")
    ids = rm.encode(PROMPT)[0]
    with rm.answering_with(pick(rm.trace(PROMPT).evidence).expert):
        applied = rm.logits(ids)
    rm.set_router(RouterConfig(top_k=2, temperature=0.5))
    assert (applied - rm.logits(ids)).abs().max() > 1e-3


def test_pick_reads_the_user_text_and_reports_the_runner_up():
    T, E = 5, 3
    w = np.zeros((2, 1, T, E), dtype=np.float32)
    w[:, :, :2, 0] = 1.0  # template tokens: all e0
    w[:, :, 2:, 1], w[:, :, 2:, 2] = 0.7, 0.3  # user tokens: e1 ahead of e2
    trace = RoutingTrace(tokens=list("abcde"), token_ids=list(range(T)), is_generated=[False] * T, layers=[0, 1],
                         modules=["q"], experts=["e0", "e1", "e2"], weights=w, user_span=(2, 5))
    got = pick(trace)
    assert (got.expert, got.runner_up, got.over) == ("e1", "e2", "user")
    assert got.weight == pytest.approx(0.7) and got.margin == pytest.approx(0.4)
    assert "e1 alone answered" in got.describe() and "next e2" in got.describe()
    no_user = RoutingTrace(tokens=list("abcde"), token_ids=list(range(T)), is_generated=[False] * T, layers=[0, 1],
                           modules=["q"], experts=["e0", "e1", "e2"], weights=w)
    assert pick(no_user).over == "prompt" and pick(no_user).expert == "e1"  # 2 x 1.0 vs 3 x 0.7 over 5 tokens
    with pytest.raises(ValueError, match="nothing to pick"):
        pick(RoutingTrace(tokens=list("ab"), token_ids=[0, 1], is_generated=[False] * 2, layers=[0], modules=["q"],
                          experts=["e0"], weights=np.zeros((1, 1, 2, 1), np.float32)))
    assert isinstance(got, PromptPick)


def test_a_pick_the_evidence_hardly_decided_is_flagged_uncertain():
    """Mean rule: a lead under UNCERTAIN_LEAD; readout: a probability under UNCERTAIN_BELOW. The flag reaches the
    trace's record and the one-line text the page and the CLI show; a decided pick says nothing of it."""
    from explorer.routing.prompt_level import UNCERTAIN_BELOW, UNCERTAIN_LEAD

    close = PromptPick(expert="e1", weight=0.40, runner_up="e2", runner_weight=0.40 - UNCERTAIN_LEAD / 2, over="user")
    clear = PromptPick(expert="e1", weight=0.40, runner_up="e2", runner_weight=0.40 - 2 * UNCERTAIN_LEAD, over="user")
    assert close.uncertain and not clear.uncertain
    assert close.describe().startswith("Per prompt:") and "Uncertain pick (lead under" in close.describe()
    assert close.record()["uncertain"] is True
    assert "Uncertain" not in clear.describe() and clear.record()["uncertain"] is False
    readout = dict(expert="e1", weight=0.3, runner_up="e2", runner_weight=0.2, over="user", rule="readout",
                   by_mean="e1")
    low = PromptPick(**readout, confidence=UNCERTAIN_BELOW - 0.01, runner_confidence=0.3)
    high = PromptPick(**readout, confidence=UNCERTAIN_BELOW + 0.01, runner_confidence=0.3)
    assert low.uncertain and f"(p under {UNCERTAIN_BELOW:g})" in low.describe() and not high.uncertain
    alone = PromptPick(expert="e1", weight=1.0, runner_up=None, runner_weight=0.0, over="user")
    assert not alone.uncertain  # one expert: nothing to decide between
    # the lead on the scale that decided: the mean weight's, the readout's probability, all of it alone
    assert close.lead == pytest.approx(UNCERTAIN_LEAD / 2) and high.lead == pytest.approx(UNCERTAIN_BELOW + 0.01 - 0.3)
    assert alone.lead == 1.0


def recorded(rm, **meta):
    """A readout for rm's router settings that records `meta` (an uncertain lead), as pick_confidence --record
    stores one; the router is set again so that the model reads it."""
    from explorer.routing.readout import Readout, readout_key

    e, n = len(rm.experts), len(rm.layers)
    rm.readouts[readout_key(rm.router)] = Readout(rm.experts, rm.layers, rm.experts, np.zeros((e, n * e)),
                                                  np.zeros(e), meta)
    rm.set_router(rm.router)


def test_a_per_token_trace_records_what_the_user_text_leans_to():
    """Per token, Arrow: the trace's meta "lean" is the mean-weight pick over the user's text, marked as not
    answered, worded "Per token: ... leans to", and flagged "Undecided" under the lead (UNCERTAIN_LEAD, or the
    one recorded with the readout of the same router settings); per prompt the pick takes its place; fixed-weight
    modes route nothing to lean on; a trace without weight has none."""
    from explorer.routing.prompt_level import UNCERTAIN_LEAD

    rm = routed("tiny-random-llama")
    trace = rm.trace(PROMPT, max_new_tokens=2)
    leaning = trace.meta["lean"]
    assert leaning["expert"] == trace.winner("user") and leaning["answered"] is False
    assert leaning["text"].startswith(f"Per token: your text leans to {trace.winner('user')} (mean weight ")
    assert "alone answered" not in leaning["text"]
    assert leaning["lead_below"] == UNCERTAIN_LEAD
    assert leaning["uncertain"] is (leaning["weight"] - leaning["runner_weight"] < UNCERTAIN_LEAD)
    recorded(rm, uncertain_lead=0.99)  # every lead is now too small
    flagged = rm.trace(PROMPT, max_new_tokens=2).meta["lean"]
    assert flagged["uncertain"] is True and flagged["text"].endswith("Undecided (lead under 0.99).")
    assert RoutingTrace.from_dict(trace.to_dict()).meta["lean"] == trace.meta["lean"]
    rm.set_router(RouterConfig(top_k=2, temperature=0.5, granularity="prompt"))
    assert "lean" not in rm.trace(PROMPT).meta
    rm.set_router(RouterConfig(mode="uniform"))
    assert "lean" not in rm.trace(PROMPT).meta
    empty = RoutingTrace(tokens=list("ab"), token_ids=[0, 1], is_generated=[False] * 2, layers=[0], modules=["q"],
                         experts=["e0", "e1"], weights=np.zeros((1, 1, 2, 2), np.float32))
    assert lean(empty) is None


@pytest.mark.parametrize("stored, flagged", [(0.99, True), (1e-9, False), ("x", None), (2.0, None)])
def test_a_library_records_its_own_lead_for_picks_by_mean_weight(stored, flagged):
    """A per-prompt pick by mean weight is flagged under the lead recorded with the readout of the same router
    settings (granularity and pick aside); a stored lead that is no weight lead falls back to UNCERTAIN_LEAD (None
    above: as without a record); another router's settings do not read it."""
    from explorer.routing.prompt_level import UNCERTAIN_LEAD

    rm = routed("tiny-random-llama", granularity="prompt", pick="mean")
    plain = rm.trace(PROMPT, max_new_tokens=1).meta["pick"]
    recorded(rm, uncertain_lead=stored)
    got = rm.trace(PROMPT, max_new_tokens=1).meta["pick"]
    assert got["expert"] == plain["expert"] and got["rule"] == "mean"
    if flagged is None:
        assert got == plain and got["lead_below"] == UNCERTAIN_LEAD
    else:
        assert got["lead_below"] == stored and got["uncertain"] is flagged
        assert ("Uncertain pick (lead under 0.99)" in got["text"]) is flagged
    rm.set_router(RouterConfig(top_k=3, temperature=0.5, granularity="prompt", pick="mean"))
    assert rm.trace(PROMPT, max_new_tokens=1).meta["pick"]["lead_below"] == UNCERTAIN_LEAD


def test_prompt_level_trace_round_trips_with_its_evidence():
    rm = routed("tiny-random-llama", granularity="prompt")
    trace = rm.trace(PROMPT, max_new_tokens=3)
    back = RoutingTrace.from_json(trace.to_json())
    assert back == trace and back.evidence == trace.evidence and back.router.granularity == "prompt"
    changed = RoutingTrace.from_json(trace.to_json())
    changed.evidence.routes.weights[0, 0, 0, 0] += 0.5
    assert changed != trace


def test_granularity_config_and_bad_values():
    assert RouterConfig().granularity == "token" and not RouterConfig().per_prompt
    assert RouterConfig(granularity="prompt").per_prompt
    assert not RouterConfig(mode="uniform", granularity="prompt").per_prompt  # other modes ignore it
    assert RouterConfig.from_dict({"mode": "arrow", "top_k": 2}).granularity == "token"  # older records
    assert RouterConfig.from_dict(RouterConfig(granularity="prompt").to_dict()).granularity == "prompt"
    with pytest.raises(ValueError, match="Unknown granularity 'sentence'"):
        RouterConfig(granularity="sentence")


def test_answering_with_an_unknown_expert_is_refused_and_changes_nothing():
    rm = routed("tiny-random-llama")
    ids = rm.encode(PROMPT)[0]
    before = rm.logits(ids)
    with pytest.raises(ValueError, match="Unknown expert 'nope'"):
        with rm.answering_with("nope"):
            pass
    torch.testing.assert_close(rm.logits(ids), before, atol=0, rtol=0)


@pytest.mark.parametrize("twin", TWINS)
def test_the_last_position_s_logits_alone_are_the_whole_forward_s_last(twin):
    """`last_logits_only`, which the evidence pass and the counterfactuals use to skip the LM head elsewhere, gives
    the same last-position logits as the whole forward on both twins; a forward that does not take it gets {}."""
    from explorer.routing.capture import last_logits_only

    base = fresh(twin)
    ids = torch.tensor([[5, 17, 99, 3, 250, 41]])
    with torch.no_grad():
        whole = base.model(input_ids=ids).logits  # (1, 6, V)
        last = base.model(input_ids=ids, **last_logits_only(base.model)).logits  # (1, 1, V)
    assert last.shape[1] == 1 and torch.allclose(last[0, -1], whole[0, -1], atol=1e-5)
    assert last_logits_only(torch.nn.Linear(2, 2)) == {}


def test_the_evidence_pass_routes_the_prompt_as_a_per_token_trace_does():
    """The evidence is the prompt routed per token, through the model's body alone (no logits): its routes equal a
    per-token trace of the same prompt without new tokens."""
    rm = routed("tiny-random-phi", granularity="prompt")
    evidence = rm.trace(PROMPT, max_new_tokens=0).evidence
    rm.set_router(RouterConfig(top_k=2, temperature=0.5))
    plain = rm.trace(PROMPT, max_new_tokens=0)
    assert evidence.token_ids == plain.token_ids
    np.testing.assert_allclose(evidence.module_weights(), plain.module_weights(), atol=1e-6)


def test_a_readout_pick_from_weak_routing_is_flagged_uncertain():
    """The pick's routing strength is the mean top-slot Arrow score over the user's text at the routed layers (a
    layer not routed has no score and is left out); a readout pick under the strength its readout records
    (`weak_below`) is flagged uncertain however probable, and says why; without a record nothing changes."""
    from explorer.routing.prompt_level import strength

    rm = routed("tiny-random-llama", layers=[0])
    recorded(rm, uncertain_below=0.01)  # the probability flag off: a uniform readout gives 1/E
    rm.set_router(RouterConfig(top_k=2, temperature=0.5, layers=[0], granularity="prompt", pick="readout"))
    plain = rm.trace(PROMPT, max_new_tokens=1)
    evidence, got = plain.evidence, plain.meta["pick"]
    top = evidence.routes.scores[:, :, evidence.positions("user"), 0]  # (L, M, P) top slots
    assert np.isnan(top[1:]).all() and np.isfinite(top[0]).all()  # layer 1 is not routed
    assert got["strength"] == pytest.approx(float(top[0].astype(np.float64).mean()), rel=1e-9) == strength(evidence)
    assert got["weak_below"] is None and got["uncertain"] is False
    for weak, flagged in ((got["strength"] + 0.01, True), (got["strength"] - 0.01, False)):
        recorded(rm, uncertain_below=0.01, weak_below=weak)
        again = rm.trace(PROMPT, max_new_tokens=1).meta["pick"]
        assert again["expert"] == got["expert"] and again["weak_below"] == weak and again["uncertain"] is flagged
        assert ("routing strength" in again["text"] and "unlike the library's training prompts" in again["text"]) \
            is flagged
    recorded(rm, uncertain_below=0.01, weak_below="high")  # no number: as without a record
    assert rm.trace(PROMPT, max_new_tokens=1).meta["pick"]["uncertain"] is False


def test_a_lean_and_a_pick_by_mean_weight_from_weak_routing_are_flagged_too():
    """The weak-routing strength recorded with the readout of the same router settings flags a per-token run's lean
    ("Undecided", with the reason) and a per-prompt pick by mean weight, whatever their lead."""
    rm = routed("tiny-random-llama")
    recorded(rm, uncertain_lead=1e-9)  # the lead flag off
    plain = rm.trace(PROMPT, max_new_tokens=1).meta["lean"]
    assert plain["uncertain"] is False and plain["weak_below"] is None and plain["strength"] > 0
    recorded(rm, uncertain_lead=1e-9, weak_below=plain["strength"] + 0.01)
    leaning = rm.trace(PROMPT, max_new_tokens=1).meta["lean"]
    assert leaning["uncertain"] is True and leaning["expert"] == plain["expert"]
    assert leaning["text"].endswith(f"Undecided (routing strength {plain['strength']:.2f} under "
                                    f"{plain['strength'] + 0.01:g}: unlike the library's training prompts).")
    rm.set_router(RouterConfig(top_k=2, temperature=0.5, granularity="prompt", pick="mean"))
    chosen = rm.trace(PROMPT, max_new_tokens=1).meta["pick"]
    assert chosen["rule"] == "mean" and chosen["uncertain"] is True and "routing strength" in chosen["text"]
