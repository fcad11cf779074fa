"""The evaluation scripts' --quick modes on the random twin, and the batched scoring they rely on.

The twin's scores are meaningless; what is checked is the plumbing: batched = one at a time, every number in
range, intervals around their means, the routing weights of each prompt summing to one, the ARI computed,
the oracle chosen inside the task's family, the files written.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import eval_common as C  # noqa: E402
from bench import eval_centring, eval_heldout, eval_routing, eval_sweep  # noqa: E402
from library_store.training.prefix import common_prefix_length  # noqa: E402


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    return C.quick_libraries(tmp_path_factory.mktemp("libs"))


@pytest.fixture(scope="module")
def routed():
    from explorer.routing.config import RouterConfig
    from explorer.routing.model import RoutedModel
    from library_store.testing import random_expert

    base = copy.deepcopy(C.load_base("tiny-random-llama"))  # the quick runs share the original
    exps = [random_expert(base, f"e{i}", rank=4, alpha=8, seed=i) for i in range(4)]
    return RoutedModel(base, exps, RouterConfig(top_k=2))  # wraps the copy in place


@pytest.fixture(scope="module")
def routed_twin(routed):
    return routed.base


TEXTS = ["Reverse the letters of this word: apple", "Add these numbers: 2 + 3",
         "Is this an animal or a plant? a big green oak tree", "Convert this date to MM/DD/YYYY: 2001-03-04"]


def test_batched_scores_equal_one_at_a_time(routed_twin):
    base = routed_twin
    tok = base.tokenizer
    ids = C.prompt_ids(base, TEXTS)
    assert common_prefix_length(ids) > 10  # the chat template's system turn is shared
    choices = [[tok(c, add_special_tokens=False).input_ids for c in cs]
               for cs in [["yes", "no"], ["five apples", "6", "seven"], ["animal", "a plant"], ["03/04/2001", "x"]]]
    batched = C.choice_loglik(base.model, tok, ids, choices, max_tokens=200)  # several batches
    alone = [C.choice_loglik(base.model, tok, [p], [c], share_prefix=False)[0] for p, c in zip(ids, choices)]
    np.testing.assert_allclose(np.concatenate(batched), np.concatenate(alone), atol=1e-4)
    assert all(v < 0 for v in np.concatenate(batched))


def test_batched_generation_equals_plain_generate(routed_twin):
    from library_store.models import generate

    base = routed_twin
    ids = C.prompt_ids(base, TEXTS)
    batched = C.greedy_generate(base.model, base.tokenizer, ids, 6)
    plain = [generate(base.model, base.tokenizer, base.format_prompt(t), 6) for t in TEXTS]
    assert [b.strip() for b in batched] == [p.strip() for p in plain]


def test_batched_routing_traces_equal_one_prompt_at_a_time(routed):
    batched = eval_routing.route_prompts(routed, routed.base, TEXTS, max_tokens=120)  # several batches
    for text, got in zip(TEXTS, batched):
        alone = routed.trace(text)
        assert got.token_ids == alone.token_ids and got.user_span == alone.user_span != (0, 0)
        np.testing.assert_allclose(got.weights, alone.weights, atol=1e-5)
        np.testing.assert_allclose(got.routes.contribution, alone.routes.contribution, rtol=1e-2, atol=1e-3)
        assert got.winner("user") == alone.winner("user") and got.winner("prompt") == alone.winner("prompt")


def test_generated_tokens_route_as_while_generating(routed):
    """Batched greedy answers fed back after their prompts route exactly as `RoutedModel.trace` generating."""
    base = routed.base
    gen = C.greedy_generate_ids(base.model, base.tokenizer, C.prompt_ids(base, TEXTS), 5, max_tokens=150)
    batched = eval_routing.route_prompts(routed, base, TEXTS, max_tokens=150, generated=gen)
    for text, g, got in zip(TEXTS, gen, batched):
        alone = routed.trace(text, max_new_tokens=5)
        assert got.token_ids == alone.token_ids and got.is_generated == alone.is_generated and any(got.is_generated)
        assert got.positions("generated") == alone.positions("generated") and got.text == alone.text
        np.testing.assert_allclose(got.weights, alone.weights, atol=1e-5)
        assert got.winner("generated") == alone.winner("generated")


def test_statistics():
    mean, lo, hi = C.bootstrap_ci(np.array([1, 0, 1, 1, 0, 1, 1, 1]))
    assert lo <= mean == 0.75 <= hi and 0 <= lo and hi <= 1
    m, lo, hi = C.bootstrap_task_mean([np.ones(5), np.zeros(20)])
    assert m == 0.5 and lo == hi == 0.5  # unweighted over tasks, no variance inside either task
    d = C.paired_difference([np.zeros(10)], [np.ones(10)])
    assert d == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one score"):
        C.bootstrap_ci(np.array([]))
    assert C.exact_match(" 42.\nmore", "42") == 1 and C.exact_match("Apple", "apple") == 0


def _in_range(stat: dict):
    lo, hi = stat["ci95"]
    assert 0 <= lo <= stat["mean"] <= hi <= 1


@pytest.mark.slow
def test_routing_quick(libs, tmp_path):
    from library_store.store.library import ExpertLibrary
    from explorer.routing.config import RouterConfig
    from explorer.routing.readout import readout_key
    from library_store.store.reports import read_default_router, read_readout, read_report

    results = eval_routing.quick(tmp_path, tmp_path / "fig", libs)
    assert [r["level"] for r in results] == ["private", "cluster"]
    for r in results:
        assert set(r["accuracy"]) == {"user", "generated", "user+generated", "prompt", "all"}
        for stat in r["accuracy"].values():
            _in_range(stat)
        assert set(r["per_task"]) == {"reverse_word", "first_letter", "add", "subtract"}
        for t in r["per_task"].values():
            assert t["n"] == 4 and 0 <= t["user"] <= 1 and t["own_experts"]
        conf = np.array(r["confusion"])
        assert conf.shape == (4, len(r["experts"]))
        np.testing.assert_allclose(conf.sum(1), 1.0, atol=1e-4)  # top-k softmax weights sum to one per token
        assert r["per_layer"]["layers"] == [0, 1] and all(0 <= a <= 1 for a in r["per_layer"]["accuracy"])
        assert set(r["per_module"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
        entropy, top_k = r["entropy"], r["router"]["top_k"]
        assert 0 <= entropy["q05"] <= entropy["q50"] <= entropy["q95"] <= np.log(top_k) + 1e-6
        assert 0 <= r["margin"]["q05"] <= r["margin"]["q95"] <= 1
        # the sweep chose the headline router on training prompts, and it was recorded as the default
        sweep = r["sweep"]
        assert sweep["evidence"]["split"] == "train" and r["router_source"].startswith("sweep")
        assert r["router"] == {**eval_sweep.router_of(sweep["winner"]).to_dict()}
        valid = [row for row in sweep["rows"] if "refused" not in row]
        assert sweep["winner"]["user"] == max(row["user"] for row in valid)  # within TIE; here the best itself
        lib = ExpertLibrary.open(libs["private" if r["level"] == "private" else "mbc"])
        assert read_default_router(lib).router == r["router"]
        gran = sweep["evidence"]["granularity"]  # per token / per prompt by mean / by a readout, then recorded
        assert len(gran["rows"]) == 3 and gran["readout"]["prompts_per_task"] == 20
        assert read_readout(lib, readout_key(RouterConfig.from_dict(r["router"]))) is not None
        rep = read_report(lib)
        assert rep.accuracy["user"] == r["accuracy"]["user"]["mean"] and rep.command == r["command"]
        assert rep.centring == r["centring"] and rep.per_layer == r["per_layer"]
        assert read_report(lib, "paraphrase") is None
        assert set(r["s5"]["per_task"]) == set(r["per_task"])  # every task is exact match with an own expert
        saved = json.loads((tmp_path / f"routing-{r['library']}-heldout.json").read_text())
        assert saved["accuracy"] == r["accuracy"]
        assert all(Path(f).read_text().startswith("<svg") for f in r["figures"].values())
    private, mbc = results
    assert [(c["centre"], c["scope"], c["input_centre"]) for c in private["centring"]] == [
        (c, s, i) for i in ("none", "base") for c, s in (("none", None), ("mean", "prototypes"), ("mean", "weights"))]
    assert all("user" in c for c in private["centring"])
    assert all(c.get("refused", "").startswith("Centring with 'mean' needs") == (c["centre"] == "mean")
               for c in mbc["centring"])  # 2 experts
    assert mbc["experts"] == ["cluster-0", "cluster-1"] and mbc["not_routed"] == ["warmup-add"]
    assert mbc["adjusted_rand"]["ari"] == pytest.approx(1.0)  # the quick MBC library's clusters are the families
    assert "adjusted_rand" not in private
    doc = (tmp_path / "routing-quick.md").read_text()
    assert "## `quick-private`, split `heldout`" in doc and "Sweep on training prompts" in doc
    # the centring table alone, routed again from the recorded result: the same rows, written into the stored report
    from dataclasses import replace

    from library_store.store.reports import write_report

    stored = ExpertLibrary.open(libs["private"], readonly=False)
    write_report(stored, replace(read_report(stored), centring=[]))  # so that only the rewrite can bring them back
    again = eval_centring.recentre(str(libs["private"]), "heldout", "tiny-random-llama", tmp_path, tmp_path / "fig",
                                   "", record=True, label="quick-private")
    keys = ("centre", "scope", "input_centre", "user", "prompt", "per_layer", "entropy_median", "margin_median")
    assert [[c[k] for k in keys] for c in again["centring"]] == [[c[k] for k in keys] for c in private["centring"]]
    assert read_report(ExpertLibrary.open(libs["private"])).centring == again["centring"] \
        and len(again["centring"]) == 6
    assert json.loads((tmp_path / "routing-quick-private-heldout.json").read_text())["centring_command"]


@pytest.mark.slow  # trains the quick libraries
def test_paraphrase_split_without_sweep_uses_the_recorded_router(libs, tmp_path):
    """After test_routing_quick recorded a default router: a paraphrase run starts from it, reads the split."""
    _, args = eval_routing.parse(["--model", "tiny-random-llama", "--n", "3", "--split", "paraphrase", "--out",
                                  str(tmp_path), "--figures", str(tmp_path), "--docs", ""])
    from library_store.store.library import ExpertLibrary
    from library_store.store.reports import default_router

    recorded = default_router(ExpertLibrary.open(libs["private"]))
    r = eval_routing.run(str(libs["private"]), args, label="quick-para")
    assert r["split"] == "paraphrase" and r["sweep"] is None
    if recorded is not None:
        assert r["router"] == recorded and r["router_source"] == "recorded default"
    else:  # this test run alone
        assert r["router_source"].startswith("fallback")
    from library_store.tasks import resolve_tasks

    for task in resolve_tasks("builtin:add,subtract,reverse_word,first_letter"):
        assert r["per_task"][task.name]["n"] == 3
        assert r["per_task"][task.name]["example"] == task.paraphrase[0].input != task.heldout[0].input


def test_centring_rows_compare_each_option_s_per_token_routing(monkeypatch):
    """A per-prompt readout headline has a readout for its own centring alone: every other option is compared by
    its per-token routing of the prompts (what a pick would read), not refused for a missing readout; the
    headline router is set again at the end."""
    from explorer.routing.config import RouterConfig

    headline = RouterConfig(top_k=2, temperature=0.1, input_centre="base", granularity="prompt", pick="readout")

    class Stub:
        router = headline

        def set_router(self, r):
            if r.granularity == "prompt" and r.pick == "readout" and r != headline:
                raise ValueError("No pick readout is fitted for this library and router")
            self.router = r

    monkeypatch.setattr(eval_routing, "route_prompts", lambda rm, base, texts: [rm.router] * len(texts))
    monkeypatch.setattr(eval_routing, "diagnose", lambda traces, own: {
        "accuracy": {"user": {"mean": next(iter(traces.values()))[0].top_k / 10}, "prompt": {"mean": 0.5}},
        "per_layer": {"accuracy": [0.5]}, "entropy": {"q50": 0.1}, "margin": {"q50": 0.2}})
    options = [("none", "prototypes", "none"), ("mean", "prototypes", "none"), ("none", "prototypes", "base")]
    stub = Stub()
    rows = eval_sweep.centring_rows(stub, None, {"t": ["a", "b"]}, {"t": ["e0"]}, headline, options)
    assert [r.get("refused") for r in rows] == [None] * 3 and [r["user"] for r in rows] == [0.2] * 3
    assert [(r["centre"], r["input_centre"], r["router"]["granularity"]) for r in rows] == [
        ("none", "none", "token"), ("mean", "none", "token"), ("none", "base", "token")]
    assert stub.router == headline


def test_s5_is_arrow_over_the_own_expert(monkeypatch):
    """S5 per task and overall, from stubbed exact-match scores; the own expert runs alone, then the router
    is restored."""
    from explorer.routing.config import RouterConfig
    from library_store.tasks import Example, Task

    class Stub:
        router = RouterConfig(top_k=2)
        seen: list = []

        def set_router(self, r):
            self.seen.append(r.mode)
            self.router = r

    own_scores = {"expert:a": [1, 1, 0, 0], "expert:b": [1, 1, 1, 1]}
    rm = Stub()
    monkeypatch.setattr(eval_sweep, "exact_matches", lambda base, ex, mt=4096: own_scores[rm.router.mode])
    ex = [Example("q", "a")] * 4
    tasks = [Task("ta", "f", train=ex, heldout=ex), Task("tb", "f", train=ex, heldout=ex),
             Task("tc", "f", train=ex, heldout=ex)]  # tc: no own expert, left out
    got = eval_sweep.s5(rm, None, tasks, {"ta": ["a"], "tb": ["b"]}, "heldout", 4,
                        {"ta": [1, 0, 0, 0], "tb": [1, 1, 1, 0], "tc": [1, 1, 1, 1]})
    assert got["per_task"]["ta"]["ratio"] == pytest.approx(0.25 / 0.5)
    assert got["per_task"]["tb"]["ratio"] == pytest.approx(0.75) and "tc" not in got["per_task"]
    assert got["overall"] == pytest.approx(((0.25 + 0.75) / 2) / ((0.5 + 1.0) / 2))
    assert rm.seen == ["expert:a", "expert:b", "arrow"] and rm.router.top_k == 2


def test_sweep_sees_training_prompts_only(monkeypatch):
    """The sweep routes and answers training examples only, every (centring, top-k, T) once; a refused centring
    is one row; the router it started with is restored."""
    from explorer.routing.config import RouterConfig
    from library_store.tasks import Example, Task

    class Stub:
        experts = ["a", "b", "c"]
        router = RouterConfig(top_k=3)

        def set_router(self, r):
            if r.centre == "mean" and r.centre_scope == "weights":
                raise ValueError("Centring refused here.")
            self.router = r

    seen, answered = [], []
    rm = Stub()

    def fake_diagnose(traces, own):  # routing improves with top-k here, so the largest k wins
        return {"accuracy": {"user": {"mean": 0.5 + 0.1 * rm.router.top_k}, "prompt": {"mean": 0.1}},
                "margin": {"q50": 0.2}, "entropy": {"q50": 0.3}}

    monkeypatch.setattr(eval_routing, "route_prompts", lambda rm_, base, texts, mt=4096: seen.extend(texts) or [])
    monkeypatch.setattr(eval_routing, "diagnose", fake_diagnose)
    monkeypatch.setattr(eval_sweep, "exact_matches", lambda base, ex, mt=4096: answered.extend(ex) or [1, 0])
    granular, fitted = [], []  # the winner's granularity step: per token answers 1 of 2, per prompt none here
    monkeypatch.setattr(eval_sweep, "fit_pick_readout", lambda rm_, base, ts, own, win, n_fit, mt=4096: fitted.append(
        [e.input for t in ts for e in t.train[:n_fit]]) or type("R", (), {"meta": {"n": 0}})())
    monkeypatch.setattr(eval_sweep, "routed_exact_matches", lambda rm_, base, ex, mt=4096, picks=None: granular.extend(
        (rm_.router.granularity, e.input) for e in ex) or ([0, 0] if rm_.router.per_prompt else [1, 0]))
    tasks = [Task(n, "f", train=[Example(f"train {n} {i}", "a") for i in range(5)],
                  heldout=[Example(f"held {n} {i}", "a") for i in range(5)]) for n in ("t1", "t2")]
    options = [("none", "prototypes", "none"), ("mean", "prototypes", "none"), ("mean", "weights", "none")]
    out = eval_sweep.sweep(rm, None, tasks, {"t1": ["a"], "t2": ["b"]}, 3, 2, [1, 2, 4], [0.1, 1.0], options, n_fit=2)
    assert seen and all(t.startswith("train") for t in seen) and len(seen) == 2 * 3 * 2 * (1 + 2 * 2)  # tasks x n x
    #  2 centrings x (top-1 at one temperature + top-2 and top-3 at both)
    gran = out["evidence"]["granularity"]
    assert [(r["granularity"], r["pick"]) for r in gran["rows"]] == [("token", "mean"), ("prompt", "mean"),
                                                                      ("prompt", "readout")]
    assert out["winner"]["granularity"] == gran["winner"]["granularity"] == "token" and gran["split"] == "train"
    assert fitted == [["train t1 0", "train t1 1", "train t2 0", "train t2 1"]]  # the readout: the first 2
    assert {t for _, t in granular} == {"train t1 2", "train t1 3", "train t2 2", "train t2 3"}  # scored on the next
    assert answered and all(e.input.startswith("train") for e in answered)
    rows = out["rows"]
    assert [(r["centre"], r["centre_scope"]) for r in rows if "refused" in r] == [("mean", "weights")]
    assert {r["top_k"] for r in rows} == {1, 2, 3}  # 4 is clipped to the 3 experts
    assert out["winner"]["top_k"] == 3 and out["evidence"]["train_prompts_per_task"] == 3
    assert rm.router == RouterConfig(top_k=3)


@pytest.mark.slow
def test_heldout_quick(libs, tmp_path):
    a, b = eval_heldout.quick(tmp_path, tmp_path / "fig", argparse.Namespace(max_tokens=4096), libs)
    assert a["methods"] == ["base", "uniform", "private_arrow", "mbc_arrow", "uniform_centred", "oracle"]
    assert b["methods"] == ["base", "uniform", "private_arrow", "mbc_arrow", "uniform_centred"]  # no oracle in B
    for s in (a, b):  # each library's recorded default router (test_routing_quick records them), else Arrow
        assert set(s["routers"]) == {"private", "mbc"} and s["split"] == "heldout"
        assert all(r["source"] in ("recorded default", "fallback (no recorded default)") for r in s["routers"].values())
    for s in (a, b):
        for m in s["methods"]:
            _in_range(s["mean"][m])
            for t in s["tasks"].values():
                _in_range(t[m])
                assert t["n"] == 6 and 0 <= t["chance"] <= 1
        assert set(s["differences"]) == {"uniform - base", "private_arrow - uniform", "mbc_arrow - private_arrow"}
        assert isinstance(s["ordering"]["reproduced"], bool) and s["partial"] is False and s["finished"]
        assert (tmp_path / f"heldout-{s['setting']}-quick.json").is_file()
    assert a["oracle"]["add_three"]["expert"] in ("add", "subtract")  # same family only
    assert a["oracle"]["last_letter"]["expert"] in ("reverse_word", "first_letter")
    assert all(t["chance"] == 0.5 for t in b["tasks"].values())  # two labels offered as choices
    assert all(t["metric"] == "multiple_choice" for t in b["tasks"].values())


@pytest.mark.slow
def test_heldout_router_changes(libs, tmp_path):
    """--router: the changes go over each library's default router, and the results say so."""
    a, _ = eval_heldout.quick(tmp_path, tmp_path / "fig",
                              argparse.Namespace(max_tokens=4096, router="input_centre=base,top_k=1"), libs)
    for r in a["routers"].values():
        assert r["router"]["input_centre"] == "base" and r["router"]["top_k"] == 1
        assert "--router" in r["source"]


