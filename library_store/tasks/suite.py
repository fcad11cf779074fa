"""Fingerprints of a task suite, so a build can refuse to resume with different tasks.

Usage::

    tasks = resolve_tasks("builtin")
    suite_hash(tasks)                         # '3f0c…' (16 hex): stable across machines and processes
    manifest = suite_manifest(tasks)          # JSON-able; store it with the library
    suite_changes(manifest, suite_manifest(resolve_tasks("builtin", seed=1)))
    # ['add: examples changed (inputs, targets or split)', ...]

The manifest holds the generator's SUITE_VERSION and per task its family, metric, source, `wordings_hash`
(which templates, and which two are held out) and a digest of every example of every split (so a changed seed,
word list, generator or held-out split shows too). `suite_hash` is the hash of the manifest.
"""
from __future__ import annotations

import hashlib
import json

from .builtin import SUITE_VERSION
from .core import SPLITS, Task


def _sha(obj) -> str:
    blob = json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def examples_hash(task: Task) -> str:
    """Digest of the task's inputs, targets, choices and wordings, split by split (in order)."""
    return _sha({split: [[e.input, e.target, e.choices, e.answer, e.wording] for e in getattr(task, split)]
                 for split in SPLITS})


def suite_manifest(tasks: list[Task]) -> dict:
    """{'version': SUITE_VERSION, 'tasks': {name: {family, metric, source, wordings, examples}}}."""
    return {"version": SUITE_VERSION,
            "tasks": {t.name: {"family": t.family, "metric": t.metric, "source": t.source,
                               "wordings": t.wordings_hash, "examples": examples_hash(t)} for t in tasks}}


def suite_hash(tasks: list[Task]) -> str:
    """One stable hash of the suite: wordings, held-out wordings, example split and generator version."""
    return _sha(suite_manifest(tasks))


def suite_changes(old: dict, new: dict) -> list[str]:
    """What differs between two manifests, one readable line per difference ([] when they are the same)."""
    out = []
    if old.get("version") != new.get("version"):
        out.append(f"suite version {old.get('version')} -> {new.get('version')}")
    before, after = old.get("tasks", {}), new.get("tasks", {})
    out += [f"{n}: task removed" for n in before if n not in after]
    out += [f"{n}: task added" for n in after if n not in before]
    for name in (n for n in before if n in after):
        a, b = before[name], after[name]
        if a.get("wordings") != b.get("wordings"):
            out.append(f"{name}: wordings changed (hash {a.get('wordings')} -> {b.get('wordings')})")
        if a.get("examples") != b.get("examples"):
            out.append(f"{name}: examples changed (inputs, targets or split)")
        for key in ("family", "metric", "source"):
            if a.get(key) != b.get(key):
                out.append(f"{name}: {key} {a.get(key)} -> {b.get(key)}")
    return out
