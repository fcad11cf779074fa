"""A library's small tables: the cluster table (cluster -> tasks) and evaluation scores.

Usage::

    lib.set_clusters({"cluster-0": ["reverse_word", "add_two"]})   # ExpertLibrary forwards to lib.records
    lib.clusters()      # {"cluster-0": ["reverse_word", "add_two"]}
    lib.cluster_of()    # {"reverse_word": "cluster-0", "add_two": "cluster-0"}  (task -> cluster)
    lib.add_score("add_two", "add_two", "exact_match", 0.75, {"n": 20})
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from library_store.store.errors import checked_name


class Records:
    """Clusters and scores of one library; `index` is the ExpertLibrary (its `_read()` and `_write()`)."""

    def __init__(self, index):
        self._index = index

    def set_clusters(self, clusters: dict[str, list[str]]) -> None:
        """Replace the cluster table: cluster name -> the task names it groups."""
        rows = [(checked_name(c, "cluster name"), json.dumps(list(tasks))) for c, tasks in clusters.items()]
        with self._index._write() as w:
            w.commit([("DELETE FROM clusters", ())] + [("INSERT INTO clusters VALUES (?, ?)", r) for r in rows])

    def clusters(self) -> dict[str, list[str]]:
        with self._index._read() as con:
            return {r[0]: json.loads(r[1]) for r in con.execute("SELECT name, tasks FROM clusters ORDER BY name")}

    def cluster_of(self) -> dict[str, str]:
        """task -> its cluster (the cluster table inverted); the one place this map is built."""
        return {task: cluster for cluster, tasks in self.clusters().items() for task in tasks}

    def add_score(self, expert: str | None, task: str, metric: str, value: float, meta: dict | None = None) -> None:
        """Record one evaluation (expert None = the base model or a routed mix, described in meta)."""
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._index._write() as w:
            w.commit([("INSERT INTO scores (expert, task, metric, value, meta, created) VALUES (?, ?, ?, ?, ?, ?)",
                       (expert, task, metric, float(value), json.dumps(meta or {}), created))])

    def scores(self) -> list[dict]:
        with self._index._read() as con:
            rows = con.execute("SELECT expert, task, metric, value, meta, created FROM scores ORDER BY id")
            return [{**dict(r), "meta": json.loads(r["meta"])} for r in rows]
