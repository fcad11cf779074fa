"""bench/operator_twins.py: the twin of a prompt is the sibling task's wording of the same index with the operation
flipped, and the table's task effect and AUC read the weights the right way round."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import operator_twins as ot  # noqa: E402

from library_store.tasks import resolve_tasks  # noqa: E402


def test_a_twin_keeps_the_numbers_and_the_wording_index_and_flips_the_operation():
    sub = resolve_tasks("builtin:subtract")[0]
    seen_shared = seen_named = False
    for e in sub.examples("heldout")[:20]:
        text, shared = ot.twin(e, "subtract", "add")
        x = ot.raw_input(e.wording, e.input)
        assert " - " in x and x.replace(" - ", " + ") in text and " - " not in text
        back, _ = ot.twin(type(e)(text, "", wording=text.replace(x.replace(" - ", " + "), "{x}")), "add", "subtract")
        assert back == e.input  # flipping twice gives the prompt back
        seen_shared |= shared and text.replace(" + ", " - ") == e.input
        seen_named |= not shared
    assert seen_shared and seen_named  # both kinds of wording occur in the first 20


def test_a_prompt_not_asked_in_its_wording_is_refused():
    with pytest.raises(ValueError, match="was not asked"):
        ot.raw_input("Subtract these numbers: {x}", "Add these numbers: 3 - 1")


def test_the_task_effect_and_auc_read_the_weights_the_right_way_round():
    # 2 prompts of task a (expert 0), 2 of task b (expert 1); each twin moves 0.02 of weight towards its own task
    W = np.array([[0.10, 0.20], [0.12, 0.20], [0.05, 0.25], [0.06, 0.24]])  # (n, E): b leads everywhere
    Wt = W + np.array([[-0.01, 0.01], [-0.01, 0.01], [0.01, -0.01], [0.01, -0.01]])
    shared, from_a = np.array([True, False, True, False]), np.array([True, True, False, False])
    own = np.array([0, 0, 1, 1])
    rows = {r["pairs"]: r for r in ot.twin_table(W, Wt, shared, from_a, 0, 1, own)}
    everything = rows["all"]
    assert everything["n"] == 4 and everything["task_effect"] == pytest.approx(0.02)
    assert everything["task_effect_positive"] == 1.0 and everything["own_right"] == 0.5  # b's standing lead
    assert everything["auc"] > 0.5
