"""Plot builders for the explorer page: pure functions, a `RoutingTrace` or a `LibraryAnalysis` in, a plotly
`go.Figure` out. Nothing here imports gradio or touches a model.

Usage::

    fig = top1_heatmap(trace, module="mean")            # token x layer, colour = top-1 expert, tint = its weight
    fig = expert_heatmap(trace, "reverse_word")         # one expert's weight over token x layer
    fig = entropy_heatmap(trace); fig = usage_bar(trace)
    fig = similarity_map(analysis); fig = cosine_matrix(analysis)
    html = figure_html(fig)                              # standalone page, plotly.js inlined (no CDN)

Every string that came from a user or a tokenizer goes through `esc()` before it reaches plotly: plotly renders
a subset of HTML in hovers and tick labels (<b>, <a href>...), and decodes entities back for display.
The numbers come from the trace's own reductions (`trace.module_weights`, `trace.entropy`, `trace.usage`,
`trace.top_expert`, `trace.winner`): a figure only lays them out.
"""
from __future__ import annotations

import html
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from explorer.routing.trace import MEAN  # the module selector's "mean over modules" value

if TYPE_CHECKING:  # only for the annotations: plots stay free of the store and the model
    from explorer.page.library_view import LibraryAnalysis
    from explorer.routing.trace import RoutingTrace

PALETTE = qualitative.Dark24 + qualitative.Light24  # 48 distinct colours before they repeat
# A light look without plotly's templates: "plotly_white" deep-copies a large template per figure (half the time)
LOOK = dict(template="none", plot_bgcolor="white", paper_bgcolor="white", hoverlabel=dict(align="left"),
            font=dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=12, color="#2a3f5f"))
SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "star", "hexagon", "triangle-down"]
MAX_TICKS = 80  # above this many tokens, label every n-th one so the axis stays readable
_MIN_TINT = 0.35  # an even split still shows a third of its expert's colour, never white


def esc(text: str) -> str:
    """User or tokenizer text made safe for plotly's HTML-ish labels: & < > escaped, so no tag can start.
    Quotes stay as typed: outside a tag they are plain text, and plotly shows `&quot;` literally."""
    return html.escape(str(text), quote=False)


def display_token(token: str) -> str:
    """What a token looks like on an axis: visible whitespace, never empty, escaped."""
    shown = str(token).replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    if not shown.strip():
        shown = "␣" * max(1, len(shown))
    return esc(shown)


# ---------------------------------------------------------------- shared layout


