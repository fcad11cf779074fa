"""Centring (GenKnowSub): subtract a general LoRA from every expert, factor-wise, before routing (and applying).

Usage::

    centring = Centring(stacks, ranks, prototype_config(experts), general={}, store=library)
    stacks = centring.stacks(RouterConfig(centre="mean", centre_scope="weights"))   # {site: SiteStack}
    means = {s: factor_means(st.A, st.B, ranks[s]) for s, st in stacks.items()}    # the maths on its own
    protos = centred_prototypes(stacks, ranks, means)                              # {site: (E, d)}, exact

A_e <- A_e - mean(A), B_e <- B_e - mean(B) per site over a set of "general" experts: every routed expert
("mean") or one named expert ("general:<name>"). Centred prototypes are the same exact prototypes of the centred
factors; scope "weights" also applies the centred factors (PEFT's `ArrowConfig(use_gks=True)`), scope
"prototypes" applies the experts as trained. Mixed ranks: row i of A (column i of B) is averaged over the
experts that have a rank-i component at that site and subtracted only from those, so zero padding never enters
a mean. See docs/design.md, "Centring".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from explorer.routing.inject import PROTOTYPE_KIND, centred_config
from explorer.routing.state import SiteStack
from explorer.routing.prototypes import compute_prototypes
from library_store.expert import LoraExpert

log = logging.getLogger(__name__)


@dataclass
class SiteMean:
    """What is subtracted at one site: A (r, d), B (out, r); `rows` (r,) False where no general expert has
    that rank component (nothing is subtracted there)."""

    A: torch.Tensor  # (r, d)
    B: torch.Tensor  # (out, r)
    rows: torch.Tensor  # (r,) bool


def site_ranks(experts: list[LoraExpert], sites: list[str]) -> dict[str, torch.Tensor]:
    """{site: (E,) each expert's rank at that site}, 0 where the expert does not cover it."""
    factors = [e.factors() for e in experts]
    return {s: torch.tensor([f[s][0].shape[0] if s in f else 0 for f in factors], dtype=torch.long)
            for s in sites}


def own_rows(ranks: torch.Tensor, r: int) -> torch.Tensor:
    """(E,) ranks -> (E, r) bool: True where the expert has that rank component (not zero padding)."""
    return torch.arange(r) < ranks[:, None]  # (E, r)


@torch.no_grad()
def factor_means(A: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor) -> SiteMean:
    """A (G, r, d), B (G, out, r) zero-padded, ranks (G,) -> the per-row mean over the experts having each row.

    Padded rows are exact zeros, so they add nothing to the sums; only the counts exclude them.
    """
    count = own_rows(ranks, A.shape[1]).sum(0)  # (r,)
    denom = count.clamp(min=1).to(A.dtype)  # (r,)
    return SiteMean(A.sum(0) / denom[:, None], B.sum(0) / denom[None, :], count > 0)  # (r, d), (out, r)


def _fit(mean: SiteMean, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean's factors cut or zero-padded to rank r (rows past r belong to no expert here)."""
    A, B = mean.A, mean.B
    if A.shape[0] > r:
        return A[:r], B[:, :r]
    if A.shape[0] < r:
        pad = r - A.shape[0]
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])])  # (r, d)
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)  # (out, r)
    return A, B


