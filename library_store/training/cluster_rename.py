"""A rebuilt MBC library keeps the expert of a cluster whose tasks did not change, under the cluster's new name.

Usage::

    moved = rename_clusters(lib, {"cluster-0": ["x", "e"], "cluster-1": ["a", "b"]})   # clusters -> their tasks

Clusters are numbered by first appearance in the task order, so a changed task renumbers the others; an
unchanged cluster is not trained again. Each step is one atomic write of the store (`ExpertLibrary.add` /
`remove`), and the steps are ordered so that a kill between any two of them loses no expert: every moved expert
is first parked under a holding name, then written at its new name, and only then are its old name and its
parked copy removed. Run again after a kill, the function finishes the job (an expert found under two names is
one expert) and removes what a killed run parked.
"""
from __future__ import annotations

import sys
from dataclasses import replace

from library_store.expert import LoraExpert
from library_store.store.library import ExpertLibrary

HOLD = ".moving"  # a parked copy is "<new name>.moving"; never a cluster's own name (cluster-N)


def _key(tasks) -> tuple[str, ...]:
    return tuple(sorted(tasks))


def _put(lib: ExpertLibrary, expert: LoraExpert, name: str, cluster: str) -> LoraExpert:
    """`expert` written under `name` (what was there replaced); the expert, renamed, for the next write."""
    expert.info = replace(expert.info, name=name, cluster=cluster)
    lib.add(expert, replace=name in lib)
    return expert


def rename_clusters(lib: ExpertLibrary, clusters: dict[str, list[str]]) -> list[str]:
    """Give each cluster the existing cluster expert trained on exactly its tasks, when it has another name.
    Returns the clusters that took over an expert, in `clusters`' order."""
    names_of: dict[tuple[str, ...], list[str]] = {}  # tasks -> every cluster expert with them (a killed run: two)
    for info in lib.infos():
        if info.kind == "cluster":
            names_of.setdefault(_key(info.tasks), []).append(info.name)
    # a cluster whose tasks some expert has, under other names only (no expert at all: nothing to move, it trains)
    moves = {c: names_of[_key(m)] for c, m in clusters.items() if c not in names_of.get(_key(m), [c])}
    parked = {c: _put(lib, lib[names[0]], c + HOLD, c)  # 1. park a copy: a moved expert is never in one place only
              for c, names in moves.items() if c + HOLD not in names}
    # 2. at its new name, from memory (or, parked by a killed run, read back); what was there is parked if it moves
    for c in moves:
        print(f"{c}: the expert of {moves[c][0]} (same tasks) kept, renamed", file=sys.stderr, flush=True)
        _put(lib, parked[c] if c in parked else lib[c + HOLD], c, c)
    owner = {_key(m): c for c, m in clusters.items()}
    for info in lib.infos():  # 3. every other copy: old names, parked ones (this run's or a killed run's)
        c = owner.get(_key(info.tasks))
        if info.kind == "cluster" and (info.name.endswith(HOLD) or (c is not None and info.name != c)):
            lib.remove(info.name)
    return list(moves)
