"""Arrow routing (Ostapenko et al., ICML 2024): the fused routed LoRA layer. Pure tensor code.

Usage::

    protos = compute_prototypes(A, B)            # explorer/routing/prototypes.py: (E, d) unit vectors
    state = RouterState(mode="arrow", top_k=4)   # explorer/routing/state.py, with SiteStack
    layer = RoutedLinear(linear, SiteStack(site, protos, A, B, scaling), state, key=(layer_i, module_i))
    q, k, v = routed_group([q_lin, k_lin, v_lin], [sq, sk, sv], state, keys)   # one shared first matmul
    y = layer(x)                                 # base(x) + Σ_e w_e · scaling_e · B_e A_e x, w routed per token

Definitions follow `peft/tuners/lora/arrow.py` and mttl (see docs/design.md, "Arrow prototypes" and "Routing"):
the score of expert e for a token h is |h · p_e|, the top-k scores go through softmax(s / T), the others weigh 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explorer.routing import fused
from explorer.routing.capture import defer_solo
from explorer.routing.state import RouterState, SiteStack

_NONE, _NO_MASK = torch.empty(0), torch.empty(0, dtype=torch.bool)  # the kernels' "none" (shift, scores; mask)


class RoutedGroup(nn.Module):
    """Everything routed about layers that read the same input (q, k, v of one block; or one layer alone).

    `proj` stacks [prototypes; A rows] of every member, (G·E + G·E·r, d): one matmul gives all G routers'
    scores and all A-projections. `up` stacks every member's B, pre-multiplied by the scaling and zero-padded
    to the widest member, (G·E, r·out_max): for one token the group gathers its top-k rows of every member at
    once and makes all G updates in one batched matmul. `gram` (G·E, r, r) = up_e up_eᵀ gives contributions
    ‖a_e up_e‖ without forming them (the trace's drill-down data).

    Members call `compute(x)` in turn; the result is cached by the identity of `x`, so only the first member
    pays. A member called with another tensor recomputes, so the cache can change timing, never results.
    Tensors are (non-persistent) buffers of a child of every member: `model.to(...)` after attach moves them.
    """

    def __init__(self, stacks: list[SiteStack], state: RouterState, dtype: torch.dtype, device=None):
        super().__init__()
        E, _, d = stacks[0].A.shape
        r = max(s.A.shape[1] for s in stacks)
        G = len(stacks)
        proj = torch.zeros(G * E + G * E * r, d, dtype=dtype, device=device)  # one copy of every factor
        for m, s in enumerate(stacks):
            proj[m * E:(m + 1) * E] = s.prototypes.reshape(E, d)  # (E, d) prototypes
            rows = proj[G * E + m * E * r: G * E + (m + 1) * E * r].view(E, r, d)
            rows[:, : s.A.shape[1]] = s.A  # (E, r_m, d) A rows; a smaller rank keeps zero rows
        self.register_buffer("proj", proj, persistent=False)
        self.outs = [s.B.shape[1] for s in stacks]
        self._outs = torch.tensor(self.outs)  # (G,) int64 on the CPU, for the fused kernels
        up = torch.zeros(G * E, r, max(self.outs))  # (G E, r, out_max)
        for m, s in enumerate(stacks):
            B = pad_rank(s.B.transpose(1, 2), r) * s.scaling.view(E, 1, 1)  # (E, r, out) = (s_e B_e)ᵀ
            up[m * E:(m + 1) * E, :, : self.outs[m]] = B
        self.register_buffer("gram", (up @ up.transpose(1, 2)).to(device), persistent=False)  # (G E, r, r)
        self.register_buffer("up", up.view(G * E, -1).to(device, dtype), persistent=False)  # (G E, r out_max)
        self.register_buffer("offsets", (torch.arange(G, device=device) * E).view(G, 1), persistent=False)
        self.n_members, self.n_experts, self.rank, self.state = G, E, r, state
        self.sites = [s.site for s in stacks]
        self.register_buffer("shift", None, persistent=False)  # (G E,) mu · p_e, subtracted from the scores
        self.register_buffer("unit", None, persistent=False)  # (G E, d) unit prototypes, once scaled (scales.py)
        self.keys: list[tuple[int, int]] = []  # members' trace keys, filled in by the members
        self._cache: tuple | None = None  # (input tensor, router version, result); set with object.__setattr__
        self._solo: tuple | None = None  # (router version, A_j (G r, d), (s_j B_j)ᵀ (G, r, out_max)): solo_rows
        self._take_views()

    def _take_views(self) -> None:
        """Plain attributes for the hot path (a buffer read through nn.Module.__getattr__ costs about as much
        as a small op when decoding): the buffers and their views, taken again whenever the module moves."""
        GE = self.n_members * self.n_experts
        self._proj, self._up, self._offsets = self.proj, self.up, self.offsets
        self._protos = self.proj[:GE]  # (G E, d) prototypes alone
        self._a_rows = self.proj[GE:].view(GE, -1)  # (G E, r d) A rows grouped per (member, expert)
        self._shift = self.shift  # (G E,) or None
        self._ups = [self.member_up(m) for m in range(self.n_members)]  # (E r, out_m) views, one per member
        self._solo = None  # rows of the expert used alone: taken again on the new device when needed

    def set_shift(self, means: list[torch.Tensor] | None) -> None:
        """Input centring: score (h - mu_m) · p_e = h · p_e - mu_m · p_e, one mean input mu_m (d,) per member
        (None: Arrow's plain score). Kept as a buffer, so `.to()` moves it."""
        if means is None:
            self.shift = None
        else:
            G, E = self.n_members, self.n_experts
            mu = torch.stack([m.to(self._protos.device, torch.float32) for m in means])  # (G, d)
            protos = self._protos.float().view(G, E, -1)  # (G, E, d)
            self.shift = (protos @ mu.unsqueeze(-1)).view(G * E).to(self._proj.dtype)  # (G E,)
        self._take_views()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._take_views()
        return out

    def extra_repr(self) -> str:
        return f"members={self.n_members}, experts={self.n_experts}, rank={self.rank}"

    @property
    def protos(self) -> torch.Tensor:
        """(G E, d) prototypes alone (a view of `proj`)."""
        return self._protos

    @property
    def a_rows(self) -> torch.Tensor:
        """(G E, r d) A rows grouped per (member, expert) (a view of `proj`)."""
        return self._a_rows

    def member_up(self, m: int) -> torch.Tensor:
        """(E r, out_m) member m's stacked, scaled B (a strided view: no copy)."""
        E, r = self.n_experts, self.rank
        return self._up[m * E:(m + 1) * E].view(E * r, -1)[:, : self.outs[m]]

    def compute(self, x: torch.Tensor) -> tuple:
        """x (..., d) -> ("dense", every member's weighted A-projections, G views (t, E·r)); Arrow on the CPU in
        float32 (fused.route_rows), ("update", every member's update, G views (t, out_max)); for one token routed
        over few of many experts, ("sparse", every member's update (G, out_max); member m's is row m, columns
        :out_m); in mode "expert" (one expert alone), ("solo", its A-projections (t, G, r))."""
        st = self.state
        cached = self._cache  # one attribute read: a consistent (input, version, result) even across threads
        if cached is not None and cached[0] is x and cached[1] == st.version:
            return cached[2]
        G, E, r = self.n_members, self.n_experts, self.rank
        proj = self._proj
        if x.numel() == x.shape[-1] and st.mode == "arrow" and st.top_k * 2 <= E and x.dtype == proj.dtype:
            out = ("sparse", self._one_token(x.view(-1)))
        elif st.mode == "expert" and st.override is None:  # one expert alone (a per-prompt answer): its rows only
            out = self._alone(x.reshape(-1, x.shape[-1]).to(proj.dtype), one=x.dtype == proj.dtype)
        else:
            h = x.reshape(-1, x.shape[-1])  # (t, d)
            if h.dtype != proj.dtype:
                h = h.to(proj.dtype)
            rows = fused.rows() if st.mode == "arrow" and h.device.type == "cpu" else None
            mask = self._kernel_mask(h.device) if rows is not None and h.dtype == torch.float32 else False
            if mask is not False:  # Arrow on the top-k rows only, in one C++ call
                upd = self._rows(rows, h.contiguous(), F.linear(h, self._protos), mask)  # (t, G, out_max)
                return self._keep(x, ("update", upd.unbind(1)))
            z = F.linear(h, proj)  # (t, G E + G E r)
            t = z.shape[0]
            scores = z[:, : G * E] if self._shift is None else z[:, : G * E] - self._shift
            scores = scores.view(t, G, E)  # (t, G, E)
            proj_a = z[:, G * E:].view(t, G, E, r)  # (t, G, E, r)
            if st.mode == "arrow":
                w_top, idx, s = self.route_top(scores)  # (t, G, k) x 2, (t, G, k or k+1)
                w = torch.zeros_like(scores).scatter_(-1, idx, w_top)  # (t, G, E)
            else:  # uniform / expert: the same weights for every token
                w = st.on("fixed", z.device).to(z.dtype).expand(t, G, E)  # (t, G, E)
                ov = self._override_here()
                if ov is not None:  # a counterfactual here
                    w = torch.zeros_like(w) if ov[1] else w.clone()
                    w[..., ov[0]] = 1.0 if ov[1] else 0.0  # forced alone, or switched off
            a = proj_a * w.unsqueeze(-1)  # (t, G, E, r)
            if st.capture is not None:
                if st.mode != "arrow":
                    w_top, idx, s = self._fixed_top(scores)
                chosen = a.gather(2, idx.unsqueeze(-1).expand(*idx.shape, r))  # (t, G, k, r)
                self._record(idx, w_top, s, chosen)
            out = ("dense", a.view(t, G, E * r).unbind(1))
        return self._keep(x, out)

    def _keep(self, x: torch.Tensor, out: tuple) -> tuple:
        object.__setattr__(self, "_cache", (x, self.state.version, out))  # a plain attribute: no Module.__setattr__
        return out

    def _override_here(self) -> tuple | None:
        """The counterfactual (`RouterState.override`: expert index, force, layers) when it applies to this
        group's layer, else None."""
        ov = self.state.override
        return ov if ov is not None and (ov[2] is None or self.keys[0][0] in ov[2]) else None

    def _kernel_mask(self, device) -> torch.Tensor | None | bool:
        """The experts the kernels must leave out, (E,) bool or None: the disabled ones and, under a counterfactual
        that switches one off in this layer, that one (scored -inf, as `route_top` does); False for a forced
        expert, which the kernels do not express (the torch ops run)."""
        mask, ov = self.state.on("mask", device), self._override_here()
        if ov is None:
            return mask
        if ov[1]:
            return False
        off = torch.zeros(self.n_experts, dtype=torch.bool, device=device)  # (E,); counterfactual calls only
        off[ov[0]] = True
        return off if mask is None else mask | off

    def _rows(self, rows, h: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """h (t, d) float32 contiguous, scores (t, G E) raw h · p_e (or empty: computed in the kernel), mask (E,)
        bool or None (`_kernel_mask`) -> every member's update (t, G, out_max) by fused.route_rows, reading only
        the top-k experts' rows; records the trace's slots ((t, G, k) ids, weights, (t, G, k+1) |s|,
        (t, G, k, r) w A h) while capturing."""
        st, shift = self.state, self._shift
        keep = 0 if st.capture is None else min(st.top_k + 1, self.n_experts)  # the runner-up too, for the trace
        upd, *slots = rows(h, scores, self._protos, _NONE if shift is None else shift, self._a_rows, self._up,
                           _NO_MASK if mask is None else mask, self.n_members, self.n_experts, self.rank, st.top_k,
                           st.temperature, keep, self._outs)
        if slots:
            self._record(*slots)
        return upd

    def solo_rows(self) -> tuple:
        """(A_j (G r, d), (s_j B_j)ᵀ (G, r, out_max)) of the expert that mode "expert" uses alone (its one-hot
        `fixed`), copied contiguous once per router setting: a token then reads r rows, not E r."""
        st = self.state
        solo = self._solo
        if solo is None or solo[0] != st.version:
            G, E, r = self.n_members, self.n_experts, self.rank
            j = int(st.on("fixed", self._proj.device).argmax())
            a = self._a_rows.view(G, E, r, -1)[:, j].reshape(G * r, -1)  # (G r, d)
            up = self._up.view(G, E, r, -1)[:, j].contiguous()  # (G, r, out_max)
            solo = (st.version, a, up)
            object.__setattr__(self, "_solo", solo)
        return solo[1], solo[2]

    def _alone(self, h: torch.Tensor, one: bool) -> tuple:
        """h (t, d) -> ("solo", the A-projections of the one expert in use (t, G, r)), or for one token (`one`:
        its dtype is the buffers'), ("sparse", every member's update (G, out_max)) as `_one_token` gives. The
        trace, when captured, gets what the dense path records: every expert's score (for the runner-up)."""
        A, up = self.solo_rows()
        G, r = self.n_members, self.rank
        a = F.linear(h, A).view(h.shape[0], G, r)  # (t, G, r)
        if self.state.capture is not None and h.shape[0] > 1:
            self._record(*self.solo_slots(h, a))
        elif self.state.capture is not None:  # a decoding step: its slots are made later, with others'
            defer_solo(self.state, self, h, a)
        if one and h.shape[0] == 1:
            return "sparse", torch.bmm(a.view(G, 1, r), up).view(G, -1)  # (G, out_max)
        return "solo", a

    def solo_slots(self, h: torch.Tensor, a: torch.Tensor) -> tuple:
        """The trace's slots in mode "expert" for inputs h (t, d) and the expert's A-projections a (t, G, r): every
        expert scored, for the runner-up. Decoding steps' are made in batches of many steps (capture.defer_solo:
        one batch instead of a dozen small ops per group and step)."""
        scores = F.linear(h, self._protos)  # (t, G E)
        scores = (scores if self._shift is None else scores - self._shift).view(*a.shape[:2], -1)  # (t, G, E)
        w_top, idx, s = self._fixed_top(scores)  # (t, G, 1) x 3: the expert, weight 1, its score + runner-up
        return idx, w_top, s, a.unsqueeze(2) * w_top.unsqueeze(-1)  # chosen (t, G, 1, r)

    def _one_token(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Decoding: read only the top-k experts' A and B rows, for all members at once, in as few ops as
        possible (each costs microseconds of dispatch, which is what a decoding step spends routing).
        h (d,) -> (G, out_max) every member's update, zero-padded to the widest member."""
        G, k, r = self.n_members, self.state.top_k, self.rank
        shift, st = self._shift, self.state
        mask = self._kernel_mask(h.device) if h.dtype == torch.float32 and h.device.type == "cpu" else False
        if mask is not False:
            rows = fused.rows() if st.capture is not None else None
            if rows is not None:  # traced: the many-token kernel on one token, which also gives the slots
                return self._rows(rows, h.view(1, -1), _NONE, mask).view(G, -1)
            step = fused.kernel()  # the same routing in one C++ call (explorer/routing/fused.py), where it built
            if step is not None:
                return step(h.contiguous(), self._protos, _NONE if shift is None else shift, self._a_rows,
                            self._up, _NO_MASK if mask is None else mask, G, self.n_experts, r, k, st.temperature,
                            self._outs)
        scores = torch.mv(self._protos, h) if shift is None else torch.addmv(shift, self._protos, h, beta=-1)
        w_top, idx, s = self.route_top(scores.view(G, -1))  # (G, k), (G, k), (G, k or k+1)
        flat = (idx + self._offsets).view(-1)  # (G k,) rows of (member, expert)
        z = torch.mv(self._a_rows.index_select(0, flat).view(G * k * r, -1), h)  # (G k r,) = A_e h
        a = z.view(G, k, r) * w_top.unsqueeze(-1)  # (G, k, r)
        if self.state.capture is not None:
            self._record(idx, w_top, s, a)  # (G, k) ...: one token, no token axis (added when assembled)
        d = torch.bmm(a.view(G, 1, k * r), self._up.index_select(0, flat).view(G, k * r, -1))  # (G, 1, out_max)
        return d.view(G, -1)  # (G, out_max): member m's update is row m, its first out_m columns

    def route_top(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., E) raw scores h · p_e -> top-k softmax(|s| / T) weights (..., k), expert ids (..., k), and the
        best |s| sorted like the slots (..., k), or (..., k+1) while capturing: the last is the best left out, for
        the trace (one topk serves routing and trace; disabled experts are -inf)."""
        st = self.state
        k = st.top_k
        n = k if st.capture is None else min(k + 1, self.n_experts)
        s = scores.abs()  # (..., E)
        if st.mask is not None:
            s = s.masked_fill(st.on("mask", s.device), float("-inf"))
        ov = self._override_here()
        if ov is not None:
            s = s.clone()
            s[..., ov[0]] = float("inf") if ov[1] else float("-inf")  # forced to the first slot, or off
            if ov[1]:  # forced: that expert alone, weight 1
                ranked, idx = s.topk(n, dim=-1)  # the forced expert first
                return F.one_hot(torch.zeros_like(idx[..., 0]), k).to(s.dtype), idx[..., :k], ranked
        ranked, idx = s.topk(n, dim=-1)  # (..., n): T > 0 keeps the order of |s| / T
        top = ranked
        if n > k:  # capturing: the runner-up is for the trace only
            top, idx = ranked[..., :k], idx[..., :k]  # (..., k)
        return (top / st.temperature if st.temperature != 1.0 else top).softmax(dim=-1), idx, ranked

    def _fixed_top(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Uniform / expert modes, for the trace: the experts with a fixed weight, highest |score| first."""
        fixed = self.state.on("fixed", scores.device)  # (E,)
        s = scores.abs()
        if self.state.mask is not None:
            s = s.masked_fill(self.state.on("mask", s.device), float("-inf"))
        idx = s.masked_fill(fixed == 0, float("-inf")).topk(int((fixed > 0).sum()), dim=-1).indices  # (t, G, K)
        left = s.masked_fill(fixed > 0, float("-inf")).amax(-1, keepdim=True)  # (t, G, 1) best left out
        raw = torch.cat([s.gather(-1, idx), left], dim=-1)  # (t, G, K + 1)
        return fixed.to(scores.dtype)[idx], idx, raw

    def _record(self, idx, w_top, s, a) -> None:
        """Append this call's routing to the trace buffer (see RouterState); s is (t, G, k+1) the raw scores of
        the slots and the best left out (route_top, _fixed_top)."""
        self.state.capture.append(("route", self, idx, w_top, s, a))

    def clear(self) -> None:
        object.__setattr__(self, "_cache", None)


class RoutedLinear(nn.Module):
    """An `nn.Linear` plus the Arrow-routed sum of E LoRA experts, in two matmuls.

    Usage: ``model.layers[3].self_attn.q_proj = RoutedLinear(q_proj, stack, state, key=(3, 0))``
    (or `routed_group` for layers that read one input).

    The group's first matmul gives the scores and every expert's A-projection (t, E·r); these are scaled by
    the routing weights, and one matmul with the member's `up`, all the B's stacked and pre-multiplied by
    their scaling (E·r, out), gives the update, added to the base output in the same call (addmm). A single
    token (a decoding step) with top_k ≤ E/2 uses the group's one-token update instead, and Arrow on the CPU in
    float32 the group's update from the top-k rows only (fused.py; same result, float rounding aside).
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
        self.base, self.site, self.state, self.key = base, stack.site, state, key
        self.group = group if group is not None else RoutedGroup([stack], state, base.weight.dtype,
                                                                 base.weight.device)
        self.group.keys.append(key)
        self.member, self.n_experts, self.out = member, E, out
        self.last = member == self.group.n_members - 1
        self._full = out == max(self.group.outs)  # no zero padding to slice off the group's one-token update
        self._plain = type(base) is nn.Linear  # its forward is F.linear, so the update can ride in as a bias
        # plain aliases of the two children for the hot path (nn.Module.__getattr__ is slow when decoding)
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_group", self.group)

    def extra_repr(self) -> str:
        return f"site={self.site}, experts={self.n_experts}, rank={self.group.rank}, shares={self.group.n_members}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        base = self._base
        if st.mode == "base" or (st.layers is not None and st.mode == "arrow" and self.key[0] not in st.layers):
            return base(x)  # no experts (here: a layer the router does not route at)
        group = self._group
        kind, a = group.compute(x)
        if self.last:  # the last reader (v): do not keep activations alive
            group.clear()
        if kind == "sparse":  # one token: the group made every member's update, (G, out_max)
            d = a[self.member] if self._full else a[self.member, : self.out]  # (out,)
            if st.capture is None:
                if self._plain:  # decoding's hot path: the update goes in as the bias, one op for W h + b + d
                    return F.linear(x, base.weight, d if base.bias is None else d + base.bias)
                return base(x) + d
        y = F.linear(x, base.weight, base.bias) if self._plain else base(x)  # (..., out)
        if st.capture is not None:
            wide = None if y.dtype == torch.float64 else torch.float32  # bf16 sums lose digits
            st.capture.append(("norm", self.key, torch.linalg.vector_norm(y.reshape(-1, self.out), dim=-1,
                                                                          dtype=wide)))  # (t,)
        if kind == "sparse":
            return y + d
        y2 = y.reshape(-1, self.out)  # (t, out)
        if kind == "update":  # many tokens, top-k rows: the group made every member's update, (t, out_max)
            return y2.add_(a[self.member] if self._full else a[self.member][:, : self.out]).view(y.shape)
        if kind == "dense":
            a_m, up = a[self.member], group._ups[self.member]  # (t, E r), (E r, out)
        else:  # "solo": one expert alone
            a_m, up = a[:, self.member], group.solo_rows()[1][self.member, :, : self.out]  # (t, r), (r, out)
        if a_m.dtype != y2.dtype:
            return (y2 + (a_m @ up).to(y2.dtype)).view(y.shape)
        if self._plain:  # y is F.linear's fresh output: add the update in place (no copy of y)
            return y2.addmm_(a_m, up).view(y.shape)
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