@torch.no_grad()
def centre_site(A: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor, mean: SiteMean | None,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (E, r, d), B (E, out, r) -> centred copies (written into `out` when given). Each expert loses the mean
    only on its own rank components; with no mean (the general set misses this site) the factors are copied."""
    out_a, out_b = out if out is not None else (torch.empty_like(A), torch.empty_like(B))
    if mean is None:
        return out_a.copy_(A), out_b.copy_(B)
    m_a, m_b = _fit(mean, A.shape[1])  # (r, d), (out, r)
    own = own_rows(ranks, A.shape[1])  # (E, r)
    if bool(own.all()):  # the usual case: one rank everywhere
        return torch.sub(A, m_a, out=out_a), torch.sub(B, m_b, out=out_b)
    own = own.to(A.dtype)
    torch.sub(A, own[:, :, None] * m_a, out=out_a)  # (E, r, d)
    torch.sub(B, own[:, None, :] * m_b, out=out_b)  # (E, out, r)
    return out_a, out_b


@torch.no_grad()
def centred_prototypes(stacks: dict[str, SiteStack], ranks: dict[str, torch.Tensor],
                       means: dict[str, SiteMean], max_floats: int = 1 << 21) -> dict[str, torch.Tensor]:
    """{site: (E, d)} exact prototypes of the centred factors, without keeping the centred factors: sites of
    one shape are centred into one reused buffer of at most `max_floats` (8 MB, or one site) and go through
    one batched call. A buffer that stays in the L3 cache between filling and the QR measured twice as fast
    as 128 MB ones (256 Phi-2-sized experts)."""
    groups: dict[tuple, list[str]] = {}
    for site, st in stacks.items():
        groups.setdefault(tuple(st.A.shape[1:]) + (st.B.shape[1],), []).append(site)
    out: dict[str, torch.Tensor] = {}
    for (r, d, o), sites in groups.items():
        E = stacks[sites[0]].A.shape[0]
        per_call = min(len(sites), max(1, max_floats // max(1, E * r * (d + o))))
        A_buf, B_buf = torch.empty(per_call * E, r, d), torch.empty(per_call * E, o, r)  # (n E, r, d), (n E, out, r)
        for i in range(0, len(sites), per_call):
            chunk = sites[i: i + per_call]
            A, B = A_buf[: len(chunk) * E], B_buf[: len(chunk) * E]  # (n E, r, d), (n E, out, r)
            for j, site in enumerate(chunk):
                st = stacks[site]
                centre_site(st.A, st.B, ranks[site], means.get(site), (A[j * E:(j + 1) * E], B[j * E:(j + 1) * E]))
            for site, p in zip(chunk, compute_prototypes(A, B).split(E)):
                out[site] = p  # (E, d)
    return out


def expert_means(expert: LoraExpert, stacks: dict[str, SiteStack]) -> dict[str, SiteMean]:
    """One general expert's factors as the mean to subtract, at the sites the routed experts cover."""
    factors = expert.factors()
    out = {}
    for site, st in stacks.items():
        if site not in factors:
            continue
        a, b = factors[site]
        want = (st.B.shape[1], st.A.shape[2])
        if (b.shape[0], a.shape[1]) != want:
            raise ValueError(f"General expert {expert.name!r} has a {b.shape[0]} x {a.shape[1]} update at {site}; "
                             f"the routed experts have {want[0]} x {want[1]} there: it cannot be subtracted.")
        out[site] = SiteMean(a.float(), b.float(), torch.ones(a.shape[0], dtype=torch.bool))
    if not out:
        raise ValueError(f"General expert {expert.name!r} covers none of the routed experts' layers.")
    return out


class Centring:
    """The centring state of one RoutedModel: its raw stacks, the centred prototypes met so far (per centre,
    shared by both scopes) and the library's derived-data cache (`store`, an ExpertLibrary, may be None)."""

    def __init__(self, stacks: dict[str, SiteStack], ranks: dict[str, torch.Tensor], config: dict,
                 general: dict[str, LoraExpert] | None = None, store=None):
        self.raw, self.ranks, self.config, self.store = stacks, ranks, config, store
        self.names = [n for n, _ in config["experts"]]
        self.general = dict(general or {})  # name -> LoraExpert, filled from the store on demand
        self.prototypes: dict[str, dict[str, torch.Tensor]] = {}  # centre -> {site: (E, d)}

    def stacks(self, centre: str, scope: str) -> dict[str, SiteStack]:
        """The stacks to wrap for this centring (the raw ones for "none"). Raises ValueError on a centring
        this library cannot take; nothing changes then."""
        if centre == "none":
            return self.raw
        means, general = self.means(centre)
        protos = self.prototypes.get(centre) or self._cached(centre, general)
        if protos is None:
            protos = centred_prototypes(self.raw, self.ranks, means)
            self._store(centre, general, protos)
        self.prototypes[centre] = protos
        if scope == "prototypes":
            return {s: SiteStack(s, protos[s], st.A, st.B, st.scaling) for s, st in self.raw.items()}
        return {s: SiteStack(s, protos[s], *centre_site(st.A, st.B, self.ranks[s], means.get(s)), st.scaling)
                for s, st in self.raw.items()}

    def means(self, centre: str) -> tuple[dict[str, SiteMean], LoraExpert | None]:
        """{site: SiteMean} to subtract, and the general expert (None for "mean" or a routed expert)."""
        if centre == "mean":
            if len(self.names) < 3:
                raise ValueError(
                    f"Centring with 'mean' needs at least 3 routed experts; this library routes {len(self.names)}. "
                    "With one, its centred factors are zero (the expert minus itself: no prototype, no update); "
                    "with two, both centred updates are the same matrix, so the router cannot tell them apart.")
            return {s: factor_means(st.A, st.B, self.ranks[s]) for s, st in self.raw.items()}, None
        name = centre.split(":", 1)[1]
        if name in self.names:  # a routed expert as the general one (it then centres to zero itself)
            i = self.names.index(name)
            return {s: factor_means(st.A[i:i + 1], st.B[i:i + 1], self.ranks[s][i:i + 1])
                    for s, st in self.raw.items() if self.ranks[s][i] > 0}, None
        expert = self._general_expert(name)
        return expert_means(expert, self.raw), expert

    def _general_expert(self, name: str) -> LoraExpert:
        if name not in self.general and self.store is not None and name in self.store:
            self.general[name] = self.store[name]
        if name not in self.general:
            known = self.store.names() if self.store is not None else sorted(set(self.names) | set(self.general))
            raise ValueError(f"No expert {name!r} to centre on (centre 'general:{name}'); the library has {known}.")
        return self.general[name]

    def cache_config(self, centre: str, general: LoraExpert | None) -> dict:
        """The derived-data config of these centred prototypes: the attached set's, plus the centring."""
        return centred_config(self.config, centre, general)

    def _cached(self, centre: str, general: LoraExpert | None) -> dict[str, torch.Tensor] | None:
        if self.store is None:
            return None
        try:
            hit = self.store.get_derived(PROTOTYPE_KIND, self.cache_config(centre, general))
        except Exception as exc:  # a broken cache must not stop routing
            log.info("centred prototypes not read from the cache: %s", exc)
            return None
        if hit is None:
            return None
        protos, E = hit[0], len(self.names)
        ok = set(protos) == set(self.raw) and all(tuple(protos[s].shape) == (E, st.A.shape[2])
                                                  for s, st in self.raw.items())
        return {s: protos[s].float() for s in self.raw} if ok else None

    def _store(self, centre: str, general: LoraExpert | None, protos: dict[str, torch.Tensor]) -> None:
        if self.store is None:
            return
        try:
            self.store.put_derived(PROTOTYPE_KIND, self.cache_config(centre, general), protos,
                                   {"experts": self.names, "centre": centre})
        except Exception as exc:  # a read-only library still routes; it just recomputes next time
            log.info("centred prototypes not cached: %s", exc)
