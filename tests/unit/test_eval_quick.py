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
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import eval_common as C  # noqa: E402
from bench import eval_heldout, eval_routing  # noqa: E402


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    return C.quick_libraries(tmp_path_factory.mktemp("libs"))


@pytest.fixture(scope="module")
def routed_twin():
    from explorer.routing.inject import random_expert
    from explorer.routing.model import RoutedModel, RouterConfig

    base = copy.deepcopy(C.load_base("tiny-random-llama"))  # the quick runs share the original
    exps = [random_expert(base.model, base.targets, f"e{i}", rank=4, alpha=8, seed=i, scale=0.5) for i in range(4)]
    RoutedModel(base, exps, RouterConfig(top_k=2))  # wraps the copy in place
    return base


TEXTS = ["Reverse the letters of this word: apple", "Add these numbers: 2 + 3",
         "Is this an animal or a plant? a big green oak tree", "Convert this date to MM/DD/YYYY: 2001-03-04"]


def test_batched_scores_equal_one_at_a_time(routed_twin):
    base = routed_twin
    tok = base.tokenizer
    ids = C.prompt_ids(base, TEXTS)
    assert C.common_prefix(ids) > 10  # the chat template's system turn is shared
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


def test_routing_quick(libs, tmp_path):
    results = eval_routing.quick(tmp_path, tmp_path / "fig", libs)
    assert [r["level"] for r in results] == ["private", "cluster"]
    for r in results:
        _in_range(r["overall"])
        _in_range(r["overall_user_tokens"])
        assert set(r["tasks"]) == {"reverse_word", "first_letter", "add", "subtract"}
        for t in r["tasks"].values():
            assert t["n"] == 6 and 0 <= t["accuracy"] <= 1 and t["own_experts"]
        conf = np.array(r["confusion"]["mean_weight"])
        assert conf.shape == (4, len(r["experts"]))
        np.testing.assert_allclose(conf.sum(1), 1.0, atol=1e-4)  # top-k softmax weights sum to one per token
        saved = json.loads((tmp_path / f"routing-{r['library']}.json").read_text())
        assert saved["overall"]["mean"] == r["overall"]["mean"]
        assert Path(r["figure"]).read_text().startswith("<svg")
    assert results[1]["experts"] == ["cluster_0", "cluster_1"] and results[1]["not_routed"] == ["warmup-add"]
    ari = results[1]["adjusted_rand"]
    assert ari["ari"] == pytest.approx(1.0)  # the quick MBC library's clusters are the families
    assert "adjusted_rand" not in results[0]


def test_heldout_quick(libs, tmp_path):
    a, b = eval_heldout.quick(tmp_path, tmp_path / "fig", argparse.Namespace(max_tokens=4096), libs)
    assert a["methods"] == ["base", "uniform", "private_arrow", "mbc_arrow", "oracle"]
    assert b["methods"] == ["base", "uniform", "private_arrow", "mbc_arrow"]  # no oracle for setting B
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
