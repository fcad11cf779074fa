"""A rebuilt MBC library keeps the expert of a cluster whose tasks did not change, whatever its number now."""
import pytest
import torch
from store_helpers.experts import LLAMA, LLAMA_FP, LLAMA_SHAPES, random_expert

from library_store.store.library import ExpertLibrary
from library_store.training.cluster_rename import rename_clusters


def _weights(lib, name):
    return {k: v.clone() for k, v in lib[name].weights.items()}


def test_unchanged_clusters_keep_their_experts_under_new_numbers(tmp_path):
    old_tasks = {"cluster-0": ["a", "b"], "cluster-1": ["c", "d"], "cluster-2": ["e", "f"]}
    lib = _library(tmp_path / "lib", old_tasks)
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


class Killed(Exception):
    """Stands for kill -9 between two writes (a kill inside one write is the store's own recovery, tested there)."""


CASES = {  # the clusters an earlier build left, and the clusters of the rebuild
    "renumbered": ({"cluster-0": ["a", "b"], "cluster-1": ["c", "d"], "cluster-2": ["e", "f"]},
                   {"cluster-0": ["x", "e"], "cluster-1": ["b", "a"], "cluster-2": ["c", "d"]}),
    "swapped": ({"cluster-0": ["a", "b"], "cluster-1": ["c", "d"]},
                {"cluster-0": ["c", "d"], "cluster-1": ["a", "b"]}),
}


def _library(path, clusters):
    lib = ExpertLibrary.create(path, LLAMA_FP, module_shapes=LLAMA_SHAPES)
    for seed, (name, tasks) in enumerate(clusters.items()):
        lib.add(random_expert(LLAMA, name, tasks=tasks, kind="cluster", cluster=name, seed=seed))
    return lib


def _state(lib):
    """name -> (tasks, cluster, weights) of every expert."""
    return {i.name: (sorted(i.tasks), i.cluster, _weights(lib, i.name)) for i in lib.infos()}


def _equal(w1, w2):
    return w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def _same(a, b):
    return a.keys() == b.keys() and all(a[n][:2] == b[n][:2] and _equal(a[n][2], b[n][2]) for n in a)


def _kill_at(lib, monkeypatch, n):
    """Make the library's n-th write (add or remove, counted from 0) raise Killed; returns the call counter."""
    calls = []
    for op in ("add", "remove"):
        def write(*args, _real=getattr(lib, op), **kwargs):
            calls.append(1)
            if len(calls) - 1 == n:
                raise Killed
            return _real(*args, **kwargs)
        monkeypatch.setattr(lib, op, write)
    return calls


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_kill_between_any_two_writes_loses_no_expert_and_a_rerun_finishes(tmp_path, monkeypatch, case):
    old, new = CASES[case]
    ref = _library(tmp_path / "ref", old)
    kept = {tuple(sorted(t)): _weights(ref, n) for n, t in old.items() if sorted(t) in map(sorted, new.values())}
    calls = _kill_at(ref, monkeypatch, -1)  # counts the writes of an uninterrupted run
    rename_clusters(ref, new)
    want, writes = _state(ref), len(calls)
    assert writes >= 3 and all(want[c][0] == sorted(m) for c, m in new.items() if c in want)
    for n in range(writes):
        lib = _library(tmp_path / f"killed-{n}", old)
        with monkeypatch.context() as m:
            _kill_at(lib, m, n)
            with pytest.raises(Killed):
                rename_clusters(lib, new)
        for tasks, weights in kept.items():  # every expert a cluster keeps is still somewhere, unchanged
            assert any(tuple(sorted(i.tasks)) == tasks and _equal(_weights(lib, i.name), weights)
                       for i in lib.infos()), (n, tasks)
        rename_clusters(lib, new)  # the resumed build
        assert _same(_state(lib), want), n
