"""Arrow routing (Ostapenko et al., ICML 2024): exact prototypes and the fused routed LoRA layer. Pure tensor code.

Usage::

    protos = compute_prototypes(A, B)            # A (E, r, d), B (E, out, r) -> (E, d) unit vectors
    state = RouterState(mode="arrow", top_k=4)
    layer = RoutedLinear(linear, SiteStack(site, protos, A, B, scaling), state, key=(layer_i, module_i))
    y = layer(x)                                 # base(x) + Σ_e w_e · scaling_e · B_e A_e x, w routed per token

Definitions follow `peft/tuners/lora/arrow.py` and mttl (see `/work/shared/design/ALGORITHMS.md`): the score of
expert e for a token h is |h · p_e|, the top-k scores go through softmax(s / T), the others weigh 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

PROTOTYPE_METHOD = "qr-svd-v1"  # part of the cache key of stored prototypes: bump when the maths changes
MODES = ("arrow", "base", "uniform", "expert")


@torch.no_grad()
def compute_prototypes(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of every ΔW_e = B_e @ A_e, exactly, without forming ΔW.

    Usage: ``protos = compute_prototypes(A, B)`` with A (E, r, d), B (E, out, r) -> (E, d), float32, unit norm.

    With Aᵀ = Q_a R_a and B = Q_b R_b, ΔW = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the r × r core M = U S Vᵀ gives
    ΔW's right singular vectors as Q_a V. Cost O((d + out) r²) per expert instead of a dense d × out SVD.
    PEFT's power iteration is not exact when the top two singular values are close; this is.
    Sign: the largest-magnitude component is made positive (routing uses |h · p|, so it only matters for
    reproducibility). An expert whose ΔW is zero (e.g. B freshly initialised) gets a zero prototype, as in PEFT.
    Zero-padded rank rows/columns (mixed ranks) do not change the result.
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"expected A (E, r, d) and B (E, out, r), got A {tuple(A.shape)} and B {tuple(B.shape)}")
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    q_a, r_a = torch.linalg.qr(A.to(dtype).transpose(1, 2))  # (E, d, r), (E, r, r)
    _, r_b = torch.linalg.qr(B.to(dtype))  # (E, r, r): Q_b is orthonormal, it does not change V
    core = r_b @ r_a.transpose(1, 2)  # (E, r, r)
    _, s, vh = torch.linalg.svd(core)  # vh (E, r, r), rows are right singular vectors
    protos = (q_a @ vh[:, 0, :, None]).squeeze(-1)  # (E, d)
    pivot = protos.abs().argmax(dim=1, keepdim=True)  # (E, 1)
    sign = torch.where(protos.gather(1, pivot) < 0, -1.0, 1.0).to(dtype)  # (E, 1)
    protos = protos * sign
    protos[s[:, 0] <= torch.finfo(dtype).tiny] = 0.0  # ΔW = 0 has no direction
    return protos.to(torch.float32)


@dataclass
class SiteStack:
    """All experts' factors at one routing site (e.g. `model.layers.3.self_attn.q_proj`), zero-padded to r_max."""

    site: str
    prototypes: torch.Tensor  # (E, d)
    A: torch.Tensor  # (E, r_max, d)
    B: torch.Tensor  # (E, out, r_max)
    scaling: torch.Tensor  # (E,) alpha / rank of each expert


@dataclass
class RouterState:
    """The router setting shared by every routed layer of one model, plus the trace buffer.

    `fixed` holds the (E,) weights of the non-routing modes (uniform: 1/E_enabled, expert: one-hot);
    `mask` is True for disabled experts (score -inf); `capture` is a list while a trace is recorded.
    """

    mode: str = "arrow"
    top_k: int = 4
    temperature: float = 1.0
    mask: torch.Tensor | None = None  # (E,) bool
    fixed: torch.Tensor | None = None  # (E,)
    capture: list | None = field(default=None, repr=False)


class RoutedLinear(nn.Module):
    """An `nn.Linear` plus the Arrow-routed sum of E LoRA experts, in two matmuls.

    Usage: ``model.layers[3].self_attn.q_proj = RoutedLinear(q_proj, stack, state, key=(3, 0))``

    `proj` stacks [prototypes; all A rows] (E + E·r, d): one matmul gives the scores (t, E) and every expert's
    A-projection (t, E·r). The projections are scaled by the routing weights and one matmul with `up`, all the
    B's stacked and pre-multiplied by their scaling (E·r, out), gives the update.
    """

    def __init__(self, base: nn.Linear, stack: SiteStack, state: RouterState, key: tuple[int, int]):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"Arrow routing wraps nn.Linear only; {stack.site} is a {type(base).__name__}.")
        E, r, d = stack.A.shape
        out = stack.B.shape[1]
        if d != base.in_features or out != base.out_features:
            raise ValueError(f"{stack.site}: experts are ({out} x {d}), the model's layer is "
                             f"({base.out_features} x {base.in_features})")
        self.base, self.site, self.state, self.key = base, stack.site, state, key
        self.n_experts, self.rank = E, r
        dtype, device = base.weight.dtype, base.weight.device
        proj = torch.cat([stack.prototypes.reshape(E, d), stack.A.reshape(E * r, d)])  # (E + E r, d)
        up = (stack.B * stack.scaling.view(E, 1, 1)).permute(0, 2, 1).reshape(E * r, out)  # (E r, out)
        self.register_buffer("proj", proj.to(device, dtype).contiguous(), persistent=False)
        self.register_buffer("up", up.to(device, dtype).contiguous(), persistent=False)

    def extra_repr(self) -> str:
        return f"site={self.site}, experts={self.n_experts}, rank={self.rank}"

    def route(self, scores: torch.Tensor) -> torch.Tensor:
        """(t, E) raw scores h · p_e -> (t, E) weights: softmax(|s| / T) over the top-k, 0 elsewhere."""
        st = self.state
        s = scores.abs()  # (t, E)
        if st.mask is not None:
            s = s.masked_fill(st.mask, float("-inf"))
        if st.temperature != 1.0:
            s = s / st.temperature
        top, idx = s.topk(st.top_k, dim=-1)  # (t, k)
        return torch.zeros_like(s).scatter_(1, idx, top.softmax(dim=-1))  # (t, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        y = self.base(x)  # (..., out)
        if st.mode == "base":
            return y
        E, r = self.n_experts, self.rank
        h = x.reshape(-1, x.shape[-1])  # (t, d)
        z = F.linear(h.to(self.proj.dtype), self.proj)  # (t, E + E r)
        if st.mode == "arrow":
            w = self.route(z[:, :E])  # (t, E)
        else:  # uniform / expert: fixed weights for every token
            w = st.fixed.to(z.dtype).expand(h.shape[0], E)  # (t, E)
        if st.capture is not None:
            st.capture.append((self.key, w))
        a = (z[:, E:].view(-1, E, r) * w.unsqueeze(-1)).view(-1, E * r)  # (t, E r)
        delta = (a @ self.up).to(y.dtype)  # (t, out)
        return y + delta.view(y.shape)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain layer under a RoutedLinear (or the module itself)."""
    return module.base if isinstance(module, RoutedLinear) else module
