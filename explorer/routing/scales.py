"""Expert scales: Arrow's score of expert e times a factor c_e, folded into the prototype rows of every routed group.

Usage::

    factors = scale_vector(router.scales, rm.experts)   # (E,) or None; refuses an unknown expert's name
    scale_groups(groups, factors)                         # proj's prototype rows become c_e p_e (unit ones kept)

|h · c_e p_e| = c_e |h · p_e|, so every path (torch ops, the fused kernels, decoding, the trace) scores with the
factors and none of them changes; the input-centring shift μ · p_e must be taken again afterwards (RoutedModel
does). Why and how they are fitted: docs/design.md, "Expert scales".
"""
from __future__ import annotations

import torch


def routed_groups(model, sites: list[str]) -> list:
    """The routed groups of an attached model (`sites`: its routed layers' names), each once, in model order."""
    from explorer.routing.layer import RoutedLinear

    seen: dict[int, object] = {}
    for site in sites:
        layer = model.get_submodule(site)
        if isinstance(layer, RoutedLinear):
            seen.setdefault(id(layer.group), layer.group)
    return list(seen.values())


def scale_vector(scales: tuple[tuple[str, float], ...], experts: list[str]) -> torch.Tensor | None:
    """(E,) float32 factors in `experts`' order (an expert not named keeps 1), or None for no scales; refuses a
    name that is not one of `experts`."""
    if not scales:
        return None
    unknown = [name for name, _ in scales if name not in experts]
    if unknown:
        raise ValueError(f"Cannot scale unknown experts {unknown}; the library's routed experts are {experts}")
    given = dict(scales)
    return torch.tensor([given.get(name, 1.0) for name in experts], dtype=torch.float32)


def scale_groups(groups: list, factors: torch.Tensor | None) -> None:
    """Set every group's prototype rows to c_e p_e (None: the unit prototypes again). A group keeps its unit
    prototypes in its `unit` buffer (G E, d) from the first time it is scaled, so scales never compound."""
    for g in groups:
        GE = g.n_members * g.n_experts
        if g.unit is None:
            if factors is None:
                continue
            g.unit = g.proj[:GE].clone()  # (G E, d); a buffer: `.to()` moves it with the rest
        c = torch.ones(g.n_experts) if factors is None else factors
        c = c.to(g.unit.device).repeat(g.n_members)  # (G E,): member m's experts are rows m E ... m E + E - 1
        g.proj[:GE] = (g.unit.float() * c[:, None]).to(g.proj.dtype)  # in place: `protos` is a view of it
