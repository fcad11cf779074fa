"""From what the routed layers recorded during one capture to a sparse trace (or to dense weights per layer).

Usage::

    with rm.capturing() as records:                 # see RouterState for the record format
        rm.logits(ids)
    routes = assemble(records, rm.layers, rm.modules, len(rm.experts), n_tokens)   # TopKRoutes
    weights = dense_by_key(records, len(rm.experts))                           # {(layer, module): (t, E)}

Contributions ‖w_e · s_e · B_e A_e h‖ are computed here, once per trace and batched over tokens, from the
recorded weighted A-projections a = w_e A_e h and the group's Gram matrices (s_e B_e)ᵀ(s_e B_e):
‖a up_e‖² = aᵀ (up_e up_eᵀ) a, an r × r product instead of an out-wide vector per token and expert.
"""
from __future__ import annotations

import numpy as np
import torch

from explorer.routing.topk import TopKRoutes


SOLO_BATCH = 3840  # deferred one-expert records made at once mid-capture: 64 steps of SmolLM2's 60 groups


def defer_solo(state, group, h: torch.Tensor, a: torch.Tensor) -> None:
    """Record a one-expert decoding step for `resolve_solo`; every SOLO_BATCH such records are resolved at once, so
    a long generation keeps at most that many inputs alive (SmolLM2: 64 steps, 8.8 MB)."""
    state.capture.append(("solo", group, h, a, state.version))
    state.pending += 1
    if state.pending >= SOLO_BATCH:
        resolve_solo(state.capture)
        state.pending = 0


def resolve_solo(records: list) -> None:
    """In place: each run of a group's deferred one-expert decoding records, ("solo", group, h (1, d), a (1, G, r),
    router version), becomes one ("route", ...) record made over the run's tokens at once (`RoutedGroup.solo_slots`).
    Called when a capture ends; the router must not have changed since the records were made."""
    if not any(rec[0] == "solo" for rec in records):
        return
    out: list = []
    open_run: dict = {}  # group -> its current run of "solo" records (a list placed in `out`)
    for rec in records:
        if rec[0] != "solo":
            if rec[0] == "route":
                open_run.pop(rec[1], None)  # a route record of that group ends its run: order is kept per group
            out.append(rec)
        elif rec[1] in open_run:
            open_run[rec[1]].append(rec)
        else:
            open_run[rec[1]] = [rec]
            out.append(open_run[rec[1]])
    records[:] = [rec if isinstance(rec, tuple) else _solo_route(rec) for rec in out]


def _solo_route(run: list) -> tuple:
    group = run[0][1]
    if any(rec[4] != group.state.version for rec in run):
        raise RuntimeError("The router changed while one-expert routing was being captured; capture again.")
    h, a = (torch.cat([rec[i] for rec in run]) for i in (2, 3))  # (t, d), (t, G, r)
    return ("route", group, *group.solo_slots(h, a))


def _by_group(records: list) -> tuple[dict, dict]:
    """records -> {group: [(idx, w, s, a), ...]}, {key: [(t,) base norms, ...]}, each in call order."""
    routes: dict = {}
    norms: dict = {}
    for rec in records:
        if rec[0] == "route":  # a one-token step has no token axis: (G, k) -> (1, G, k)
            routes.setdefault(rec[1], []).append(rec[2:] if rec[2].dim() == 3 else tuple(x[None] for x in rec[2:]))
        else:
            norms.setdefault(rec[1], []).append(rec[2])
    return routes, norms


@torch.no_grad()
def dense_by_key(records: list, n_experts: int) -> dict[tuple[int, int], torch.Tensor]:
    """{(layer, module index): (tokens, E) float32 weights, 0 outside the chosen experts} on the CPU."""
    out = {}
    for group, recs in _by_group(records)[0].items():
        idx = torch.cat([r[0] for r in recs]).cpu()  # (t, G, k)
        w = torch.cat([r[1] for r in recs]).float().cpu()  # (t, G, k)
        dense = torch.zeros(*idx.shape[:2], n_experts).scatter_(-1, idx, w)  # (t, G, E)
        for m, key in enumerate(group.keys):
            out[key] = dense[:, m]
    return out


