"""Everything the explorer page needs that is not gradio: the shared model, libraries, runs and their checks.

Usage::

    ex = Explorer("tiny-random-llama", ["/tmp/lib"])      # nothing loads yet
    ex.start()                                             # base model + libraries load in a thread
    ex.wait(progress=lambda frac, what: print(frac, what))
    result = ex.run(RunRequest("Reverse the word: apple", library="lib", top_k=2))
    result.trace, result.notices                            # a RoutingTrace and what the page should say
    ex.compare(request, result.trace)                       # {"base": ..., "uniform merge": ..., ...}
    ex.analysis("lib")                                      # LibraryAnalysis for the Library tab

One model per process, shared by every visitor: the base model is wrapped in place by one `RoutedModel` at a
time, so a run (library switch, router setting, generation) holds `self.lock` from start to end. That is what
makes eight simultaneous requests each equal to the same request alone.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from explorer.page.library_view import LibraryAnalysis, analyse_library, expert_groups
from explorer.page.plots import most_used_expert
from explorer.routing.trace import RoutingTrace

if TYPE_CHECKING:  # torch, transformers and the store load in the background thread, after the page is up
    from explorer.routing.model import RoutedModel
    from library_store.store.library import ExpertLibrary

log = logging.getLogger(__name__)

PAGE_PROMPT_TOKENS = 256  # the page's context: longer prompts are cut (a 5,000-token grid helps nobody)
MAX_NEW_TOKENS = 128



@dataclass
class RunRequest:
    """One press of Run: the prompt and the router controls."""

    prompt: str
    library: str
    chat: bool = True
    top_k: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 32
    disabled: tuple[str, ...] = ()


@dataclass
class RunResult:
    trace: RoutingTrace | None  # None when the request was refused (see `error`)
    notices: list[str] = field(default_factory=list)  # clamps and truncations the page must show
    error: str | None = None  # a plain message for the page instead of results
    reference: RoutingTrace | None = None  # the same run with no expert disabled (interventions only)


# ---------------------------------------------------------------- prompt checks


def crop_to_prompt(trace: RoutingTrace, keep: list[int]) -> RoutingTrace:
    """The trace restricted to some token positions (e.g. without the chat template's tokens)."""
    idx = np.asarray(keep, dtype=int)
    return replace(trace, tokens=[trace.tokens[i] for i in idx], token_ids=[trace.token_ids[i] for i in idx],
                   is_generated=[trace.is_generated[i] for i in idx], weights=trace.weights[:, :, idx])


def user_token_positions(tokenizer, trace: RoutingTrace, formatted: str, user_text: str) -> list[int]:
    """Positions of the user's own tokens and the generated ones: the chat template's system and role tokens
    are routed too, but they are the same for every prompt and crowd the grid."""
    start = formatted.find(user_text) if user_text else -1
    n_prompt = trace.n_prompt
    if start < 0:
        return list(range(len(trace.tokens)))
    before = tokenizer(formatted[:start], add_special_tokens=False).input_ids
    after = tokenizer(formatted[start + len(user_text):], add_special_tokens=False).input_ids
    ids = trace.token_ids[:n_prompt]
    if ids[: len(before)] != before or (after and ids[n_prompt - len(after):] != after):
        return list(range(len(trace.tokens)))  # the template merged into the text: show everything
    return list(range(len(before), n_prompt - len(after))) + list(range(n_prompt, len(trace.tokens)))


# ---------------------------------------------------------------- the shared engine


class Explorer:
    """The page's one model and its libraries (see module docstring)."""

    def __init__(self, base_model: str, libraries: list, dtype: str = "float32",
                 prompt_tokens: int = PAGE_PROMPT_TOKENS):
        self.base_name, self.dtype, self.prompt_tokens = base_model, dtype, prompt_tokens
        self.paths: dict[str, Path] = {}
        for path in libraries:
            path = Path(path)
            name = path.name
            while name in self.paths:  # two folders called the same: keep both, tell them apart
                name = f"{path.parent.name}/{name}"
            self.paths[name] = path
        self.lock = threading.RLock()  # one run at a time on the shared, in-place wrapped model
        self.base = None
        self.libs: dict[str, "ExpertLibrary"] = {}
        self.experts: dict[str, list] = {}  # library -> its LoraExperts, read once
        self.problems: dict[str, str] = {}  # library -> why it could not be opened
        self._routed: "RoutedModel | None" = None
        self._routed_lib: str | None = None
        self._analyses: dict[str, LibraryAnalysis] = {}
        self._groups: dict[str, dict[str, str]] = {}
        self._progress = (0.0, "waiting to start")
        self._error: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.load_seconds: float | None = None

    # ------------------------------------------------------------ loading

    @property
    def library_names(self) -> list[str]:
        return list(self.paths)

    def start(self) -> None:
        """Load in the background so the page is up before the model is (idempotent)."""
        with self.lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="explorer-load", daemon=True)
                self._thread.start()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            self._progress = (0.02, "importing torch and transformers")
            import torch

            from library_store.models import load_base_model
            from library_store.store.library import ExpertLibrary

            self._progress = (0.1, f"loading base model {self.base_name}")
            self.base = load_base_model(self.base_name, dtype=getattr(torch, self.dtype))
            for i, (name, path) in enumerate(self.paths.items()):
                self._progress = (0.5 + 0.5 * i / max(1, len(self.paths)), f"reading library {name}")
                try:
                    lib = ExpertLibrary.open(path, readonly=True)
                    lib.check_base(self.base.fingerprint)
                    self.libs[name] = lib
                    self.experts[name] = []
                    for expert in lib.routable_names():
                        try:
                            self.experts[name].append(lib[expert])
                        except Exception as exc:  # ExpertUnavailable: a broken file; route over the others
                            self.problems[f"{name}/{expert}"] = f"{type(exc).__name__}: {exc}"
                except Exception as exc:  # one bad library must not take the page down: say why instead
                    self.problems[name] = f"{type(exc).__name__}: {exc}"
                    log.warning("library %s not loaded: %s", name, exc)
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
        libs = ", ".join(f"{n} ({len(self.experts[n])} experts)" for n in self.libs) or "none"
        bad = "".join(f"\n\nLibrary {n} is unavailable: {why}" for n, why in self.problems.items())
        return f"Model {self.base.source} ready in {self.load_seconds:.1f} s. Libraries: {libs}.{bad}"

    # ------------------------------------------------------------ routing (call with self.lock held)

    def routed(self, library: str) -> "RoutedModel":
        """The RoutedModel of `library`, swapping the wrapped layers if another library was attached."""
        if library not in self.libs:
            why = self.problems.get(library, f"unknown library; choose one of {list(self.libs)}")
            raise ValueError(f"Library {library!r} is not available: {why}")
        if self._routed_lib != library:
            if self._routed is not None:
                self._routed.detach()
            self._routed, self._routed_lib = None, None
            from explorer.routing.model import RoutedModel, RouterConfig

            # base mode until a run sets its router: the default top-k may exceed a small library
            self._routed = RoutedModel(self.base, self.experts[library], RouterConfig(mode="base"))
            self._routed_lib = library
        return self._routed

    def expert_names(self, library: str) -> list[str]:
        return [e.name for e in self.experts.get(library, [])]

    def modules(self) -> list[str]:
        return list(self.base.targets) if self.base is not None else []

    def groups(self, library: str) -> dict[str, str]:
        """expert -> cluster; a library without clusters borrows another loaded library's (same task names)."""
        if library not in self.libs:
            return {}
        if library not in self._groups:
            borrowed = {}
            if not self.libs[library].clusters():
                for other, lib in self.libs.items():
                    if other != library and lib.clusters():
                        borrowed = {t: c for c, tasks in lib.clusters().items() for t in tasks}
                        break
            self._groups[library] = expert_groups(self.libs[library], borrowed)
        return self._groups[library]

    def analysis(self, library: str) -> LibraryAnalysis:
        if library not in self._analyses:
            if library not in self.libs:
                why = self.problems.get(library, "not loaded yet")
                return LibraryAnalysis(name=library, note=f"Library {library!r} is not available: {why}")
            self._analyses[library] = analyse_library(self.libs[library], library)
        return self._analyses[library]

    # ------------------------------------------------------------ one run

    def check(self, req: RunRequest) -> tuple[RunRequest, list[str], str | None]:
        """The request with its settings clamped, the notices to show, or an error message."""
        if not self.ready:
            return req, [], self._error or "The model is still loading; try again in a moment."
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            return req, [], "The prompt is empty: type something (or pick an example) and press Run."
        if req.library not in self.libs:
            return req, [], f"Library {req.library!r} is not available: {self.problems.get(req.library, 'unknown')}"
        notices = []
        names = self.expert_names(req.library)
        disabled = tuple(n for n in (req.disabled or ()) if n in names)
        unknown = [n for n in (req.disabled or ()) if n not in names]
        if unknown:
            notices.append(f"Ignored unknown experts {unknown}: {req.library} has {names}.")
        enabled = len(names) - len(disabled)
        if enabled < 1:
            return req, [], "Every expert is disabled: enable at least one to route."
        top_k = int(req.top_k)
        if top_k > enabled:
            notices.append(f"top-k {top_k} is more than the {enabled} enabled experts of {req.library}: "
                           f"clamped to {enabled}.")
            top_k = enabled
        top_k = max(1, top_k)
        new = int(min(max(0, int(req.max_new_tokens)), MAX_NEW_TOKENS))
        temperature = float(req.temperature) if float(req.temperature) > 0 else 1.0
        ids = self.base.tokenizer(req.prompt, add_special_tokens=False).input_ids
        prompt = req.prompt
        limit = min(self.prompt_tokens, self.base.context_length - new - 64)  # 64: room for the chat template
        if len(ids) > limit:
            prompt = self.base.tokenizer.decode(ids[:limit])
            notices.append(f"The prompt was {len(ids):,} tokens ({len(req.prompt):,} characters): truncated to "
                           f"its first {limit} tokens, the page's context.")
        return replace(req, prompt=prompt, top_k=top_k, temperature=temperature, max_new_tokens=new,
                       disabled=disabled), notices, None

    def _trace(self, req: RunRequest, disabled: tuple[str, ...]) -> RoutingTrace:
        from explorer.routing.model import RouterConfig

        rm = self.routed(req.library)
        rm.set_router(RouterConfig(mode="arrow", top_k=req.top_k, temperature=req.temperature, disabled=disabled))
        trace = rm.trace(req.prompt, max_new_tokens=req.max_new_tokens, chat=req.chat)
        trace.meta.update(library=req.library, user_prompt=req.prompt, chat=req.chat,
                          formatted=self.base.format_prompt(req.prompt, req.chat))
        return trace

    def run(self, req: RunRequest) -> RunResult:
        """Route (and generate) one prompt; with experts disabled, also the un-intervened reference run."""
        req, notices, error = self.check(req)
        if error:
            return RunResult(trace=None, notices=notices, error=error)
        try:
            with self.lock:
                trace = self._trace(req, req.disabled)
                reference = self._trace(req, ()) if req.disabled else None
        except (ValueError, RuntimeError, LookupError) as exc:  # the engine's refusals: a message, not a trace
            log.exception("run failed")
            return RunResult(trace=None, notices=notices, error=f"This run failed: {exc}")
        if trace.truncated:
            notices.append("The prompt was cut to fit the model's context.")
        return RunResult(trace=trace, notices=notices, reference=reference)

    def compare(self, req: RunRequest, trace: RoutingTrace | None) -> dict[str, str]:
        """The same prompt through base, uniform merge, the single most-used expert and Arrow (from `trace`)."""
        req, _, error = self.check(req)
        if error or trace is None:
            return {}
        top = most_used_expert(trace)
        modes = {"base": "base", "uniform merge": "uniform"}
        if top:
            modes[f"most-used expert ({top})"] = f"expert:{top}"
        from explorer.routing.model import RouterConfig

        out = {}
        with self.lock:
            rm = self.routed(req.library)
            for label, mode in modes.items():
                rm.set_router(RouterConfig(mode=mode, top_k=1, disabled=()))
                out[label] = rm.generate(req.prompt, max_new_tokens=req.max_new_tokens, chat=req.chat)
        out["arrow"] = trace.text
        return out

    def view(self, trace: RoutingTrace, show_template: bool) -> RoutingTrace:
        """What the grids show: all routed tokens, or only the user's and the generated ones."""
        if show_template or not trace.meta.get("chat") or self.base is None:
            return trace
        keep = user_token_positions(self.base.tokenizer, trace, trace.meta.get("formatted", ""),
                                    trace.meta.get("user_prompt", ""))
        return crop_to_prompt(trace, keep)
