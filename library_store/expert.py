"""One LoRA expert in memory: its record and its weights in PEFT's layout, plus the one site-name grammar.

Usage::

    expert = LoraExpert.from_state_dict(info, get_peft_model_state_dict(peft_model))
    for site, (A, B) in expert.factors().items():   # site = "model.layers.7.self_attn.q_proj"
        ...                                          # A: (r, d_in), B: (d_out, r); ΔW = scaling * B @ A
"""
from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field

import torch

PEFT_PREFIX = "base_model.model."
EXPERT_KINDS = ("private", "warmup", "cluster", "imported", "general")  # general: centring only, never routed
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SITE_RE = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<block>[A-Za-z_]+)\.(?P<module>[A-Za-z0-9_]+)$")


def check_name(name: str) -> str:
    """Expert, task and cluster names: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, so they are safe as folder names."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"Invalid name {name!r}: names must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}.")
    return name


@functools.lru_cache(maxsize=65536)  # called per tensor when attaching: 64 experts are ~24,000 calls
def parse_site(site: str) -> tuple[int, str]:
    """`model.layers.7.self_attn.q_proj` -> (7, "q_proj"). The one parser of routing-site names."""
    match = _SITE_RE.match(site)
    if not match:
        raise LookupError(f"Not a routing site (expected '...layers.<i>.<block>.<module>'): {site!r}")
    return int(match["layer"]), match["module"]


@dataclass
class TrainRecord:
    """How an expert was trained (empty for imported ones)."""

    steps: int = 0
    lr: float = 0.0
    batch_size: int = 0
    examples: int = 0
    seed: int = 0
    final_loss: float | None = None
    seconds: float | None = None  # the optimizer steps alone
    wall_seconds: float | None = None  # the whole expert on its worker: tokenize, train, pack (a build's time)
    init_seed: int | None = None  # warm-up experts share one LoRA init so MBC sees what training changed


@dataclass
class ExpertInfo:
    """An expert's index record (everything but the weights)."""

    name: str
    kind: str = "private"  # one of EXPERT_KINDS
    tasks: list[str] = field(default_factory=list)
    cluster: str | None = None
    rank: int = 4
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=list)
    n_params: int = 0
    train: TrainRecord = field(default_factory=TrainRecord)
    checksum: str | None = None
    created: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertInfo":
        data = dict(data)
        data["train"] = TrainRecord(**(data.get("train") or {}))
        return cls(**data)


@dataclass
class LoraExpert:
    """An expert's record plus its LoRA weights keyed as PEFT saves them
    (`base_model.model.<site>.lora_A.weight` (r, d_in) and `...lora_B.weight` (d_out, r))."""

    info: ExpertInfo
    weights: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def scaling(self) -> float:
        return self.info.alpha / self.info.rank

    @classmethod
    def from_state_dict(cls, info: ExpertInfo, state: dict[str, torch.Tensor]) -> "LoraExpert":
        """From `peft.get_peft_model_state_dict(...)`; fills rank, targets and parameter count from the weights."""
        weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        expert = cls(info, weights)
        factors = expert.factors()
        if not factors:
            raise ValueError(f"Expert {info.name!r} holds no lora_A/lora_B weights.")
        info.rank = max(a.shape[0] for a, _ in factors.values())
        info.target_modules = sorted({parse_site(s)[1] for s in factors})
        info.n_params = sum(v.numel() for v in weights.values())
        return expert

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """site -> (A (r, d_in), B (d_out, r)), sites in model order."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, a in self.weights.items():
            if key.endswith(".lora_A.weight"):
                site = key[: -len(".lora_A.weight")].removeprefix(PEFT_PREFIX)
                b = self.weights.get(key.replace(".lora_A.weight", ".lora_B.weight"))
                if b is None:
                    raise ValueError(f"Expert {self.name!r}: {key} has no matching lora_B.")
                out[site] = (a, b)
        return dict(sorted(out.items(), key=lambda kv: (parse_site(kv[0])[0], kv[0])))
