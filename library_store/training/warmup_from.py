"""MBC warm-ups taken from an existing private library instead of training them again.

Usage::

    python -m library_store build mbc --tasks builtin --clusters 4 --out libs/mbc --warmup-from libs/private
    reuse_warmups(lib, "libs/private", base, tasks, warmup)   # -> the TrainConfig the copies were trained with

MBC clusters what training changed (W - W_init), so a warm-up expert is any expert of the task that started
from the shared LoRA init. A private library built on the same base, the same task suite and the same init
seed already holds one per task, trained much longer than a warm-up: measured on demo-private (150 steps x 8)
the clusters match the task families at ARI 0.82 against 0.615 for 10-step warm-ups (docs/demo_libraries.md).
Each private expert is copied under its warm-up name (kind `warmup`); the source library is only read.
Refused, naming the reason: another base model, a task with no private expert, a changed task suite, or an
expert that did not start from the warm-up init (another seed, rank, alpha or target modules).
"""
from __future__ import annotations

from dataclasses import replace

from library_store.store.library import ExpertLibrary
from library_store.tasks import Task
from library_store.tasks.suite import suite_manifest
from library_store.training.mbc import warmup_name
from library_store.training.suite_guard import SuiteChanged, recorded_suite, shared_changes
from library_store.training.train import TrainConfig


class WarmupSourceError(ValueError):
    """The source library cannot stand in for the warm-up experts."""


def _private_expert(src: ExpertLibrary, task: str):
    for info in src.infos():
        if info.kind == "private" and info.tasks == [task]:
            return info
    return None


def _check_suite(src: ExpertLibrary, tasks: list[Task]) -> None:
    old = recorded_suite(src)
    if old is None:
        raise SuiteChanged(f"{src.root} has no record of the task suite its experts were trained on; "
                           "its experts cannot be reused as warm-ups.")
    diff = shared_changes(old, suite_manifest(tasks))  # every task has an expert there: all are shared
    if diff:
        raise SuiteChanged(f"The task suite differs from the one {src.root} was trained on:\n  "
                           + "\n  ".join(diff))


def reuse_warmups(lib: ExpertLibrary, source, base, tasks: list[Task], warmup: TrainConfig) -> TrainConfig:
    """Copy each task's private expert of `source` into `lib` as its warm-up expert (skipping those already
    there); return `warmup` with the steps, batch size and lr the copies were trained with."""
    src = ExpertLibrary.open(source, base=base)
    infos = {t.name: _private_expert(src, t.name) for t in tasks}
    missing = sorted(n for n, i in infos.items() if i is None)
    if missing:
        raise WarmupSourceError(f"{src.root} has no private expert for {', '.join(missing)}; "
                                f"it holds: {', '.join(src.names()) or 'nothing'}.")
    _check_suite(src, tasks)
    targets = sorted(warmup.targets or base.targets)
    for task, info in infos.items():
        seed = info.train.seed if info.train.init_seed is None else info.train.init_seed
        why = [f"init seed {seed} (warm-ups: {warmup.init_seed})" if seed != warmup.init_seed else "",
               f"rank {info.rank} (warm-ups: {warmup.rank})" if info.rank != warmup.rank else "",
               f"alpha {info.alpha} (warm-ups: {warmup.alpha})" if info.alpha != warmup.alpha else "",
               f"targets {info.target_modules} (warm-ups: {targets})" if sorted(info.target_modules) != targets
               else ""]
        why = [w for w in why if w]
        if why:
            raise WarmupSourceError(f"{src.root}'s expert {info.name!r} did not start from the warm-up init: "
                                    + "; ".join(why) + ". Pass the matching --init-seed/--rank/--alpha/--targets.")
    for task, info in infos.items():
        name = warmup_name(task)
        if name in lib:
            continue
        expert = src[info.name]
        expert.info = replace(expert.info, name=name, kind="warmup", cluster=None,
                              train=replace(expert.info.train, init_seed=warmup.init_seed))
        lib.add(expert)
    first = next(iter(infos.values())).train  # the record keeps the fewest steps; per-expert ones are in each info
    return replace(warmup, steps=min(i.train.steps for i in infos.values()), batch_size=first.batch_size,
                   lr=first.lr)
