"""Cached derived data of a library (prototypes, MBC matrices...): `lib.derived`, forwarded by ExpertLibrary.

Usage::

    key = lib.put_derived("prototypes", {"experts": lib.checksums(), "method": "svd"}, {"proto": t})
    tensors, meta = lib.get_derived("prototypes", {"experts": lib.checksums(), "method": "svd"})

Derived data is a cache keyed by (kind, hash of its config): put what it was computed from into the config
(e.g. `lib.checksums()`), and a changed library simply misses the cache. A library that is open read-only (or
whose folder is not writable) is never written: its derived data goes to the user cache (`UserCache`, keyed by
the library's content), and `get` reads the library first, then that cache.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from datetime import datetime, timezone

import torch

from library_store.store.errors import checked_name
from library_store.store.io import file_problem, fsync_tree, library_writable, sha256_file
from library_store.store.peft_layout import load_weights
from library_store.store.user_cache import UserCache


def config_key(config: dict) -> str:
    """The derived-data key: a hash of the config's canonical JSON."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class DerivedStore:
    """The derived data of one library; `index` is the ExpertLibrary (root, readonly, `_read()`, `_write()`,
    `content_key()`)."""

    def __init__(self, index):
        self._index = index

    @property
    def writes_to_library(self) -> bool:
        return not self._index.readonly and library_writable(self._index.root)

    def user_cache(self) -> UserCache:
        return UserCache(self._index.content_key())

    def put(self, kind: str, config: dict, tensors: dict, meta: dict | None = None) -> str:
        """Store tensors computed from the library under (kind, hash of config); returns the key."""
        checked_name(kind, "derived-data kind")
        key = config_key(config)
        tensors = {k: torch.as_tensor(v).detach().cpu().contiguous().clone() for k, v in tensors.items()}
        if not self.writes_to_library:
            config = json.loads(json.dumps(config, sort_keys=True, default=str))
            self.user_cache().put(kind, key, config, tensors, meta or {}, _now())
            return key
        from safetensors.torch import save_file

        target = f"derived/{kind}-{key}.safetensors"
        with self._index._write() as w:
            tmp = w.temp_dir()
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

    def get(self, kind: str, config: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The stored (tensors, meta) for this kind and config: the library's own entry, else the user
        cache's; None if neither has it (a damaged library entry is ignored with a warning)."""
        key = config_key(config)
        with self._index._read() as con:
            row = con.execute("SELECT * FROM derived WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        if row is not None:
            root = self._index.root
            problem = file_problem(root / row["file"], row["checksum"], row["size"], full=True)
            if not problem:
                return load_weights(root / row["file"]), json.loads(row["meta"])
            warnings.warn(f"Derived data {kind}-{key} ignored: {problem}.", stacklevel=3)
        return self.user_cache().get(kind, key)

    def list(self) -> list[dict]:
        """The library's own entries (not the user cache's), by kind and key."""
        with self._index._read() as con:
            rows = con.execute("SELECT kind, key, config, meta, file, size, created FROM derived ORDER BY kind, key")
            return [{**dict(r), "config": json.loads(r["config"]), "meta": json.loads(r["meta"])} for r in rows]

    def remove(self, kind: str, key: str | None = None) -> None:
        """Drop one of the library's entries, or every entry of a kind."""
        for entry in [d for d in self.list() if d["kind"] == kind and key in (None, d["key"])]:
            with self._index._write() as w:
                w.swap(entry["file"], None, op="remove_derived",
                       sql=[("DELETE FROM derived WHERE kind = ? AND key = ?", (entry["kind"], entry["key"]))])
