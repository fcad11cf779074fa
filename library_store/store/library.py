"""`ExpertLibrary`: a folder of LoRA experts for one base model, with its SQLite index and cached derived data.

Usage::

    lib = ExpertLibrary.create("libs/mine", base)           # a BaseModel, or its fingerprint dict
    lib.add(expert)                                        # LoraExpert; refused if it does not fit the base
    lib = ExpertLibrary.open("libs/mine", base=base)        # refused if built for another base model
    for name in lib.names():
        expert = lib[name]                                 # loaded from safetensors, checksum checked
    key = lib.put_derived("prototypes", {"experts": lib.checksums()}, {"proto": tensor})
    tensors, meta = lib.get_derived("prototypes", {"experts": lib.checksums()})

On disk (see shared/design/ARCHITECTURE.md): `library.sqlite`, `experts/<name>/` in PEFT layout,
`derived/<kind>-<hash>.safetensors`. Every write is crash-safe (see `store_io`).
"""
from __future__ import annotations

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
from library_store.expert import EXPERT_KINDS, ExpertInfo, LoraExpert, check_name, parse_site
from library_store.store.io import (FORMAT_VERSION, INDEX, SCHEMA_VERSION, LibraryError, WriteSession, connect,
                                    dir_writable, fsync_path, fsync_tree, init_index, library_writable,
                                    read_meta, sha256_file)
from library_store.store.derived import AuxDataMixin, config_key
from library_store.store.peft_layout import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_adapter, write_adapter
from library_store.store.checks import check_fit, check_weight_keys

__all__ = ["ExpertLibrary", "LibraryError", "LibraryMismatch", "ExpertUnavailable", "InvalidName",
           "module_shapes", "config_key"]


class LibraryMismatch(LibraryError):
    """The library was built for another base model; the message shows both fingerprints."""


class ExpertUnavailable(LibraryError):
    """An indexed expert whose files are missing or damaged; the message names it."""


class InvalidName(LibraryError, ValueError):
    """A name outside `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`."""


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


def _name(name: str, what: str = "name") -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise InvalidName(f"Invalid {what}: {exc}") from None


class ExpertLibrary(AuxDataMixin):
    """A mapping name -> LoraExpert over one library folder. Cheap to construct; every call reads the index
    afresh, so several processes (a build and the page) can share one library."""

    def __init__(self, root: Path, readonly: bool):
        self.root = Path(root)
        self.readonly = readonly
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
    def open(cls, path, readonly: bool = False, base=None) -> "ExpertLibrary":
        """Open an existing library; a read-only folder opens read-only. `base` (a BaseModel or fingerprint)
        is checked with `check_base`."""
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
            return cls.open(path, base=base)
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
        other experts exist. The page, the CLI and the engine all ask this one place."""
        infos = self.infos()
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
        problem = self._file_problem(path, row["checksum"], row["size"], full=True)
        if problem:
            raise ExpertUnavailable(f"Expert {name!r} is unavailable: {problem}.")
        try:
            weights = load_weights(path)
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
                if self._file_problem(self.expert_dir(r["name"]) / WEIGHTS_FILE, r["checksum"], r["size"], False)
                or not (self.expert_dir(r["name"]) / CONFIG_FILE).is_file()]

    @staticmethod
    def _file_problem(path: Path, checksum: str, size: int, full: bool) -> str | None:
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path} has {actual} bytes, the index says {size} (truncated or replaced)"
        if full and sha256_file(path) != checksum:
            return f"{path} does not match its checksum (changed on disk)"
        return None

    # ------------------------------------------------------------ writing experts

    def add(self, expert: LoraExpert, replace: bool = False) -> ExpertInfo:
        """Store an expert; refuses a bad name, a duplicate (unless `replace`), or weights that do not fit."""
        info = ExpertInfo.from_dict(expert.info.to_dict())
        _name(info.name, "expert name")
        if info.kind not in EXPERT_KINDS:
            raise LibraryError(f"Expert {info.name!r}: kind {info.kind!r} is not one of {', '.join(EXPERT_KINDS)}.")
        if info.cluster is not None:
            _name(info.cluster, "cluster name")
        check_weight_keys(info.name, expert.weights)
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
                raise LibraryError(f"An expert named {info.name!r} already exists in {self.root}; "
                                   "pass replace=True (--replace) to overwrite it.")
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

    def import_peft(self, folder, name: str, kind: str = "imported", replace: bool = False) -> ExpertInfo:
        """Add an existing PEFT LoRA adapter directory (safetensors only) under `name`."""
        _name(name, "expert name")
        info, weights = read_adapter(Path(folder), name, kind)
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

    # ------------------------------------------------------------ verification

    def verify(self) -> list[str]:
        """Every problem found, one line each naming the expert or derived entry; empty when all is well.
        Re-hashes every file and checks every expert's shapes against the base model."""
        problems: list[str] = []
        with self._read() as con:
            rows = list(con.execute("SELECT * FROM experts ORDER BY name"))
            derived = list(con.execute("SELECT * FROM derived ORDER BY kind, key"))
            pending = con.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
        if pending:
            problems.append(f"{pending} interrupted write(s) not yet recovered (open the library writable to fix)")
        for row in rows:
            name, issues = row["name"], self._config_problems(row)
            try:
                check_fit(name, self[name].factors(), self.fingerprint, self.module_shapes)
            except LibraryError as exc:
                issues.append(str(exc))
            if issues:
                problems.append(f"expert {name!r}: {'; '.join(issues)}")
        for row in derived:
            problem = self._file_problem(self.root / row["file"], row["checksum"], row["size"], full=True)
            if problem:
                problems.append(f"derived {row['kind']}-{row['key']}: {problem}")
        return problems

    def _config_problems(self, row) -> list[str]:
        path = self.expert_dir(row["name"]) / CONFIG_FILE
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            return [f"{path} is missing"]
        except (OSError, ValueError) as exc:
            return [f"{path} is unreadable ({exc})"]
        if (config.get("r"), float(config.get("lora_alpha", -1))) != (row["rank"], row["alpha"]):
            return [f"{path} says r={config.get('r')}, lora_alpha={config.get('lora_alpha')}; the index says "
                    f"rank {row['rank']}, alpha {row['alpha']}"]
        return []

    def __repr__(self) -> str:
        return f"ExpertLibrary({str(self.root)!r}, experts={len(self)}, base={self.fingerprint.get('source')!r})"


def _row_info(row) -> ExpertInfo:
    return ExpertInfo.from_dict({
        "name": row["name"], "kind": row["kind"], "tasks": json.loads(row["tasks"]), "cluster": row["cluster"],
        "rank": row["rank"], "alpha": row["alpha"], "target_modules": json.loads(row["target_modules"]),
        "n_params": row["n_params"], "train": json.loads(row["train"]), "checksum": row["checksum"],
        "created": row["created"]})
