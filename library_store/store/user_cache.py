"""Derived data of a library that must not be written to (committed assets, a read-only mount): kept in the
user's cache directory, under the library's content key, so two copies of one library share it and a changed
library misses it.

Usage::

    cache = UserCache(lib.content_key())          # <cache_dir()>/derived/<content key>/
    cache.put("arrow-prototypes", key, config, tensors, meta)
    tensors, meta = cache.get("arrow-prototypes", key)

An entry is `<kind>-<key>.safetensors` plus `<kind>-<key>.json` (config, meta, checksum), each renamed into
place; the JSON is written last, so a half-written entry is never read.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from library_store.store.io import file_problem, sha256_file
from library_store.store.peft_layout import load_weights

CACHE_ENV = "LORA_EXPLORER_DERIVED_CACHE"  # overrides <cache_dir()>/derived (the tests point it at a tmp dir)


def derived_cache_root() -> Path:
    from library_store.models import cache_dir

    return Path(os.environ.get(CACHE_ENV) or cache_dir() / "derived")


def _replace_into(folder: Path, name: str, write) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, folder / name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return folder / name


class UserCache:
    """The cached derived data of one library content (see the module docstring)."""

    def __init__(self, content_key: str):
        self.folder = derived_cache_root() / content_key

    def put(self, kind: str, key: str, config: dict, tensors: dict[str, torch.Tensor], meta: dict,
            created: str) -> Path | None:
        """Store an entry; returns its weights file, or None (with a warning) when the cache is not writable:
        it is only a cache, so the caller goes on without it."""
        from safetensors.torch import save_file

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = _replace_into(self.folder, f"{kind}-{key}.safetensors",
                                 lambda tmp: save_file(tensors, tmp, metadata={"kind": kind, "key": key}))
            record = {"kind": kind, "key": key, "config": config, "meta": meta, "checksum": sha256_file(path),
                      "size": path.stat().st_size, "created": created}
            blob = json.dumps(record, sort_keys=True, default=str)
            _replace_into(self.folder, f"{kind}-{key}.json", lambda tmp: Path(tmp).write_text(blob))
        except OSError as exc:
            warnings.warn(f"Derived data {kind}-{key} not cached: {self.folder} is not writable ({exc}).",
                          stacklevel=3)
            return None
        return path

    def get(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, meta) of an entry, or None if absent or damaged."""
        try:
            record = json.loads((self.folder / f"{kind}-{key}.json").read_text())
        except (OSError, ValueError):
            return None
        path = self.folder / f"{kind}-{key}.safetensors"
        if file_problem(path, record["checksum"], record["size"], full=True):
            return None
        return load_weights(path), record["meta"]
