"""The library's cache of Arrow prototypes and what a trace records about the library: helpers of
`RoutedModel.from_library` (explorer/routing/model.py). A whole set's prototypes are one derived entry; each
expert's own are another, so an added expert is the only one computed.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from explorer.routing.inject import PROTOTYPE_KIND, build_stacks, prototype_config
from explorer.routing.prototypes import PROTOTYPE_METHOD
from library_store.expert import LoraExpert

log = logging.getLogger(__name__)


def library_identity(library, experts: list[LoraExpert]) -> dict:
    """What a trace records about the library it was routed over: {"name": folder name, "path", "content":
    sha256 over the sorted (name, checksum) pairs of the routed experts} (same experts, same content)."""
    pairs = sorted([e.name, e.info.checksum] for e in experts)
    content = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    root = Path(library.root)
    return {"name": root.name, "path": str(root), "content": content}


EXPERT_PROTOTYPE_KIND = "arrow-prototype"  # one expert's prototypes: an added expert is the only one computed


def _expert_config(expert: LoraExpert) -> dict:
    """The key of one expert's entry. `layout` "flat": its prototypes are one tensor, every site's (d,) one after the
    other, and the meta lists (site, d) in that order. One tensor instead of one per site makes writing 64 experts'
    entries 0.3 s faster (safetensors' cost is per tensor); the older per-site entries are simply not found."""
    return {"method": PROTOTYPE_METHOD, "layout": "flat", "expert": [expert.name, expert.info.checksum]}


def _expert_prototypes(library, experts: list[LoraExpert]) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {site: (d,)}} for the experts whose own prototypes are cached (e.g. all but a new upload)."""
    out = {}
    for e in experts:
        hit = library.get_derived(EXPERT_PROTOTYPE_KIND, _expert_config(e))
        if hit is not None and "prototypes" in hit[0] and "sites" in hit[1]:  # else a miss: computed again
            flat, sites = hit[0]["prototypes"], hit[1]["sites"]  # (sum of d,), [[site, d], ...]
            out[e.name] = dict(zip([s for s, _ in sites], flat.split([d for _, d in sites])))
    return out


def _cache_prototypes(library, rm, experts: list[LoraExpert], config: dict, known: dict) -> None:
    """One entry for the whole set (one read next time) and one per newly computed expert."""
    try:
        library.put_derived(PROTOTYPE_KIND, config, {s: st.prototypes for s, st in rm._stacks.items()},
                            {"experts": rm.experts})
        for i, e in enumerate(experts):
            if e.name not in known:
                sites = e.factors()  # once per expert: it scans and sorts every weight name
                own = [(s, st.prototypes[i]) for s, st in rm._stacks.items() if s in sites]  # [(site, (d,))]
                library.put_derived(EXPERT_PROTOTYPE_KIND, _expert_config(e), {"prototypes": torch.cat(
                    [p for _, p in own])}, {"expert": e.name, "sites": [[s, p.numel()] for s, p in own]})
    except Exception as exc:  # a library that cannot cache still routes; it just recomputes next time
        log.info("prototypes not cached: %s", exc)


def _unroutable(experts: list[LoraExpert], exc: Exception) -> dict[str, str]:
    """The experts whose prototypes cannot be computed on their own (after attaching all of them failed)."""
    bad = {}
    for e in experts:
        try:
            build_stacks([e])
        except Exception as own:  # noqa: BLE001 - any failure of this one expert is its own
            bad[e.name] = f"prototypes cannot be computed: {type(own).__name__}: {own}"
    return bad


def seed_prototypes(lib, before) -> int | None:
    """Cache the prototypes of `lib`'s routable set from `before` (a snapshot of the previous set), computing
    only the experts that are new or changed; `RoutedModel.from_library` then reads them. Returns how many
    experts were computed, or None when nothing could be reused (from_library computes them all)."""
    if before is None:
        return None
    pairs, old = before
    known = {name: i for i, (name, checksum) in enumerate(pairs)}
    checks = lib.checksums()
    names = lib.routable_names()
    try:
        experts = [lib[n] for n in names]
    except Exception:  # a broken expert: from_library skips it and says why
        return None
    new = [e for e in experts if e.name not in known or checks.get(e.name) != pairs[known[e.name]][1]]
    fresh = build_stacks(new) if new else {}  # only the new experts' prototypes: {site: (n_new, d)}
    if not set(fresh) <= set(old) or any(set(e.factors()) != set(old) for e in new):
        return None  # another set of layers: zero padding differs, let from_library compute everything
    index = {e.name: i for i, e in enumerate(new)}
    protos = {site: torch.stack([fresh[site].prototypes[index[e.name]] if e.name in index else p[known[e.name]]
                                 for e in experts]) for site, p in old.items()}  # (E, d)
    try:
        lib.put_derived(PROTOTYPE_KIND, prototype_config(experts), protos, {"experts": names})
    except Exception as exc:  # not cached: from_library computes them all
        log.info("prototypes not seeded: %s", exc)
        return None
    return len(new)
