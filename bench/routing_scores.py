"""Would another routing score pick the own expert in more single (layer, token) cells than Arrow's?

The own expert wins the user's text by the *mean* over layers, but is the top-1 of few single cells
(bench/cell_routing.py), and that gap is what S5 measures. This probe asks whether the score is to blame. It
records the input of every routed group once, under the library's default router (at the layers it routes at,
if it routes at a subset; without its expert scales, if it has any), and scores the same hidden states several
ways:

- `arrow`: Arrow's |(h - mu) · p_e| (input-centred when the default router is), what the engine routes by;
- `spectral`: ||ΔW_e (h - mu)|| / σ1(ΔW_e), the whole rank-r spectrum of the expert instead of its top
  singular vector (as in SpectR, Fleshman & Van Durme 2024); the same as Arrow for a rank-1 expert;
- `zscore`: Arrow's score divided by its root mean square over the calibration prompts' tokens, per expert
  and site (an expert whose prototype lies along a high-variance direction no longer wins every token);
- `ema0.5`: Arrow's scores smoothed over the tokens, causally (s_t <- 0.5 s_t-1 + 0.5 s_t);
- `layer`: one decision per layer: the z-scored scores averaged over the layer's routed modules (q, k, v, o),
  then top-k once, shared by every module of the layer (as a mixture-of-experts router decides per layer).
  Not causal: o_proj's input exists only after q, k and v were routed, so no forward pass can route this way;
- `qkv`: the causal part of it: one decision shared by q, k and v (they read one input), o on its own;
- `dual`: |(h - mu) · d_e| with the prototypes' dual basis D = (P Pᵀ + λ I)⁻¹ P per site: the least-squares
  coefficient of each prototype in h, so that two overlapping prototypes (add, subtract) no longer share the
  direction they have in common; λ = `--dual-ridge` × the mean of P Pᵀ's diagonal. `dualz`: the same, z-scored;
- `famcentre`: Arrow with *family-centred* prototypes: each expert's factors minus its task family's mean factors
  (GenKnowSub's centring, per family instead of per library), so that what add and subtract share no longer counts;
- `family`: two stages: a token's family is the one whose best member has the largest Arrow score; within it the
  top-k weights come from the family-centred scores; `famoracle`: the second stage alone, inside the own family
  (an upper bound of how well family-centred prototypes separate a family's members);
- `null<c>`: Arrow plus a "no expert" slot whose score is c × the site's mean top Arrow score over the
  calibration prompts: a token whose best expert scores weakly sends its weight there (the base layer), so the
  mean over the user's text is carried by the tokens with evidence. Its weight counts for no expert;
- `ownz`: Arrow's score divided by the expert's mean score over its *own* task's training prompts (the user's
  text of the first `--fit-n` per task), per site: how much a token looks like the expert's own text, relative to
  how much its own text does (a per-expert scale fitted on training prompts, never on the split scored);
  `trainz`: the same, divided by the expert's mean score over every task's training prompts;
- `bias`: Arrow's score plus T · b, with one bias b per (site, expert) fitted on the same training prompts so
  that softmax(s / T + b) gives each user-text cell's own expert the largest probability (cross-entropy, Adam);
  T is the default router's temperature. A router with learned offsets, no longer training-free Arrow;
- `offset`: Arrow's score plus T · b_e, one offset per *expert*, the same at every site (E numbers), fitted on the
  same training prompts to the prompt-level goal itself: each prompt's own expert should have the largest mean
  top-k weight over its user text (a hinge on the margin, Adam, through the top-k softmax). A standing lead of one
  expert over a sibling on their shared text (bench/operator_twins.py) is one such offset. `scale`: the same fit
  for one factor per expert instead, Arrow's score × c_e, geometric mean 1 (the engine's `RouterConfig.scales`,
  folded into the prototypes; bench/fit_scales.py fits and records them).

Each is turned into top-k weights the way the router does, then scored as the routing evaluation does: the
share of prompts whose user text routes to the own expert by the mean weight, and the share of the user text's
(layer, module, token) cells whose top-1 is the own expert.

Usage::

    .venv/bin/python bench/routing_scores.py --library assets/libraries/demo-private --split paraphrase --n 6
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import attach_from_args, library_arguments  # noqa: E402

VARIANTS = ("arrow", "spectral", "zscore", "ema0.5", "layer", "qkv", "dual", "dualz", "famcentre", "family",
            "famoracle", "null0.5", "null1", "null1.5", "null2", "ownz", "trainz", "bias", "offset", "scale")


class Sites:
    """Every routed group's factors, and a hook that records its input (t, d) on each forward."""

    def __init__(self, rm, dual_ridge: float = 0.05):
        from explorer.routing.layer import RoutedLinear

        from explorer.routing.config import routed_layers

        kept = routed_layers(rm.router, rm.layers)  # None: every layer; else the layers the router routes at
        firsts = [m for m in rm.base.model.modules() if isinstance(m, RoutedLinear) and m.member == 0
                  and (kept is None or m.group.keys[0][0] in kept)]
        self.groups = [m.group for m in firsts]  # one per routed group; its first member sees the group's input
        self.inputs: dict[int, torch.Tensor] = {}
        self.hooks = [m.register_forward_pre_hook(self._record(i)) for i, m in enumerate(firsts)]
        E = len(rm.experts)
        centred = rm.router.input_centre == "base"
        self.factors = []
        for g in self.groups:
            G, r = g.n_members, g.rank
            P = g.protos.float().view(G, E, -1)  # (G, E, d)
            A = g.a_rows.float().view(G, E, r, -1)  # (G, E, r, d)
            K = g.gram.float().view(G, E, r, r)  # (G, E, r, r) = (s B)ᵀ (s B)
            s1 = torch.linalg.eigvals(A @ A.transpose(-1, -2) @ K).real.amax(-1).clamp_min(1e-30).sqrt()  # (G, E)
            d = P.shape[-1]
            mu = torch.stack([rm._means[s].float() for s in g.sites]) if centred else torch.zeros(G, d)  # (G, d)
            gram = P @ P.transpose(-1, -2)  # (G, E, E)
            ridge = dual_ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(E)  # (G, E, E)
            D = torch.linalg.solve(gram + ridge, P)  # (G, E, d): h · D_e = least-squares coefficient of p_e in h
            self.factors.append((P, A, K, s1, mu, D))
        self.rms: dict[tuple[str, int], torch.Tensor] = {}
        self.top_mean: dict[int, torch.Tensor] = {}  # (G,) per group: the mean top Arrow score on calibration
        self.fit_mean: dict[tuple[str, int], torch.Tensor] = {}  # (G, E) per group: ownz / trainz scales
        self.bias: dict[int, torch.Tensor] = {}  # (G, E) per group: T · b of the `bias` variant
        self.offset = torch.zeros(len(rm.experts))  # (E,): T · b of the `offset` variant
        self.scale = torch.ones(len(rm.experts))  # (E,): exp(b) of the `scale` variant
        self.fam_protos: list[torch.Tensor] = []  # (G, E, d) per group, when family_centre() ran

    def family_centre(self, experts: list, family: list[int]) -> None:
        """Family-centred prototypes of every routed group: each family's factors centred on the family's mean with
        the engine's own centring (`factor_means`, `centre_site`: mixed ranks included), then the exact prototypes.
        `family[e]` is expert e's family; every expert covers every routed site."""
        from explorer.routing.centring import centre_site, factor_means, site_ranks
        from explorer.routing.layer import pad_rank
        from explorer.routing.prototypes import compute_prototypes

        fam = torch.tensor(family)  # (E,)
        factors = [x.factors() for x in experts]
        for g in self.groups:
            ranks = site_ranks(experts, g.sites)
            per_site = []
            for site in g.sites:
                r = int(ranks[site].max())
                A = torch.cat([pad_rank(f[site][0].float()[None], r) for f in factors])  # (E, r, d)
                B = torch.cat([pad_rank(f[site][1].float().T[None], r) for f in factors]).transpose(1, 2)  # (E, out, r)
                Ac, Bc = torch.empty_like(A), torch.empty_like(B)
                for f in fam.unique():
                    m, rk = fam == f, ranks[site][fam == f]
                    Ac[m], Bc[m] = centre_site(A[m], B[m], rk, factor_means(A[m], B[m], rk))  # the family's mean
                per_site.append(compute_prototypes(Ac, Bc))  # (E, d)
            self.fam_protos.append(torch.stack(per_site))  # (G, E, d)

    def _record(self, i):
        def hook(_module, args):
            self.inputs[i] = args[0].reshape(-1, args[0].shape[-1]).detach().float()  # (t, d)
        return hook

    def scores(self, kind: str, i: int) -> torch.Tensor:
        """(t, G, E) scores of group i's recorded input."""
        P, A, K, s1, mu, D = self.factors[i]
        hc = self.inputs[i].unsqueeze(0) - mu.unsqueeze(1)  # (G, t, d)
        if kind == "spectral":
            a = torch.einsum("gerd,gtd->tger", A, hc)  # (t, G, E, r)
            return torch.einsum("tger,gers,tges->tge", a, K, a).clamp_min(0).sqrt() / s1  # (t, G, E)
        if kind.startswith("null"):
            s = torch.einsum("ged,gtd->tge", P, hc).abs()  # (t, G, E)
            floor = float(kind[4:]) * self.top_mean[i]  # (G,)
            return torch.cat([s, floor.expand(s.shape[0], -1).unsqueeze(-1)], -1)  # (t, G, E + 1): last = none
        if kind == "bias":
            return torch.einsum("ged,gtd->tge", P, hc).abs() + self.bias[i]  # (t, G, E)
        if kind == "offset":
            return torch.einsum("ged,gtd->tge", P, hc).abs() + self.offset  # (t, G, E)
        if kind == "scale":
            return torch.einsum("ged,gtd->tge", P, hc).abs() * self.scale  # (t, G, E)
        if kind in ("ownz", "trainz"):
            return torch.einsum("ged,gtd->tge", P, hc).abs() / self.fit_mean[(kind, i)]  # (t, G, E)
        if kind == "famcentre":
            return torch.einsum("ged,gtd->tge", self.fam_protos[i], hc).abs()  # (t, G, E)
        if kind.startswith("dual"):
            s = torch.einsum("ged,gtd->tge", D, hc).abs()  # (t, G, E)
            return s / self.rms[("dual", i)] if kind == "dualz" else s
        s = torch.einsum("ged,gtd->tge", P, hc).abs()  # (t, G, E)
        if kind == "zscore":
            return s / self.rms[("arrow", i)]
        if kind.startswith("ema"):
            alpha = float(kind[3:])
            out = s.clone()
            for t in range(1, s.shape[0]):
                out[t] = alpha * out[t - 1] + (1 - alpha) * s[t]
            return out
        return s

    def layer_scores(self, pos: list[int]) -> list[torch.Tensor]:
        """One (P, 1, E) score per layer: the z-scored scores of the layer's routed modules, averaged."""
        by_layer: dict[int, list[torch.Tensor]] = {}
        for i, g in enumerate(self.groups):
            by_layer.setdefault(g.keys[0][0], []).append(self.scores("zscore", i)[pos])  # (P, G, E)
        return [torch.cat(parts, dim=1).mean(1, keepdim=True) for _, parts in sorted(by_layer.items())]

    def group_scores(self, pos: list[int]) -> list[torch.Tensor]:
        """One (P, G, E) score per routed group: its members' z-scored scores averaged, the same for every member
        (q, k and v share one decision; o, a group of its own, keeps its own)."""
        out = []
        for i, g in enumerate(self.groups):
            z = self.scores("zscore", i)[pos]  # (P, G, E)
            out.append(z.mean(1, keepdim=True).expand_as(z))
        return out

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def calibrate(rm, sites: Sites) -> None:
    """Root mean square of Arrow's score per (site, expert) over the calibration prompts, in mode base."""
    from explorer.routing.calibration import CALIBRATION_PROMPTS
    from explorer.routing.model import with_router

    saved = rm.router
    rm.set_router(with_router(rm, mode="base"))
    squares: dict[tuple[str, int], list[torch.Tensor]] = {}
    tops: dict[int, list[torch.Tensor]] = {}
    for prompt in CALIBRATION_PROMPTS:
        rm.trace(prompt, max_new_tokens=0)
        for i in range(len(sites.groups)):
            for kind in ("arrow", "dual"):
                squares.setdefault((kind, i), []).append(sites.scores(kind, i) ** 2)
            tops.setdefault(i, []).append(sites.scores("arrow", i).amax(-1))  # (t, G)
    rm.set_router(saved)
    for key, parts in squares.items():
        sites.rms[key] = torch.cat(parts).mean(0).sqrt().clamp_min(1e-12)  # (G, E)
    for i, parts in tops.items():
        sites.top_mean[i] = torch.cat(parts).mean(0)  # (G,)


