"""The Library tab's data, read from a library's index and derived data (no gradio, no model).

Usage::

    lib = ExpertLibrary.open("assets/libraries/demo-mbc", readonly=True)
    analysis = analyse_library(lib, "demo-mbc")   # tasks, 2-D map, cosine matrix, clusters, experts table
    delta_analysis(lib, "demo-mbc", analysis)      # the same views over the experts' weight updates ΔW
    expert_groups(lib)                             # expert -> cluster, to colour routing by cluster
    task_clusters(lib)                             # task -> cluster, from the library's cluster table

The MBC data (map, similarity, labels) is read through `library_store.training.mbc.read_mbc`, the one schema
that builds write; the ΔW map (any library, any initialisation) through `library_store.store.similarity`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from library_store.store.library import ExpertLibrary


@dataclass
class LibraryAnalysis:
    """What the Library tab shows for one library: the MBC map, the similarity matrix and the experts table."""

    name: str
    tasks: list[str] = field(default_factory=list)  # one entry per warm-up adapter, map order
    coords: np.ndarray | None = None  # (tasks, 2) stored 2-D map coordinates
    similarity: np.ndarray | None = None  # (tasks, tasks) cosine similarity
    cluster_of: dict[str, str] = field(default_factory=dict)  # task -> MBC cluster
    experts: pd.DataFrame = field(default_factory=pd.DataFrame)
    note: str = ""  # shown instead of the map when there is no MBC data
    family_of: dict[str, str] = field(default_factory=dict)  # task -> task family (when the build recorded it)
    summary: str = ""  # how the map was made: method, agreement of clusters with families
    map_kind: str = "mbc"  # "mbc": rows are warm-up adapters; "delta": rows are experts, cosine of their ΔW


def experts_table(lib: "ExpertLibrary") -> pd.DataFrame:
    """One row per expert: name, kind, tasks, cluster, rank, parameters, steps, final loss."""
    rows = []
    for info in lib.infos():
        loss = info.train.final_loss
        rows.append({"name": info.name, "kind": info.kind, "tasks": ", ".join(info.tasks),
                     "cluster": info.cluster or "", "rank": info.rank, "parameters": info.n_params,
                     "steps": info.train.steps, "final loss": round(loss, 4) if loss is not None else None})
    return pd.DataFrame(rows, columns=["name", "kind", "tasks", "cluster", "rank", "parameters", "steps",
                                       "final loss"])


def task_clusters(lib: "ExpertLibrary") -> dict[str, str]:
    """task -> cluster from the library's cluster table (what `build mbc` or `set_clusters` wrote)."""
    return {task: cluster for cluster, tasks in lib.clusters().items() for task in tasks}


def analyse_library(lib: "ExpertLibrary", name: str) -> LibraryAnalysis:
    """The Library tab's data: stored MBC data (map, similarity, clusters) if the library has it, experts."""
    from library_store.training.mbc import MAP_KIND, read_mbc  # torch: loaded after the page is up

    out = LibraryAnalysis(name=name, cluster_of=task_clusters(lib), experts=experts_table(lib))
    try:
        data = read_mbc(lib)
    except ValueError as exc:  # stored data that contradicts itself: say so, show the rest
        out.note = f"Library {name!r} has MBC data this page cannot read: {exc}"
        return out
    if data is None:
        out.note = (f"Library {name!r} has no MBC map (derived data {MAP_KIND!r}): build it with "
                    "`python -m library_store build mbc` to see which tasks' adapters are alike.")
        return out
    out.tasks, out.coords, out.similarity = list(data.tasks), data.coords, data.similarity
    out.cluster_of = {**data.cluster_of, **out.cluster_of}  # the cluster table wins where both name a task
    if data.families is not None:
        out.family_of = dict(zip(data.tasks, data.families))
    parts = [f"{len(data.tasks)} warm-up adapters"]
    if data.method:
        parts.append(f"2-D map by {data.method}")
    if data.ari_vs_families is not None:
        parts.append(f"adjusted Rand index of the clusters vs the task families {data.ari_vs_families:.2f}")
    out.summary = "; ".join(parts) + "."
    return out


def expert_groups(lib: "ExpertLibrary", borrowed: dict[str, str] | None = None) -> dict[str, str]:
    """expert -> cluster, for colouring the routing by cluster: the expert's own cluster, else the cluster of
    its first task that has one, else its own name. `borrowed` (task -> cluster, e.g. from an MBC library over
    the same tasks) colours a private library."""
    cluster_of = {**(borrowed or {}), **task_clusters(lib)}
    return {info.name: info.cluster or next((cluster_of[t] for t in info.tasks if t in cluster_of), info.name)
            for info in lib.infos()}


def delta_analysis(lib: "ExpertLibrary", name: str, base: LibraryAnalysis | None = None) -> LibraryAnalysis:
    """The ΔW similarity map of `lib`'s experts (cached and incremental in the store) as a LibraryAnalysis whose
    rows are experts; `base` (the library's `analyse_library`) lends its experts table and task families."""
    from library_store.store.similarity import delta_similarity  # torch: loaded after the page is up

    base = base or analyse_library(lib, name)
    out = LibraryAnalysis(name=name, experts=base.experts, map_kind="delta")
    try:
        sim = delta_similarity(lib)
    except Exception as exc:  # noqa: BLE001 - the tab shows why instead of the map; the rest still works
        out.note = f"The ΔW similarity map of {name!r} could not be computed: {type(exc).__name__}: {exc}"
        return out
    if not sim.names:
        out.note = f"Library {name!r} has no experts to map."
        return out
    own = {info.name: info.cluster for info in lib.infos() if info.cluster}
    found = {n: c for c, members in sim.clusters.items() for n in members}
    out.tasks, out.coords, out.similarity = list(sim.names), sim.coords, sim.similarity
    out.cluster_of = {n: own.get(n) or found[n] for n in sim.names}
    tasks_of = dict(zip(sim.names, sim.tasks))
    out.family_of = {n: base.family_of[t[0]] for n, t in tasks_of.items() if t and t[0] in base.family_of}
    skipped = f" Not on the map: {', '.join(f'{n} ({why})' for n, why in sim.skipped.items())}." if sim.skipped else ""
    out.summary = (f"{len(sim.names)} experts; cosine of their weight updates ΔW = s·B·A summed over modules "
                   f"(exact, low rank); 2-D map by {sim.method or 'pca'}; colour = the expert's cluster, else a "
                   f"k-means cluster of the similarity rows.{skipped}")
    return out