@torch.no_grad()
def assemble(records: list, layers: list[int], modules: list[str], n_experts: int, n_tokens: int) -> TopKRoutes:
    """Records of one capture -> TopKRoutes (L, M, T, k) with scores, runner-up, contributions, base norms."""
    routes, norms = _by_group(records)
    L, M, T, E = len(layers), len(modules), n_tokens, n_experts
    k = max((recs[0][0].shape[-1] for recs in routes.values()), default=0)
    ids = np.full((L, M, T, k), -1, dtype=np.int64)
    weights = np.zeros((L, M, T, k), dtype=np.float32)
    scores, contribution = np.full((L, M, T, k), np.nan, np.float32), np.full((L, M, T, k), np.nan, np.float32)
    runner_up, base_norm = np.full((L, M, T), np.nan, np.float32), np.full((L, M, T), np.nan, np.float32)
    li = {layer: i for i, layer in enumerate(layers)}

    def check(key, n):
        if n != T:
            raise RuntimeError(f"trace of layer {key[0]} {modules[key[1]]}: {n} routed tokens for {T} tokens")

    buckets: dict[tuple, list] = {}  # groups whose slots are processed together: same rank, k, score width
    for group, recs in routes.items():
        idx, w, s, a = (recs[0][i] if len(recs) == 1 else torch.cat([r[i] for r in recs]) for i in range(4))
        check(group.keys[0], idx.shape[0])  # idx, w (T, G, k); s (T, G, k+1) or (T, G, k); a (T, G, k, r)
        buckets.setdefault((group.rank, idx.shape[-1], s.shape[-1], idx.device), []).append((group, idx, w, s, a))
    for items in buckets.values():
        groups = [g for g, *_ in items]
        idx, w, s = (torch.cat([it[i] for it in items], dim=1) for i in (1, 2, 3))  # (T, C, ...), C = Σ G
        c = _contributions(groups, idx, torch.cat([it[4] for it in items], dim=1).float())  # (T, C, k)
        idx, w, s, c = idx.cpu().numpy(), w.float().cpu().numpy(), s.float().cpu().numpy(), c.cpu().numpy()
        at = _places([key for g in groups for key in g.keys], li)  # column j of the arrays is member at[j]
        ids[at], weights[at] = idx.transpose(1, 0, 2), w.transpose(1, 0, 2)  # (C, T, k) into (L, M, T, k)
        scores[at], contribution[at] = s[..., :k].transpose(1, 0, 2), c.transpose(1, 0, 2)
        if s.shape[-1] > k:
            runner_up[at] = s[..., k].T  # (C, T)
    if norms:
        keys = list(norms)
        parts = [p[0] if len(p) == 1 else torch.cat(p) for p in norms.values()]  # (T,) each
        for key, n in zip(keys, parts):
            check(key, n.shape[0])
        base_norm[_places(keys, li)] = torch.stack(parts).float().cpu().numpy()  # (n keys, T)
    runner_up[~np.isfinite(runner_up)] = np.nan  # -inf: every other expert was disabled
    return TopKRoutes(E, ids, weights, scores, runner_up, contribution, base_norm)


def _places(keys: list[tuple[int, int]], li: dict) -> tuple[np.ndarray, np.ndarray]:
    """(layer, module index) keys -> the (layer row, module) index arrays that address them in a trace array."""
    return np.array([li[key[0]] for key in keys]), np.array([key[1] for key in keys])


def _contributions(groups: list, idx: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖a up_e‖ = sqrt(aᵀ up_e up_eᵀ a) of every chosen slot, for groups of one rank and k at once (one gather
    and one batched matmul for the whole model instead of one per group): idx (T, Σ G, k) and a (T, Σ G, k, r),
    the groups' members side by side -> (T, Σ G, k)."""
    grams = torch.cat([g.gram for g in groups]).float()  # (Σ G E, r, r)
    first, start = [], 0  # row of `grams` where each member's experts start
    for g in groups:
        first.extend(start + m * g.n_experts for m in range(g.n_members))
        start += g.n_members * g.n_experts
    r = groups[0].rank
    rows = (idx + torch.tensor(first, device=idx.device).view(1, -1, 1)).view(-1)  # (T Σ G k,) rows of `grams`
    g = grams.view(-1, r * r).index_select(0, rows).view(*idx.shape, r, r)  # (T, Σ G, k, r, r)
    a = a.unsqueeze(-2)  # (T, Σ G, k, 1, r)
    return ((a @ g) * a).sum((-2, -1)).clamp_min(0).sqrt()


def next_step_kwargs(model, out) -> dict:
    """The KV cache of a generate/forward output, as the keyword the model takes for the next step: `cache` in
    recent transformers, `past_key_values` in earlier 5.x and 4.x."""
    import inspect

    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def last_logits_only(model) -> dict:
    """Keywords that make a forward form the last position's logits only (`logits_to_keep=1`, which causal LMs of
    transformers 5 take), for callers that read `logits[:, -1]` alone: the LM head over a 49k vocabulary is about
    11 % of a 48-token SmolLM2 forward. {} for a model whose forward does not take it."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
