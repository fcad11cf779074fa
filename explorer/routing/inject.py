"""Attaching E experts to a base model: stack their factors per site, compute or reuse prototypes, swap layers.

Usage::

    stacks = build_stacks(experts, prototypes=None)      # {site: SiteStack}, sites in model order
    keys = wrap_model(model, stacks, state)              # {site: (layer_index, module_index)}
    unwrap_model(model)                                  # the plain nn.Linear layers back

No PEFT model is built: attaching is tensor stacking, so a 64-expert library attaches in well under a second
once its weights are read.
"""
from __future__ import annotations

import torch
from torch import nn

from explorer.routing.layer import RoutedLinear, routed_group
from explorer.routing.state import RouterState, SiteStack
from explorer.routing.prototypes import PROTOTYPE_METHOD, compute_prototypes
from library_store.expert import LoraExpert, parse_site

PROTOTYPE_KIND = "arrow-prototypes"
# Factors stacked per batched prototype call: 8 MB stays in cache between the QR and the eigenproblem; measured
# on 24 Phi-2-shaped sites, 128 MB chunks took 0.69 s against 0.36 s at 8 MB.
CHUNK_FLOATS = 1 << 21
CENTRING_METHOD = "factor-mean-v1"  # version of centring.py's maths, in the key of centred prototypes


def prototype_config(experts: list[LoraExpert], centre: str = "none", general: LoraExpert | None = None) -> dict:
    """What a cached prototype set depends on: the method and every expert's weights (name, checksum), in
    order. One entry per attached set: a changed library recomputes (about a second), a same one reads once.
    Centred prototypes (docs/design.md, "Centring") add the centring, see `centred_config`."""
    config = {"method": PROTOTYPE_METHOD, "experts": [[e.name, e.info.checksum] for e in experts]}
    return centred_config(config, centre, general)


def centred_config(config: dict, centre: str, general: LoraExpert | None = None) -> dict:
    """`config` (an attached set's) plus the centring: "mean" or "general:<name>" with that expert's checksum.
    The scope is not in it: both scopes route on the same centred prototypes. "none" leaves it unchanged, so
    prototypes cached before centring existed stay valid."""
    if centre == "none":
        return config
    out = {**config, "centre": centre, "centring": CENTRING_METHOD}
    if general is not None:
        out["general"] = [general.name, general.info.checksum]
    return out


@torch.no_grad()
def build_stacks(experts: list[LoraExpert], prototypes: dict[str, dict[str, torch.Tensor]] | None = None,
                 site_order: list[str] | None = None,
                 site_prototypes: dict[str, torch.Tensor] | None = None) -> dict[str, SiteStack]:
    """One SiteStack per site any expert covers; missing sites and smaller ranks are zero-padded.

    `prototypes` maps expert name -> {site: (d,)} for experts whose prototypes are already known (a cache);
    `site_prototypes` {site: (E, d)} holds every expert's at once (the cache entry of the whole set, used as
    is); the others are computed here, batched over all sites of one shape.
    """
    names = [e.name for e in experts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"Duplicate expert names: {dupes}")
    factors = [e.factors() for e in experts]
    shapes: dict[str, tuple[int, int]] = {}  # site -> (out, d)
    for expert, fac in zip(experts, factors):
        for site, (a, b) in fac.items():
            shape = (b.shape[0], a.shape[1])
            if shapes.setdefault(site, shape) != shape:
                raise ValueError(f"Expert {expert.name!r} has a {shape[0]} x {shape[1]} update at {site}; "
                                 f"others have {shapes[site][0]} x {shapes[site][1]}: not the same base model.")
    order = site_order or sorted(shapes, key=lambda s: (parse_site(s)[0], s))
    known = prototypes or {}
    scaling = torch.tensor([e.scaling for e in experts], dtype=torch.float32)  # (E,)
    stacks: dict[str, SiteStack] = {}
    jobs: dict[tuple, list[tuple[str, list[int]]]] = {}  # (r, d, out) -> [(site, experts to compute)]
    for site in [s for s in order if s in shapes]:
        out, d = shapes[site]
        facs = [fac.get(site) for fac in factors]
        r = max(f[0].shape[0] for f in facs if f is not None)
        if all(f is not None and f[0].shape[0] == r for f in facs):  # the usual case: one cast per stack
            A = torch.stack([f[0] for f in facs]).float()  # (E, r, d)
            B = torch.stack([f[1] for f in facs]).float()  # (E, out, r)
        else:
            A = torch.stack([_padded(f[0] if f else None, (r, d)) for f in facs])  # (E, r_max, d)
            B = torch.stack([_padded(f[1] if f else None, (out, r)) for f in facs])  # (E, out, r_max)
        whole = (site_prototypes or {}).get(site)
        if whole is not None and tuple(whole.shape) == (len(experts), d):
            protos, todo = whole.float(), []  # (E, d), nothing to compute
        else:
            cached = [known.get(e.name, {}).get(site) for e in experts]
            protos = torch.stack([p if p is not None else torch.zeros(d) for p in cached])  # (E, d)
            todo = [i for i, p in enumerate(cached) if p is None]
        stacks[site] = SiteStack(site, protos, A, B, scaling)
        if todo:
            jobs.setdefault((r, d, out), []).append((site, todo))
    # One batched QR/SVD per layer shape (q and o share one, k and v another): a handful of calls for the
    # whole model instead of one per site keeps attaching fast even on a busy CPU.
    E = len(experts)
    for group in (chunk for (r, d, out), g in jobs.items() for chunk in _chunks(g, r * (d + out))):
        def pick(t, todo):  # all experts (the usual case) without an index copy
            return t if len(todo) == E else t[todo]

        A = torch.cat([pick(stacks[site].A, todo) for site, todo in group])  # (sum of todo, r, d)
        B = torch.cat([pick(stacks[site].B, todo) for site, todo in group])  # (sum of todo, out, r)
        protos = compute_prototypes(A, B).split([len(todo) for _, todo in group])
        for (site, todo), p in zip(group, protos):
            if len(todo) == E:
                stacks[site].prototypes = p
            else:
                stacks[site].prototypes[todo] = p
    return stacks


