"""Why a run decided what it decided, layer by layer: a pure function of a trace's recorded decision.

Usage::

    fig = decision_layers(trace)   # a per-prompt run's pick (meta "pick") or a per-token run's lean (meta "lean")

Each bar is one routed layer's share of the decision's margin over the runner-up (prompt_level.PromptPick.by_layer):
for a readout pick, the layer's part of the logit margin (the bars plus the intercepts' share add up to it exactly);
for a pick or lean by mean weight, the layer's weight lead over the user's text (their mean is the lead). Layers the
router does not route at (RouterConfig.layers) are left out. Bars
above zero argue for the pick, below for the runner-up, so a researcher sees which layers carried the decision and
can read those rows of the grid.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

from explorer.page.plots import LOOK, category_colours, esc, note_figure

if TYPE_CHECKING:
    from explorer.routing.trace import RoutingTrace

TITLE = "Which layers decided"


def decision(trace: "RoutingTrace") -> dict | None:
    """The run's recorded decision (a pick, else a lean) when it says, layer by layer, why; else None."""
    found = trace.meta.get("pick") or trace.meta.get("lean")
    return found if found and found.get("by_layer") and found.get("runner_up") else None


def decision_layers(trace: "RoutingTrace") -> go.Figure:
    """Bars over the evidence's layers: each layer's share of the margin of the pick (or lean) over its runner-up."""
    d = decision(trace)
    if d is None:
        return note_figure(TITLE, "This run made no decision to explain: route per prompt (its pick) or per token "
                                  "with Arrow (what your text leans to).")
    evidence = trace.evidence if trace.evidence is not None else trace
    routed = evidence.routed().any(axis=1)  # (L,) the layers the router routes at (RouterConfig.layers)
    layers = [layer for layer, on in zip(evidence.layers, routed) if on]
    share = np.asarray(d["by_layer"], dtype=float)[routed]  # (L',)
    pick, runner = d["expert"], d["runner_up"]
    colours = category_colours(list(trace.experts))
    readout = d.get("rule") == "readout"
    what = "the readout's logit margin" if readout else "the mean-weight lead over your text"
    total = (f"layers sum {share.sum():+.2f}, intercepts {d.get('bias') or 0.0:+.2f}" if readout
             else f"mean {share.mean():+.3f}")
    if readout and share.sum() < 0:  # the layers favour the runner-up: the readout's prior carried the pick
        total += f"; the layers alone favour {esc(runner)}, the intercepts decided"
    fig = go.Figure(go.Bar(
        x=list(layers), y=share, marker_color=[colours.get(pick if v >= 0 else runner, "#888") for v in share],
        customdata=[esc(pick if v >= 0 else runner) for v in share],
        hovertemplate="layer %{x}: %{y:+.3f} for %{customdata}<extra></extra>"))
    fig.update_layout(
        title=dict(text=f"{TITLE}: {esc(pick)} over {esc(runner)}, each layer's share of {what} ({total})", x=0.01,
                   font=dict(size=13)),
        **LOOK, height=300, xaxis_title="layer", yaxis_title=f"↓ {esc(runner)} · {esc(pick)} ↑",
        yaxis=dict(gridcolor="#e8e8e8", zeroline=True, zerolinecolor="#888"), margin=dict(l=60, r=20, t=60, b=50),
        bargap=0.15)
    return fig
