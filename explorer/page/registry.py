"""The page's models and libraries: one base model, the libraries it can route over (opened read-only), which
one is attached, and what the Library tab reads about each.

Usage::

    reg = Registry("tiny-random-llama", ["/tmp/lib"])       # nothing loads yet
    reg.start()                                              # base model + libraries load on the model thread
    reg.wait(progress=lambda frac, what: print(frac, what))
    with reg.lock:                                           # on reg.model_thread (reg.model_thread.call)
        routed = reg.attach("lib")                           # a RoutedModel over lib's routable experts
    reg.expert_names("lib"); reg.groups("lib"); reg.analysis("lib")
    reg.default_router("lib")      # {"top_k", "temperature", "centre", ..., "granularity", "recorded"}
    reg.add_expert("lib", "upload.zip", "my-expert", tasks=["add"])   # -> Edit; routes at once
    reg.remove_expert("lib", "my-expert"); reg.library_map("lib", "delta"); reg.report("lib")

One model per process, shared by every visitor: the base model is wrapped in place by one `RoutedModel` at a
time, so whoever attaches and runs holds `lock` from start to end (see `explorer.page.session`). Libraries are
opened read-only: runs never write into them (derived data such as prototypes is cached in the user's cache
directory instead, see docs/design.md). Only `add_expert` and `remove_expert` write, through the store's
checked intake; a committed demo library is never written: the first edit makes a user copy
(`library_store.store.user_copy`), which the registry serves from then on under the same name. An edit holds
`lock` only to swap the attached model, so a route that is running finishes on the library it started with.
Every model call runs on `model_thread`, one long-lived thread (why: `explorer.page.model_thread`).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dataclasses import dataclass, field, replace

from explorer.page.library_view import (LibraryAnalysis, analyse_library, delta_analysis, expert_groups,
                                        task_clusters)
from explorer.page.model_thread import ModelThread, in_passing
from explorer.page.request import DEFAULTS, ROUTER_FIELDS

if TYPE_CHECKING:  # torch, transformers and the store load on the model thread, after the page is up
    from explorer.routing.model import RoutedModel
    from library_store.store.library import ExpertLibrary

log = logging.getLogger(__name__)


def library_default_router(lib) -> dict:
    """The router a library starts with: its evaluation's recorded default (`reports.default_router`), else the
    built-in defaults; {"top_k", "temperature", "centre", "centre_scope", "input_centre", "granularity",
    "recorded": bool}. A record written before input centring (granularity) existed reads as "none" ("token")."""
    from library_store.store.reports import default_router

    out = {k: DEFAULTS[k] for k in ROUTER_FIELDS}
    try:
        found = default_router(lib) or {}
    except Exception as exc:  # a damaged record must not stop the page: the built-in defaults then
        log.warning("default router of %s not read: %s", getattr(lib, "root", lib), exc)
        found = {}
    out.update({k: found[k] for k in ROUTER_FIELDS if found.get(k) is not None})
    return {**out, "recorded": bool(found)}


@dataclass
class Edit:
    """What an add or remove did: the record, where the library now lives, timings for the page to show."""

    library: str
    path: Path
    copied: bool  # the library was a committed (or read-only) one: the edit went into this user copy
    info: object = None  # the stored ExpertInfo (add)
    seconds: dict = field(default_factory=dict)  # "store", "attach"
    computed: int | None = None  # experts whose prototypes were computed on re-attach (None: not attached)


class Registry:
    """The base model and the libraries (see module docstring)."""

    def __init__(self, base_model: str, libraries: list, dtype: str = "float32", device: str = "cpu"):
        self.base_name, self.dtype, self.device = base_model, dtype, device
        self.paths: dict[str, Path] = {}
        for path in map(Path, libraries):
            name = path.name
            while name in self.paths:  # two folders called the same: keep both, tell them apart
                name = f"{path.parent.name}/{name}"
            self.paths[name] = path
        self.origins: dict[str, Path] = dict(self.paths)  # as started; `paths` moves to a user copy on first edit
        self.lock = threading.RLock()  # one run at a time on the shared, in-place wrapped model
        self._start_lock = threading.Lock()  # not `lock`: waiting must not queue behind the first attach
        self.base = None
        self.libs: dict[str, "ExpertLibrary"] = {}
        self.problems: dict[str, str] = {}  # library (or library/expert) -> why it could not be used
        self._routed: "RoutedModel | None" = None
        self._routed_lib: str | None = None
        self._analyses: dict[str, LibraryAnalysis] = {}
        self._maps: dict[tuple[str, str], LibraryAnalysis] = {}
        self._edit_lock = threading.Lock()  # one add/remove at a time in this page (the store locks across processes)
        self._groups: dict[str, dict[str, str]] = {}
        self._progress = (0.0, "waiting to start")
        self._error: str | None = None
        self._done = threading.Event()
        self._loading = None  # the load's Future on the model thread, once started
        self.model_thread = ModelThread()  # every model call of the page runs there (explorer/page/model_thread.py)
        self.load_seconds: float | None = None

    # ------------------------------------------------------------ loading

    @property
    def library_names(self) -> list[str]:
        return list(self.paths)

    def start(self) -> None:
        """Load in the background so the page is up before the model is (idempotent)."""
        with self._start_lock:
            if self._loading is None:
                self._loading = self.model_thread.submit(self._load)

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            self._progress = (0.02, "importing torch and transformers")
            from library_store.models import load_base_model
            from library_store.store.library import ExpertLibrary

            self._progress = (0.1, f"loading base model {self.base_name}")
            from explorer.routing.device import resolve_device, resolve_dtype

            device = resolve_device(self.device)
            self.base = load_base_model(self.base_name, dtype=resolve_dtype(self.dtype, device))
            self.base.model.to(device)  # routed buffers are built on the base layers' device
            for i, (name, path) in enumerate(self.paths.items()):
                self._progress = (0.5 + 0.4 * i / max(1, len(self.paths)), f"opening library {name}")
                try:
                    path = self.paths[name] = _served_path(path)
                    lib = ExpertLibrary.open(path, readonly=True)
                    lib.check_base(self.base.fingerprint)
                    self.libs[name] = lib
                except Exception as exc:  # one bad library must not take the page down: say why instead
                    self.problems[name] = f"{type(exc).__name__}: {exc}"
                    log.warning("library %s not opened: %s", name, exc)
            if self.libs:  # the first library is what the page shows first: attach it now, not on Run
                first = next(iter(self.libs))
                self._progress = (0.9, f"attaching library {first}")
                with self.lock:
                    self.attach(first)
            if device.type == "cpu":  # built once per machine (about 25 s), so no visitor's first answer waits
                self._progress = (0.95, "preparing the fused decoding step")
                from explorer.routing import fused

                fused.kernel()
            self._progress = (1.0, "ready")
        except Exception as exc:
            self._error = f"The model could not be loaded: {type(exc).__name__}: {exc}"
            log.exception("explorer load failed")
        finally:
            self.load_seconds = time.perf_counter() - t0
            self._done.set()

    def wait(self, progress=None, timeout: float | None = None) -> bool:
        """Block until loaded, reporting (fraction, description) to `progress` meanwhile. True when ready."""
        self.start()
        if self.model_thread.here and not self._done.is_set():  # the load is queued behind this very job
            raise RuntimeError("Registry.wait() called on the model thread before the model loaded: it would never "
                               "return. Wait before handing work to the model thread.")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.wait(0.25):
            if progress is not None:
                progress(*self._progress)
            if deadline is not None and time.monotonic() > deadline:
                return False
        return self._error is None

    @property
    def ready(self) -> bool:
        return self._done.is_set() and self._error is None

    @property
    def error(self) -> str | None:
        return self._error

    def status(self) -> str:
        if self._error:
            return self._error
        if not self._done.is_set():
            return f"Loading… {self._progress[1]}"
        libs = ", ".join(f"{n} ({len(self.expert_names(n))} experts)" for n in self.libs) or "none"
        bad = "".join(f"\n\nLibrary {n} is unavailable: {why}" for n, why in self.problems.items())
        copies = "".join(f"\n\nLibrary {n} is served from your copy at {self.user_copy_of(n)} (experts added "
                         "from the page; the committed library is unchanged)."
                         for n in self.libs if self.user_copy_of(n))
        return f"Model {self.base.source} ready in {self.load_seconds:.1f} s. Libraries: {libs}.{bad}{copies}"

    # ------------------------------------------------------------ routing (call with self.lock held)

    def attach(self, library: str) -> "RoutedModel":
        """The RoutedModel of `library` (its routable experts, prototypes from the cache), swapping the wrapped
        layers if another library was attached. Raises ValueError for a library that is not available."""
        if library not in self.libs:
            why = self.problems.get(library, f"unknown library; choose one of {list(self.libs)}")
            raise ValueError(f"Library {library!r} is not available: {why}")
        if self._routed_lib != library:
            from explorer.routing.config import RouterConfig
            from explorer.routing.model import RoutedModel

            if self._routed is not None:
                self._routed.detach()
            self._routed, self._routed_lib = None, None
            # base mode until a run sets its router: the default top-k may exceed a small library
            routed = RoutedModel.from_library(self.base, self.libs[library], RouterConfig(mode="base"))
            for expert, why in routed.unavailable.items():  # a broken file: route over the others, say why
                self.problems[f"{library}/{expert}"] = why
            self._routed, self._routed_lib = routed, library
        return self._routed

    @property
    def attached(self) -> str | None:
        """The library whose experts are wrapped into the base model now."""
        return self._routed_lib

    # ------------------------------------------------------------ what the page shows about a library

    def expert_names(self, library: str) -> list[str]:
        """The experts a run over `library` routes (without the ones that could not be read)."""
        if library not in self.libs:
            return []
        if library == self._routed_lib:
            return list(self._routed.experts)
        return [e for e in self.libs[library].routable_names() if f"{library}/{e}" not in self.problems]

    def groups(self, library: str) -> dict[str, str]:
        """expert -> cluster; a library without clusters borrows another loaded library's (same task names)."""
        if library not in self.libs:
            return {}
        if library not in self._groups:
            borrowed = {}
            if not task_clusters(self.libs[library]):
                borrowed = next((found for other, lib in self.libs.items() if other != library
                                 for found in [task_clusters(lib)] if found), {})
            self._groups[library] = expert_groups(self.libs[library], borrowed)
        return self._groups[library]

    def analysis(self, library: str) -> LibraryAnalysis:
        if library not in self._analyses:
            if library not in self.libs:
                why = self.problems.get(library, "not loaded yet")
                return LibraryAnalysis(name=library, note=f"Library {library!r} is not available: {why}")
            self._analyses[library] = in_passing(analyse_library, self.libs[library], library)  # numba, torch
        return self._analyses[library]

    def explore_map(self, library: str) -> LibraryAnalysis:
        """The map next to the grid: the MBC map of the warm-ups where the library has one, else the ΔW map of
        its experts (a private library), coloured like the grid's "cluster" colouring where the library has or
        borrows clusters (`groups`), else by k-means clusters of the ΔW similarity."""
        mbc = self.analysis(library)
        if mbc.coords is not None or library not in self.libs:
            return mbc
        delta = self.library_map(library, "delta")
        if delta.coords is None:  # the ΔW map failed too: say why, after why there is no MBC map
            return replace(delta, note=f"{mbc.note} {delta.note}".strip())
        groups = self.groups(library)  # expert -> its cluster, or itself when it has none (as the grid colours)
        if any(groups.get(n, n) != n for n in delta.cluster_of):  # never mix those names with k-means labels
            return replace(delta, cluster_of={n: groups.get(n, n) for n in delta.cluster_of})
        return delta

    def library_map(self, library: str, kind: str = "mbc") -> LibraryAnalysis:
        """The map to show: "mbc" (the warm-up map, as `analysis`) or "delta" (cosine of the experts' weight
        updates ΔW, `library_store.store.similarity`, for any library)."""
        if kind != "delta" or library not in self.libs:
            return self.analysis(library)
        if (library, kind) not in self._maps:
            self._maps[library, kind] = in_passing(delta_analysis, self.libs[library], library, self.analysis(library))
        return self._maps[library, kind]

    def user_copy_of(self, library: str) -> Path | None:
        """The user copy the page serves for `library` (after an edit of a committed one), else None."""
        path = self.paths.get(library)
        return path if path is not None and path != self.origins.get(library) else None

    def default_router(self, library: str) -> dict:
        """The library's default router (see `library_default_router`); built-in defaults when not loaded."""
        if library not in self.libs:
            return {**{k: DEFAULTS[k] for k in ROUTER_FIELDS}, "recorded": False}
        return library_default_router(self.libs[library])

    def report(self, library: str):
        """The library's routing report card as its evaluation stored it (`reports.read_report`), or None."""
        from library_store.store.reports import read_report

        return read_report(self.libs[library]) if library in self.libs else None

    # ------------------------------------------------------------ editing a library (add / remove an expert)

    def add_expert(self, library: str, src, name: str, tasks=(), replace: bool = False) -> Edit:
        """Check and store the adapter at `src` (folder, .zip or files) as `name`, then route over it at once.
        Raises the store's refusal (UploadRefused, InvalidName, DuplicateExpert...) with the library unchanged."""
        from library_store.store.upload import intake_adapter

        return self._edit(library, lambda lib: intake_adapter(src, lib, name, tasks=tasks, replace=replace))

    def remove_expert(self, library: str, name: str) -> Edit:
        """Remove `name` (the page asked for confirmation); a committed library is copied first."""
        from library_store.store.upload import remove_expert

        return self._edit(library, lambda lib: remove_expert(lib, name))

    def _edit(self, library: str, change) -> Edit:
        if library not in self.libs:
            why = self.problems.get(library, f"unknown library; choose one of {list(self.libs)}")
            raise ValueError(f"Library {library!r} is not available: {why}")
        with self._edit_lock:
            t0 = time.perf_counter()
            path, copied, before, info = in_passing(self._stored, library, change)  # the upload's checks use torch
            edit = Edit(library, path, copied, info, {"store": time.perf_counter() - t0})
            t1 = time.perf_counter()
            self.model_thread.call(self._swap, library, path, before, edit)
            edit.seconds["attach"] = time.perf_counter() - t1
        return edit

    def _swap(self, library: str, path: Path, before, edit: Edit) -> None:
        """Serve the edited library from `path`, re-attached if it was (on the model thread)."""
        from library_store.store.library import ExpertLibrary

        with self.lock:  # waits for a running route; the next one routes over the changed library
            was_attached = self._routed_lib == library
            if was_attached:
                self._routed.detach()
                self._routed, self._routed_lib = None, None
            self.paths[library], self.libs[library] = path, ExpertLibrary.open(path, readonly=True)
            for key in [k for k in self.problems if k.startswith(f"{library}/")]:
                del self.problems[key]
            self._analyses.pop(library, None)
            self._groups.pop(library, None)
            for key in [k for k in self._maps if k[0] == library]:
                del self._maps[key]
            if was_attached:
                from explorer.routing.prototype_cache import seed_prototypes

                edit.computed = seed_prototypes(self.libs[library], before)
                self.attach(library)

    def _stored(self, library: str, change) -> tuple:
        """The store's side of an edit: (the library's path to edit, whether it was copied, the attached set's cached
        prototypes before it, what `change` returned)."""
        from library_store.store.library import ExpertLibrary
        from library_store.store.user_copy import library_for_adding

        path, copied = library_for_adding(self.paths[library])
        before = self._prototype_snapshot(library)
        return path, copied, before, change(ExpertLibrary.open(path, readonly=False))

    def _prototype_snapshot(self, library: str):
        """(pairs, {site: (E, d)}) of the attached set's cached prototypes, read before an edit changes the
        library's content key (a read-only library's cache is keyed by it)."""
        if self._routed_lib != library or self._routed is None:
            return None
        from explorer.routing.inject import PROTOTYPE_KIND
        from explorer.routing.prototypes import PROTOTYPE_METHOD

        checks = self.libs[library].checksums()
        pairs = [[n, checks.get(n)] for n in self._routed.experts]
        hit = self.libs[library].get_derived(PROTOTYPE_KIND, {"method": PROTOTYPE_METHOD, "experts": pairs})
        return (pairs, hit[0]) if hit is not None else None


def _served_path(path: Path) -> Path:
    """A committed library's user copy when one exists (what earlier edits from the page went into), else
    `path`: a restart shows the experts added before it."""
    from library_store.store.io import INDEX
    from library_store.store.user_copy import is_committed_asset, user_libraries_dir

    copy = user_libraries_dir() / path.resolve().name
    return copy if is_committed_asset(path) and (copy / INDEX).is_file() else path
