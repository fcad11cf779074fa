"""What an evaluation found about a library's routing, stored with the library: the routing report and the
default router chosen by evidence. The page and the CLI only read these; `bench/eval_routing.py --record` writes
them.

Usage::

    from library_store.store.reports import RoutingReport, read_report, write_report, default_router
    report = read_report(lib)                      # RoutingReport of the held-out split, or None
    report = read_report(lib, split="paraphrase")  # one report per split
    if report is None: ...                         # never evaluated, or the experts changed since
    report.accuracy["user"], report.per_layer, report.confusion, report.command
    default_router(lib)                            # {"mode": "arrow", "top_k": 2, ...} or None
    record = read_default_router(lib)              # DefaultRouter: router, evidence, command, date
    writer = ExpertLibrary.open(path, readonly=False)
    write_report(writer, report)                   # explicit: a read-only library is refused
    write_default_router(writer, {"mode": "arrow", "top_k": 2, ...}, evidence={"rule": ..., "sweep": [...]})

A per-prompt router's pick readout (`write_readout` / `read_readout`, kind `pick-readout`: tensors and meta from
explorer/routing/readout.py, keyed by content and the router settings it was fitted under) lives here too.

Both are derived data (kinds `routing-report` and `router-default`) keyed by the library's content
(`lib.content_key()`, a hash of every expert's checksum): a library whose experts changed since the evaluation
simply has no report and no default router any more; `write_*` drops the stale entries of the kind. Everything
is plain JSON in the entry's meta (no tensors). The router is a dict in `RouterConfig.to_dict()` form
(library_store never imports the engine); `RouterConfig.from_dict(default_router(lib))` checks it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from library_store.store.errors import LibraryError

REPORT_KIND = "routing-report"
ROUTER_KIND = "router-default"
REPORT_SPLITS = ("heldout", "paraphrase", "train")
ROUTER_FIELDS = ("mode", "top_k", "temperature", "disabled", "centre", "centre_scope", "input_centre",
                 "granularity", "pick", "layers", "scales")


@dataclass
class RoutingReport:
    """Routing diagnostics of one library on one split (see bench/eval_routing.py for how each is measured).

    Accuracies are shares of prompts whose own expert (a cluster library: the task's cluster expert) has the
    largest mean routing weight over some token positions. Quantiles are keyed "q05", "q25", "q50", "q75",
    "q95" plus "mean".
    """

    content_key: str  # lib.content_key() it was computed on
    split: str  # "heldout" | "paraphrase" | "train": which prompts were routed
    router: dict  # RouterConfig.to_dict() of the headline numbers
    level: str = "private"  # "private" (own expert) or "cluster" (the task's cluster expert)
    experts: list[str] = field(default_factory=list)  # routed experts: the confusion's columns
    tasks: list[str] = field(default_factory=list)  # the confusion's rows
    n_per_task: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)  # "user" (headline), "generated", "user+generated",
    #                                                           "prompt", "all"
    per_layer: dict[str, list] = field(default_factory=dict)  # {"layers": [...], "accuracy": [...]} (user text)
    per_module: dict[str, float] = field(default_factory=dict)  # module -> accuracy (user text)
    per_task: dict[str, dict] = field(default_factory=dict)  # task -> {"user": acc, "generated": acc, ...}
    confusion: list[list[float]] = field(default_factory=list)  # (tasks, experts) mean own-text weight
    entropy: dict[str, float] = field(default_factory=dict)  # nats per (layer, user token); max log(top_k)
    margin: dict[str, float] = field(default_factory=dict)  # top-1 minus top-2 weight per (layer, user token)
    centring: list[dict] = field(default_factory=list)  # one row per centring option, same top-k and T
    sweep: list[dict] = field(default_factory=list)  # top-k x temperature x centring on training prompts
    s5: dict = field(default_factory=dict)  # {"per_task": {task: {"arrow", "own", "ratio"}}, "overall": ratio}
    command: str = ""  # the exact command line that produced it
    date: str = ""  # UTC, ISO 8601
    model: str = ""  # base model name
    extra: dict = field(default_factory=dict)  # anything else (and fields written by a newer version)

    def __post_init__(self):
        if self.split not in REPORT_SPLITS:
            raise ValueError(f"Unknown split {self.split!r}; use one of {', '.join(REPORT_SPLITS)}.")
        check_router_dict(self.router)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=float))

    @classmethod
    def from_dict(cls, data: dict) -> "RoutingReport":
        """The inverse of `to_dict`; keys this version does not know go to `extra` (a newer writer's)."""
        known = {f.name for f in fields(cls)}
        extra = dict(data.get("extra") or {})
        extra.update({k: v for k, v in data.items() if k not in known})
        return cls(**{**{k: v for k, v in data.items() if k in known}, "extra": extra})


@dataclass
class DefaultRouter:
    """The router a library starts with, and why (the sweep that chose it, scored on training prompts)."""

    router: dict  # RouterConfig.to_dict()
    evidence: dict  # e.g. {"rule": ..., "split": "train", "sweep": [...], "winner": {...}}
    content_key: str
    command: str = ""
    date: str = ""


def check_router_dict(router) -> dict:
    """A router dict in `RouterConfig.to_dict()` form: known keys only, and a mode. The engine checks the
    values (`RouterConfig.from_dict`)."""
    if not isinstance(router, dict) or "mode" not in router:
        raise ValueError(f"A router must be a dict like RouterConfig.to_dict() (with a 'mode'), got {router!r}")
    unknown = sorted(set(router) - set(ROUTER_FIELDS))
    if unknown:
        raise ValueError(f"Unknown router fields {unknown}; known: {', '.join(ROUTER_FIELDS)}")
    return router


def _writable(lib) -> None:
    if lib.readonly:
        raise LibraryError(f"The library at {lib.root} is open read-only; evaluation results are only written "
                           "on request: open it with readonly=False (bench/eval_routing.py --record).")


def _drop_stale(lib, kind: str, keep: str, same=lambda config: True) -> None:
    """Remove the library's entries of `kind` computed on another content (and matching `same`)."""
    for entry in lib.list_derived():
        cfg = entry["config"]
        if entry["kind"] == kind and cfg.get("content") != keep and same(cfg):
            lib.remove_derived(kind, entry["key"])


def _get(lib, kind: str, config: dict) -> dict | None:
    """The entry's meta (the key hashes the content, so another content's entry is never found)."""
    hit = lib.get_derived(kind, config)
    return None if hit is None else hit[1]


def write_report(lib, report: RoutingReport) -> str:
    """Store `report` in `lib` (opened writable); returns the derived-data key. Refuses a report computed on
    other experts than the library holds now."""
    _writable(lib)
    content = lib.content_key()
    if report.content_key != content:
        raise LibraryError(f"This report was computed on library content {report.content_key}; the library at "
                           f"{lib.root} now holds {content} (its experts changed): evaluate it again.")
    _drop_stale(lib, REPORT_KIND, content, lambda cfg: cfg.get("split") == report.split)
    return lib.put_derived(REPORT_KIND, {"content": content, "split": report.split}, {}, report.to_dict())


def read_report(lib, split: str = "heldout") -> RoutingReport | None:
    """The library's routing report of `split`, or None when there is none for the experts it holds now."""
    if split not in REPORT_SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(REPORT_SPLITS)}.")
    meta = _get(lib, REPORT_KIND, {"content": lib.content_key(), "split": split})
    return None if meta is None else RoutingReport.from_dict(meta)


def write_default_router(lib, router: dict, evidence: dict, command: str = "", date: str = "") -> str:
    """Record `router` as the library's default (opened writable), with the evidence that chose it."""
    _writable(lib)
    check_router_dict(router)
    content = lib.content_key()
    record = DefaultRouter(dict(router), json.loads(json.dumps(evidence, default=float)), content, command, date)
    _drop_stale(lib, ROUTER_KIND, content)
    return lib.put_derived(ROUTER_KIND, {"content": content}, {}, asdict(record))


def read_default_router(lib) -> DefaultRouter | None:
    """The recorded default router and its evidence, or None (never chosen, or the experts changed since)."""
    meta = _get(lib, ROUTER_KIND, {"content": lib.content_key()})
    return None if meta is None else DefaultRouter(**{f.name: meta[f.name] for f in fields(DefaultRouter)})


def default_router(lib) -> dict | None:
    """The library's default router as a `RouterConfig.to_dict()` dict, or None."""
    record = read_default_router(lib)
    return None if record is None else dict(record.router)


READOUT_KIND = "pick-readout"


def write_readout(lib, router_key: str, tensors: dict, meta: dict) -> str:
    """Store a per-prompt pick readout (explorer/routing/readout.py) fitted for this content and router (opened
    writable); stale readouts of another content are dropped."""
    _writable(lib)
    content = lib.content_key()
    _drop_stale(lib, READOUT_KIND, content)
    return lib.put_derived(READOUT_KIND, {"content": content, "router": router_key}, tensors, meta)


def read_readout(lib, router_key: str) -> tuple[dict, dict] | None:
    """(tensors, meta) of the readout fitted for this content and router key, or None."""
    return lib.get_derived(READOUT_KIND, {"content": lib.content_key(), "router": router_key})