def fit_on_training(rm, sites: Sites, tasks: list, own: dict[str, str], n: int, bias: bool,
                    offset: bool = False, scale: bool = False) -> tuple:
    """What the fitted variants need, from the user's text of the first `n` training prompts per task: the
    `ownz` and `trainz` scales (each expert's mean Arrow score per site over its own task(s)' prompts, or every
    task's) and, with `bias`, `offset` and `scale`, those variants' fits. Returns what the fits read: (the Arrow
    scores (N, G, E) of every routed group, the own expert (N,) and the prompt (N,) of each user-text token)."""
    examples = [(ex.input, rm.experts.index(own[task.name])) for task in tasks for ex in task.examples("train")[:n]]
    scores, y, prompts = routed_scores(rm, sites, examples)  # (N, G, E) per group, (N,), (N,)
    mine = torch.nn.functional.one_hot(y, len(rm.experts)).float()  # (N, E): token n is expert e's own text
    for i, s in enumerate(scores):
        sites.fit_mean[("trainz", i)] = s.mean(0).clamp_min(1e-12)  # (G, E)
        own_mean = torch.einsum("nge,ne->ge", s, mine) / mine.sum(0).clamp_min(1)  # (G, E)
        sites.fit_mean[("ownz", i)] = own_mean.clamp_min(1e-12)
        if bias:
            sites.bias[i] = fit_bias(s, y, rm.router.temperature)
    if offset:
        sites.offset = fit_offset(scores, y, prompts, rm.router.top_k, rm.router.temperature)
    if scale:
        sites.scale = fit_offset(scores, y, prompts, rm.router.top_k, rm.router.temperature, scale=True)
    return scores, y, prompts


