"""A tiny library for the page's tests: random LoRA experts on tiny-random-llama, with an MBC map and
clusters stored the way the MBC build stores them, so the Library tab has something to show.

Usage::

    path = make_tiny_library(tmp_path / "lib", n_experts=5)
    # python app.py --base-model tiny-random-llama --library <path>
"""
from __future__ import annotations

import numpy as np
import torch

from library_store.models import load_base_model
from library_store.expert import ExpertInfo, LoraExpert, TrainRecord
from library_store.store.library import ExpertLibrary

TINY = "tiny-random-llama"
TASKS = ["reverse_word", "add_two", "capital_city", "sentiment", "sort_letters", "antonym"]


def random_expert(base, name: str, tasks: list[str], seed: int, rank: int = 4, cluster: str | None = None):
    """Random A and B (B not zero, so the expert changes the output) on every target of the base model."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for site, module in base.model.named_modules():
        if site.rsplit(".", 1)[-1] in base.targets and hasattr(module, "weight"):
            out, d = module.weight.shape
            key = f"base_model.model.{site}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, d, generator=gen) / d**0.5  # (r, d)
            state[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.5  # (out, r)
    info = ExpertInfo(name=name, kind="private", tasks=tasks, cluster=cluster, alpha=16.0,
                      train=TrainRecord(steps=10 + seed, final_loss=1.0 / (seed + 1)))
    return LoraExpert.from_state_dict(info, state)


def make_tiny_mbc_library(path, n_tasks: int = 6, k: int = 2, seed: int = 0) -> str:
    """Laid out like `build mbc` leaves it: warm-up adapters `warmup-<task>` (the map's data) and one
    `cluster-<c>` expert per cluster (the routed ones), clusters set, `mbc-similarity` and `mbc-map` stored."""
    base = load_base_model(TINY)
    lib = ExpertLibrary.create(path, base)
    tasks = TASKS[:n_tasks]
    labels = [i % k for i in range(n_tasks)]
    clusters = {f"cluster-{c}": [t for t, lab in zip(tasks, labels) if lab == c] for c in range(k)}
    for i, (task, lab) in enumerate(zip(tasks, labels)):
        expert = random_expert(base, f"warmup-{task}", [task], seed=seed + i, cluster=f"cluster-{lab}")
        expert.info.kind = "warmup"
        lib.add(expert)
    for c, members in clusters.items():
        expert = random_expert(base, c, members, seed=seed + 100 + len(members), cluster=c)
        expert.info.kind = "cluster"
        lib.add(expert)
    lib.set_clusters(clusters)
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n_tasks, 3))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    meta = {"tasks": tasks, "experts": [f"warmup-{t}" for t in tasks], "labels": labels, "clusters": clusters}
    key = {"experts": meta["experts"], "seed": seed}
    lib.put_derived("mbc-similarity", key, {"similarity": torch.tensor(emb @ emb.T, dtype=torch.float32),
                                            "labels": torch.tensor(labels)}, meta=meta)
    lib.put_derived("mbc-map", key, {"coords": torch.tensor(rng.normal(size=(n_tasks, 2)), dtype=torch.float32)},
                    meta={**meta, "method": "pca"})
    return str(path)


def make_tiny_library(path, n_experts: int = 5, with_map: bool = True, seed: int = 0) -> str:
    base = load_base_model(TINY)
    lib = ExpertLibrary.create(path, base)
    tasks = TASKS[:n_experts]
    clusters = {f"cluster{i % 2}": [t for j, t in enumerate(tasks) if j % 2 == i] for i in range(2)}
    for i, task in enumerate(tasks):
        lib.add(random_expert(base, task, [task], seed=seed + i, cluster=f"cluster{i % 2}" if with_map else None))
    if with_map:
        lib.set_clusters(clusters)
        rng = np.random.default_rng(seed)
        emb = rng.normal(size=(n_experts, 3))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        config = {"tasks": tasks, "seed": seed}
        lib.put_derived("mbc-map", config, {"coords": torch.tensor(rng.normal(size=(n_experts, 2)))},
                        {"tasks": tasks})
        lib.put_derived("mbc-similarity", config, {"similarity": torch.tensor(emb @ emb.T)}, {"tasks": tasks})
    return str(path)
