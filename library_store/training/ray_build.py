"""Train a build's experts on a Ray cluster: one Ray task per expert, retried on failure.

Usage::

    with RayExecutor(address="auto", cpus_per_expert=4, gpus_per_expert=1) as ex:   # join `ray start` cluster
        build_private(base, tasks, "libs/flan", TrainConfig(), executor=ex)
    RayExecutor()              # no address: starts a local Ray on this machine (all its CPUs)

    python -m library_store build private ... --executor ray --ray-address auto --gpus-per-expert 1

Each worker process loads the base model once (cached by source, targets, dtype and device) and trains one
expert per task call; it sends back the adapter as safetensors bytes plus its record as a dict, through
Ray's object store (no pickled model). The driver stores them (executor.run_jobs), so only the driver touches
the library. A task whose worker dies (killed, out of memory, node lost) is retried up to `max_retries`
times, as is one that raised a RuntimeError or OSError (CUDA out of memory, a model cache being written);
a ValueError (a bad task or setting) fails at once. Workers set torch's thread count explicitly, so an
expert built here equals, bit for bit, the one a local build makes with the same thread count.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from library_store.training.executor import (ExecutorUnavailable, ExpertJob, Failed, Finished, Started, pack,
                                             slim_task, unpack)

CONNECT_TIMEOUT_S = 5.0  # ray.init on an unreachable address retries for minutes; we probe first
RETRIED = (RuntimeError, OSError, MemoryError)  # exceptions worth another try (a ValueError is not)
POLL_S = 0.2
WORKER_START_S = 300  # a first worker imports torch and transformers: seconds, minutes on a loaded node


@dataclass(frozen=True)
class BaseSpec:
    """How a worker loads the driver's base model (each node needs the model cache or the model folder)."""

    source: str  # built-in name, HF id or path, as load_base_model takes it
    targets: tuple[str, ...] | None = None
    dtype: str = "float32"

    @classmethod
    def of(cls, base) -> "BaseSpec":
        dtype = str(next(base.model.parameters()).dtype).removeprefix("torch.")
        return cls(base.source, tuple(base.targets), dtype)


_BASES: dict = {}  # (BaseSpec, device) -> BaseModel, one per worker process


def _worker_base(spec: BaseSpec, device: str):
    from library_store.models import load_base_model

    key = (spec, device)
    if key not in _BASES:
        base = load_base_model(spec.source, dtype=getattr(torch, spec.dtype),
                               targets=list(spec.targets) if spec.targets else None)
        base.model.to(device)
        _BASES[key] = base
    return _BASES[key]


def _worker_device(device: str) -> str:
    """"auto": the GPU Ray gave this task (CUDA_VISIBLE_DEVICES is set to it), else the CPU."""
    if device != "auto":
        return device
    import ray

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def train_on_worker(spec: BaseSpec, job: ExpertJob, save_dtype: str, threads: int, device: str,
                    tracker) -> dict:
    """The Ray task body: train one expert on this worker's cached base model; return `pack`'s plain data."""
    from library_store.training.train import train_expert

    where = f"{socket.gethostname()}:{os.getpid()}"
    tracker.started.remote(job.name, socket.gethostname(), os.getpid())
    torch.set_num_threads(threads)  # Ray sets OMP threads per task; torch's pool must match for determinism
    device = _worker_device(device)
    base = _worker_base(spec, device)
    start = time.perf_counter()
    config = replace(job.config, progress=False, device=device)  # no per-step bars from workers
    expert = train_expert(base, job.tasks, job.name, job.kind, config, cluster=job.cluster)
    return pack(expert, getattr(torch, save_dtype), base.fingerprint, time.perf_counter() - start, where)


class _Tracker:
    """A zero-CPU actor the workers tell when they start an expert: the bar's running count (and tests)."""

    def __init__(self):
        self.events: list[tuple[str, str, int]] = []

    def started(self, name: str, node: str, pid: int) -> None:
        self.events.append((name, node, pid))

    def since(self, i: int) -> list[tuple[str, str, int]]:
        return self.events[i:]


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    return (host or "127.0.0.1", int(port)) if port.isdigit() else None


