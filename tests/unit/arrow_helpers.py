"""Shared by the Arrow tests: tiny twins, random experts, PEFT adapter folders, a plain reference router."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library_store.expert import LoraExpert
from library_store.models import load_base_model
from library_store.testing import random_expert

TWINS = ("tiny-random-llama", "tiny-random-phi")
IDS = torch.tensor([[1, 523, 3784, 314, 260, 3600, 30, 2003, 42, 1177, 9, 88]])


_TWINS: dict = {}


def thorough(*cases) -> list:
    """Further parametrisations of a test whose first case already runs in the fast loop: marked slow, so
    `make test` runs every case and `make test-fast` one per twin."""
    return [pytest.param(*c, marks=pytest.mark.slow) for c in cases]


def fresh(twin: str):
    """A new copy of a twin (a deep copy of one loaded per session: every copy has the same weights)."""
    if twin not in _TWINS:
        _TWINS[twin] = load_base_model(twin)
    return copy.deepcopy(_TWINS[twin])


def experts(base, n: int, rank: int | list[int] = 4, seed: int = 0, scale: float = 0.5) -> list[LoraExpert]:
    ranks = rank if isinstance(rank, list) else [rank] * n
    return [random_expert(base, f"e{i}", rank=ranks[i], alpha=2.0 * ranks[i] + i, seed=seed * 1000 + i, scale=scale)
            for i in range(n)]


def save_peft_dir(expert: LoraExpert, folder: Path) -> str:
    """The expert as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig

    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=expert.info.rank, lora_alpha=expert.info.alpha, lora_dropout=0.0,
               target_modules=expert.info.target_modules).save_pretrained(str(folder))
    save_file(dict(expert.weights), str(folder / "adapter_model.safetensors"))
    return str(folder)


def dense_prototype(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of the dense B @ A, in float64 (the slow, obvious way)."""
    return torch.linalg.svd(B.double() @ A.double()).Vh[0]


@torch.no_grad()
def reference_logits(base, exps: list[LoraExpert], top_k: int, temperature: float = 1.0, ids=IDS,
                     weights_out: dict | None = None, means: dict | None = None,
                     scales: list[float] | None = None) -> torch.Tensor:
    """Arrow routing written plainly with forward hooks on an unwrapped model: per token, per module.
    `means` {site: (d,)}: input centring, score |(h - mu) · p_e|; `scales` (one per expert): score × c_e."""
    handles = []
    sites = sorted({s for e in exps for s in e.factors()})
    modules = dict(base.model.named_modules())
    for site in sites:
        facs = [e.factors().get(site) for e in exps]

        def hook(mod, inp, out, facs=facs, site=site):
            h = inp[0].reshape(-1, inp[0].shape[-1]).double()  # (t, d)
            protos = torch.stack([dense_prototype(*f) if f else torch.zeros(h.shape[1], dtype=torch.float64)
                                  for f in facs])  # (E, d)
            hc = h if means is None else h - means[site].double()  # (t, d)
            s = (hc @ protos.T).abs() / temperature  # (t, E)
            if scales is not None:
                s = s * torch.tensor(scales, dtype=torch.float64)
            top, idx = s.topk(top_k, dim=-1)
            w = torch.zeros_like(s).scatter_(1, idx, top.softmax(-1))  # (t, E)
            delta = torch.zeros(h.shape[0], out.shape[-1], dtype=torch.float64)
            for e, (exp, f) in enumerate(zip(exps, facs)):
                if f:
                    A, B = f
                    delta += w[:, e:e + 1] * exp.scaling * (h @ A.double().T @ B.double().T)
            if weights_out is not None:
                weights_out[site] = w
            return out + delta.to(out.dtype).view(out.shape)

        handles.append(modules[site].register_forward_hook(hook))
    try:
        return base.model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def centred(exps: list[LoraExpert], general: list[LoraExpert] | None = None) -> list[LoraExpert]:
    """Each expert minus the mean of the general experts' factors (default: all of `exps`), written plainly per
    weight key (equal ranks): the reference for centring (docs/design.md, "Centring")."""
    general = exps if general is None else general
    out = []
    for e in exps:
        weights = {k: v - torch.stack([g.weights[k] for g in general]).mean(0) for k, v in e.weights.items()}
        out.append(LoraExpert(copy.deepcopy(e.info), weights))
    return out
