"""Where a build's experts are trained, and the driver loop that stores them as they arrive.

Usage::

    jobs = [ExpertJob("add", "private", [add_task], TrainConfig(steps=150), where="[1/16]"), ...]
    failed = run_jobs(lib, jobs, LocalExecutor(), base, torch.bfloat16)    # in this process, one after another
    with RayExecutor(address="auto") as ex:                               # ray_build.py: one Ray task per expert
        failed = run_jobs(lib, jobs, ex, base, torch.bfloat16)
    if failed:
        raise BuildFailed(failed)                                         # {name: error}

An executor turns jobs into a stream of events (`Started`, `Finished`, `Failed`) in whatever order the experts
finish. `run_jobs` is the only writer: it stores each finished expert with the store's atomic `add`, so the
library may sit on the driver's local disk and a build interrupted at any point keeps what it stored (a re-run
skips those experts). A failed expert is reported by name while the others go on.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field, replace

import torch

from library_store.expert import ExpertInfo, LoraExpert
from library_store.tasks import Task
from library_store.training.train import TrainConfig


class BuildFailed(RuntimeError):
    """Some experts could not be trained (after retries); the others were stored."""

    def __init__(self, failed: dict[str, str]):
        self.failed = dict(failed)
        lines = "\n".join(f"  {name}: {error}" for name, error in sorted(self.failed.items()))
        super().__init__(f"{len(self.failed)} expert(s) failed and were not stored:\n{lines}\n"
                         "Fix the cause and re-run the same command: the stored experts are skipped.")


class ExecutorUnavailable(ConnectionError):
    """The executor cannot start (e.g. no Ray cluster at the given address); nothing was trained or written."""


@dataclass
class ExpertJob:
    """One expert to train: what `train_expert` needs, plus where it goes in the library."""

    name: str
    kind: str  # private | warmup | cluster
    tasks: list[Task]
    config: TrainConfig
    cluster: str | None = None
    replace: bool = False  # overwrite a stored expert of that name (a cluster whose members changed)
    where: str = ""  # log label, e.g. "[3/16]"


@dataclass
class Started:
    name: str
    node: str = ""  # host or Ray node address
    pid: int = 0  # the worker process training it


@dataclass
class Finished:
    job: ExpertJob
    expert: LoraExpert  # weights already in the save dtype (Ray) or not yet (local)
    fingerprint: dict | None = None  # of the base model the worker trained on; None: the driver's own
    worker: str = ""


@dataclass
class Failed:
    job: ExpertJob
    error: str


Event = Started | Finished | Failed


def slim_task(task: Task) -> Task:
    """What training reads of a task (its name and train split): less to ship to a worker."""
    return replace(task, heldout=[], paraphrase=[])


def pack(expert: LoraExpert, dtype: torch.dtype, fingerprint: dict, wall: float, worker: str) -> dict:
    """A trained expert as plain data for Ray's object store: safetensors bytes + its record as a dict."""
    from safetensors.torch import save

    info = expert.info.to_dict()
    info["train"]["wall_seconds"] = round(wall, 2)
    weights = save({k: v.to(dtype).contiguous() for k, v in expert.weights.items()})
    return {"info": info, "weights": weights, "fingerprint": fingerprint, "worker": worker}


def unpack(payload: dict) -> LoraExpert:
    """`pack`'s inverse (safetensors, never pickle)."""
    from safetensors.torch import load

    return LoraExpert(ExpertInfo.from_dict(payload["info"]), load(payload["weights"]))


@dataclass
class LocalExecutor:
    """Train the jobs in this process, in order, on the driver's base model (the default executor).
    `train` is `train_expert`'s signature; build.py passes its own so tests can wrap it."""

    train: Callable | None = None
    attempts: dict[str, int] = field(default_factory=dict)  # name -> times started, this run

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start(self) -> None:
        pass

    def run(self, jobs: list[ExpertJob], base, dtype: torch.dtype | None = None) -> Iterator[Event]:
        import os
        import socket

        from library_store.training.train import train_expert

        train = self.train or train_expert
        self.attempts = {}
        for job in jobs:
            self.attempts[job.name] = self.attempts.get(job.name, 0) + 1
            yield Started(job.name, socket.gethostname(), os.getpid())
            start = time.perf_counter()
            try:
                expert = train(base, job.tasks, job.name, job.kind, job.config, cluster=job.cluster)
            except Exception as exc:  # reported by name; KeyboardInterrupt still stops the build
                yield Failed(job, f"{type(exc).__name__}: {exc}")
                continue
            expert.info.train.wall_seconds = round(time.perf_counter() - start, 2)
            yield Finished(job, expert, worker="local")


def _log(bar, msg: str) -> None:
    bar.write(msg, file=sys.stderr)
    sys.stderr.flush()


def run_jobs(lib, jobs: list[ExpertJob], executor, base, dtype: torch.dtype, desc: str = "experts",
             progress: bool = True) -> dict[str, str]:
    """Run `jobs` on `executor`, storing each expert atomically as it arrives; returns {name: error} of the
    experts that failed. One bar over the experts, with done / running / failed counts."""
    from tqdm.auto import tqdm

    failed: dict[str, str] = {}
    running: set[str] = set()
    done = 0
    bar = tqdm(total=len(jobs), desc=desc, unit="expert", disable=not progress or not jobs, file=sys.stderr)
    try:
        with closing(executor.run(jobs, base, dtype)) as events:  # closing: an interrupted build cancels the rest
            for event in events:
                if isinstance(event, Started):
                    running.add(event.name)
                else:
                    running.discard(event.job.name)
                    error = _store(lib, event, dtype) if isinstance(event, Finished) else event.error
                    if error:
                        failed[event.job.name] = error
                        _log(bar, f"{event.job.where} {event.job.name}: FAILED: {error}")
                    else:
                        done += 1
                        _log(bar, _done_line(event))
                bar.set_postfix(done=done, running=len(running), failed=len(failed), refresh=False)
                bar.update(0 if isinstance(event, Started) else 1)
    finally:
        bar.close()
    return failed


def _store(lib, event: Finished, dtype: torch.dtype) -> str | None:
    """Store a finished expert (the store's atomic add); the reason it cannot be stored, or None."""
    from library_store.models import same_model

    if event.fingerprint is not None and not same_model(lib.fingerprint, event.fingerprint):
        return (f"the worker {event.worker} trained on another base model ({event.fingerprint.get('source')}) "
                "than the library's")
    expert = event.expert
    lib.add(LoraExpert(expert.info, {k: v.to(dtype) for k, v in expert.weights.items()}), replace=event.job.replace)
    return None


def _done_line(event: Finished) -> str:
    job, rec = event.job, event.expert.info.train
    loss = f"{rec.final_loss:.3f}" if rec.final_loss is not None else "n/a"
    on = "" if event.worker in ("", "local") else f" on {event.worker}"
    return f"{job.where} {job.name}: {job.config.steps} steps in {rec.wall_seconds or 0:.0f} s{on}, final loss {loss}"
