"""Arrow routing (Ostapenko et al., ICML 2024): exact prototypes and the fused routed LoRA layer. Pure tensor code.

Usage::

    protos = compute_prototypes(A, B)            # A (E, r, d), B (E, out, r) -> (E, d) unit vectors
    state = RouterState(mode="arrow", top_k=4)
    layer = RoutedLinear(linear, SiteStack(site, protos, A, B, scaling), state, key=(layer_i, module_i))
    q, k, v = routed_group([q_lin, k_lin, v_lin], [sq, sk, sv], state, keys)   # one shared first matmul
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

    With Aᵀ = Q_a R_a and B = Q_b R_b, ΔW = Q_b M Q_aᵀ with the r × r core M = R_b R_aᵀ, so ΔW's right singular
    vectors are Q_a V for M's right singular vectors V. Those are the eigenvectors of MᵀM = R_a (BᵀB) R_aᵀ, so B
    only enters through its r × r Gram matrix (no second QR), and the eigenproblem is r × r, solved in float64.
    Cost O((d + out) r²) per expert instead of a dense d × out SVD. PEFT's 15-step power iteration is not exact
    when the top two singular values are close; this is.
    Sign: the largest-magnitude component is made positive (routing uses |h · p|, so it only matters for
    reproducibility). An expert whose ΔW is zero (e.g. B freshly initialised) gets a zero prototype, as in PEFT.
    Zero-padded rank rows/columns (mixed ranks) do not change the result.
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"expected A (E, r, d) and B (E, out, r), got A {tuple(A.shape)} and B {tuple(B.shape)}")
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    q_a, r_a = torch.linalg.qr(A.to(dtype).transpose(1, 2))  # (E, d, r), (E, r, r)
    B = B.to(dtype)
    gram_b = B.transpose(1, 2) @ B  # (E, r, r) = R_bᵀ R_b
    core = (r_a @ gram_b @ r_a.transpose(1, 2)).double()  # (E, r, r) = MᵀM
    evals, evecs = torch.linalg.eigh(core)  # ascending eigenvalues
    v = evecs[:, :, -1].to(dtype)  # (E, r): top right singular vector of M
    protos = torch.einsum("edr,er->ed", q_a, v)  # (E, d)
    pivot = protos.abs().argmax(dim=1, keepdim=True)  # (E, 1)
    protos = protos * torch.where(protos.gather(1, pivot) < 0, -1.0, 1.0).to(dtype)  # (E, d)
    protos[evals[:, -1] <= torch.finfo(torch.float64).tiny] = 0.0  # ΔW = 0 has no direction
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
    version: int = 0  # bumped on every router change, so cached group results are not reused across it


class RoutedGroup:
    """The first matmul of layers that read the same input (q, k, v), shared: [prototypes; A rows] of every
    member stacked, (G·E + G·E·r, d), so one matmul gives all G routers' scores and all A-projections.

    Members call `compute(x)` in turn; the result is cached by the identity of `x`, so only the first member
    pays. A member called with another tensor recomputes, so the cache can change timing, never results.
    A plain object (not an nn.Module): its tensors are built in the base layer's dtype and device at attach.
    """

    def __init__(self, stacks: list[SiteStack], state: RouterState, dtype: torch.dtype, device=None):
        E, _, d = stacks[0].A.shape
        r = max(s.A.shape[1] for s in stacks)
        protos = torch.cat([s.prototypes.reshape(E, d) for s in stacks])  # (G E, d)
        rows = torch.cat([pad_rank(s.A, r).reshape(E * r, d) for s in stacks])  # (G E r, d)
        self.proj = torch.cat([protos, rows]).to(device, dtype).contiguous()  # (G E + G E r, d)
        G = len(stacks)
        self.n_members, self.n_experts, self.rank, self.state = G, E, r, state
        # Views for the one-token path (decoding): prototypes alone, and A rows grouped per (member, expert).
        self.protos = self.proj[: G * E]  # (G E, d)
        self.a_rows = self.proj[G * E:].view(G * E, r * d)  # (G E, r d)
        self.offsets = (torch.arange(G, device=device) * E).view(1, G, 1)  # (1, G, 1)
        self._cache: tuple | None = None  # (input tensor, router version, result)

    def route(self, scores: torch.Tensor) -> torch.Tensor:
        """(t, G, E) raw scores h · p_e -> (t, G, E) weights: softmax(|s| / T) over the top-k, 0 elsewhere."""
        w_top, idx = self.route_top(scores)  # (t, G, k)
        return torch.zeros_like(scores).scatter_(-1, idx, w_top)  # (t, G, E)

    def compute(self, x: torch.Tensor) -> tuple:
        """x (..., d) -> ("dense", weights (t, G, E), weighted A-projections (t, G, E·r)) or, for one token
        routed over few of many experts, ("sparse", weights (1, G, E) or None, top-k ids (G, k),
        weighted A-projections of the top-k (G, k·r))."""
        st = self.state
        cached = self._cache  # one attribute read: a consistent (input, version, result) even across threads
        if cached is not None and cached[0] is x and cached[1] == st.version:
            return cached[2]
        G, E, r = self.n_members, self.n_experts, self.rank
        h = x.reshape(-1, x.shape[-1])  # (t, d)
        if h.dtype != self.proj.dtype:
            h = h.to(self.proj.dtype)
        if h.shape[0] == 1 and st.mode == "arrow" and st.top_k * 2 <= E:
            out = self._one_token(h)
            self._cache = (x, st.version, out)
            return out
        z = F.linear(h, self.proj)  # (t, G E + G E r)
        t = z.shape[0]
        if st.mode == "arrow":
            w = self.route(z[:, : G * E].view(t, G, E))  # (t, G, E)
        else:  # uniform / expert: the same weights for every token
            w = st.fixed.to(z.dtype).expand(t, G, E)  # (t, G, E)
        a = (z[:, G * E:].view(t, G, E, r) * w.unsqueeze(-1)).view(t, G, E * r)  # (t, G, E r)
        self._cache = (x, st.version, ("dense", w, a))
        return self._cache[2]

    def _one_token(self, h: torch.Tensor) -> tuple:
        """Decoding: read only the top-k experts' A rows (and, in the members, B rows). When generating, every
        step streams the stacks from memory for one token, so reading k of E experts is what keeps it cheap."""
        G, E, r, k = self.n_members, self.n_experts, self.rank, self.state.top_k
        w_top, idx = self.route_top(F.linear(h, self.protos).view(1, G, E))  # (1, G, k), (1, G, k)
        rows = self.a_rows.index_select(0, (idx + self.offsets).view(-1))  # (G k, r d)
        z = rows.view(G, k * r, -1) @ h[0]  # (G, k r)
        a = (z.view(G, k, r) * w_top[0].unsqueeze(-1)).view(G, k * r)  # (G, k r)
        w = None
        if self.state.capture is not None:
            w = torch.zeros(1, G, E, dtype=w_top.dtype, device=w_top.device).scatter_(-1, idx, w_top)  # (1, G, E)
        return "sparse", w, idx[0], a

    def route_top(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, G, E) raw scores -> top-k softmax weights (t, G, k) and expert ids (t, G, k)."""
        st = self.state
        s = scores.abs()  # (t, G, E)
        if st.mask is not None:
            s = s.masked_fill(st.mask, float("-inf"))
        if st.temperature != 1.0:
            s = s / st.temperature
        top, idx = s.topk(st.top_k, dim=-1)  # (t, G, k)
        return top.softmax(dim=-1), idx

    def clear(self) -> None:
        self._cache = None


