"""The Library tab's data, read from a library's index and derived data (no gradio, no model).

Usage::

    lib = ExpertLibrary.open("assets/libraries/demo-mbc", readonly=True)
    analysis = analyse_library(lib, "demo-mbc")   # tasks, 2-D map, cosine matrix, clusters, experts table
    expert_groups(lib)                             # expert -> cluster, to colour routing by cluster
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from library_store.store.library import ExpertLibrary

MAP_KIND, SIMILARITY_KIND = "mbc-map", "mbc-similarity"  # derived data written by `build mbc`


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


def _latest(lib: "ExpertLibrary", kind: str):
    """(tensors, meta, config) of the newest derived entry of `kind`, or None."""
    entries = [d for d in lib.list_derived() if d["kind"] == kind]
    if not entries:
        return None
    entry = max(entries, key=lambda d: d.get("created") or "")
    hit = lib.get_derived(kind, entry["config"])
    return None if hit is None else (hit[0], hit[1] or {}, entry["config"] or {})


def _matrix(tensors: dict, preferred: tuple[str, ...], cols: int | None) -> np.ndarray | None:
    for key in preferred:
        if key in tensors:
            return tensors[key].float().numpy()
    for value in tensors.values():  # fall back to the first 2-D tensor of the expected shape
        if value.dim() == 2 and (cols is None and value.shape[0] == value.shape[1] or value.shape[1] == cols):
            return value.float().numpy()
    return None


def _tasks_of(meta: dict, config: dict) -> list[str] | None:
    for source in (meta, config):
        for key in ("tasks", "names", "experts"):
            if isinstance(source.get(key), list):
                return [str(t) for t in source[key]]
    return None


def analyse_library(lib: "ExpertLibrary", name: str) -> LibraryAnalysis:
    """The Library tab's data: stored MBC map and similarity (if the library has them), clusters, experts."""
    table = experts_table(lib)
    cluster_of = {task: cluster for cluster, tasks in lib.clusters().items() for task in tasks}
    for info in lib.infos():  # MBC cluster experts name their cluster and its tasks
        for task in info.tasks:
            cluster_of.setdefault(task, info.cluster or "")
    out = LibraryAnalysis(name=name, cluster_of={t: c for t, c in cluster_of.items() if c}, experts=table)
    found = _latest(lib, MAP_KIND)
    if found is None:
        out.note = (f"Library {name!r} has no MBC map (derived data {MAP_KIND!r}): build it with "
                    "`python -m library_store build mbc` to see which tasks' adapters are alike.")
        return out
    tensors, meta, config = found
    coords = _matrix(tensors, ("coords", "map", "xy"), cols=2)
    tasks = _tasks_of(meta, config)
    sim_found = _latest(lib, SIMILARITY_KIND)
    similarity = None
    if sim_found is not None:
        similarity = _matrix(sim_found[0], ("similarity", "cosine", "sim"), cols=None)
        tasks = tasks or _tasks_of(sim_found[1], sim_found[2])
    if similarity is None:
        similarity = _matrix(tensors, ("similarity", "cosine"), cols=None)
    if coords is None or tasks is None or len(tasks) != len(coords):
        out.note = f"Library {name!r} has an MBC map this page cannot read (no coordinates or task names)."
        return out
    if similarity is not None and similarity.shape != (len(tasks), len(tasks)):
        similarity = None
    labels = meta.get("labels") or config.get("labels")
    if labels is not None and len(labels) == len(tasks) and not out.cluster_of:
        out.cluster_of = {t: f"cluster{int(c)}" for t, c in zip(tasks, labels)}
    out.tasks, out.coords, out.similarity = tasks, coords, similarity
    families = meta.get("families")
    if isinstance(families, list) and len(families) == len(tasks):
        out.family_of = {t: str(f) for t, f in zip(tasks, families)}
    parts = [f"{len(tasks)} warm-up adapters"]
    if meta.get("method"):
        parts.append(f"2-D map by {meta['method']}")
    if isinstance(meta.get("ari_vs_families"), (int, float)):
        parts.append(f"adjusted Rand index of the clusters vs the task families {meta['ari_vs_families']:.2f}")
    out.summary = "; ".join(parts) + "."
    return out


def expert_groups(lib: "ExpertLibrary", borrowed: dict[str, str] | None = None) -> dict[str, str]:
    """expert -> MBC cluster, for colouring the heatmap by cluster (experts without one keep their name).
    `borrowed` (task -> cluster, e.g. from an MBC library over the same tasks) colours a private library."""
    cluster_of = {**(borrowed or {}), **{task: cluster for cluster, tasks in lib.clusters().items()
                                         for task in tasks}}
    groups = {}
    for info in lib.infos():
        groups[info.name] = info.cluster or next((cluster_of[t] for t in info.tasks if t in cluster_of), info.name)
    return groups
