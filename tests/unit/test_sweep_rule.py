"""The default router's winner rule (bench/eval_sweep.py, `choose`) and choosing again from recorded sweep rows."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import eval_sweep  # noqa: E402


def test_sweep_winner_rule():
    rows = [{"user": 0.90, "prompt": 0.5, "em": 0.2, "margin_median": 0.9, "top_k": 1},
            {"user": 0.895, "prompt": 0.4, "em": 0.6, "margin_median": 0.1, "top_k": 2},  # within 1 point: best EM
            {"user": 0.70, "prompt": 0.9, "em": 0.9, "margin_median": 0.9, "top_k": 4},  # routes worse: out
            {"refused": "no", "top_k": 4}]
    assert eval_sweep.choose(rows)["top_k"] == 2
    assert eval_sweep.choose([dict(r, em=None) for r in rows[:3]])["top_k"] == 1  # then the margin
    centred = [dict(r, centre="mean", centre_scope="weights", user=0.99, top_k=8) for r in rows[:1]]
    assert eval_sweep.choose(rows + centred)["top_k"] == 2  # routes best, but answers with altered experts: out
    assert eval_sweep.choose(rows + [dict(c, centre_scope="prototypes") for c in centred])["top_k"] == 8
    even = [dict(rows[0], user=0.99, margin_median=0.02, top_k=16)]  # routes best, but its weights split evenly
    assert eval_sweep.choose(rows + even)["top_k"] == 2 and eval_sweep.choose(rows + even, decisive=0.01)["top_k"] == 16
    with pytest.raises(ValueError, match="refused"):
        eval_sweep.choose(rows[3:])


def test_regranulate_can_rechoose_from_the_recorded_rows(monkeypatch):
    from types import SimpleNamespace

    keys = ("top_k", "temperature", "centre", "centre_scope", "input_centre")
    rows = [{"user": 0.9, "prompt": 0.5, "em": 0.5, "top_k": 1, "temperature": 0.1, "centre": "mean",
             "centre_scope": "weights", "input_centre": "base"},
            {"user": 0.8, "prompt": 0.5, "em": 0.3, "top_k": 4, "temperature": 0.1, "centre": "none",
             "centre_scope": "prototypes", "input_centre": "base"}]
    stale = {"user": 0.9, "em": 0.5, "margin_median": 0.02, "layers": [3]}  # the old winner's scores and layers
    recorded = SimpleNamespace(router={k: rows[0][k] for k in keys}, command="sweep", date="then",
                               evidence={"rows": rows, "winner": {**{k: rows[0][k] for k in keys}, **stale},
                                         "rule": "old"})
    seen = []
    def step(rm, base, tasks, own, winner, n_fit, n_em, max_tokens):
        seen.append(winner)
        return {"winner": {"granularity": "prompt", "pick": "readout"}}, None

    monkeypatch.setattr(eval_sweep, "granularity_step", step)
    kept = eval_sweep.regranulate(None, None, [], {}, recorded, 2)
    assert (kept["winner"]["centre_scope"], kept["evidence"]["rule"]) == ("weights", "old")  # the recorded router
    again = eval_sweep.regranulate(None, None, [], {}, recorded, 2, rechoose=True)
    assert {k: again["winner"][k] for k in keys} == {k: rows[1][k] for k in keys} == {k: seen[-1][k] for k in keys}
    assert again["evidence"]["rule"] == eval_sweep.RULE and again["evidence"]["rows_rechosen_from"] == "then"
    assert again["rows"] == rows and again["winner"]["granularity"] == "prompt"
    # the new winner's own scores, not the old winner's, and no layers chosen for another setting
    assert (again["winner"]["user"], again["winner"]["em"], again["winner"].get("layers")) == (0.8, 0.3, None)
    assert "margin_median" not in again["winner"]


def test_a_per_prompt_default_must_decide_on_the_scale_that_picks():
    """demo-mbc, 2026-12-01: picks by mean weight answered best (0.925) but led by a median 0.035; the readout's
    picks answered 0.906 and led by far more. A candidate whose picks hardly lead cannot win."""
    rows = [{"granularity": "token", "pick": "mean", "em": 0.46, "lead_median": None},
            {"granularity": "prompt", "pick": "mean", "em": 0.925, "lead_median": 0.035},
            {"granularity": "prompt", "pick": "readout", "em": 0.906, "lead_median": 0.6}]
    assert eval_sweep.granularity_winner(rows)["pick"] == "readout"
    assert eval_sweep.granularity_winner(rows, decisive=0.03)["pick"] == "mean"  # decided by the threshold
    undecided = [rows[0], rows[1], dict(rows[2], lead_median=0.01)]
    assert eval_sweep.granularity_winner(undecided)["granularity"] == "token"  # per token: no pick to decide
    tie = [rows[0], dict(rows[1], lead_median=0.2), dict(rows[2], em=0.925)]
    assert eval_sweep.granularity_winner(tie)["pick"] == "mean"  # a tie goes to the simpler
    assert eval_sweep.granularity_winner(rows[1:2])["pick"] == "mean"  # nothing decides: the best of all
