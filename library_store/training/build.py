"""Whole-library builds: one private expert per task, or MBC (warm-up experts -> clusters -> cluster experts).

Usage::

    python -m library_store build private --base-model smollm2-135m-instruct --tasks builtin --out libs/private
    python -m library_store build mbc --base-model smollm2-135m-instruct --tasks builtin --clusters 4 \\
        --warmup-steps 12 --out libs/mbc

    build_private(base, tasks, "libs/private", TrainConfig(steps=150))
    build_mbc(base, tasks, "libs/mbc", k=4, warmup=TrainConfig(steps=25, init_seed=0), train=TrainConfig())

    # the same on a Ray cluster, one task per expert (docs/cluster.md); the driver stores every expert
    python -m library_store build private ... --executor ray --ray-address auto --gpus-per-expert 1
    with RayExecutor(address="auto") as ex:
        build_private(base, tasks, "libs/private", TrainConfig(), executor=ex)

Both are resumable: an expert already in the library is skipped, so re-running an interrupted build finishes
it. Every warm-up expert starts from the same seeded LoRA init (recorded as derived data `mbc-init`) and MBC
clusters what training changed (W - W_init; a measured pitfall, see docs/design.md), a choice recorded with
the clusters. The warm-up cosine matrix and the 2-D map are stored as `MBCData` (derived data `mbc-similarity`,
`mbc-map`), so the page never runs UMAP at start-up.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace

import torch

from library_store.training.cluster_rename import rename_clusters
from library_store.training.mbc import (INIT_KIND, MBCConfig, MBCData, adjusted_rand, cluster_name, mbc_cluster,
                                        read_mbc, warmup_name)
from library_store.store.library import ExpertLibrary
from library_store.tasks import Task
from library_store.training.executor import BuildFailed, ExpertJob, LocalExecutor, run_jobs
from library_store.training.suite_guard import SuiteChanged, check_suite
from library_store.training.train import TrainConfig, lora_init_state, train_expert
from library_store.training.warmup_from import WarmupSourceError, reuse_warmups

SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _local_train(*args, **kwargs):
    return train_expert(*args, **kwargs)  # looked up at call time, so a test can wrap train_expert


def _executor(executor):
    """The given executor, started (an unreachable cluster fails here, before the library is touched), or a
    LocalExecutor training in this process."""
    executor = executor or LocalExecutor(train=_local_train)
    executor.start()
    return executor


def _run(lib, jobs: list[ExpertJob], executor, base, dtype: torch.dtype, desc: str, progress: bool) -> None:
    failed = run_jobs(lib, jobs, executor, base, dtype, desc=desc, progress=progress)
    if failed:
        raise BuildFailed(failed)


def build_private(base, tasks: list[Task], out, config: TrainConfig | None = None,
                  save_dtype: str = "bf16", rebuild: bool = False,
                  task_steps: dict[str, int] | None = None, executor=None) -> ExpertLibrary:
    """One expert per task, named after it (kind `private`); experts already present are skipped (resume),
    unless their task changed since they were trained (refused, or retrained with rebuild=True).
    task_steps overrides the step count per task (hard tasks get more). `executor`: where experts train
    (LocalExecutor by default, or ray_build.RayExecutor); raises BuildFailed naming the experts that failed
    after the others were stored."""
    config = config or TrainConfig()
    executor = _executor(executor)
    lib = ExpertLibrary.open_or_create(out, base)
    for name in check_suite(lib, tasks, rebuild):
        if name in lib:
            _log(f"{name}: its task changed since it was trained: removed, to be retrained (--rebuild)")
            lib.remove(name)
    start = time.perf_counter()
    jobs = []
    for i, task in enumerate(tasks, 1):
        if task.name in lib:
            _log(f"[{i}/{len(tasks)}] {task.name}: already in the library, skipped")
            continue
        steps = (task_steps or {}).get(task.name, config.steps)
        jobs.append(ExpertJob(task.name, "private", [task], replace(config, steps=steps),
                              where=f"[{i}/{len(tasks)}]"))
    _run(lib, jobs, executor, base, SAVE_DTYPES[save_dtype], "private experts", config.progress)
    _log(f"private library {out}: {len(lib)} experts, {time.perf_counter() - start:.0f} s")
    return lib


def _check_k(k: int, n: int) -> None:
    if k < 2:
        raise ValueError(f"--clusters must be at least 2 (got {k}).")
    if k > n:
        raise ValueError(f"--clusters {k} is more than the {n} tasks; use at most {n}.")


def warmup_init(lib: ExpertLibrary, base, warmup: TrainConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """W_init of the warm-up experts, stored once as derived data (rounded like the experts, so W - W_init is
    exactly zero for an untouched weight)."""
    key = {"init_seed": warmup.init_seed, "rank": warmup.rank, "alpha": warmup.alpha,
           "targets": list(warmup.targets or base.targets), "dtype": str(dtype)}
    cached = lib.get_derived(INIT_KIND, key)
    if cached is not None:
        return cached[0]
    init = {k: v.to(dtype).cpu() for k, v in lora_init_state(base, warmup).items()}
    lib.put_derived(INIT_KIND, key, init, meta={"what": "shared LoRA init of the warm-up experts"})
    return init


def _cluster(lib, tasks, names, init, mbc: MBCConfig, warmup: TrainConfig, key: dict,
             warmup_from: str | None = None) -> MBCData:
    """Run MBC on the stored warm-up experts; store the result (cosine matrix, map, labels) as MBCData."""
    threads = torch.get_num_threads()
    result = mbc_cluster([lib[n] for n in names], mbc.k, init=init, config=mbc)
    # scikit-learn's threadpoolctl resets OpenMP's thread count on exit, which torch shares: restore ours, or
    # the cluster experts train with oversubscribed threads (a step took 57 s with 2 threads against 10 s
    # with 1 on a busy 2-core machine)
    torch.set_num_threads(threads)
    families = [t.family for t in tasks]
    data = MBCData(tasks=[t.name for t in tasks], experts=names, labels=result.labels.tolist(),
                   similarity=result.similarity, coords=result.coords, method=result.map_method,
                   raw_similarity=result.raw_similarity, families=families,
                   ari_vs_families=adjusted_rand(result.labels, families),
                   settings={"mbc": mbc.to_dict(), "warmup": asdict(warmup),
                             **({"warmup_from": str(warmup_from)} if warmup_from else {})})
    for c, members in data.clusters.items():
        _log(f"{c}: {', '.join(members)}")
    _log(f"adjusted Rand index of the clusters vs the task families: {data.ari_vs_families:.3f}")
    data.write(lib, key)
    return data


def build_mbc(base, tasks: list[Task], out, k: int, warmup: TrainConfig | None = None,
              train: TrainConfig | None = None, mbc: MBCConfig | None = None,
              save_dtype: str = "bf16", rebuild: bool = False, executor=None,
              warmup_from=None) -> ExpertLibrary:
    """Warm-up expert per task -> MBC clusters -> one cluster expert per cluster (see the module docstring).
    `warmup_from`: a private library whose experts are copied in as the warm-ups (training/warmup_from.py).
    Refuses to resume on a changed task suite; rebuild=True then retrains every expert (clusters depend on all).
    Warm-ups and cluster experts train on `executor` (as in build_private); the clustering runs here. A failed
    warm-up stops the build before the clustering (BuildFailed)."""
    _check_k(k, len(tasks))
    executor = _executor(executor)
    dtype = SAVE_DTYPES[save_dtype]
    warmup = warmup or TrainConfig(steps=25)
    if warmup.init_seed is None:
        warmup = replace(warmup, init_seed=warmup.seed)
    train = train or TrainConfig()
    mbc = mbc or MBCConfig(k=k)
    mbc.k = k
    lib = ExpertLibrary.open_or_create(out, base)
    if check_suite(lib, tasks, rebuild):
        _log("the task suite changed since this library was built: every expert is retrained (--rebuild)")
        for name in lib.names():
            lib.remove(name)
    start = time.perf_counter()
    init = warmup_init(lib, base, warmup, dtype)

    if warmup_from is not None:
        warmup = reuse_warmups(lib, warmup_from, base, tasks, warmup)
        _log(f"warm-up experts copied from {warmup_from} (from {warmup.steps} steps x {warmup.batch_size})")
    names = [warmup_name(t.name) for t in tasks]
    jobs = []
    for i, (task, name) in enumerate(zip(tasks, names), 1):
        if name in lib:
            _log(f"[warm-up {i}/{len(tasks)}] {name}: already in the library, skipped")
            continue
        jobs.append(ExpertJob(name, "warmup", [task], warmup, where=f"[warm-up {i}/{len(tasks)}]"))
    _run(lib, jobs, executor, base, dtype, "warm-up experts", warmup.progress)
    _log(f"warm-up done in {time.perf_counter() - start:.0f} s")

    by_task = {t.name: t for t in tasks}
    key = {"experts": {n: lib.info(n).checksum for n in names}, "mbc": mbc.to_dict()}
    data = read_mbc(lib, key)
    if data is not None:  # resumed after the clustering: same warm-up experts, same settings, same clusters
        _log(f"clusters of an earlier run reused (ARI vs families {data.ari_vs_families:.3f})")
    else:
        data = _cluster(lib, tasks, names, init, mbc, warmup, key, warmup_from)
    clusters = data.clusters
    lib.set_clusters(clusters)
    for name, label in zip(names, data.labels):  # each warm-up expert records its cluster
        if lib.info(name).cluster != cluster_name(label):
            expert = lib[name]
            expert.info.cluster = cluster_name(label)
            lib.add(expert, replace=True)

    rename_clusters(lib, clusters)
    jobs = []
    for i, (cname, members) in enumerate(clusters.items(), 1):
        if cname in lib and sorted(lib.info(cname).tasks) == sorted(members):
            _log(f"[cluster {i}/{k}] {cname}: already in the library, skipped")
            continue
        jobs.append(ExpertJob(cname, "cluster", [by_task[m] for m in members], train, cluster=cname,
                              replace=cname in lib, where=f"[cluster {i}/{k}]"))
    _run(lib, jobs, executor, base, dtype, "cluster experts", train.progress)
    for stale in [i.name for i in lib.infos() if i.kind == "cluster" and i.name not in clusters]:
        lib.remove(stale)  # a cluster of an earlier run with another K
    _log(f"MBC library {out}: {len(lib)} experts, {time.perf_counter() - start:.0f} s")
    return lib


# ---------------------------------------------------------------- CLI


def _train_args(p, prefix: str = "", steps: int = 150, what: str = "") -> None:
    d = TrainConfig()
    p.add_argument(f"--{prefix}steps", type=int, default=steps, help=f"optimizer steps per {what}expert")
    p.add_argument(f"--{prefix}batch-size", type=int, default=d.batch_size)
    p.add_argument(f"--{prefix}lr", type=float, default=d.lr)


def _common(p) -> None:
    d = TrainConfig()
    p.add_argument("--base-model", default="smollm2-135m-instruct", help="built-in name, HF id or local path")
    p.add_argument("--tasks", required=True, help="builtin | builtin:a,b | variants | bigbench:a,b | jsonl:DIR")
    p.add_argument("--out", required=True, help="library folder (created, or resumed)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--warmup-frac", type=float, default=d.warmup, help="fraction of steps with lr warm-up")
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--no-chat", action="store_true", help="train on raw inputs, without the chat template")
    p.add_argument("--targets", default=None, help="LoRA target modules, comma-separated (default: attention)")
    p.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is fastest on a busy machine: spinning threads fight over cores)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rebuild", action="store_true",
                   help="retrain experts whose task suite changed since they were built (default: refuse)")
    _executor_args(p)


def _config(args, prefix: str = "") -> TrainConfig:
    get = lambda n: getattr(args, prefix.replace("-", "_") + n)  # noqa: E731
    return TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, steps=get("steps"),
                       batch_size=get("batch_size"), lr=get("lr"), warmup=args.warmup_frac, seed=args.seed,
                       max_len=args.max_len, chat=not args.no_chat,
                       targets=args.targets.split(",") if args.targets else None, progress=not args.no_progress,
                       device=_local_device(args))


def _local_device(args) -> str:
    """Where a local build trains: --device, with "auto" meaning the CPU (Ray workers resolve their own)."""
    return "cpu" if args.executor == "ray" or args.device == "auto" else args.device


def _setup(args):
    from library_store.models import load_base_model
    from library_store.tasks import resolve_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = resolve_tasks(args.tasks, seed=args.seed)
    base = load_base_model(args.base_model, targets=args.targets.split(",") if args.targets else None)
    base.model.to(_local_device(args))
    return base, tasks


def _make_executor(args):
    """--executor local|ray and its flags -> an executor (not yet started)."""
    if args.executor == "local":
        used = [f for f, v in (("--ray-address", args.ray_address), ("--gpus-per-expert", args.gpus_per_expert),
                               ("--cpus-per-expert", args.cpus_per_expert)) if v]
        if used:
            raise ValueError(f"{', '.join(used)} only apply with --executor ray.")
        return LocalExecutor(train=_local_train)
    from library_store.training.ray_build import RayExecutor

    return RayExecutor(address=args.ray_address, cpus_per_expert=args.cpus_per_expert or 1,
                       gpus_per_expert=args.gpus_per_expert or 0, max_retries=args.max_retries,
                       threads=args.threads, device=args.device)


def _task_steps(text: str | None) -> dict[str, int]:
    """'subtract=450,add=300' -> {'subtract': 450, 'add': 300}."""
    out = {}
    for part in filter(None, (text or "").split(",")):
        name, _, steps = part.partition("=")
        if not steps.strip().isdigit() or int(steps) < 1:
            raise ValueError(f"--task-steps wants NAME=STEPS (STEPS >= 1), comma-separated; got {part!r}")
        out[name.strip()] = int(steps)
    return out


def cmd_build_private(args) -> int:
    task_steps = _task_steps(args.task_steps)
    with _make_executor(args) as executor:  # connects first: an unreachable cluster fails before any work
        base, tasks = _setup(args)
        unknown = sorted(set(task_steps) - {t.name for t in tasks})
        if unknown:
            raise ValueError(f"--task-steps names tasks not in this build: {unknown}")
        return _finish(lambda: build_private(base, tasks, args.out, _config(args), save_dtype=args.save_dtype,
                                             rebuild=args.rebuild, task_steps=task_steps, executor=executor))


def _finish(build) -> int:
    """Exit status of a build: 2 for a refused suite change, 1 when experts failed (named), else 0."""
    try:
        build()
    except (SuiteChanged, WarmupSourceError) as exc:
        _log(str(exc))
        return 2
    except BuildFailed as exc:
        _log(str(exc))
        return 1
    return 0


def cmd_build_mbc(args) -> int:
    from library_store.tasks import resolve_tasks

    _check_k(args.clusters, len(resolve_tasks(args.tasks, seed=args.seed)))  # refuse before loading a model
    with _make_executor(args) as executor:
        base, tasks = _setup(args)
        warm = replace(_config(args, "warmup-"), init_seed=args.init_seed)
        mbc = MBCConfig(k=args.clusters, sparsity=args.sparsity, delta=not args.no_delta, seed=args.seed,
                        map_method=args.map_method)
        return _finish(lambda: build_mbc(base, tasks, args.out, args.clusters, warm, _config(args), mbc,
                                         save_dtype=args.save_dtype, rebuild=args.rebuild, executor=executor,
                                         warmup_from=args.warmup_from))


def _executor_args(p) -> None:
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where experts train: this process, one after another (local), or a Ray cluster, one "
                        "task per expert (ray; see docs/cluster.md)")
    p.add_argument("--ray-address", default=None,
                   help="ray: HOST:PORT of a running cluster, or auto (the one `ray start` left on this node); "
                        "none starts a local Ray on this machine")
    p.add_argument("--cpus-per-expert", type=float, default=None, help="ray: CPUs each expert's task reserves (1)")
    p.add_argument("--gpus-per-expert", type=float, default=None,
                   help="ray: GPUs each expert's task reserves (0); with a GPU the worker trains on it")
    p.add_argument("--max-retries", type=int, default=2,
                   help="ray: retries of an expert whose worker died or raised a RuntimeError/OSError")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ...; auto: the CPU locally, a Ray worker's GPU when it has one")


def add_build_commands(subparsers) -> None:
    """`build private|mbc` under the library CLI (`python -m library_store build ...`)."""
    build = subparsers.add_parser("build", help="train a library: private experts or MBC clusters")
    kinds = build.add_subparsers(dest="build_kind", required=True)
    p = kinds.add_parser("private", help="one expert per task")
    _common(p)
    _train_args(p)
    p.add_argument("--task-steps", default=None, help="per-task steps, e.g. subtract=450,add=300")
    p.set_defaults(func=cmd_build_private)
    p = kinds.add_parser("mbc", help="warm-up expert per task, MBC clusters, one expert per cluster")
    _common(p)
    _train_args(p, what="cluster ")
    p.add_argument("--clusters", type=int, required=True, help="K, between 2 and the number of tasks")
    _train_args(p, "warmup-", steps=25, what="warm-up ")
    p.add_argument("--init-seed", type=int, default=0, help="the LoRA init every warm-up expert starts from")
    p.add_argument("--warmup-from", default=None, metavar="LIBRARY",
                   help="copy each task's private expert of LIBRARY in as its warm-up instead of training one "
                        "(same base, task suite and LoRA init; the --warmup-* flags are then ignored)")
    p.add_argument("--sparsity", type=float, default=MBCConfig.sparsity, help="per-expert |w| quantile zeroed")
    p.add_argument("--no-delta", action="store_true", help="cluster raw weights, not W - W_init")
    p.add_argument("--map-method", choices=("auto", "umap", "pca"), default="auto",
                   help="2-D map: UMAP from 10 tasks up (auto), or PCA (no JIT compile, seconds)")
    p.set_defaults(func=cmd_build_mbc)