def routed_scores(rm, sites: Sites, examples: list[tuple[str, int]]) -> tuple:
    """Each (prompt, own expert index) routed once: (the Arrow scores (N, G, E) of every routed group over the
    prompts' user-text tokens, their own experts (N,), their prompts (N,), numbered from 0 in `examples`' order)."""
    cells: list[list[torch.Tensor]] = [[] for _ in sites.groups]
    y, prompt_of = [], []
    for j, (text, e) in enumerate(examples):
        pos = rm.trace(text, max_new_tokens=0).positions("user")
        for i, parts in enumerate(cells):
            parts.append(sites.scores("arrow", i)[pos])  # (P, G, E)
        y.append(torch.full((len(pos),), e))
        prompt_of.append(torch.full((len(pos),), j))
    return [torch.cat(parts) for parts in cells], torch.cat(y), torch.cat(prompt_of)


def fit_offset(scores: list[torch.Tensor], y: torch.Tensor, prompt_of: torch.Tensor, k: int, temperature: float,
               steps: int = 300, margin: float = 0.02, scale: bool = False, lr: float = 0.02) -> torch.Tensor:
    """(E,) offsets T · b, the same at every site, for the scores (N, G, E) of every routed group of N user-text
    tokens, token n of prompt prompt_of[n] whose own expert is y[n]: b minimises the mean hinge
    relu(margin − (w_own − max w_other)) over prompts, w the prompt's mean top-k weight (Adam; the b of the lowest
    loss seen is kept, so the fit never ends worse than it started). With `scale`, (E,) factors exp(b − mean b)
    of the scores instead (geometric mean 1: T keeps its meaning)."""
    own = prompt_owners(y, prompt_of)  # (n_prompts,)
    b = torch.zeros(scores[0].shape[-1], requires_grad=True)  # (E,)
    opt = torch.optim.Adam([b], lr=lr)
    best = (float("inf"), b.detach().clone())
    with torch.enable_grad():
        for _ in range(steps + 1):
            logits = [s * (b - b.mean()).exp() / temperature if scale else s / temperature + b for s in scores]
            mean = prompt_weights(logits, prompt_of, k)  # (n_prompts, E)
            mine = mean.gather(1, own[:, None]).squeeze(1)  # (n_prompts,)
            rival = mean.scatter(1, own[:, None], float("-inf")).amax(1)  # (n_prompts,)
            loss = torch.relu(margin - (mine - rival)).mean()
            if loss.item() < best[0]:
                best = (loss.item(), b.detach().clone())
            opt.zero_grad()
            loss.backward()
            opt.step()
    b = best[1]
    return (b - b.mean()).exp() if scale else temperature * b


