"""Clusters, scores and cached derived data of a library (mixed into `ExpertLibrary`).

Usage::

    lib.set_clusters({"c0": ["reverse_word", "add_two"]})
    key = lib.put_derived("prototypes", {"experts": lib.checksums(), "method": "svd"}, {"proto": t})
    tensors, meta = lib.get_derived("prototypes", {"experts": lib.checksums(), "method": "svd"})

Derived data is a cache keyed by (kind, hash of its config): put what it was computed from into the config
(e.g. `lib.checksums()`), and a changed library simply misses the cache.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from datetime import datetime, timezone

import torch

from library_store.expert import check_name
from library_store.store.io import fsync_tree, sha256_file
from library_store.store.peft_layout import load_weights


def config_key(config: dict) -> str:
    """The derived-data key: a hash of the config's canonical JSON."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _name(name: str, what: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        from library_store.store.library import InvalidName

        raise InvalidName(f"Invalid {what}: {exc}") from None


class AuxDataMixin:
    """Needs `self.root`, `self._read()`, `self._write()`, `self._file_problem()` from ExpertLibrary."""

    # ------------------------------------------------------------ clusters and scores

    def set_clusters(self, clusters: dict[str, list[str]]) -> None:
        """Replace the cluster table: cluster name -> the task names it groups."""
        rows = [(_name(c, "cluster name"), json.dumps(list(tasks))) for c, tasks in clusters.items()]
        with self._write() as w:
            w.commit([("DELETE FROM clusters", ())] + [("INSERT INTO clusters VALUES (?, ?)", r) for r in rows])

    def clusters(self) -> dict[str, list[str]]:
        with self._read() as con:
            return {r[0]: json.loads(r[1]) for r in con.execute("SELECT name, tasks FROM clusters ORDER BY name")}

    def add_score(self, expert: str | None, task: str, metric: str, value: float, meta: dict | None = None) -> None:
        """Record one evaluation (expert None = the base model or a routed mix, described in meta)."""
        with self._write() as w:
            w.commit([("INSERT INTO scores (expert, task, metric, value, meta, created) VALUES (?, ?, ?, ?, ?, ?)",
                       (expert, task, metric, float(value), json.dumps(meta or {}), _now()))])

    def scores(self) -> list[dict]:
        with self._read() as con:
            rows = con.execute("SELECT expert, task, metric, value, meta, created FROM scores ORDER BY id")
            return [{**dict(r), "meta": json.loads(r["meta"])} for r in rows]

    # ------------------------------------------------------------ derived data

    def put_derived(self, kind: str, config: dict, tensors: dict, meta: dict | None = None) -> str:
        """Cache tensors computed from the library under (kind, hash of config); returns the key."""
        _name(kind, "derived-data kind")
        key = config_key(config)
        tensors = {k: torch.as_tensor(v).detach().cpu().contiguous().clone() for k, v in tensors.items()}
        target = f"derived/{kind}-{key}.safetensors"
        with self._write() as w:
            tmp = w.temp_dir()
            from safetensors.torch import save_file

            path = tmp / f"{kind}-{key}.safetensors"
            save_file(tensors, str(path), metadata={"kind": kind, "key": key})
            fsync_tree(tmp)
            checksum, size = sha256_file(path), path.stat().st_size
            row = (kind, key, json.dumps(config, sort_keys=True, default=str), json.dumps(meta or {}, default=str),
                   target, checksum, size, _now())
            w.swap(target, path, op="put_derived",
                   sql=[("INSERT OR REPLACE INTO derived VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)])
            tmp.rmdir()
        return key

    def get_derived(self, kind: str, config: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The cached (tensors, meta) for this kind and config, or None (also when the file is damaged)."""
        key = config_key(config)
        with self._read() as con:
            row = con.execute("SELECT * FROM derived WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        if row is None:
            return None
        problem = self._file_problem(self.root / row["file"], row["checksum"], row["size"], full=True)
        if problem:
            warnings.warn(f"Derived data {kind}-{key} ignored: {problem}.", stacklevel=2)
            return None
        return load_weights(self.root / row["file"]), json.loads(row["meta"])

    def list_derived(self) -> list[dict]:
        with self._read() as con:
            rows = con.execute("SELECT kind, key, config, meta, file, size, created FROM derived ORDER BY kind, key")
            return [{**dict(r), "config": json.loads(r["config"]), "meta": json.loads(r["meta"])} for r in rows]

    def remove_derived(self, kind: str, key: str | None = None) -> None:
        """Drop one cached entry, or every entry of a kind."""
        for entry in [d for d in self.list_derived() if d["kind"] == kind and key in (None, d["key"])]:
            with self._write() as w:
                w.swap(entry["file"], None, op="remove_derived",
                       sql=[("DELETE FROM derived WHERE kind = ? AND key = ?", (entry["kind"], entry["key"]))])
