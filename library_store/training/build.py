"""Whole-library builds: one private expert per task, or MBC (warm-up experts -> clusters -> cluster experts).

Usage::

    python -m library_store build private --base-model smollm2-135m-instruct --tasks builtin --out libs/private
    python -m library_store build mbc --base-model smollm2-135m-instruct --tasks builtin --clusters 4 \\
        --warmup-steps 12 --out libs/mbc

    build_private(base, tasks, "libs/private", TrainConfig(steps=150))
    build_mbc(base, tasks, "libs/mbc", k=4, warmup=TrainConfig(steps=25, init_seed=0), train=TrainConfig())

Both are resumable: an expert already in the library is skipped, so re-running an interrupted build finishes
it. Every warm-up expert starts from the same seeded LoRA init (recorded as derived data `mbc-init`) and MBC
clusters what training changed (W - W_init; ALGORITHMS.md's measured pitfall), a choice recorded with the
clusters. The warm-up cosine matrix and the 2-D map are stored as derived data (`mbc-similarity`,
`mbc-map`), so the page never runs UMAP at start-up.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from library_store.training.mbc import MBCConfig, adjusted_rand, mbc_cluster
from library_store.expert import LoraExpert
from library_store.store.library import ExpertLibrary
from library_store.tasks import Task
from library_store.training.train import TrainConfig, lora_init_state, train_expert

SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
WARMUP_PREFIX, CLUSTER_PREFIX = "warmup-", "cluster-"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cast(expert: LoraExpert, dtype: torch.dtype) -> LoraExpert:
    return LoraExpert(expert.info, {k: v.to(dtype) for k, v in expert.weights.items()})


def _train_into(lib: ExpertLibrary, base, tasks: list[Task], name: str, kind: str, config: TrainConfig,
                dtype: torch.dtype, cluster: str | None = None, replace_existing: bool = False,
                where: str = "") -> None:
    start = time.perf_counter()
    expert = train_expert(base, tasks, name, kind, config, cluster=cluster)
    lib.add(_cast(expert, dtype), replace=replace_existing)
    _log(f"{where} {name}: {config.steps} steps in {time.perf_counter() - start:.0f} s, "
         f"final loss {expert.info.train.final_loss:.3f}")


def build_private(base, tasks: list[Task], out, config: TrainConfig | None = None,
                  save_dtype: str = "bf16") -> ExpertLibrary:
    """One expert per task, named after it (kind `private`); experts already present are skipped."""
    config = config or TrainConfig()
    lib = ExpertLibrary.open_or_create(out, base)
    start = time.perf_counter()
    for i, task in enumerate(tasks, 1):
        if task.name in lib:
            _log(f"[{i}/{len(tasks)}] {task.name}: already in the library, skipped")
            continue
        _train_into(lib, base, [task], task.name, "private", config, SAVE_DTYPES[save_dtype],
                    where=f"[{i}/{len(tasks)}]")
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
    cached = lib.get_derived("mbc-init", key)
    if cached is not None:
        return cached[0]
    init = {k: v.to(dtype) for k, v in lora_init_state(base, warmup).items()}
    lib.put_derived("mbc-init", key, init, meta={"what": "shared LoRA init of the warm-up experts"})
    return init


def _cluster(lib, base, tasks, names, init, mbc: MBCConfig, warmup: TrainConfig, key: dict) -> list[int]:
    """Run MBC on the stored warm-up experts; record the cosine matrix and the map as derived data."""
    threads = torch.get_num_threads()
    result = mbc_cluster([lib[n] for n in names], mbc.k, init=init, config=mbc)
    # scikit-learn's threadpoolctl resets OpenMP's thread count on exit, which torch shares: restore ours, or
    # the cluster experts train with oversubscribed threads (a step took 57 s with 2 threads against 10 s
    # with 1 on a busy 2-core machine)
    torch.set_num_threads(threads)
    families = [t.family for t in tasks]
    ari = adjusted_rand(result.labels, families)
    clusters = {f"{CLUSTER_PREFIX}{c}": [n.removeprefix(WARMUP_PREFIX) for n in members]
                for c, members in sorted(result.clusters().items())}
    for c, members in clusters.items():
        _log(f"{c}: {', '.join(members)}")
    _log(f"adjusted Rand index of the clusters vs the task families: {ari:.3f}")
    meta = {"tasks": [t.name for t in tasks], "experts": names, "families": families,
            "labels": result.labels.tolist(), "clusters": clusters, "mbc": mbc.to_dict(), "warmup": asdict(warmup),
            "ari_vs_families": ari}
    lib.put_derived("mbc-similarity", key, {
        "similarity": torch.tensor(result.similarity, dtype=torch.float32),  # (N, N) after sparsify + SVD
        "raw_similarity": torch.tensor(result.raw_similarity, dtype=torch.float32),  # (N, N) before
        "labels": torch.tensor(result.labels, dtype=torch.int64)}, meta=meta)
    lib.put_derived("mbc-map", key, {"coords": torch.tensor(result.coords, dtype=torch.float32)},  # (N, 2)
                    meta={**meta, "method": result.map_method})
    return [int(x) for x in result.labels]


def build_mbc(base, tasks: list[Task], out, k: int, warmup: TrainConfig | None = None,
              train: TrainConfig | None = None, mbc: MBCConfig | None = None,
              save_dtype: str = "bf16") -> ExpertLibrary:
    """Warm-up expert per task -> MBC clusters -> one cluster expert per cluster (see the module docstring)."""
    _check_k(k, len(tasks))
    dtype = SAVE_DTYPES[save_dtype]
    warmup = warmup or TrainConfig(steps=25)
    if warmup.init_seed is None:
        warmup = replace(warmup, init_seed=warmup.seed)
    train = train or TrainConfig()
    mbc = mbc or MBCConfig(k=k)
    mbc.k = k
    lib = ExpertLibrary.open_or_create(out, base)
    start = time.perf_counter()
    init = warmup_init(lib, base, warmup, dtype)

    names = [WARMUP_PREFIX + t.name for t in tasks]
    for i, (task, name) in enumerate(zip(tasks, names), 1):
        if name in lib:
            _log(f"[warm-up {i}/{len(tasks)}] {name}: already in the library, skipped")
            continue
        _train_into(lib, base, [task], name, "warmup", warmup, dtype, where=f"[warm-up {i}/{len(tasks)}]")
    _log(f"warm-up done in {time.perf_counter() - start:.0f} s")

    by_task = {t.name: t for t in tasks}
    key = {"experts": {n: lib.info(n).checksum for n in names}, "mbc": mbc.to_dict()}
    cached = lib.get_derived("mbc-similarity", key)
    if cached is not None:  # resumed after the clustering: same warm-up experts, same settings, same clusters
        labels = [int(x) for x in cached[0]["labels"].tolist()]
        _log(f"clusters of an earlier run reused (ARI vs families {cached[1]['ari_vs_families']:.3f})")
    else:
        labels = _cluster(lib, base, tasks, names, init, mbc, warmup, key)
    clusters: dict[str, list[str]] = {}
    for task, label in zip(tasks, labels):
        clusters.setdefault(f"{CLUSTER_PREFIX}{label}", []).append(task.name)
    clusters = dict(sorted(clusters.items()))
    lib.set_clusters(clusters)
    for name, label in zip(names, labels):  # each warm-up expert records its cluster
        info = lib.info(name)
        if info.cluster != f"{CLUSTER_PREFIX}{label}":
            expert = lib[name]
            expert.info.cluster = f"{CLUSTER_PREFIX}{label}"
            lib.add(expert, replace=True)

    for i, (cname, members) in enumerate(clusters.items(), 1):
        if cname in lib and sorted(lib.info(cname).tasks) == sorted(members):
            _log(f"[cluster {i}/{k}] {cname}: already in the library, skipped")
            continue
        _train_into(lib, base, [by_task[m] for m in members], cname, "cluster", train, dtype, cluster=cname,
                    replace_existing=cname in lib, where=f"[cluster {i}/{k}]")
    for stale in [n for n in lib.names() if n.startswith(CLUSTER_PREFIX) and n not in clusters]:
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


def _config(args, prefix: str = "") -> TrainConfig:
    get = lambda n: getattr(args, prefix.replace("-", "_") + n)  # noqa: E731
    return TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, steps=get("steps"),
                       batch_size=get("batch_size"), lr=get("lr"), warmup=args.warmup_frac, seed=args.seed,
                       max_len=args.max_len, chat=not args.no_chat,
                       targets=args.targets.split(",") if args.targets else None, progress=not args.no_progress)


def _setup(args):
    from library_store.models import load_base_model
    from library_store.tasks import resolve_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = resolve_tasks(args.tasks, seed=args.seed)
    base = load_base_model(args.base_model, targets=args.targets.split(",") if args.targets else None)
    return base, tasks


def cmd_build_private(args) -> int:
    base, tasks = _setup(args)
    build_private(base, tasks, args.out, _config(args), save_dtype=args.save_dtype)
    return 0


def cmd_build_mbc(args) -> int:
    from library_store.tasks import resolve_tasks

    _check_k(args.clusters, len(resolve_tasks(args.tasks, seed=args.seed)))  # refuse before loading a model
    base, tasks = _setup(args)
    warm = replace(_config(args, "warmup-"), init_seed=args.init_seed)
    mbc = MBCConfig(k=args.clusters, sparsity=args.sparsity, delta=not args.no_delta, seed=args.seed,
                    map_method=args.map_method)
    build_mbc(base, tasks, args.out, args.clusters, warm, _config(args), mbc, save_dtype=args.save_dtype)
    return 0


def add_build_commands(subparsers) -> None:
    """`build private|mbc` under the library CLI (`python -m library_store build ...`)."""
    build = subparsers.add_parser("build", help="train a library: private experts or MBC clusters")
    kinds = build.add_subparsers(dest="build_kind", required=True)
    p = kinds.add_parser("private", help="one expert per task")
    _common(p)
    _train_args(p)
    p.set_defaults(func=cmd_build_private)
    p = kinds.add_parser("mbc", help="warm-up expert per task, MBC clusters, one expert per cluster")
    _common(p)
    _train_args(p, what="cluster ")
    p.add_argument("--clusters", type=int, required=True, help="K, between 2 and the number of tasks")
    _train_args(p, "warmup-", steps=25, what="warm-up ")
    p.add_argument("--init-seed", type=int, default=0, help="the LoRA init every warm-up expert starts from")
    p.add_argument("--sparsity", type=float, default=MBCConfig.sparsity, help="per-expert |w| quantile zeroed")
    p.add_argument("--no-delta", action="store_true", help="cluster raw weights, not W - W_init")
    p.add_argument("--map-method", choices=("auto", "umap", "pca"), default="auto",
                   help="2-D map: UMAP from 4 tasks up (auto), or PCA (no JIT compile, seconds)")
    p.set_defaults(func=cmd_build_mbc)