def resolve_address(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None (start a local Ray) or a reachable `host:port` / `ray://host:port`; "auto" is the cluster
    `ray start` left on this node (or $RAY_ADDRESS). Raises ExecutorUnavailable within `timeout` seconds."""
    if address in (None, "", "local"):
        return None
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as exc:
            found, why = None, str(exc)
        else:
            why = "no cluster recorded on this node"
        if not found:
            raise ExecutorUnavailable(f"--ray-address auto: no running Ray cluster found ({why}). Start one with "
                                      "`ray start --head` (see docs/cluster.md), or drop --ray-address to start "
                                      "a local one.")
        address = found
    target = _host_port(address)
    if target is None:
        raise ExecutorUnavailable(f"--ray-address {address!r} is not HOST:PORT or auto.")
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        raise ExecutorUnavailable(f"Cannot reach a Ray cluster at {address} ({exc.strerror or exc}, waited at "
                                  f"most {timeout:.0f} s); nothing was trained or written. Is `ray start --head` "
                                  "running there, and the port open?") from None
    return address


class RayExecutor:
    """Run ExpertJobs as Ray tasks (see the module docstring). Reuses a Ray this process already started
    (notebooks, tests); otherwise connects on `start()` and disconnects on `close()`."""

    def __init__(self, address: str | None = None, cpus_per_expert: float = 1, gpus_per_expert: float = 0,
                 max_retries: int = 2, threads: int | None = None, device: str = "auto",
                 on_start: Callable[[Started], None] | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        if cpus_per_expert <= 0 or gpus_per_expert < 0 or max_retries < 0:
            raise ValueError("--cpus-per-expert must be > 0, --gpus-per-expert and --max-retries >= 0.")
        self.address, self.connect_timeout = address, connect_timeout
        self.cpus, self.gpus, self.max_retries = cpus_per_expert, gpus_per_expert, max_retries
        self.threads = threads or max(1, int(cpus_per_expert))
        self.device, self.on_start = device, on_start
        self.attempts: dict[str, int] = {}  # name -> times a worker started it, this run (retries show as > 1)
        self._owns_ray = self._started = False

    def __enter__(self) -> "RayExecutor":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        import ray

        if self._started:
            return
        address = resolve_address(self.address, self.connect_timeout)  # before anything touches a library
        self._started = True
        if ray.is_initialized():
            return
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # workers import library_store: from an installed package, or from this checkout on a local Ray
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}
        ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False,
                 runtime_env=env if address is None else None)
        self._owns_ray = True

    def close(self) -> None:
        import ray

        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = self._started = False

    def _task(self):
        import ray

        # max_calls=0: keep the worker (and its cached base model) for the next expert; Ray's GPU default
        # would restart the worker after every task and reload the model each time
        return ray.remote(max_calls=0)(train_on_worker).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.max_retries, retry_exceptions=list(RETRIED))

    def run(self, jobs: list[ExpertJob], base, dtype: torch.dtype) -> Iterator:
        import ray

        self.start()
        self.attempts = {}
        spec = BaseSpec.of(base)
        tracker = ray.remote(num_cpus=0)(_Tracker).remote()
        try:
            ray.get(tracker.since.remote(0), timeout=WORKER_START_S)  # a worker of the cluster imports us
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            ray.kill(tracker)
            raise ExecutorUnavailable(f"Ray workers cannot run library_store ({_reason(exc, 1)}). Every node "
                                      "needs the package (see docs/cluster.md).") from None
        task = self._task()
        save_dtype = str(dtype).removeprefix("torch.")  # workers send the weights already cast: less to ship
        pending = {task.remote(spec, replace(job, tasks=[slim_task(t) for t in job.tasks]), save_dtype,
                               self.threads, self.device, tracker): job for job in jobs}
        seen = 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for name, node, pid in ray.get(tracker.since.remote(seen)):
                    seen += 1
                    self.attempts[name] = self.attempts.get(name, 0) + 1
                    event = Started(name, node, pid)
                    if self.on_start:
                        self.on_start(event)
                    yield event
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        payload = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        yield Failed(job, _reason(exc, self.attempts.get(job.name, 1)))
                        continue
                    yield Finished(job, unpack(payload), payload["fingerprint"], payload["worker"])
        finally:
            for ref in pending:  # an interrupted driver leaves no expert training on the cluster
                ray.cancel(ref, force=True)
            ray.kill(tracker)


def _reason(exc, attempts: int) -> str:
    """One line: the worker's own exception, or why the worker went away (after its retries)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        lines = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {lines[0] if lines else ''}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__} after {attempts} attempt(s): {lines[0] if lines else ''}"
