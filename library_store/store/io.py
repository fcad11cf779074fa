"""The store's disk mechanics: the SQLite schema, crash-safe file swaps with a journal, hashing, the write lock.

Usage::

    with WriteSession(root) as w:                     # takes <root>/.lock, recovers an interrupted write first
        tmp = w.temp_dir()                            # <root>/.tmp-<uuid>/, write files into it
        ...                                           # write + fsync files
        w.swap("experts/foo", tmp, op="add", sql=[("INSERT INTO experts ...", params)])

A swap is: journal row committed -> old entry renamed to `.old-<uuid>` -> new entry renamed into place ->
one transaction that applies `sql` and deletes the journal row -> old entry deleted. A `kill -9` anywhere
leaves a journal row (or nothing), and the next write undoes the renames from it, so the index and the
files always agree: the old library or the new one, never half of each.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import uuid
from contextlib import closing
from pathlib import Path

from library_store.store.errors import LibraryError

SCHEMA_VERSION = 1
FORMAT_VERSION = 1
INDEX = "library.sqlite"
LOCK = ".lock"

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experts (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, tasks TEXT NOT NULL, cluster TEXT, rank INTEGER NOT NULL,
    alpha REAL NOT NULL, target_modules TEXT NOT NULL, n_params INTEGER NOT NULL, train TEXT NOT NULL,
    checksum TEXT NOT NULL, size INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clusters (name TEXT PRIMARY KEY, tasks TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS derived (
    kind TEXT NOT NULL, key TEXT NOT NULL, config TEXT NOT NULL, meta TEXT NOT NULL, file TEXT NOT NULL,
    checksum TEXT NOT NULL, size INTEGER NOT NULL, created TEXT NOT NULL, PRIMARY KEY (kind, key));
CREATE TABLE IF NOT EXISTS scores (
    id INTEGER PRIMARY KEY AUTOINCREMENT, expert TEXT, task TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL NOT NULL, meta TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    id TEXT PRIMARY KEY, op TEXT NOT NULL, target TEXT NOT NULL, temp TEXT, old TEXT);
"""


def crash_point(name: str) -> None:
    """A named point inside a write; tests replace this to `kill -9` the process exactly there."""


# ---------------------------------------------------------------- small file helpers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is only durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for child in path.iterdir():
        fsync_path(child)
    fsync_path(path)


def dir_writable(path: Path) -> bool:
    """Writable for us, and not marked read-only by its owner (root ignores mode bits; we respect them)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return os.access(path, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def library_writable(root: Path) -> bool:
    """The folder and its index can both be written (either marked read-only makes the library read-only)."""
    index = root / INDEX
    return dir_writable(root) and (not index.exists() or dir_writable(index))


def file_problem(path: Path, checksum: str, size: int, full: bool) -> str | None:
    """What is wrong with a stored file against its index row (missing, wrong size, or with `full`, wrong
    checksum), or None."""
    if not path.is_file():
        return f"{path} is missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path} has {actual} bytes, the index says {size} (truncated or replaced)"
    if full and sha256_file(path) != checksum:
        return f"{path} does not match its checksum (changed on disk)"
    return None


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- SQLite


def connect(root: Path, readonly: bool) -> sqlite3.Connection:
    """A fresh connection; autocommit mode so every write names its own transaction."""
    db = root / INDEX
    if readonly:
        # A read-only folder cannot hold WAL's -shm file; `immutable` reads the file as it is.
        flag = "mode=ro" if dir_writable(root) else "immutable=1"
        con = sqlite3.connect(f"{db.resolve().as_uri()}?{flag}", uri=True, timeout=30, isolation_level=None)
    else:
        con = sqlite3.connect(db, timeout=30, isolation_level=None)
        con.execute("PRAGMA busy_timeout = 30000")
    con.row_factory = sqlite3.Row
    return con


def init_index(root: Path, meta: dict[str, object]) -> None:
    with closing(connect(root, readonly=False)) as con:
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("BEGIN IMMEDIATE")
        for statement in SCHEMA.strip().split(";"):
            if statement.strip():
                con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        con.execute("COMMIT")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file before it is moved


def read_meta(con: sqlite3.Connection) -> dict:
    return {row["key"]: json.loads(row["value"]) for row in con.execute("SELECT key, value FROM meta")}


# ---------------------------------------------------------------- the write session


class WriteSession:
    """One write to a library, under its file lock (one writer at a time across processes)."""

    def __init__(self, root: Path):
        self.root = root
        self.con: sqlite3.Connection | None = None
        self._lock = None

    def __enter__(self) -> "WriteSession":
        from filelock import FileLock

        if not library_writable(self.root):
            raise LibraryError(f"The library at {self.root} is read-only; it can be read but not changed.")
        self._lock = FileLock(str(self.root / LOCK), timeout=600)
        self._lock.acquire()
        try:
            self.con = connect(self.root, readonly=False)
            recover(self.root, self.con)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        if self.con is not None:
            try:  # keep the WAL empty, so a copy or a read-only mount of the folder holds everything
                self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except Exception:  # noqa: BLE001 - a busy reader only delays the checkpoint
                pass
            self.con.close()
            self.con = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def temp_dir(self) -> Path:
        path = self.root / f".tmp-{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def commit(self, sql: list[tuple[str, tuple]]) -> None:
        """Index-only change in one transaction."""
        self.con.execute("BEGIN IMMEDIATE")
        try:
            for statement, params in sql:
                self.con.execute(statement, params)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def swap(self, target: str, new: Path | None, op: str, sql: list[tuple[str, tuple]]) -> None:
        """Put `new` (a finished, fsynced temp entry; None to delete) at `root/target` and apply `sql`, atomically."""
        dest = self.root / target
        op_id = uuid.uuid4().hex
        old = self.root / f".old-{op_id}"
        had_old = dest.exists()
        self.commit([("INSERT INTO pending VALUES (?, ?, ?, ?, ?)",
                      (op_id, op, target, new.name if new else None, old.name if had_old else None))])
        crash_point("after_journal")
        try:
            if had_old:
                os.rename(dest, old)
                crash_point("after_old_aside")
            if new is not None:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(new, dest)
                fsync_path(dest.parent)
                crash_point("after_rename")
            fsync_path(self.root)
            crash_point("before_commit")
            self.commit([*sql, ("DELETE FROM pending WHERE id = ?", (op_id,))])
        except Exception:
            recover(self.root, self.con)  # a failed (not killed) write is undone at once, while we hold the lock
            raise
        crash_point("after_commit")
        if had_old:
            remove_path(old)


def recover(root: Path, con: sqlite3.Connection) -> None:
    """Undo the renames of writes that died before their commit, then delete every `.tmp-*` / `.old-*` left.

    Runs under the write lock, so every journal row belongs to a dead writer.
    """
    rows = list(con.execute("SELECT id, op, target, temp, old FROM pending"))
    for row in rows:
        dest = root / row["target"]
        old = root / row["old"] if row["old"] else None
        if old is not None and old.exists():
            # The old entry was moved aside, so whatever sits at dest now is the unfinished new one.
            remove_path(dest)
            os.rename(old, dest)
        elif old is None and row["temp"] is not None:
            # A fresh add: nothing was there before, so anything at dest is the unfinished new entry.
            remove_path(dest)
        con.execute("DELETE FROM pending WHERE id = ?", (row["id"],))
    if rows:
        fsync_path(root)
    for leftover in list(root.glob(".tmp-*")) + list(root.glob(".old-*")):
        remove_path(leftover)
