"""Runs over the registry's model: route a prompt, compare it with the baselines, and the views the page shows
of a `RoutingTrace`. No gradio here.

Usage::

    reg = Registry("tiny-random-llama", ["/tmp/lib"]); reg.wait()
    session = Session(reg)
    result = session.run(RawRequest("Reverse the word: apple", library="lib", top_k=2, max_new_tokens=4))
    result.trace, result.notices, result.request          # a RoutingTrace, what the page should say, the request
    session.compare(result.request, result.trace)          # {"base": ..., "uniform merge": ..., ...}, cached
    session.route(session.check(raw), streamer=s)          # the run itself, handing new tokens to a streamer
    session.view(result.trace, show_template=False)        # the trace without the chat template's tokens

A run holds `registry.lock` (on the registry's model thread) from attaching the library to the end of generation:
the base model is wrapped in place and shared by every visitor, which is what makes eight simultaneous requests
each equal the same request alone.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from explorer.page.registry import Registry
from explorer.page.request import PAGE_LIMITS, Limits, RawRequest, RunRequest, normalise
from explorer.routing.config import RouterConfig
from explorer.routing.readout import MissingReadout
from explorer.routing.trace import RoutingTrace

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = PAGE_LIMITS.max_new_tokens
# a readout pick under settings its readout was not fitted for (another top-k, temperature, centring or enabled
# experts): the page picks by mean weight instead and says so
NO_READOUT = ("This library's pick readout was fitted for its default top-k, temperature, centring and enabled "
              "experts, not these: the expert was picked by mean weight instead.")


@dataclass
class RunResult:
    trace: RoutingTrace | None  # None when the request was refused (see `error`)
    notices: list[str] = field(default_factory=list)  # clamps and truncations the page must show
    error: str | None = None  # a plain message for the page instead of results
    reference: RoutingTrace | None = None  # the same run with no expert disabled (interventions only)
    request: RunRequest | None = None  # the request as run (after the normaliser)
    run_id: int = 0  # unique per run of this process: a click on a grid drawn for another run is stale

    @property
    def shown(self) -> RoutingTrace | None:
        """What the Explore view draws and drills into: the trace; for a per-prompt run, its evidence (the prompt
        routed per token, which chose the one expert that then answered alone)."""
        if self.trace is None:
            return None
        return self.trace.evidence if self.trace.evidence is not None else self.trace


_RUN_IDS = itertools.count(1)


class Session:
    """Runs, comparisons and views over one `Registry` (see module docstring)."""

    def __init__(self, registry: Registry, limits: Limits = PAGE_LIMITS, compare_cache: int = 32):
        self.registry, self.limits = registry, limits
        self._compared: OrderedDict = OrderedDict()  # (request, trace text, library content) -> texts
        self._compare_size = compare_cache
        self._compare_lock = threading.Lock()

    def check(self, raw: RawRequest) -> RunResult:
        """The normalised request (in `.request`) with its notices, or the error that stops it."""
        reg = self.registry
        if not reg.ready:
            return RunResult(trace=None, error=reg.error or "The model is still loading; try again in a moment.")
        library = str(raw.library or "")
        if library not in reg.libs:
            why = reg.problems.get(library, f"unknown; choose one of {list(reg.libs)}")
            return RunResult(trace=None, error=f"Library {library!r} is not available: {why}")
        names = [i.name for i in reg.libs[library].infos()]  # a general expert may centre without routing
        done = normalise(raw, reg.expert_names(library), tokenizer=reg.base.tokenizer,
                         context_length=reg.base.context_length, limits=self.limits, names=names,
                         defaults=reg.default_router(library))
        return RunResult(trace=None, notices=done.notices, error=done.error, request=done.request)

    def run(self, raw: RawRequest) -> RunResult:
        """Route (and generate) one prompt; with experts disabled, also the un-intervened reference run."""
        result = self.check(raw)
        return result if result.error else self.route(result)

    def route(self, checked: RunResult, streamer=None) -> RunResult:
        """Run a checked request (`check`'s result) on the model thread; `streamer` (a `generate` streamer) gets the
        new tokens of the main run as they come. The engine's refusals become the result's error."""
        return self.registry.model_thread.call(self._route, checked, streamer)

    def _route(self, checked: RunResult, streamer=None) -> RunResult:
        req, fell_back = checked.request, []
        try:
            with self.registry.lock:
                try:
                    trace = self._trace(req, req.router, streamer)
                except MissingReadout:  # refused by set_router before anything ran: pick by mean weight instead
                    req, fell_back = replace(req, router=replace(req.router, pick="mean")), [NO_READOUT]
                    trace = self._trace(req, req.router, streamer)
                reference = self._trace(req, replace(req.router, disabled=())) if req.router.disabled else None
        except (ValueError, RuntimeError, LookupError) as exc:  # the engine's refusals: a message, not a trace
            log.exception("run failed")
            return replace(checked, error=f"This run failed: {exc}")
        notices = list(checked.notices) + fell_back
        if trace.truncated:
            notices.append("The prompt was cut to fit the model's context.")
        return replace(checked, trace=trace, reference=reference, notices=notices, request=req,
                       run_id=next(_RUN_IDS))

    def _trace(self, req: RunRequest, router: RouterConfig, streamer=None) -> RoutingTrace:
        routed = self.registry.attach(req.library)
        routed.set_router(router)
        extra = {"streamer": streamer} if streamer is not None else {}
        return routed.trace(req.prompt, max_new_tokens=req.max_new_tokens, chat=req.chat, **extra)

    def compare(self, req: RunRequest | None, trace: RoutingTrace | None) -> dict[str, str]:
        """The same prompt through the base model, the uniform merge, the single most-used expert and Arrow
        (the text of `trace`), labelled "base", "uniform merge", "most-used expert (<name>)" and "arrow". A
        per-prompt run answered with its pick alone, so its third answer is the runner-up's instead, labelled
        "runner-up (<name>)": what the other candidate would have said (most useful when the pick is uncertain).
        Cached per request (prompt, router setting, length, template) and library content: asking again, or
        after re-running the same request, costs no model call."""
        if req is None or trace is None or not self.registry.ready:
            return {}
        key = (req, trace.text, trace.library.get("content"))
        with self._compare_lock:
            if key in self._compared:
                self._compared.move_to_end(key)
                return dict(self._compared[key])
        modes = {"base": "base", "uniform merge": "uniform"}
        runner = (trace.meta.get("pick") or {}).get("runner_up")  # a per-prompt run's pick only
        top = trace.most_used_expert()
        if runner:
            modes[f"runner-up ({runner})"] = f"expert:{runner}"
        elif top:
            modes[f"most-used expert ({top})"] = f"expert:{top}"
        out = self.registry.model_thread.call(self._generate_each, req, modes)
        out["arrow"] = trace.text
        with self._compare_lock:
            self._compared[key] = dict(out)
            while len(self._compared) > self._compare_size:
                self._compared.popitem(last=False)
        return out

    def _generate_each(self, req: RunRequest, modes: dict[str, str]) -> dict[str, str]:
        """{label: the answer with router mode `mode`} (on the model thread)."""
        out = {}
        with self.registry.lock:
            routed = self.registry.attach(req.library)
            for label, mode in modes.items():
                routed.set_router(RouterConfig(mode=mode, top_k=1))
                out[label] = routed.generate(req.prompt, max_new_tokens=req.max_new_tokens, chat=req.chat)
        return out

    def compared(self, req: RunRequest | None, trace: RoutingTrace | None) -> dict[str, str] | None:
        """The cached comparison of this run, or None (no model call)."""
        if req is None or trace is None:
            return None
        with self._compare_lock:
            hit = self._compared.get((req, trace.text, trace.library.get("content")))
        return dict(hit) if hit is not None else None

    @staticmethod
    def view(trace: RoutingTrace, show_template: bool) -> RoutingTrace:
        """What the grids show: every routed token, or (chat template on, not shown) the user's own tokens and
        the generated ones; the template's system and role tokens are the same for every prompt."""
        if show_template or not trace.meta.get("chat"):
            return trace
        return trace.crop("user+generated")