def prompt_weights(logits: list[torch.Tensor], prompt_of: torch.Tensor, k: int) -> torch.Tensor:
    """(n_prompts, E) each prompt's mean top-k softmax weight over its user-text tokens and every routed group's
    cells, from the logits (N, G, E) of every routed group (scores / T) of N tokens, token n of prompt
    prompt_of[n] (prompts numbered from 0)."""
    n_prompts = int(prompt_of.max()) + 1
    w = torch.cat([top_weights(x, k, 1.0) for x in logits], dim=1).mean(1)  # (N, E)
    count = torch.zeros(n_prompts).index_add_(0, prompt_of, torch.ones(len(prompt_of)))  # (n_prompts,) tokens
    return torch.zeros(n_prompts, w.shape[1]).index_add(0, prompt_of, w) / count[:, None]


def prompt_owners(y: torch.Tensor, prompt_of: torch.Tensor) -> torch.Tensor:
    """(n_prompts,) the own expert of each prompt, from its tokens' own experts y (N,)."""
    return torch.zeros(int(prompt_of.max()) + 1, dtype=torch.long).scatter(0, prompt_of, y)


def top_weights(s: torch.Tensor, k: int, temperature: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(..., E) scores -> the router's top-k softmax(s / T) weights, 0 elsewhere; only `allowed` experts
    ((..., E) bool) compete when given (k shrinks to how many are allowed)."""
    if allowed is not None:
        k = min(k, int(allowed.sum(-1).min()))
        s = s.masked_fill(~allowed, float("-inf"))
    top, idx = (s / temperature).topk(k, dim=-1)
    return torch.zeros_like(s).scatter(-1, idx, top.softmax(-1))


def family_weights(sites: Sites, i: int, pos: list[int], family: torch.Tensor, st, own: int | None):
    """(P, G, E) weights of the two-stage router: a family per cell by its best member's Arrow score (or the
    own expert's family when `own` is given), then top-k within it on the family-centred scores."""
    if own is None:
        arrow = sites.scores("arrow", i)[pos]  # (P, G, E)
        best = torch.stack([arrow[..., family == f].amax(-1) for f in range(int(family.max()) + 1)], -1)  # (P, G, F)
        chosen = best.argmax(-1)  # (P, G)
    else:
        chosen = torch.full(sites.inputs[i][pos].shape[:1] + (sites.groups[i].n_members,), int(family[own]))
    allowed = family[None, None, :] == chosen[..., None]  # (P, G, E)
    return top_weights(sites.scores("famcentre", i)[pos], *st, allowed=allowed)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--split", default="paraphrase", choices=["train", "heldout", "paraphrase"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--n", type=int, default=6, help="prompts per task")
    ap.add_argument("--settings", nargs="+", metavar="K:T",
                    help="top-k:temperature pairs to score (default: the router's own, and top-4 at T 1)")
    ap.add_argument("--fit-n", type=int, default=20, help="ownz, trainz, bias: training prompts per task to fit on")
    ap.add_argument("--dual-ridge", type=float, default=0.05, help="λ of the dual scores, a share of the mean "
                    "diagonal of the prototypes' Gram matrix")
    args = ap.parse_args(argv)
    from library_store.tasks import resolve_tasks

    start = time.time()
    rm, source, own = attach_from_args(args)
    from explorer.routing.model import with_router

    # the per-token routing a per-prompt router picks from (its evidence pass), on Arrow's plain score: every variant
    # (the `scale` one included, which bench/fit_scales.py records) is an alternative to it
    rm.set_router(with_router(rm, granularity="token", scales=()))
    sites = Sites(rm, args.dual_ridge)
    calibrate(rm, sites)
    family = None
    if {"famcentre", "family", "famoracle"} & set(args.variants):
        from library_store.store.library import ExpertLibrary
        from library_store.tasks.builtin import builtin_family

        lib = ExpertLibrary.open(args.library, readonly=True)
        experts = [lib.get(name) for name in rm.experts]
        names = sorted({builtin_family(x.info.tasks[0]) for x in experts})
        family = torch.tensor([names.index(builtin_family(x.info.tasks[0])) for x in experts])  # (E,)
        sites.family_centre(experts, family.tolist())
    tasks = resolve_tasks("builtin:" + ",".join(sorted(own)))
    if {"ownz", "trainz", "bias", "offset", "scale"} & set(args.variants):
        with torch.no_grad():
            fit_on_training(rm, sites, tasks, own, args.fit_n, bias="bias" in args.variants,
                            offset="offset" in args.variants, scale="scale" in args.variants)
        if "offset" in args.variants:
            print("offset T·b per expert:", {x: round(float(v), 4) for x, v in zip(rm.experts, sites.offset)})
        if "scale" in args.variants:
            print("scale per expert:", {x: round(float(v), 4) for x, v in zip(rm.experts, sites.scale)})
    router = rm.router
    settings = [(router.top_k, router.temperature), (min(4, len(rm.experts)), 1.0)]
    if args.settings:
        settings = [(min(int(k), len(rm.experts)), float(t)) for k, t in (x.split(":") for x in args.settings)]
    hits = {(v, st): ([], []) for v in args.variants for st in settings}
    with torch.no_grad():
        for task in tasks:
            e = rm.experts.index(own[task.name])
            for ex in task.examples(args.split)[: args.n]:
                pos = rm.trace(ex.input, max_new_tokens=0).positions("user")
                for v in args.variants:
                    if v in ("family", "famoracle"):
                        scores = None
                    else:
                        scores = sites.layer_scores(pos) if v == "layer" else sites.group_scores(pos) \
                            if v == "qkv" else [sites.scores(v, i)[pos] for i in range(len(sites.groups))]  # (P, G, E)
                    for st in settings:
                        if scores is None:
                            w = torch.cat([family_weights(sites, i, pos, family, st, e if v == "famoracle" else None)
                                           for i in range(len(sites.groups))], dim=1)  # (P, cells per token, E)
                        else:
                            w = torch.cat([top_weights(s, *st) for s in scores], dim=1)  # (P, cells per token, E)
                        w = w[..., : len(rm.experts)]  # a null slot's weight counts for no expert
                        mean = w.mean((0, 1))  # (E,); all zero when every cell chose no expert: a miss
                        hits[(v, st)][0].append(float(mean.argmax() == e and mean.max() > 0))
                        own_top = (w.argmax(-1) == e) & (w.amax(-1) > 0)  # a cell that chose no expert is no hit
                        hits[(v, st)][1].append(float(own_top.float().mean()))
    sites.remove()
    print(f"{Path(args.library).name}, split {args.split}, {args.n} prompts x {len(tasks)} tasks, default router "
          f"{router.to_dict()} ({source}), {time.time() - start:.0f} s")
    print("| score | top-k, T | own text routed right (prompts) | own expert top-1 (user-text cells) |")
    print("|---|---|---|---|")
    for st in settings:
        for v in args.variants:
            prompts, cells = hits[(v, st)]
            print(f"| {v} | {st[0]}, {st[1]:g} | {np.mean(prompts):.3f} | {np.mean(cells):.3f} |")
    rm.detach()


if __name__ == "__main__":
    main()
