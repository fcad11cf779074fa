"""Committed libraries are never modified: adding to one first makes a writable copy in the user's data folder.

Usage::

    if is_committed_asset(path):                  # inside the repository's assets/ folder
        path = user_copy(path)                    # ~/.local/share/lora-explorer/libraries/<name>, made once
    path, copied = library_for_adding(path)       # the same decision in one call, for the page

The copy is made aside (`.copying-<uuid>`) and renamed into place, under a lock, so two pages asking at once get
one copy. An existing copy is reused (what was added to it stays); one made from a library for another base
model is refused rather than mixed.
"""
from __future__ import annotations

import os
import shutil
import stat
import uuid
from pathlib import Path

from library_store.store.errors import LibraryError
from library_store.store.io import INDEX, LOCK, fsync_path, library_writable, read_meta

DATA_ENV = "LORA_EXPLORER_DATA"  # overrides the user data folder (the tests point it at a tmp dir)
_SKIP = (LOCK, ".tmp-*", ".old-*", ".copying-*")  # a lock or a dead writer's leftovers are not library content


def user_data_dir() -> Path:
    """$LORA_EXPLORER_DATA, else $XDG_DATA_HOME or ~/.local/share, then /lora-explorer."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    root = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(root) / "lora-explorer"


def user_libraries_dir() -> Path:
    return user_data_dir() / "libraries"


def assets_dir() -> Path:
    from library_store.models import ASSETS

    return ASSETS


def is_committed_asset(path) -> bool:
    """True for a library inside the repository's committed `assets/` folder (the demo libraries)."""
    try:
        Path(path).resolve().relative_to(assets_dir().resolve())
    except ValueError:
        return False
    return True


def library_for_adding(path) -> tuple[Path, bool]:
    """Where an expert for the library at `path` should go: `path` itself when it may be changed, else its user
    copy (made now if needed). Returns (library path, whether it is a user copy)."""
    root = Path(path)
    if not (root / INDEX).is_file():
        raise LibraryError(f"No library at {root} (no {INDEX}).")
    if is_committed_asset(root) or not library_writable(root):
        return user_copy(root), True
    return root, False


def user_copy(path, dest_root=None) -> Path:
    """A writable copy of the library at `path` under `dest_root` (default `user_libraries_dir()`), named after
    the library's folder; an existing copy for the same base model is returned as it is."""
    from filelock import FileLock

    src = Path(path)
    if not (src / INDEX).is_file():
        raise LibraryError(f"No library at {src} (no {INDEX}); nothing to copy.")
    dest_root = Path(dest_root) if dest_root is not None else user_libraries_dir()
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LibraryError(f"Cannot make the user library folder {dest_root}: {exc.strerror or exc}. "
                           f"Point {DATA_ENV} at a writable folder.") from None
    dest = dest_root / src.resolve().name
    with FileLock(str(dest_root / f".{dest.name}.lock"), timeout=600):
        if (dest / INDEX).is_file():
            _check_same_base(src, dest)
            return dest
        if dest.exists():
            raise LibraryError(f"{dest} exists but is not a library; move it away to copy {src} there.")
        tmp = dest_root / f".copying-{uuid.uuid4().hex}"
        try:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*_SKIP))
            for p in [tmp, *tmp.rglob("*")]:  # committed files may be read-only: the copy must be writable
                p.chmod(p.stat().st_mode | stat.S_IWUSR)
            os.rename(tmp, dest)
            fsync_path(dest_root)
        except OSError as exc:
            raise LibraryError(f"Cannot copy {src} to {dest}: {exc.strerror or exc}.") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _check_same_base(src: Path, dest: Path) -> None:
    from contextlib import closing

    from library_store.models import same_model
    from library_store.store.io import connect

    fingerprints = []
    for root in (src, dest):
        with closing(connect(root, readonly=True)) as con:
            fingerprints.append(read_meta(con)["base_fingerprint"])
    if not same_model(*fingerprints):
        raise LibraryError(f"{dest} already holds a library for another base model than {src}; move it away "
                           "or copy to another folder.")
