"""Read-only libraries: they read, refuse changes clearly, and keep derived data in the user cache (keyed by
the library's content), so routing a committed library never writes into it."""
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from store_helpers.experts import LLAMA, LLAMA_FP, LLAMA_SHAPES, random_expert

from library_store.store.library import ExpertLibrary, LibraryError
from library_store.store.user_cache import CACHE_ENV


@pytest.fixture
def lib(tmp_path):
    return ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


SQLITE_SIDE_FILES = ("library.sqlite-shm", "library.sqlite-wal")  # SQLite's reader coordination (git-ignored)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime (ns), but SQLite's side files, which any reader of a WAL
    database on a writable folder updates: equal snapshots mean no library content was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.name not in SQLITE_SIDE_FILES}


def test_a_read_only_library_reads_but_refuses_changes_clearly(lib, cache):
    lib.add(random_expert(LLAMA, "ro"))
    key = lib.put_derived("emb", {"k": 1}, {"x": torch.ones(2)})
    lib.set_clusters({"c0": ["t1"]})
    _make_read_only(lib.root)
    try:
        ro = ExpertLibrary.open(lib.root, readonly=False)  # asking for writable does not make it so
        assert ro.readonly and ro.names() == ["ro"] and ro["ro"].weights and ro.clusters() == {"c0": ["t1"]}
        assert ro.get_derived("emb", {"k": 1})[0]["x"].tolist() == [1.0, 1.0] and ro.verify() == []
        assert [d["key"] for d in ro.list_derived()] == [key]
        for write in (lambda: ro.add(random_expert(LLAMA, "new")), lambda: ro.remove("ro"),
                      lambda: ro.set_clusters({}), lambda: ro.add_score("ro", "t1", "m", 1.0),
                      lambda: ro.remove_derived("emb"),
                      lambda: lib.add(random_expert(LLAMA, "new"))):  # also the handle opened before the chmod
            with pytest.raises(LibraryError, match=f"{lib.root}.*read-only"):
                write()
        assert sorted(os.listdir(lib.root / "experts")) == ["ro"]
    finally:
        _make_writable(lib.root)


def test_a_read_only_index_file_alone_makes_the_library_read_only(lib):
    lib.add(random_expert(LLAMA, "a"))
    index = lib.root / "library.sqlite"
    index.chmod(0o444)
    try:
        again = ExpertLibrary.open(lib.root, readonly=False)
        assert again.readonly and again["a"].weights
        with pytest.raises(LibraryError, match="read-only"):
            lib.remove("a")
    finally:
        index.chmod(0o644)


def test_open_is_read_only_unless_asked_and_refuses_changes(lib):
    lib.add(random_expert(LLAMA, "a"))
    ro = ExpertLibrary.open(lib.root)
    assert ro.readonly and ro["a"].weights
    with pytest.raises(LibraryError, match="open read-only"):
        ro.remove("a")
    assert not ExpertLibrary.open(lib.root, readonly=False).readonly


@pytest.mark.parametrize("how", ["opened read-only", "folder read-only", "chmod after a writable open"])
def test_derived_data_of_a_read_only_library_goes_to_the_user_cache(lib, cache, how):
    lib.add(random_expert(LLAMA, "a"))
    writer = ExpertLibrary.open(lib.root, readonly=False)
    if how != "opened read-only":
        _make_read_only(lib.root)
    try:
        ro = writer if how.startswith("chmod") else ExpertLibrary.open(lib.root)
        before = tree(lib.root)
        key = ro.put_derived("proto", {"v": 1}, {"x": torch.arange(3.0)}, {"n": 1})
        assert tree(lib.root) == before and ro.list_derived() == []  # nothing written into the library
        assert (cache / lib.content_key() / f"proto-{key}.safetensors").is_file()
        tensors, meta = ro.get_derived("proto", {"v": 1})
        assert tensors["x"].tolist() == [0.0, 1.0, 2.0] and meta == {"n": 1}
        assert ro.get_derived("proto", {"v": 2}) is None
    finally:
        _make_writable(lib.root)


def test_the_cache_follows_the_content_not_the_path(lib, cache, tmp_path):
    lib.add(random_expert(LLAMA, "a"))
    copy = Path(shutil.copytree(lib.root, tmp_path / "copy"))
    ExpertLibrary.open(lib.root).put_derived("proto", {"v": 1}, {"x": torch.ones(2)})
    assert ExpertLibrary.open(copy).get_derived("proto", {"v": 1}) is not None  # same experts: shared
    ExpertLibrary.open(copy, readonly=False).add(random_expert(LLAMA, "b", seed=1))
    changed = ExpertLibrary.open(copy)
    assert changed.content_key() != lib.content_key() and changed.get_derived("proto", {"v": 1}) is None


def test_a_damaged_cache_entry_is_a_miss(lib, cache):
    lib.add(random_expert(LLAMA, "a"))
    ro = ExpertLibrary.open(lib.root)
    key = ro.put_derived("proto", {"v": 1}, {"x": torch.ones(2)})
    path = cache / lib.content_key() / f"proto-{key}.safetensors"
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    assert ro.get_derived("proto", {"v": 1}) is None


def test_an_unwritable_cache_warns_and_goes_on(lib, cache):
    lib.add(random_expert(LLAMA, "a"))
    cache.write_text("a file where the cache folder should be")  # refuses writes even to root
    with pytest.warns(UserWarning, match="not cached"):
        ExpertLibrary.open(lib.root).put_derived("proto", {"v": 1}, {"x": torch.ones(2)})


def test_routing_a_read_only_copy_writes_nothing_and_reuses_its_prototypes(tiny_llama, cache, tmp_path,
                                                                            monkeypatch):
    from library_store.testing import make_tiny_library

    from explorer.routing import inject
    from explorer.routing.config import RouterConfig
    from explorer.routing.model import RoutedModel

    path = Path(make_tiny_library(tmp_path / "lib", n_experts=3, base=tiny_llama))
    before = tree(path)
    rm = RoutedModel.from_library(tiny_llama, ExpertLibrary.open(path), RouterConfig(top_k=2))
    rm.detach()
    assert tree(path) == before and len(list(cache.rglob("*.safetensors"))) == 1 + 3  # the set + each expert

    def no_recompute(*args, **kwargs):
        raise AssertionError("prototypes recomputed: the user cache was not used")

    monkeypatch.setattr(inject, "compute_prototypes", no_recompute)
    again = RoutedModel.from_library(tiny_llama, ExpertLibrary.open(path), RouterConfig(top_k=2))
    again.detach()
    assert tree(path) == before
