"""Test and bench material: tiny random base models, random LoRA experts, tiny libraries laid out like builds.

Usage::

    base = load_base_model("tiny-random-llama")            # built by library_store/tiny_models.py
    expert = random_expert(base, "e0", tasks=["add"], seed=0)   # B is not zero: it changes the output
    path = make_tiny_mbc_library(tmp_path / "mbc", n_tasks=6, k=2)   # warm-up + cluster experts, MBC data

Everything here is deterministic per seed. Nothing in the product imports this module; the twins themselves
are a base-model source (`library_store/tiny_models.py`), so the page and the CLI can run on them.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from library_store.expert import PEFT_PREFIX, ExpertInfo, LoraExpert, TrainRecord, parse_site
from library_store.tiny_models import tiny_random_model  # noqa: F401  (re-exported for tests)
from library_store.training.mbc import MBCData, cluster_name, warmup_name

TINY = "tiny-random-llama"
TASKS = ["reverse_word", "add_two", "capital_city", "sentiment", "sort_letters", "antonym"]


# ---------------------------------------------------------------- random experts


def expert_sites(base, targets: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """site -> (d_in, d_out) of every LoRA target: from a BaseModel, an nn.Module (with `targets`), or a
    ready mapping site -> (d_in, d_out) (lets store tests skip building a model)."""
    if isinstance(base, Mapping):
        return {site: tuple(shape) for site, shape in base.items()}
    model = base.model if hasattr(base, "model") and hasattr(base, "targets") else base
    targets = targets or getattr(base, "targets", None)
    if not targets:
        raise ValueError("random_expert needs the target module names (a BaseModel carries them).")
    sites = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features"):
            try:
                parse_site(name)  # only decoder-layer sites
            except LookupError:
                continue
            sites[name] = (module.in_features, module.out_features)
    return sites


@torch.no_grad()
def random_expert(base, name: str, tasks=(), seed: int = 0, rank: int = 4, alpha: float = 16.0,
                  kind: str = "private", cluster: str | None = None, targets: list[str] | None = None,
                  scale: float = 0.5, train: TrainRecord | None = None) -> LoraExpert:
    """A LoRA expert with random A (r, d_in) / sqrt(d_in) and random B (d_out, r) * scale at every target
    site of `base` (see `expert_sites`); the same seed gives the same weights."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for site, (d_in, d_out) in expert_sites(base, targets).items():
        weights[f"{PEFT_PREFIX}{site}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / d_in ** 0.5
        weights[f"{PEFT_PREFIX}{site}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * scale
    info = ExpertInfo(name=name, kind=kind, tasks=list(tasks), cluster=cluster, rank=rank, alpha=alpha,
                      train=train or TrainRecord())
    return LoraExpert.from_state_dict(info, weights)


# ---------------------------------------------------------------- tiny libraries


def _fake_mbc(tasks: list[str], experts: list[str], labels: list[int], seed: int) -> MBCData:
    """MBC data with random (but valid) matrices: a unit-vector cosine matrix and 2-D coordinates."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(len(tasks), 3))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return MBCData(tasks=tasks, experts=experts, labels=labels, similarity=emb @ emb.T,
                   coords=rng.normal(size=(len(tasks), 2)), method="pca")


def _record(seed: int) -> TrainRecord:
    return TrainRecord(steps=10 + seed, final_loss=1.0 / (seed + 1))  # something for the experts table


def make_tiny_mbc_library(path, n_tasks: int = 6, k: int = 2, seed: int = 0, base=None) -> str:
    """Laid out like `build mbc` leaves it: warm-up experts `warmup-<task>` (the map's data), one
    `cluster-<i>` expert per cluster (the routed ones), the cluster table, and the MBC data."""
    from library_store.models import load_base_model
    from library_store.store.library import ExpertLibrary

    base = base or load_base_model(TINY)
    lib = ExpertLibrary.create(path, base)
    tasks = TASKS[:n_tasks]
    data = _fake_mbc(tasks, [warmup_name(t) for t in tasks], [i % k for i in range(n_tasks)], seed)
    for i, (task, label) in enumerate(zip(tasks, data.labels)):
        lib.add(random_expert(base, warmup_name(task), [task], seed=seed + i, kind="warmup",
                              cluster=cluster_name(label), train=_record(seed + i)))
    for c, members in data.clusters.items():
        s = seed + 100 + len(members)
        lib.add(random_expert(base, c, members, seed=s, kind="cluster", cluster=c, train=_record(s)))
    lib.set_clusters(data.clusters)
    data.write(lib, {"experts": data.experts, "seed": seed})
    return str(path)


def make_tiny_library(path, n_experts: int = 5, with_map: bool = True, seed: int = 0, base=None) -> str:
    """One private expert per task (named after it). With `with_map`, two clusters and MBC data whose rows
    are these experts, so the Library tab has a map to show."""
    from library_store.models import load_base_model
    from library_store.store.library import ExpertLibrary

    base = base or load_base_model(TINY)
    lib = ExpertLibrary.create(path, base)
    tasks = TASKS[:n_experts]
    data = _fake_mbc(tasks, list(tasks), [i % 2 for i in range(n_experts)], seed)
    for i, (task, label) in enumerate(zip(tasks, data.labels)):
        lib.add(random_expert(base, task, [task], seed=seed + i, cluster=cluster_name(label) if with_map else None,
                              train=_record(seed + i)))
    if with_map:
        lib.set_clusters(data.clusters)
        data.write(lib, {"experts": data.experts, "seed": seed})
    return str(path)