class RoutedLinear(nn.Module):
    """An `nn.Linear` plus the Arrow-routed sum of E LoRA experts, in two matmuls.

    Usage: ``model.layers[3].self_attn.q_proj = RoutedLinear(q_proj, stack, state, key=(3, 0))``
    (or `routed_group` for layers that read one input).

    The group's first matmul gives the scores and every expert's A-projection (t, E·r); these are scaled by
    the routing weights, and one matmul with `up`, all the B's stacked and pre-multiplied by their scaling
    (E·r, out), gives the update, added to the base output in the same call (addmm). A single token (a
    decoding step) with top_k ≤ E/2 reads only its top-k experts' rows of both stacks instead (same result).
    Kept deliberately unfused from the base layer: folding W into the first matmul measured no faster on
    decoding here and would make the base weights views into our buffer.
    """

    def __init__(self, base: nn.Linear, stack: SiteStack, state: RouterState, key: tuple[int, int],
                 group: RoutedGroup | None = None, member: int = 0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"Arrow routing wraps nn.Linear only; {stack.site} is a {type(base).__name__}.")
        E, _, d = stack.A.shape
        out = stack.B.shape[1]
        if d != base.in_features or out != base.out_features:
            raise ValueError(f"{stack.site}: experts are ({out} x {d}), the model's layer is "
                             f"({base.out_features} x {base.in_features})")
        dtype, device = base.weight.dtype, base.weight.device
        self.base, self.site, self.state, self.key = base, stack.site, state, key
        self.group = group or RoutedGroup([stack], state, dtype, device)
        self.member, self.n_experts = member, E
        r = self.group.rank
        B = pad_rank(stack.B.transpose(1, 2), r).transpose(1, 2)  # (E, out, r)
        up = (B * stack.scaling.view(E, 1, 1)).permute(0, 2, 1).reshape(E * r, out)  # (E r, out)
        self.register_buffer("up", up.to(device, dtype).contiguous(), persistent=False)

    def extra_repr(self) -> str:
        return f"site={self.site}, experts={self.n_experts}, rank={self.group.rank}, shares={self.group.n_members}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        y = self.base(x)  # (..., out)
        if st.mode == "base":
            return y
        kind, w, *rest = self.group.compute(x)
        if self.member == self.group.n_members - 1:  # the last reader (v): do not keep activations alive
            self.group.clear()
        if st.capture is not None:
            st.capture.append((self.key, w[:, self.member]))  # (t, E)
        y2 = y.reshape(-1, y.shape[-1])  # (t, out)
        if kind == "sparse":  # one token: only its top-k experts' B rows
            idx, a = rest  # (G, k), (G, k r)
            up = self.up.view(self.n_experts, -1).index_select(0, idx[self.member])  # (k, r out)
            a_m, up = a[self.member : self.member + 1], up.view(a.shape[1], -1)  # (1, k r), (k r, out)
        else:
            a_m, up = rest[0][:, self.member], self.up  # (t, E r), (E r, out)
        if a_m.dtype != y2.dtype:
            return (y2 + (a_m @ up).to(y2.dtype)).view(y.shape)
        return torch.addmm(y2, a_m, up).view(y.shape)


def routed_group(bases: list[nn.Linear], stacks: list[SiteStack], state: RouterState,
                 keys: list[tuple[int, int]]) -> list[RoutedLinear]:
    """RoutedLinears for layers that read the same input (e.g. q, k, v of one attention block)."""
    group = RoutedGroup(stacks, state, bases[0].weight.dtype, bases[0].weight.device)
    return [RoutedLinear(b, s, state, k, group, m) for m, (b, s, k) in enumerate(zip(bases, stacks, keys))]


def pad_rank(t: torch.Tensor, r: int) -> torch.Tensor:
    """(E, r0, n) -> (E, r, n) with zero rows (a smaller rank padded; zeros change no product)."""
    if t.shape[1] == r:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], r - t.shape[1], t.shape[2])], dim=1)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain layer under a RoutedLinear (or the module itself)."""
    return module.base if isinstance(module, RoutedLinear) else module
