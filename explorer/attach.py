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

from explorer.arrow import PROTOTYPE_METHOD, RoutedLinear, RouterState, SiteStack, compute_prototypes
from library_store.expert import LoraExpert, parse_site

PROTOTYPE_KIND = "arrow-prototypes"


def prototype_config(expert: LoraExpert) -> dict:
    """What a cached prototype set depends on: the expert's weights (checksum) and the method."""
    return {"expert": expert.name, "checksum": expert.info.checksum, "method": PROTOTYPE_METHOD}


@torch.no_grad()
def build_stacks(experts: list[LoraExpert], prototypes: dict[str, dict[str, torch.Tensor]] | None = None,
                 site_order: list[str] | None = None) -> dict[str, SiteStack]:
    """One SiteStack per site any expert covers; missing sites and smaller ranks are zero-padded.

    `prototypes` maps expert name -> {site: (d,)} for experts whose prototypes are already known (a cache);
    the others are computed here, batched over experts per site.
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
    E = len(experts)
    stacks: dict[str, SiteStack] = {}
    for site in [s for s in order if s in shapes]:
        out, d = shapes[site]
        r = max(fac[site][0].shape[0] for fac in factors if site in fac)
        A = torch.zeros(E, r, d)  # (E, r_max, d)
        B = torch.zeros(E, out, r)  # (E, out, r_max)
        for i, fac in enumerate(factors):
            if site in fac:
                a, b = fac[site]
                A[i, : a.shape[0]] = a
                B[i, :, : b.shape[1]] = b
        scaling = torch.tensor([e.scaling for e in experts], dtype=torch.float32)  # (E,)
        protos = torch.zeros(E, d)  # (E, d)
        todo = [i for i, e in enumerate(experts) if site not in known.get(e.name, {})]
        for i, e in enumerate(experts):
            if i not in todo:
                protos[i] = known[e.name][site]
        if todo:
            protos[todo] = compute_prototypes(A[todo], B[todo])
        stacks[site] = SiteStack(site, protos, A, B, scaling)
    return stacks


def split_prototypes(stacks: dict[str, SiteStack], names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{expert name: {site: (d,)}} from the stacks, for caching per expert."""
    return {n: {site: st.prototypes[i].clone() for site, st in stacks.items()} for i, n in enumerate(names)}


def model_sites(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the target layers inside the decoder layers, in model order."""
    out = []
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets:
            try:
                parse_site(name)
            except LookupError:
                continue
            out.append(name)
    return out


def wrap_model(model: nn.Module, stacks: dict[str, SiteStack], state: RouterState) -> dict[str, tuple[int, int]]:
    """Replace each stacked site's layer by a RoutedLinear; returns site -> (layer index, module index)
    where module index is the leaf name's position in model order."""
    unwrap_model(model)
    modules = dict(model.named_modules())
    missing = [s for s in stacks if s not in modules]
    if missing:
        raise LookupError(f"The experts target layers this model does not have, e.g. {missing[:3]}")
    leaves = module_leaves(list(stacks))
    keys = {}
    for site, stack in stacks.items():
        layer, leaf = parse_site(site)
        keys[site] = (layer, leaves.index(leaf))
        parent_name, _, attr = site.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, RoutedLinear(getattr(parent, attr), stack, state, keys[site]))
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


@torch.no_grad()
def random_expert(model: nn.Module, targets: list[str], name: str, rank: int = 4, alpha: float = 16.0,
                  seed: int = 0, scale: float = 0.05) -> LoraExpert:
    """A LoRA expert with random A and non-zero random B at every target site (for tests and benches).

    Usage: ``random_expert(base.model, base.targets, "e0", rank=4, seed=0)``
    """
    from library_store.expert import PEFT_PREFIX, ExpertInfo

    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for site in model_sites(model, targets):
        layer = model.get_submodule(site)
        d, out = layer.in_features, layer.out_features
        weights[f"{PEFT_PREFIX}{site}.lora_A.weight"] = torch.randn(rank, d, generator=gen) / d ** 0.5
        weights[f"{PEFT_PREFIX}{site}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * scale
    return LoraExpert.from_state_dict(ExpertInfo(name=name, rank=rank, alpha=alpha), weights)
