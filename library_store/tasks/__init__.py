"""Task sources behind one spec string.

Usage::

    resolve_tasks("builtin")                          # the 16-task demo suite (4 families)
    resolve_tasks("builtin:reverse_word,add")         # some of it (or of its held-out variants)
    resolve_tasks("variants")                         # the held-out variant tasks, never in the demo libraries
    resolve_tasks("bigbench:navigate,snarks")         # BIG-bench task.json files (downloads the sdist once)
    resolve_tasks("jsonl:/path/folder")               # a folder of <task>.jsonl files
    resolve_tasks("builtin+jsonl:/path/folder")       # several sources joined with '+'
    resolve_tasks("builtin@original:add")             # a wording set (built-in sources only; default varied)

Unknown task names and wording sets are answered with the close matches; a task with fewer than 10 examples,
or with wordings but fewer than 3 of them, is refused. Splits, wordings and suite hashes: docs/tasks.md.
"""
from __future__ import annotations

from library_store.expert import check_name
from .builtin import SUITE_VERSION, WORDING_SETS, builtin_by_name, builtin_names, builtin_tasks, heldout_variant_tasks
from .core import (MIN_EXAMPLES, MIN_WORDINGS, SPLITS, Example, Task, TaskError, Wordings, check_wordings,
                   split_examples, unknown_name_error)
from .suite import suite_changes, suite_hash, suite_manifest

__all__ = ["Example", "Task", "TaskError", "Wordings", "resolve_tasks", "builtin_tasks", "heldout_variant_tasks",
           "check_task", "check_wordings", "split_examples", "MIN_EXAMPLES", "MIN_WORDINGS", "SPLITS",
           "SUITE_VERSION", "WORDING_SETS", "unknown_name_error", "suite_hash", "suite_manifest", "suite_changes"]

SOURCES = ("builtin", "variants", "bigbench", "jsonl")
WORDED_SOURCES = ("builtin", "variants")  # the sources whose tasks have instruction wordings


def check_task(task: Task) -> Task:
    """Refuse tasks that cannot train or score an expert (or whose wordings cannot give a paraphrase split)."""
    try:
        check_name(task.name)
    except ValueError as exc:
        raise TaskError(f"Task name {task.name!r} is not usable as an expert name: {exc}") from None
    n = len(task.train) + len(task.heldout)
    if n < MIN_EXAMPLES:
        raise TaskError(f"Task {task.name!r} has only {n} examples; at least {MIN_EXAMPLES} are needed "
                        "(to train an expert and keep some held out).")
    if not task.train or not task.heldout:
        raise TaskError(f"Task {task.name!r} needs both training and held-out examples.")
    if task.wordings is not None:
        check_wordings(task.name, task.wordings)
    return task


def _names(rest: str) -> list[str]:
    return [n.strip() for n in rest.split(",") if n.strip()]


def _resolve_one(part: str, seed: int) -> list[Task]:
    head, _, rest = part.partition(":")
    source, at, wording_set = (s.strip().lower() for s in head.partition("@"))
    if at and source not in WORDED_SOURCES:
        raise TaskError(f"Wording sets ('@{wording_set}') apply to {' and '.join(WORDED_SOURCES)} tasks only; "
                        f"{source!r} tasks carry their own instructions.")
    if at and wording_set not in WORDING_SETS:
        raise unknown_name_error("wording set", wording_set, list(WORDING_SETS))
    wording_set = wording_set or "varied"
    if source == "builtin":
        if not rest:
            return builtin_tasks(seed, wordings=wording_set)
        known = builtin_names()
        for n in _names(rest):
            if n not in known:
                raise unknown_name_error("built-in task", n, known)
        return builtin_by_name(_names(rest), seed, wordings=wording_set)
    if source == "variants":
        tasks = heldout_variant_tasks(seed, wordings=wording_set)
        if not rest:
            return tasks
        by = {t.name: t for t in tasks}
        for n in _names(rest):
            if n not in by:
                raise unknown_name_error("held-out variant task", n, list(by))
        return [by[n] for n in _names(rest)]
    if source == "bigbench":
        from .bigbench import load_bigbench_tasks

        if not rest:
            raise TaskError("Name the BIG-bench tasks: bigbench:navigate,snarks")
        return load_bigbench_tasks(_names(rest), seed=seed)
    if source == "jsonl":
        from .jsonl import load_jsonl_folder

        if not rest:
            raise TaskError("Give the folder: jsonl:/path/to/folder")
        return load_jsonl_folder(rest, seed=seed)
    raise unknown_name_error("task source", source, list(SOURCES))


def resolve_tasks(spec: str, seed: int = 0) -> list[Task]:
    """All tasks named by `spec` (see the module docstring), each checked; duplicate names are refused."""
    if not spec or not spec.strip():
        raise TaskError(f"Empty task spec; use one of {', '.join(SOURCES)} (e.g. 'builtin').")
    tasks: list[Task] = []
    for part in spec.split("+"):
        tasks.extend(check_task(t) for t in _resolve_one(part.strip(), seed))
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaskError(f"Task names appear twice in {spec!r}: {', '.join(dupes)}")
    return tasks
