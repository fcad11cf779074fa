"""A build remembers the task suite it trained on, and refuses to resume with a different one.

Usage::

    check_suite(lib, tasks, rebuild=False)   # first build: records the suite; resume: refuses a changed one
    check_suite(lib, tasks, rebuild=True)    # records the new suite; returns the tasks whose experts must go

The record is derived data of kind `build-suite` (meta = `suite_manifest` of every task the library was trained
on). A later run may add tasks (a library grows); a task whose wordings, examples or metadata changed is refused
with the difference named, unless `--rebuild`, which retrains those tasks' experts.
"""
from __future__ import annotations

from library_store.tasks import Task
from library_store.tasks.suite import suite_changes, suite_manifest

SUITE_KIND = "build-suite"
SUITE_KEY = {"record": "training suite"}


class SuiteChanged(ValueError):
    """The library was built on another version of these tasks."""


def recorded_suite(lib) -> dict | None:
    hit = lib.get_derived(SUITE_KIND, SUITE_KEY)
    return hit[1] if hit else None


def shared_changes(old: dict, new: dict) -> list[str]:
    """What differs between two suite manifests on the tasks both name (the suite version included): a later
    build may add tasks, never change one."""
    shared = [n for n in new["tasks"] if n in old.get("tasks", {})]
    return suite_changes({"version": old.get("version"), "tasks": {n: old["tasks"][n] for n in shared}},
                         {"version": new["version"], "tasks": {n: new["tasks"][n] for n in shared}})


def check_suite(lib, tasks: list[Task], rebuild: bool = False) -> list[str]:
    """Compare the tasks with the recorded suite; record the union. Returns the names of tasks that changed
    (only possible with rebuild=True; without it a change raises SuiteChanged)."""
    new = suite_manifest(tasks)
    old = recorded_suite(lib)
    if old is None and len(lib) and not rebuild:
        raise SuiteChanged(f"The library {lib.root} holds {len(lib)} experts but no record of the task suite "
                           "they were trained on (built before suite version 2?). Pass --rebuild to retrain "
                           "them on the current suite, or build into a new folder.")
    changed: list[str] = []
    if old is not None:
        shared = {n: old["tasks"][n] for n in new["tasks"] if n in old.get("tasks", {})}
        diff = shared_changes(old, new)
        if diff and not rebuild:
            raise SuiteChanged(f"The task suite differs from the one {lib.root} was built on:\n  "
                               + "\n  ".join(diff) + "\nPass --rebuild to retrain the changed experts.")
        changed = sorted(n for n in shared if shared[n] != new["tasks"][n]) if old.get("version") == \
            new["version"] else sorted(shared)
    if old is None and len(lib):  # rebuild of a library with no record: every task's expert is stale
        changed = [t.name for t in tasks]
    merged = {"version": new["version"], "tasks": {**(old or {}).get("tasks", {}), **new["tasks"]}}
    if merged != old:
        lib.put_derived(SUITE_KIND, SUITE_KEY, {}, meta=merged)
    return changed
