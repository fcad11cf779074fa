"""`ExpertLibrary`: a folder of LoRA experts for one base model, with its SQLite index and cached derived data.

Usage::

    lib = ExpertLibrary.create("libs/mine", base)           # a BaseModel, or its fingerprint dict
    lib.add(expert)                                        # LoraExpert; refused if it does not fit the base
    lib = ExpertLibrary.open("libs/mine", base=base)        # read-only; refused if built for another base model
    writer = ExpertLibrary.open("libs/mine", readonly=False)   # builds, import, remove
    for name in lib.names():
        expert = lib[name]                                 # loaded from safetensors, checksum checked
    key = lib.put_derived("prototypes", {"experts": lib.checksums()}, {"proto": tensor})
    tensors, meta = lib.get_derived("prototypes", {"experts": lib.checksums()})

On disk (see docs/design.md): `library.sqlite`, `experts/<name>/` in PEFT layout,
`derived/<kind>-<hash>.safetensors`. Every write is crash-safe (see `store_io`). A read-only library is never
written: its derived data goes to the user cache (see `derived`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import uuid
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from torch import nn

from library_store.store import io as store_io
from library_store.models import same_model
from library_store.expert import EXPERT_KINDS, ExpertInfo, LoraExpert, parse_site
from library_store.store.errors import (DuplicateExpert, ExpertUnavailable, InvalidName, LibraryError,
                                        LibraryMismatch, checked_name)
from library_store.store.io import (FORMAT_VERSION, INDEX, SCHEMA_VERSION, WriteSession, connect, dir_writable,
                                    file_problem, fsync_path, fsync_tree, init_index, library_writable, read_meta,
                                    sha256_file)
from library_store.store.derived import DerivedStore, config_key
from library_store.store.records import Records
from library_store.store.peft_layout import load_weights, read_adapter, write_adapter, CONFIG_FILE, WEIGHTS_FILE
from library_store.store.checks import check_finite, check_fit, check_weight_keys, verify_library

__all__ = ["ExpertLibrary", "LibraryError", "LibraryMismatch", "ExpertUnavailable", "InvalidName",
           "module_shapes", "config_key"]


def module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Leaf name -> (d_in, d_out) of layer 0's nn.Linear modules: what a LoRA factor on that module must fit."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers.0." in f".{name}":
            try:
                layer, leaf = parse_site(name)
            except LookupError:
                continue
            if layer == 0:
                shapes[leaf] = (module.in_features, module.out_features)
    return shapes


_shapes_of = module_shapes  # `create` has an argument of the same name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_name = checked_name


class ExpertLibrary:
    """A mapping name -> LoraExpert over one library folder. Cheap to construct; every call reads the index
    afresh, so several processes (a build and the page) can share one library. Its cluster table and scores
    are `self.records`, its derived data `self.derived`; the methods below forward to them."""

    def __init__(self, root: Path, readonly: bool):
        self.root = Path(root)
        self.readonly = readonly
        self.records = Records(self)
        self.derived = DerivedStore(self)
        try:
            with self._read() as con:
                meta = read_meta(con)
                version = con.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise LibraryError(f"{self.root / INDEX} is not a readable library index ({exc}).") from None
        if version is None or version > SCHEMA_VERSION:
            raise LibraryError(f"{self.root / INDEX} has schema version {version}; this code reads up to "
                               f"{SCHEMA_VERSION}. Upgrade the package to open it.")
        self.fingerprint: dict = meta["base_fingerprint"]
        self.module_shapes: dict[str, tuple[int, int]] = {k: tuple(v) for k, v in
                                                          (meta.get("module_shapes") or {}).items()}
        self.format_version: int = meta.get("format_version", FORMAT_VERSION)

    # ------------------------------------------------------------ create / open

    @classmethod
    def create(cls, path, base_fingerprint=None, module_shapes: dict | None = None, *,
               base_model=None) -> "ExpertLibrary":
        """A new, empty library. `base_fingerprint` may be a BaseModel (its fingerprint and module shapes are
        taken from it) or a fingerprint dict (then pass `module_shapes` to get exact shape checks)."""
        base = base_model if base_model is not None else base_fingerprint
        if hasattr(base, "fingerprint") and hasattr(base, "model"):
            fingerprint = dict(base.fingerprint)
            module_shapes = module_shapes or _shapes_of(base.model)
        elif isinstance(base, dict):
            fingerprint = dict(base)
        else:
            raise LibraryError("create() needs the base model (a BaseModel or its fingerprint dict).")
        root = Path(path)
        if (root / INDEX).exists():
            raise LibraryError(f"A library already exists at {root}; open it instead.")
        if root.exists() and not root.is_dir():
            raise LibraryError(f"{root} exists and is not a directory.")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LibraryError(f"Cannot create the library at {root}: {exc.strerror or exc}.") from None
        if not dir_writable(root):
            raise LibraryError(f"Cannot create the library at {root}: the directory is read-only.")
        from filelock import FileLock

        with FileLock(str(root / ".lock"), timeout=600):
            if (root / INDEX).exists():
                raise LibraryError(f"A library already exists at {root}; open it instead.")
            for sub in ("experts", "derived"):
                (root / sub).mkdir(exist_ok=True)
            shapes = {k: list(v) for k, v in (module_shapes or {}).items()}
            tmp_index = root / f".tmp-{uuid.uuid4().hex}"
            tmp_index.mkdir()
            init_index(tmp_index, {"format_version": FORMAT_VERSION, "base_fingerprint": fingerprint,
                                   "module_shapes": shapes, "created": _now()})
            # Build the index aside and rename it in, so a half-created library never looks like one.
            for extra in ("-wal", "-shm"):
                (tmp_index / (INDEX + extra)).unlink(missing_ok=True)
            fsync_tree(tmp_index)
            os.rename(tmp_index / INDEX, root / INDEX)
            fsync_path(root)
            shutil.rmtree(tmp_index, ignore_errors=True)
        return cls(root, readonly=False)

    @classmethod
    def open(cls, path, readonly: bool = True, base=None) -> "ExpertLibrary":
        """Open an existing library, read-only unless `readonly=False` (builds, import, remove); a read-only
        folder always opens read-only. Reading and routing never write into a read-only library: its derived
        data goes to the user cache. `base` (a BaseModel or fingerprint) is checked with `check_base`."""
        root = Path(path)
        if not (root / INDEX).is_file():
            raise LibraryError(f"No library at {root} (no {INDEX}). Create one with ExpertLibrary.create "
                               "or `python -m library_store build`.")
        readonly = readonly or not library_writable(root)
        lib = cls(root, readonly)
        if base is not None:
            lib.check_base(getattr(base, "fingerprint", base))
        if not readonly and lib._has_pending():
            with WriteSession(root):  # an earlier writer died mid-write: undo its renames now
                pass
        return lib

    @classmethod
    def open_or_create(cls, path, base) -> "ExpertLibrary":
        """Open `path` for `base` (checked), creating it when there is no library yet."""
        if (Path(path) / INDEX).is_file():
            return cls.open(path, readonly=False, base=base)
        return cls.create(path, base)

    def check_base(self, fingerprint: dict) -> None:
        """Raise LibraryMismatch unless `fingerprint` describes this library's base model."""
        if not same_model(self.fingerprint, fingerprint):
            raise LibraryMismatch(
                f"The library at {self.root} was built for another base model.\n"
                f"  library:    {json.dumps(self.fingerprint, sort_keys=True)}\n"
                f"  base model: {json.dumps(fingerprint, sort_keys=True)}")

    def _read(self):
        return closing(connect(self.root, readonly=self.readonly))

    def _write(self) -> WriteSession:
        if self.readonly:
            raise LibraryError(f"The library at {self.root} is open read-only; it can be read but not changed.")
        return WriteSession(self.root)

    def _has_pending(self) -> bool:
        with self._read() as con:
            return con.execute("SELECT COUNT(*) FROM pending").fetchone()[0] > 0

    # ------------------------------------------------------------ reading experts

    def names(self) -> list[str]:
        with self._read() as con:
            return [r[0] for r in con.execute("SELECT name FROM experts ORDER BY name")]

    def __contains__(self, name: object) -> bool:
        with self._read() as con:
            return con.execute("SELECT 1 FROM experts WHERE name = ?", (name,)).fetchone() is not None

    def __len__(self) -> int:
        with self._read() as con:
            return con.execute("SELECT COUNT(*) FROM experts").fetchone()[0]

    def __iter__(self):
        return iter(self.names())

    def infos(self) -> list[ExpertInfo]:
        """Every expert's record, from the index only (no weights read)."""
        with self._read() as con:
            return [_row_info(r) for r in con.execute("SELECT * FROM experts ORDER BY name")]

    def info(self, name: str) -> ExpertInfo:
        return _row_info(self._row(name))

    def routable_names(self) -> list[str]:
        """The experts a library routes over. An MBC library also keeps its warm-up experts (one per task, a few
        steps each): they are the similarity map's data, not experts to route to, so they are left out when
        other experts exist. A `general` expert is only ever subtracted (docs/design.md, "Centring"), never
        routed. The page, the CLI and the engine all ask this one place."""
        infos = [i for i in self.infos() if i.kind != "general"]
        chosen = [i.name for i in infos if i.kind != "warmup"]
        return chosen or [i.name for i in infos]

    def checksums(self) -> dict[str, str]:
        """name -> sha256 of its weights; put it in a derived config so the cache follows the experts."""
        with self._read() as con:
            return {r[0]: r[1] for r in con.execute("SELECT name, checksum FROM experts ORDER BY name")}

    def _row(self, name: str):
        with self._read() as con:
            row = con.execute("SELECT * FROM experts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(f"No expert {name!r} in the library at {self.root}.")
        return row

    def expert_dir(self, name: str) -> Path:
        return self.root / "experts" / name

    def __getitem__(self, name: str) -> LoraExpert:
        """Load one expert's weights (safetensors only); its checksum must match the index."""
        row = self._row(name)
        path = self.expert_dir(name) / WEIGHTS_FILE
        problem = file_problem(path, row["checksum"], row["size"], full=False)  # missing or resized
        data = None
        if problem is None:  # read once: the bytes whose checksum is checked are the bytes loaded
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != row["checksum"]:
                problem = f"{path} does not match its checksum (changed on disk)"
        if problem:
            raise ExpertUnavailable(f"Expert {name!r} is unavailable: {problem}.")
        try:
            weights = load_weights(path, data)
        except LibraryError as exc:
            raise ExpertUnavailable(f"Expert {name!r} is unavailable: {exc}") from None
        return LoraExpert(_row_info(row), weights)

    def get(self, name: str, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def unavailable(self) -> list[str]:
        """Indexed experts whose files are missing or have the wrong size (a quick check; `verify` hashes)."""
        with self._read() as con:
            rows = list(con.execute("SELECT name, checksum, size FROM experts ORDER BY name"))
        return [r["name"] for r in rows
                if file_problem(self.expert_dir(r["name"]) / WEIGHTS_FILE, r["checksum"], r["size"], False)
                or not (self.expert_dir(r["name"]) / CONFIG_FILE).is_file()]

    # ------------------------------------------------------------ writing experts

    def add(self, expert: LoraExpert, replace: bool = False) -> ExpertInfo:
        """Store an expert; refuses a bad name, a duplicate (unless `replace`: DuplicateExpert), non-finite
        weights, or weights that do not fit."""
        info = ExpertInfo.from_dict(expert.info.to_dict())
        _name(info.name, "expert name")
        if info.kind not in EXPERT_KINDS:
            raise LibraryError(f"Expert {info.name!r}: kind {info.kind!r} is not one of {', '.join(EXPERT_KINDS)}.")
        if info.cluster is not None:
            _name(info.cluster, "cluster name")
        check_weight_keys(info.name, expert.weights)
        check_finite(info.name, expert.weights)
        factors = LoraExpert(info, expert.weights).factors()
        check_fit(info.name, factors, self.fingerprint, self.module_shapes)
        info.rank = next(iter(factors.values()))[0].shape[0]
        info.target_modules = sorted({parse_site(s)[1] for s in factors})
        info.n_params = sum(t.numel() for t in expert.weights.values())
        info.created = info.created or _now()
        weights = {k: v.detach().cpu().contiguous() for k, v in expert.weights.items()}
        with self._write() as w:
            exists = w.con.execute("SELECT 1 FROM experts WHERE name = ?", (info.name,)).fetchone()
            if exists and not replace:
                raise DuplicateExpert(f"An expert named {info.name!r} already exists in {self.root}; "
                                      "pass replace=True (--replace) to overwrite it.", info.name)
            tmp = w.temp_dir()
            path = write_adapter(tmp, weights, info, self.fingerprint.get("source", ""))
            fsync_tree(tmp)
            info.checksum = sha256_file(path)
            size = path.stat().st_size
            store_io.crash_point("after_temp_write")
            row = (info.name, info.kind, json.dumps(info.tasks), info.cluster, info.rank, info.alpha,
                   json.dumps(info.target_modules), info.n_params, json.dumps(info.to_dict()["train"]),
                   info.checksum, size, info.created)
            w.swap(f"experts/{info.name}", tmp, op="replace" if exists else "add",
                   sql=[(f"INSERT OR REPLACE INTO experts VALUES ({','.join('?' * len(row))})", row)])
        return info

    def remove(self, name: str) -> None:
        with self._write() as w:
            if not w.con.execute("SELECT 1 FROM experts WHERE name = ?", (name,)).fetchone():
                raise KeyError(f"No expert {name!r} in the library at {self.root}.")
            w.swap(f"experts/{name}", None, op="remove", sql=[("DELETE FROM experts WHERE name = ?", (name,))])

    def import_peft(self, folder, name: str, kind: str = "imported", replace: bool = False,
                    tasks=()) -> ExpertInfo:
        """Add an existing PEFT LoRA adapter directory (safetensors only) under `name`. For untrusted uploads
        (zips, size caps, symlinks) use `store.upload.intake_adapter`."""
        _name(name, "expert name")
        info, weights = read_adapter(Path(folder), name, kind)
        info.tasks = [_name(t, "task name") for t in tasks]
        return self.add(LoraExpert.from_state_dict(info, weights), replace=replace)

    def export(self, name: str, dest) -> Path:
        """Copy an expert's PEFT directory to `dest` (new or empty); `PeftModel.from_pretrained` loads it."""
        self[name]  # refuses a broken expert before copying anything
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise LibraryError(f"Export destination {dest} exists and is not an empty directory.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".exporting-{uuid.uuid4().hex}"  # not `.tmp-*`: a library write would clean it
        shutil.copytree(self.expert_dir(name), tmp)
        fsync_tree(tmp)
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
        return dest

    # ------------------------------------------------------------ verification, clusters, scores, derived data

    def verify(self) -> list[str]:
        """Every problem found, one line each naming the expert or derived entry; empty when all is well.
        Re-hashes every file and checks every expert's shapes against the base model."""
        return verify_library(self)

    def content_key(self) -> str:
        """A hash of the experts' checksums and the format version: what this library's content is, wherever
        it lies (the user cache of a read-only library is keyed by it)."""
        return config_key({"format_version": self.format_version, "experts": self.checksums()})

    def set_clusters(self, clusters: dict[str, list[str]]) -> None:
        self.records.set_clusters(clusters)

    def clusters(self) -> dict[str, list[str]]:
        return self.records.clusters()

    def cluster_of(self) -> dict[str, str]:
        return self.records.cluster_of()

    def add_score(self, expert: str | None, task: str, metric: str, value: float, meta: dict | None = None) -> None:
        self.records.add_score(expert, task, metric, value, meta)

    def scores(self) -> list[dict]:
        return self.records.scores()

    def put_derived(self, kind: str, config: dict, tensors: dict, meta: dict | None = None) -> str:
        return self.derived.put(kind, config, tensors, meta)

    def get_derived(self, kind: str, config: dict) -> tuple[dict, dict] | None:
        return self.derived.get(kind, config)

    def list_derived(self) -> list[dict]:
        return self.derived.list()

    def remove_derived(self, kind: str, key: str | None = None) -> None:
        self.derived.remove(kind, key)

    def __repr__(self) -> str:
        return f"ExpertLibrary({str(self.root)!r}, experts={len(self)}, base={self.fingerprint.get('source')!r})"


def _row_info(row) -> ExpertInfo:
    return ExpertInfo.from_dict({
        "name": row["name"], "kind": row["kind"], "tasks": json.loads(row["tasks"]), "cluster": row["cluster"],
        "rank": row["rank"], "alpha": row["alpha"], "target_modules": json.loads(row["target_modules"]),
        "n_params": row["n_params"], "train": json.loads(row["train"]), "checksum": row["checksum"],
        "created": row["created"]})