def _chunks(group: list[tuple[str, list[int]]], row_size: int, max_floats: int = CHUNK_FLOATS) -> list[list]:
    """Split a shape group so one batched call stacks at most `max_floats` (8 MB) of factors: 256 Phi-2
    experts at all 128 sites would otherwise be 2.7 GB at once."""
    max_rows = max(1, max_floats // row_size)
    out, rows = [[]], 0
    for job in group:
        if out[-1] and rows + len(job[1]) > max_rows:
            out.append([])
            rows = 0
        out[-1].append(job)
        rows += len(job[1])
    return out


def _padded(t: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """`t` zero-padded to `shape` (a smaller rank, or an expert that does not cover this site)."""
    if t is None:
        return torch.zeros(shape)
    if tuple(t.shape) == shape:
        return t.float()
    out = torch.zeros(shape)
    out[: t.shape[0], : t.shape[1]] = t
    return out


SHARED_INPUT = ("q_proj", "k_proj", "v_proj")  # read the same hidden state in Llama and Phi attention


def wrap_model(model: nn.Module, stacks: dict[str, SiteStack], state: RouterState,
               share_inputs: bool = True) -> dict[str, tuple[int, int]]:
    """Replace each stacked site's layer by a RoutedLinear; returns site -> (layer index, module index)
    where module index is the leaf name's position in model order. With `share_inputs`, the q, k and v
    layers of one block share their first matmul (`RoutedGroup`)."""
    unwrap_model(model)
    modules = dict(model.named_modules())
    missing = [s for s in stacks if s not in modules]
    if missing:
        raise LookupError(f"The experts target layers this model does not have, e.g. {missing[:3]}")
    leaves = module_leaves(list(stacks))
    keys = {site: (parse_site(site)[0], leaves.index(parse_site(site)[1])) for site in stacks}
    groups: dict[str, list[str]] = {}  # one list per shared input, in model order
    for site in stacks:
        parent, _, leaf = site.rpartition(".")
        groups.setdefault(parent + ".qkv" if share_inputs and leaf in SHARED_INPUT else site, []).append(site)
    for sites in groups.values():
        bases = [model.get_submodule(s) for s in sites]
        for s, b in zip(sites, bases):
            if not isinstance(b, nn.Linear):
                raise TypeError(f"Arrow routing wraps nn.Linear only; {s} is a {type(b).__name__}.")
        routed = routed_group(bases, [stacks[s] for s in sites], state, [keys[s] for s in sites])
        for site, layer in zip(sites, routed):
            parent, _, attr = site.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
    return keys


def module_leaves(sites: list[str]) -> list[str]:
    """Leaf names (q_proj, k_proj, ...) in order of first appearance."""
    leaves: list[str] = []
    for site in sites:
        leaf = parse_site(site)[1]
        if leaf not in leaves:
            leaves.append(leaf)
    return leaves


def unwrap_model(model: nn.Module) -> int:
    """Put the plain layers back; returns how many were unwrapped."""
    routed = [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedLinear)]
    for name, mod in routed:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, mod.base)
    return len(routed)