def _tint(colour: str, amount: float) -> str:
    """Blend a '#rrggbb' colour towards white; amount 1 = the colour, 0 = white."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    mix = [round(255 - (255 - c) * amount) for c in (r, g, b)]
    return f"rgb({mix[0]},{mix[1]},{mix[2]})"


def category_colours(names: list[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _token_axis(fig: go.Figure, trace: "RoutingTrace", title: str) -> None:
    """x = token positions (numeric, so repeated tokens stay apart) labelled with the escaped tokens, a dashed
    line where the generated tokens start, y = layers from the bottom up."""
    T = len(trace.tokens)
    step = max(1, -(-T // MAX_TICKS))
    ticks = list(range(0, T, step))
    fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=[display_token(trace.tokens[i]) for i in ticks],
                     tickangle=-60, title_text="token (prompt, then generated)", range=[-0.5, T - 0.5],
                     automargin=True)
    fig.update_yaxes(title_text="layer", tickmode="array", tickvals=list(range(len(trace.layers))),
                     ticktext=[str(layer) for layer in trace.layers])
    if 0 < trace.n_prompt < T:
        fig.add_vline(x=trace.n_prompt - 0.5, line_width=2, line_dash="dash", line_color="black")
        fig.add_annotation(x=trace.n_prompt - 0.5, y=1.0, yref="paper", yanchor="bottom", xanchor="left",
                           text="generated →", showarrow=False, font=dict(size=11))
    fig.update_layout(title=dict(text=esc(title), x=0.01), **LOOK,
                      margin=dict(l=60, r=20, t=60, b=110), height=max(320, 120 + 18 * len(trace.layers)))


def _hover_text(trace: "RoutingTrace", w: np.ndarray, module: str, top: int) -> np.ndarray:
    """(layer, token) hover strings: token, position, layer, module and the `top` experts with weights."""
    L, T, _ = w.shape
    order = np.argsort(-w, axis=-1)[..., :top]  # (L, T, top)
    tokens = [display_token(t) for t in trace.tokens]
    experts = [esc(e) for e in trace.experts]
    module_label = "mean over modules" if module == MEAN else esc(module)
    out = np.empty((L, T), dtype=object)
    for li in range(L):
        for ti in range(T):
            part = "generated" if trace.is_generated[ti] else "prompt"
            lines = [f"token <b>{tokens[ti]}</b> (#{ti}, {part})",
                     f"layer {trace.layers[li]} · {module_label}"]
            lines += [f"{experts[e]}: {w[li, ti, e]:.3f}" for e in order[li, ti] if w[li, ti, e] > 0]
            out[li, ti] = "<br>".join(lines if len(lines) > 2 else lines + ["not routed: no expert here"])
    return out


def note_figure(title: str, note: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=esc(note), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14))
    fig.update_layout(title=dict(text=esc(title), x=0.01), **LOOK, height=320,
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


# ---------------------------------------------------------------- routing figures


def top1_heatmap(trace: "RoutingTrace", module: str = MEAN, groups: dict[str, str] | None = None,
                 by: str = "weight", legend: bool = True) -> go.Figure:
    """Token x layer grid coloured by the top-1 expert (or, with `groups` = {expert: cluster}, by the top-1
    cluster, summing its experts' weights); the tint says how much weight the winner got (pale = unsure).
    `by="contribution"`: coloured by the expert that added the most, ‖w_e · s_e · B_e A_e h‖, tinted by its
    share of the largest contribution of the grid. `legend=False` leaves the legend to the page."""
    w = trace.module_weights(module)  # (L, T, E)
    contribution = by == "contribution" and trace.routes.contribution is not None
    if contribution:
        names, top, conf = trace.top_contributor(module, groups)  # (L, T) winner and its contribution
    else:
        names, top, conf = trace.top_expert(module, groups)  # (L, T) winner index and its weight
    n = len(names)
    if n == 0 or w.shape[1] == 0:
        return note_figure("Top-1 expert per token and layer", "Nothing routed: the trace has no tokens or experts.")
    if contribution:
        frac = np.clip(conf / max(1e-12, float(conf.max())), 0, 1)
    else:
        # Tint = the winner's weight between an even top-k split (palest) and the most decisive cell of this grid
        # (full colour): absolute weights of a 16-expert library hover near 1/k and would leave every cell pale.
        even = 1.0 / max(1, min(trace.top_k, n))
        frac = np.clip((conf - even) / max(1e-6, float(conf.max()) - even), 0, 1)
    routed = trace.routed(module)  # (L, T) False at a layer the router does not route at
    z = np.where(routed, top + frac * 0.999, np.nan)  # category e covers [e, e+1); NaN: an empty cell
    colours = category_colours(names)
    scale = []
    for i, name in enumerate(names):  # equal stops at each boundary make the categories sharp
        scale += [[i / n, _tint(colours[name], _MIN_TINT)], [(i + 1) / n, colours[name]]]
    hover = _hover_text(trace, w, module, top=max(1, trace.top_k))
    fig = go.Figure(go.Heatmap(z=z, zmin=0, zmax=n, colorscale=scale, showscale=False, text=hover,
                               hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1, name="top-1"))
    used = set(top[routed].tolist())
    for i, name in enumerate(names if legend else []):  # a heatmap has no legend: invisible markers make one
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=esc(name), showlegend=True,
                                 marker=dict(size=12, symbol="square", color=colours[name]),
                                 visible=True if i in used else "legendonly"))
    what = "cluster" if groups else "expert"
    where = "mean over modules" if module == MEAN else module
    how = "largest contribution" if contribution else "pale = close to an even top-k split"
    title = f"Top-1 {what} by {'contribution' if contribution else 'weight'} per token and layer ({where}); {how}"
    _token_axis(fig, trace, title)
    if legend:
        fig.update_layout(legend=dict(title_text=what, orientation="v", x=1.01, y=1), margin=dict(r=160),
                          height=max(fig.layout.height, 140 + 21 * len(used)))  # room for the legend's entries
    return fig


def expert_heatmap(trace: "RoutingTrace", expert: str, module: str = MEAN) -> go.Figure:
    """One expert's routing weight over token x layer (continuous, 0..1)."""
    if expert not in trace.experts:
        return note_figure("Expert weight", f"Expert {expert!r} is not in this trace.")
    w = trace.module_weights(module)  # (L, T, E)
    z = np.where(routed := trace.routed(module), w[..., trace.experts.index(expert)], np.nan)  # (L, T); NaN: unrouted
    hover = _hover_text(trace, w, module, top=max(1, trace.top_k))
    fig = go.Figure(go.Heatmap(z=z, zmin=0, zmax=1, colorscale="Viridis", text=hover, xgap=1, ygap=1,
                               hovertemplate=f"<b>{esc(expert)}</b>: %{{z:.3f}}<br>%{{text}}<extra></extra>",
                               colorbar=dict(title="weight")))
    _token_axis(fig, trace, f"Weight of expert {expert} per token and layer{_unrouted(routed)}")
    return fig


def entropy_heatmap(trace: "RoutingTrace", module: str = MEAN) -> go.Figure:
    """Routing entropy (nats) over token x layer: 0 = one expert took everything, log k = an even split."""
    h = np.where(routed := trace.routed(module), trace.entropy(module), np.nan)  # (L, T); NaN: unrouted, not "decided"
    hover = _hover_text(trace, trace.module_weights(module), module, top=max(1, trace.top_k))
    zmax = float(np.log(max(2, trace.top_k)))
    fig = go.Figure(go.Heatmap(z=h, zmin=0, zmax=zmax, colorscale="Magma", reversescale=True, text=hover,
                               xgap=1, ygap=1, colorbar=dict(title="nats"),
                               hovertemplate="entropy %{z:.3f}<br>%{text}<extra></extra>"))
    _token_axis(fig, trace, f"Routing entropy per token and layer (max log k = {zmax:.2f}){_unrouted(routed)}")
    return fig


def usage_bar(trace: "RoutingTrace", groups: dict[str, str] | None = None) -> go.Figure:
    """Mean weight per expert over the prompt's tokens, all layers and modules, largest first."""
    usage = trace.usage("prompt")  # (E,)
    if not len(usage):
        return note_figure("Expert usage", "No experts in this trace.")
    order = np.argsort(-usage)
    names = [trace.experts[i] for i in order]
    colours = category_colours(list(trace.experts))
    hover = [f"{esc(n)}" + (f" (cluster {esc(groups[n])})" if groups and n in groups else "") for n in names]
    fig = go.Figure(go.Bar(x=[esc(n) for n in names], y=usage[order], marker_color=[colours[n] for n in names],
                           customdata=hover, hovertemplate="%{customdata}<br>mean weight %{y:.3f}<extra></extra>"))
    fig.update_layout(title=dict(text="Expert usage over the prompt: what this query needed", x=0.01),
                      **LOOK, height=340, yaxis_title="mean routing weight", yaxis_gridcolor="#e8e8e8",
                      xaxis=dict(tickangle=-45), margin=dict(l=60, r=20, t=60, b=110))
    return fig


def diff_heatmap(before: "RoutingTrace", after: "RoutingTrace", module: str = MEAN) -> go.Figure:
    """How much routing moved, per token x layer: total variation between the two weight distributions
    (0 = same, 1 = disjoint), on the tokens both traces share (the prompt, and generated tokens until they
    diverge)."""
    if before.experts != after.experts or before.layers != after.layers:
        return note_figure("Routing change", "The two runs used different experts or layers.")
    T = min(len(before.token_ids), len(after.token_ids))
    same = 0
    while same < T and before.token_ids[same] == after.token_ids[same]:
        same += 1
    wb = before.module_weights(module)[:, :same]  # (L, S, E)
    wa = after.module_weights(module)[:, :same]
    routed = before.routed(module)[:, :same] | after.routed(module)[:, :same]  # (L, S)
    tv = np.where(routed, 0.5 * np.abs(wa - wb).sum(axis=-1), np.nan)  # (L, S); NaN: routed in neither run
    shared = after.crop(list(range(same)))
    hover = _hover_text(shared, wa, module, top=max(1, after.top_k))
    fig = go.Figure(go.Heatmap(z=tv, zmin=0, zmax=1, colorscale="Reds", text=hover, xgap=1, ygap=1,
                               colorbar=dict(title="change"),
                               hovertemplate="change %{z:.3f}<br>after: %{text}<extra></extra>"))
    title = "Routing change after the intervention (total variation, shared tokens)" + _unrouted(routed)
    _token_axis(fig, shared, title)
    return fig


def token_experts(trace: "RoutingTrace", index: int, module: str = MEAN) -> go.Figure:
    """One token's routing at every layer: layer x expert weights (what the token strip's click shows)."""
    if not 0 <= index < len(trace.tokens):
        return note_figure("One token's experts", "Click a token in the strip above to see its experts.")
    w = np.where((routed := trace.routed(module))[:, index, None], trace.module_weights(module)[:, index], np.nan)
    token = display_token(trace.tokens[index])
    part = "generated" if trace.is_generated[index] else "prompt"
    fig = go.Figure(go.Heatmap(z=w, x=[esc(e) for e in trace.experts], y=list(range(len(trace.layers))),
                               zmin=0, zmax=1, colorscale="Viridis", xgap=1, ygap=1, colorbar=dict(title="weight"),
                               hovertemplate="layer %{y} · %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(title_text="layer", tickmode="array", tickvals=list(range(len(trace.layers))),
                     ticktext=[str(layer) for layer in trace.layers])
    title = f"Experts of token <b>{token}</b> (#{index}, {part}) at every layer{_unrouted(routed)}"
    fig.update_layout(title=dict(text=title, x=0.01),
                      **LOOK, xaxis=dict(tickangle=-45),
                      height=max(320, 140 + 14 * len(trace.layers)), margin=dict(l=60, r=20, t=60, b=110))
    return fig


def _unrouted(routed: np.ndarray) -> str:
    """A title's note when some layers (rows of the (L, T) `routed` mask) are not routed and left empty, else ""."""
    missing = int((~routed.any(axis=1)).sum())
    return f"; empty rows: {missing} layers not routed" if 0 < missing < len(routed) else ""


def token_strip(trace: "RoutingTrace", module: str = MEAN, groups: dict[str, str] | None = None):
    """[(token text, its top expert or cluster over all layers)] for a clickable strip; colours {label: colour}."""
    labels = sorted({groups.get(e, e) for e in trace.experts}) if groups else list(trace.experts)
    strip = [(str(token), trace.crop([ti]).winner("all", groups=groups, module=module))
             for ti, token in enumerate(trace.tokens)]
    return strip, category_colours(labels)


# ---------------------------------------------------------------- library figures


def similarity_map(analysis: "LibraryAnalysis") -> go.Figure:
    """The stored 2-D map of the warm-up adapters: one point per task, coloured by MBC cluster; hover lists the
    task's nearest tasks by cosine similarity. A ΔW map (`map_kind` "delta") has one point per expert."""
    if analysis.coords is None or not len(analysis.tasks):
        return note_figure("Adapter-similarity map", analysis.note or "This library has no MBC map.")
    clusters = [analysis.cluster_of.get(t, "none") for t in analysis.tasks]
    colours = category_colours(sorted(set(clusters)))
    family_of = analysis.family_of
    families = sorted(set(family_of.values()))
    symbol = {f: SYMBOLS[i % len(SYMBOLS)] for i, f in enumerate(families)}  # shape = family, colour = cluster
    side, x_range, y_range = label_sides(analysis.coords, list(analysis.tasks))
    fig = go.Figure()
    for cluster in sorted(set(clusters)):
        idx = [i for i, c in enumerate(clusters) if c == cluster]
        hover = [_map_hover(analysis, i) for i in idx]
        fig.add_trace(go.Scatter(
            x=analysis.coords[idx, 0], y=analysis.coords[idx, 1], mode="markers+text", name=esc(cluster),
            text=[esc(analysis.tasks[i]) for i in idx], textposition=[side[i] for i in idx], textfont=dict(size=10),
            customdata=hover, hovertemplate="%{customdata}<extra></extra>",
            marker=dict(size=14, color=colours[cluster], line=dict(width=1, color="white"),
                        symbol=[symbol.get(family_of.get(analysis.tasks[i]), "circle") for i in idx])))
    for family in families:  # shape legend: grey markers, one per family
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"family {esc(family)}",
                                 marker=dict(size=11, color="#888", symbol=symbol[family])))
    delta = analysis.map_kind == "delta"
    title = ("Expert-similarity map of the weight updates ΔW: colour = cluster" if delta else
             "Adapter-similarity map of the warm-up weights: colour = MBC cluster"
             + (", shape = task family" if families else ""))
    fig.update_layout(title=dict(text=title, x=0.01), **LOOK, height=540,
                      legend_title_text="cluster" if delta else "MBC cluster",
                      xaxis=dict(showticklabels=False, title="", zeroline=False, gridcolor="#f0f0f0", range=x_range),
                      yaxis=dict(showticklabels=False, title="", zeroline=False, gridcolor="#f0f0f0", range=y_range))
    return fig


