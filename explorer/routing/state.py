"""The records routed layers share: one site's stacked experts, and the router setting with its trace buffer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    `mask` is True for disabled experts (score -inf); `capture` is a list while a trace is recorded, of
    ("route", group, idx (t, G, k), weights (t, G, k), raw scores (t, G, k+1 or k), a (t, G, k, r)) per
    group call (a: the chosen experts' weighted A-projections w_e · A_e h) and ("norm", key, (t,)) per member
    call (‖base output‖); in mode "expert" a decoding step defers its slots as ("solo", group, h (1, d),
    a (1, G, r), version), made in batches and when the capture ends (capture.defer_solo, resolve_solo). Slots
    are largest weight first; the (k+1)-th raw score, when there, is the best expert left out.
    `RoutedModel._assemble` turns them into a sparse trace (see docs/engine.md).
    """

    mode: str = "arrow"
    top_k: int = 4
    temperature: float = 1.0
    mask: torch.Tensor | None = None  # (E,) bool
    fixed: torch.Tensor | None = None  # (E,)
    capture: list | None = field(default=None, repr=False)
    pending: int = 0  # one-expert decoding records deferred in `capture` since the last batch (capture.defer_solo)
    version: int = 0  # bumped on every router change, so cached group results are not reused across it
    # a counterfactual (RoutedModel.overriding): (expert index, force, model layers or None for all)
    override: tuple | None = None
    layers: frozenset | None = None  # the model layers Arrow routes at (None: all); the others run base alone
    _moved: dict = field(default_factory=dict, repr=False)  # (name, version, device) -> tensor

    def on(self, name: str, device: torch.device) -> torch.Tensor | None:
        """`mask` or `fixed` on `device`, copied once per router setting (set_router builds them on the CPU;
        a copy per call would be a host-to-GPU transfer per layer)."""
        t = getattr(self, name)
        if t is None or t.device == device:
            return t
        key = (name, self.version, device)
        moved = self._moved.get(key)
        if moved is None:
            self._moved = {k: v for k, v in self._moved.items() if k[1] == self.version}
            moved = self._moved[key] = t.to(device)
        return moved
