"""bench/pair_geometry.py: the pair table reads a library and ranks a pair that learned the same update first."""
import json
import sys
from pathlib import Path

import pytest

from library_store.store.library import ExpertLibrary
from library_store.testing import random_expert

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import pair_geometry  # noqa: E402


@pytest.fixture
def library(tmp_path, _twins):
    base = _twins("tiny-random-llama")
    lib = ExpertLibrary.create(tmp_path / "lib", base)
    for seed in range(4):
        lib.add(random_expert(base, f"e{seed}", seed=seed))
    twin = random_expert(base, "twin", seed=0)  # e0's update, a hair larger
    for key in twin.weights:
        if key.endswith("lora_B.weight"):
            twin.weights[key] = twin.weights[key] * 1.001
    lib.add(twin)
    return tmp_path / "lib"


def test_a_pair_with_the_same_update_ranks_first_and_the_others_do_not_match(library, tmp_path):
    out = tmp_path / "pairs.json"
    assert pair_geometry.main(["--library", str(library), "--a", "twin", "--b", "e0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["pair_rank"] == 1 and len(data["pairs"]) == 10
    assert data["pair"]["raw"] == pytest.approx(1, abs=1e-4) and data["pair"]["centred"] == pytest.approx(1, abs=1e-3)
    assert data["pair"]["update"] == pytest.approx(1, abs=1e-3)
    others = [p for p in data["pairs"] if {p["a"], p["b"]} != {"twin", "e0"}]
    assert max(p["raw"] for p in others) < 0.9 and max(p["update"] for p in others) < 0.9
    assert {e["expert"] for e in data["experts"]} == {"e0", "e1", "e2", "e3", "twin"}
    # the library's mean update is taken out: the centred updates sum to zero, so the pairs' cosines lean negative
    assert sum(p["update"] for p in data["pairs"]) < 0


def test_an_unknown_expert_is_refused_naming_the_library_s_experts(library):
    with pytest.raises(SystemExit, match=r"No routable expert 'nope'.*'e0'"):
        pair_geometry.main(["--library", str(library), "--a", "nope", "--b", "e0"])