LABEL_PLACES = ("top center", "top right", "top left", "bottom center", "bottom right", "bottom left",
                "middle right", "middle left")  # a map label's places, in order of preference


def label_sides(coords: np.ndarray, labels: list[str], pad: float = 0.08, width: float = 295, height: float = 240,
                char: float = 6.0, line: float = 12.0, gap: float = 7.0,
                near: float = 14.0) -> tuple[list[str], list, list]:
    """coords (n, 2), one label per point -> each label's position ("top center", ...), and padded x and y
    ranges, so that labels are neither cut at the plot's edge nor drawn over each other or beside another point
    where another place is free, on a nominal plot of `width` x `height` px (the Explore map's plot area in
    Chromium at 1440 x 900; the Library tab's wider map only spreads them). Placed greedily, top point first,
    then each again against all the others until none moves: the first of top, top right, top left, bottom,
    bottom right, bottom left, right, left that stays inside and clears the other labels and every other point
    (its marker and `near` px around it, so that no label reads as a neighbour's), else the one that overlaps
    least."""
    xy = np.asarray(coords, dtype=float)[:, :2]  # (n, 2)
    lo, hi = xy.min(0), xy.max(0)  # (2,) each
    span = np.where(hi > lo, hi - lo, 1.0)  # (2,)
    x_range = [lo[0] - pad * span[0], hi[0] + pad * span[0]]
    y_range = [lo[1] - pad * span[1], hi[1] + 2.5 * pad * span[1]]  # room for the top label
    px = (xy[:, 0] - x_range[0]) / (x_range[1] - x_range[0]) * width  # (n,) pixels from the left
    py = (xy[:, 1] - y_range[0]) / (y_range[1] - y_range[0]) * height  # (n,) pixels from the bottom

    def box(i: int, pos: str) -> tuple[float, float, float, float]:  # (x0, x1, y0, y1) of label i at pos
        w = char * len(labels[i])
        vert, horiz = pos.split()
        x0 = {"center": px[i] - w / 2, "right": px[i] + (gap if vert == "middle" else 0.0),
              "left": px[i] - w - (gap if vert == "middle" else 0.0)}[horiz]
        y0 = {"top": py[i] + gap, "bottom": py[i] - gap - line, "middle": py[i] - line / 2}[vert]
        return x0, x0 + w, y0, y0 + line

    def fits(b) -> bool:
        return b[0] >= 0 and b[1] <= width and b[2] >= 0 and b[3] <= height

    def overlap(a, b) -> float:
        return max(0.0, min(a[1], b[1]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[2], b[2]))

    points = [(px[j] - near, px[j] + near, py[j] - near, py[j] + near) for j in range(len(xy))]  # markers, padded
    boxes = [{p: box(i, p) for p in LABEL_PLACES} for i in range(len(xy))]
    side: list[str | None] = [None] * len(xy)

    def best(i: int) -> str:  # the place of label i that overlaps the other labels placed and points least
        places = [p for p in LABEL_PLACES if fits(boxes[i][p])] or list(LABEL_PLACES)
        others = [boxes[j][side[j]] for j in range(len(xy)) if j != i and side[j]] + points[:i] + points[i + 1:]
        return min(places, key=lambda p: (sum(overlap(boxes[i][p], q) for q in others), places.index(p)))

    order = np.argsort(-py, kind="stable")  # the top point first
    for i in order:
        side[i] = best(i)
    for _ in range(5):  # then each label again against all the others, until none moves
        moved = False
        for i in order:
            place = best(i)
            moved, side[i] = moved or place != side[i], place
        if not moved:
            break
    return side, x_range, y_range


