"""The evaluation's per-prompt paths on the random twin: batched answers by each prompt's pick equal the
model's own, the pick accuracy is scored, and the granularity (and pick) is chosen by training exact match."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import eval_common as C  # noqa: E402
from bench import eval_heldout, eval_routing, eval_sweep  # noqa: E402
from test_eval_quick import TEXTS, routed  # noqa: E402,F401 (the fixture: a twin with 4 random experts)


def test_batched_per_prompt_answers_equal_the_model_s_own(routed):
    """The evaluation's per-prompt path (route all, group by pick, answer each group with its pick alone) gives
    each prompt the pick and the answer `RoutedModel` gives it alone, for generation and rank classification."""
    from dataclasses import replace

    from library_store.tasks import Example, Task

    base, start = routed.base, routed.router
    routed.set_router(replace(start, granularity="prompt"))
    try:
        texts, picks = TEXTS, []
        gen, chosen = eval_sweep.per_prompt(routed, base, texts, lambda rows: C.greedy_generate(
            base.model, base.tokenizer, C.prompt_ids(base, [texts[i] for i in rows]), 5), max_tokens=150)
        for text, g, c in zip(texts, gen, chosen):
            alone = routed.trace(text, max_new_tokens=5)
            assert c.expert == alone.most_used_expert() and g.strip() == alone.text.strip()
            picks.append(c.expert)
        assert len(set(picks)) >= 2  # several groups: the regrouping is exercised
        task = Task("t", "f", metric="multiple_choice", train=[],
                    heldout=[Example(t, "yes", choices=["yes", "no"], answer=i % 2) for i, t in enumerate(texts)])
        got = eval_heldout.score_task(base, task, 4, 150, rm=routed)
        assert got["picks"] == picks
        for i, text in enumerate(texts):
            with routed.answering_with(picks[i]):
                one = C.rank_classify(base.model, base.tokenizer, C.prompt_ids(base, [text]), [[
                    base.tokenizer(c, add_special_tokens=False).input_ids for c in ["yes", "no"]]])[0]
            assert got["correct"][i] == int(one == i % 2)
    finally:
        routed.set_router(start)


def test_per_prompt_headline_reports_the_pick_accuracy(routed):
    """answer_and_route names each prompt's pick in its trace; diagnose scores it as "pick" accuracy."""
    from dataclasses import replace

    from library_store.tasks import Example

    start = routed.router
    routed.set_router(replace(start, granularity="prompt"))
    try:
        traces, em = eval_sweep.answer_and_route(routed, routed.base, [Example(t, "x") for t in TEXTS], 150)
    finally:
        routed.set_router(start)
    picks = [tr.meta["pick"]["expert"] for tr in traces]
    assert all(tr.meta["pick"]["text"].startswith("Per prompt:") for tr in traces)  # as RoutedModel.trace records
    assert all(p in routed.experts for p in picks) and len(em) == len(TEXTS)
    d = eval_routing.diagnose({"t": traces}, {"t": [picks[0]]})
    assert d["accuracy"]["pick"]["mean"] == pytest.approx(np.mean([p == picks[0] for p in picks]))
    assert d["per_task"]["t"]["pick"] == d["accuracy"]["pick"]["mean"]
    assert "pick" not in eval_routing.diagnose({"t": eval_routing.route_prompts(routed, routed.base, TEXTS)},
                                               {"t": [picks[0]]})["accuracy"]  # per token: no pick


def test_granularity_is_chosen_by_training_exact_match(monkeypatch):
    """Per prompt wins only with a higher exact match on training examples and picks that lead by a median of at
    least DECISIVE; a tie keeps per token; the router is restored; the winner row carries the granularity into
    router_of."""
    from types import SimpleNamespace

    from explorer.routing.config import RouterConfig
    from library_store.tasks import Example

    class Stub:
        router = RouterConfig(top_k=3)

        def set_router(self, r):
            self.router = r

    rm, seen = Stub(), []
    winner = {"top_k": 2, "temperature": 0.3, "centre": "none", "centre_scope": "prototypes", "input_centre": "base"}
    examples = {"t1": [Example("train 1", "a"), Example("train 2", "b")]}
    lead = eval_sweep.DECISIVE
    for prompt_em, leads, want in (([1, 1], [lead, lead], "prompt"), ([1, 0], [1, 1], "token"),
                                   ([1, 1], [lead / 2, lead], "token")):  # answers better, but hardly decides
        def fake(rm_, base, ex, mt=4096, picks=None, prompt_em=prompt_em, leads=leads):
            seen.append((rm_.router.granularity, rm_.router.top_k, rm_.router.input_centre, [e.input for e in ex]))
            if rm_.router.granularity == "token":
                return [1, 0]
            picks += [SimpleNamespace(lead=x) for x in leads]
            return prompt_em
        monkeypatch.setattr(eval_sweep, "routed_exact_matches", fake)
        got = eval_sweep.choose_granularity(rm, None, winner, examples)
        assert got["winner"] == {"granularity": want, "pick": "mean"} and rm.router == RouterConfig(top_k=3)
        assert got["rows"][1]["lead_median"] == pytest.approx(np.median(leads))
    assert seen[:2] == [("token", 2, "base", ["train 1", "train 2"]), ("prompt", 2, "base", ["train 1", "train 2"])]
    assert eval_sweep.router_of({**winner, "granularity": "prompt"}).per_prompt
    assert not eval_sweep.router_of(winner).per_prompt  # rows recorded before granularity existed


def test_the_evaluation_picks_with_the_router_s_readout(routed):
    """With pick "readout" the batched path answers by the readout's pick, not the mean weight's."""
    from dataclasses import replace

    from explorer.routing.readout import Readout, readout_key

    base, start = routed.base, routed.router
    by_mean = [t.winner("user") for t in eval_routing.route_prompts(routed, base, TEXTS)]
    target = next(e for e in routed.experts if e not in by_mean)
    E, L = len(routed.experts), len(routed.layers)
    routed.readouts[readout_key(start)] = Readout(list(routed.experts), list(routed.layers), list(routed.experts),
                                                  np.zeros((E, L * E)), np.where(np.array(routed.experts) == target,
                                                                                 5.0, 0.0))
    try:
        routed.set_router(replace(start, granularity="prompt", pick="readout"))
        _, chosen = eval_sweep.per_prompt(routed, base, TEXTS, lambda rows: [None] * len(rows), 150)
        assert [c.expert for c in chosen] == [target] * len(TEXTS) and chosen[0].by_mean == by_mean[0]
    finally:
        routed.set_router(start)
        routed.readouts.clear()
