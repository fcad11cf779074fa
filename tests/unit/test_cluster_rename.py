"""A rebuilt MBC library keeps the expert of a cluster whose tasks did not change, whatever its number now."""
import torch
from store_helpers.experts import LLAMA, LLAMA_FP, LLAMA_SHAPES, random_expert

from library_store.store.library import ExpertLibrary
from library_store.training.build import rename_clusters


def _weights(lib, name):
    return {k: v.clone() for k, v in lib[name].weights.items()}


def test_unchanged_clusters_keep_their_experts_under_new_numbers(tmp_path):
    lib = ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    old_tasks = {"cluster-0": ["a", "b"], "cluster-1": ["c", "d"], "cluster-2": ["e", "f"]}
    for seed, (name, tasks) in enumerate(old_tasks.items()):
        lib.add(random_expert(LLAMA, name, tasks=tasks, kind="cluster", cluster=name, seed=seed))
    before = {n: _weights(lib, n) for n in ("cluster-0", "cluster-1", "cluster-2")}
    # a new task came first: a, b's cluster is now numbered 1 and c, d's 2; no cluster has e, f any more
    moved = rename_clusters(lib, {"cluster-0": ["x", "e"], "cluster-1": ["b", "a"], "cluster-2": ["c", "d"]})
    assert sorted(moved) == ["cluster-1", "cluster-2"]
    for new, old in (("cluster-1", "cluster-0"), ("cluster-2", "cluster-1")):
        info = lib.info(new)
        assert (info.kind, info.cluster, sorted(info.tasks)) == ("cluster", new, old_tasks[old])
        assert all(torch.equal(lib[new].weights[k], before[old][k]) for k in before[old])
    assert "cluster-0" not in lib and len(lib) == 2  # no expert had x, e (the build trains it); e, f's was replaced
    assert rename_clusters(lib, {"cluster-1": ["a", "b"], "cluster-2": ["c", "d"]}) == []  # nothing left to move