def _map_hover(analysis: "LibraryAnalysis", i: int, n: int = 3) -> str:
    task = analysis.tasks[i]
    what = "expert" if analysis.map_kind == "delta" else "task"
    lines = [f"{what} <b>{esc(task)}</b>", f"cluster {esc(analysis.cluster_of.get(task, 'none'))}"]
    family = analysis.family_of.get(task)
    if family:
        lines.append(f"family {esc(family)}")
    if analysis.similarity is not None:
        sims = analysis.similarity[i].astype(float).copy()
        sims[i] = -np.inf
        for j in np.argsort(-sims)[:n]:
            if np.isfinite(sims[j]):
                lines.append(f"near {esc(analysis.tasks[j])}: cos {sims[j]:.2f}")
    return "<br>".join(lines)


def cosine_matrix(analysis: "LibraryAnalysis") -> go.Figure:
    """Task x task cosine similarity of the warm-up adapters (a ΔW map's: expert x expert, of their weight
    updates), rows and columns grouped by cluster."""
    if analysis.similarity is None or not len(analysis.tasks):
        return note_figure("Cosine similarity", analysis.note or "This library has no similarity matrix.")
    order = sorted(range(len(analysis.tasks)), key=lambda i: (analysis.cluster_of.get(analysis.tasks[i], ""),
                                                              analysis.tasks[i]))
    labels = [esc(f"{analysis.tasks[i]} [{analysis.cluster_of.get(analysis.tasks[i], '-')}]") for i in order]
    sim = analysis.similarity[np.ix_(order, order)]
    fig = go.Figure(go.Heatmap(z=sim, x=labels, y=labels, colorscale="RdBu", zmid=0, zmin=-1, zmax=1,
                               colorbar=dict(title="cos"),
                               hovertemplate="%{y} · %{x}<br>cos %{z:.3f}<extra></extra>"))
    title = ("Cosine similarity of the experts' weight updates ΔW, by cluster" if analysis.map_kind == "delta"
             else "Cosine similarity of warm-up adapters, grouped by cluster")
    fig.update_layout(title=dict(text=title, x=0.01),
                      **LOOK, height=600, yaxis=dict(autorange="reversed", automargin=True),
                      xaxis=dict(tickangle=-60, automargin=True), margin=dict(l=20, b=20, t=60, r=20))
    return fig


def figure_html(fig: go.Figure) -> str:
    """A standalone HTML page for one figure, with plotly.js inlined: it opens offline, no CDN."""
    return fig.to_html(include_plotlyjs=True, full_html=True)