@pytest.mark.parametrize("spec, message", [
    ("top_k=x", "top_k takes a number, got 'x'"), ("foo=1", "Unknown RouterConfig fields"),
    ("input_centre=bse", "Unknown input_centre 'bse'"), ("top_k", "KEY=VALUE pairs")])
def test_heldout_router_bad_input(spec, message):
    with pytest.raises(ValueError, match=message):
        eval_heldout.parse_router(spec)
    assert eval_heldout.parse_router(" input_centre=base, temperature=0.1") == {"input_centre": "base",
                                                                                "temperature": 0.1}


def test_routing_cli_needs_a_library():
    with pytest.raises(SystemExit):
        eval_routing.main([])


def test_partial_summary_and_ordering_text():
    from library_store.tasks import Example, Task

    tasks = [Task(f"t{i}", "f", train=[Example("q", "a")] * 3, heldout=[Example("q", "a")] * 4) for i in range(2)]
    rec = {"correct": [1, 0, 1, 0], "samples": []}
    partial = eval_heldout.summarise(tasks, {"base": {"t0": rec, "t1": rec}}, 4)
    assert partial["partial"] and partial["missing_methods"] == ["uniform", "private_arrow", "mbc_arrow"]
    assert partial["ordering"]["reproduced"] is None and partial["differences"] == {}
    assert "PARTIAL" in eval_heldout.report(partial)
    assert eval_heldout.observed_order({"base": 0.1, "uniform": 0.1, "mbc_arrow": 0.3}) == \
        "base 0.100 = uniform 0.100 < mbc_arrow 0.300"
    assert not eval_heldout.mbc_complete("/nonexistent/library")
