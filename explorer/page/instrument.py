"""The instrument's HTML: the clickable grid (with its legend and token strip), the linked map, the drill-down
panel and the counterfactual panel, as strings for `gr.HTML`. No gradio, no model.

Usage::

    grid_html(result, view, positions, module="mean", groups=None, by="weight")   # the grid + strip + legend
    map_html(analysis, task_expert, groups)                   # the similarity map with its points' experts
    drill_html(detail)                                        # a CellDetail as a table
    counterfactual_html(result)                               # before/after top-5, KL, the answer's diff

The figures travel as JSON in a `data-payload` attribute that `explorer/page/static/*.js` draws with the
plotly.js the app serves (no CDN). Everything from a user, a library or a tokenizer is escaped: attribute
values with `html.escape(quote=True)`, text with `esc`; the JS reads them back as data and writes them with
`textContent` only, so a hostile prompt stays text in the grid, the strip, the legend, the panel and the map.
"""
from __future__ import annotations

import difflib
import html
import json

import numpy as np

from explorer.page import plots
from explorer.page.drill import CellDetail, grid_labels, strip_labels
from explorer.routing.trace import MEAN

GRID_HEIGHT = 380  # px: grid + strip + map fit a 1440 x 900 screen under the prompt and the answer


def attr(value) -> str:
    """A value safe inside a double-quoted HTML attribute."""
    return html.escape(str(value), quote=True)


def _payload(data: dict) -> str:
    return attr(json.dumps(data, separators=(",", ":"), default=_plain))


def _plain(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON: {type(x).__name__}")


def note_html(text: str, kind: str = "note") -> str:
    return f'<div class="x-note x-{kind}">{html.escape(text, quote=False)}</div>'


def grid_html(result, view, positions: list[int], module: str = MEAN, groups: dict[str, str] | None = None,
              by: str = "weight") -> str:
    """The run's grid (token x layer, coloured by the top expert by weight or contribution), a legend whose
    entries light the map, and the token strip; `positions` are the view's tokens' places in the full trace."""
    fig = plots.top1_heatmap(view, module, groups, by=by, legend=False)
    what = "cluster" if groups else "expert"
    where = "mean over modules" if module == MEAN else plots.esc(module)
    if len(view.layers) > 12:  # every layer labelled would overlap: every fifth
        ticks = list(range(0, len(view.layers), 5))
        fig.update_yaxes(tickvals=ticks, ticktext=[str(view.layers[i]) for i in ticks])
    fig.update_layout(height=GRID_HEIGHT - 80, margin=dict(l=48, r=8, t=24, b=60),
                      title=dict(text=f"Top {what} by {by} per token and layer ({where})", font=dict(size=12)))
    names, idx = grid_labels(view, module, groups, by)  # (L, T) winners, the same as the colours
    colours = plots.category_colours(names)
    w_names, w_idx = grid_labels(view, module, groups, "weight")
    c_names, c_idx = grid_labels(view, module, groups, "contribution")
    differ = int(((np.asarray(w_names, dtype=object)[w_idx] != np.asarray(c_names, dtype=object)[c_idx])
                  & (w_idx >= 0)).sum()) if view.routes.contribution is not None and names else 0
    experts = view.experts
    label_of = {e: (groups or {}).get(e, e) for e in experts}
    used = sorted(set(idx[idx >= 0].tolist())) if names else []  # -1: a cell not routed
    legend = "".join(f'<span class="x-key" data-label="{attr(names[i])}"><i style="background:{colours[names[i]]}">'
                     f'</i>{plots.esc(names[i])}</span>' for i in used)
    strip = []
    for ti, label in enumerate(strip_labels(view, module, groups)):
        colour = plots._tint(colours[label], 0.45) if label in colours else "#eee"
        gen = " x-gen" if view.is_generated[ti] else ""
        strip.append(f'<span class="x-tok{gen}" data-t="{positions[ti]}" data-label="{attr(label or "")}" '
                     f'style="background:{colour}">{plots.display_token(view.tokens[ti])}</span>')
    payload = {"run": result.run_id, "figure": json.loads(fig.to_json()), "layers": view.layers,
               "positions": positions, "names": names, "idx": idx, "label_of": label_of}
    total, unrouted = int((idx >= 0).sum()), int((idx < 0).all(axis=1).sum())  # routed cells, empty rows
    caption = (f"{len(view.tokens)} tokens × {len(view.layers)} layers"
               + (f" ({unrouted} not routed: empty rows)" if unrouted else "") + ". Click a cell for its experts; "
               f"top expert by weight and by contribution differ in {differ} of {total} routed cells.")
    return (f'<div class="x-grid" data-payload="{_payload(payload)}"><div class="x-plot"></div>'
            f'<div class="x-legend">{legend}</div><div class="x-strip">{"".join(strip)}</div>'
            f'{lean_html(result.trace)}<div class="x-caption">{html.escape(caption)}</div></div>')


def lean_html(trace) -> str:
    """Under a per-token run's grid: what the user's text leans to (trace.meta["lean"]), ⚠️ and "Undecided" when
    its lead is too small to call; empty for a per-prompt run (its notice names the pick) and fixed weights."""
    lean = trace.meta.get("lean") if trace is not None else None  # recorded for per-token Arrow runs only
    if not lean:
        return ""
    mark, kind = ("⚠️", " x-warn") if lean.get("uncertain") else ("ℹ️", "")
    return f'<div class="x-lean{kind}">{mark} {html.escape(lean["text"])}</div>'


def task_experts(analysis, experts: list[str]) -> dict[str, str]:
    """task -> the routed expert that serves it: one trained on it, else the expert named after its cluster,
    else an expert named like the task (a private library's). On a ΔW map the points are the experts."""
    if analysis.map_kind == "delta":
        return {name: name if name in experts else "" for name in analysis.tasks}
    out = {}
    table = analysis.experts
    if len(table):
        for name, tasks in zip(table["name"], table["tasks"]):
            if name in experts:
                for task in str(tasks or "").split(", "):
                    out.setdefault(task, name)
    for task in analysis.tasks:
        if task not in out:
            cluster = analysis.cluster_of.get(task)
            out[task] = cluster if cluster in experts else task if task in experts else ""
    return out


def map_html(analysis, experts: list[str], groups: dict[str, str] | None = None) -> str:
    """The similarity map, its points knowing the experts (and clusters) they stand for."""
    fig = plots.similarity_map(analysis)
    fig.update_layout(height=GRID_HEIGHT - 10, margin=dict(l=8, r=8, t=24, b=8),
                      title=dict(text="Expert map (click a point or a cluster)", font=dict(size=12)),
                      legend=dict(font=dict(size=10), orientation="h", y=-0.02, yanchor="top", entrywidth=0.5,
                                  entrywidthmode="fraction", title_text=""))  # two columns, names in full
    if analysis.coords is None or not len(analysis.tasks):
        return note_html(analysis.note or "This library has no map.")
    serve = task_experts(analysis, experts)
    points = []  # per curve, per point: {task, expert, cluster}; legend-only curves get []
    for curve in fig.data:
        tasks = list(curve.text) if curve.text is not None else []
        tasks = [html.unescape(t) for t in tasks]  # the labels are escaped; the payload carries plain names
        points.append([{"task": t, "expert": serve.get(t, ""), "cluster": analysis.cluster_of.get(t, "")}
                       for t in tasks])
    cluster_experts = {}
    for expert in experts:
        cluster_experts.setdefault((groups or {}).get(expert, expert), []).append(expert)
    payload = {"figure": json.loads(fig.to_json()), "points": points, "cluster_experts": cluster_experts}
    return f'<div class="x-map" data-payload="{_payload(payload)}"><div class="x-plot"></div></div>'


def _num(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def drill_html(d: CellDetail) -> str:
    """The cell's experts: weight, raw score |h·p|, margin, contribution and its share of the base output."""
    where = "generated" if d.generated else "prompt"
    head = (f'<div class="x-drill-head">Layer <b>{d.layer}</b> · token <b>#{d.token}</b> ({where}) '
            f'<code class="x-token">{plots.display_token(d.text)}</code></div>')
    agree = d.top_weight == d.top_contribution or d.top_contribution is None
    tops = (f'<div>Top by weight: <span class="x-exp" data-expert="{attr(d.top_weight or "")}">'
            f'{html.escape(d.top_weight or "–")}</span> · top by contribution: <span class="x-exp" '
            f'data-expert="{attr(d.top_contribution or "")}">{html.escape(d.top_contribution or "–")}</span>'
            + ("" if agree else ' <span class="x-badge">they disagree</span>') + "</div>")
    if not d.rows:
        return (f'<div class="x-drill" data-layer="{d.layer}" data-token="{d.token}">{head}<div>Not routed: this '
                f'router routes no expert at layer {d.layer}, so its base layers ran alone.</div></div>')
    return (f'<div class="x-drill" data-layer="{d.layer}" data-token="{d.token}">{head}{tops}'
            f'{_rows_table(d.rows, "mean over modules")}<details><summary>each module</summary>'
            + "".join(_rows_table(rows, m) for m, rows in d.modules.items()) + "</details></div>")


def _rows_table(rows, caption: str) -> str:
    body = "".join(
        f'<tr class="x-exp" data-expert="{attr(r.expert)}"><td>{html.escape(r.expert)}</td><td>{_num(r.weight)}</td>'
        f'<td>{_num(r.score)}</td><td>{_num(r.margin)}</td><td>{_num(r.contribution)}</td>'
        f'<td>{_num(None if r.relative is None else 100 * r.relative, ".1f")}%</td></tr>' for r in rows)
    return (f'<table class="x-table"><caption>{html.escape(caption)}</caption><tr><th>expert</th><th>weight</th>'
            f'<th title="Arrow\'s score (times the expert\'s fitted scale where the router has expert scales)">'
            f'|h·p|</th><th title="score minus the next expert\'s">margin</th>'
            f'<th title="contribution: ‖w·s·BA h‖, the size of the expert\'s weighted update">contrib.</th>'
            f'<th title="contribution / ‖base layer output‖">of base</th></tr>{body}</table>')


def counterfactual_html(res) -> str:
    """Before/after next-token top-5, the KL divergence, the cost, and the regenerated answer's difference."""
    rows = "".join(
        f'<tr><td><code>{plots.display_token(b[0])}</code></td><td>{b[1]:.3f}</td>'
        f'<td><code>{plots.display_token(a[0])}</code></td><td>{a[1]:.3f}</td></tr>'
        for b, a in zip(res.before, res.after))
    table = (f'<table class="x-table x-cf"><caption>Next token after #{res.cf.token}: '
             f'{html.escape(res.cf.describe())}</caption><tr><th>before</th><th>p</th><th>after</th><th>p</th></tr>'
             f'{rows}</table>')
    summary = f'<div class="x-kl">KL(before ‖ after) = <b>{res.kl:.4f}</b> nats · {1000 * res.seconds:.0f} ms</div>'
    if res.text_after is None:
        text = '<div class="x-note">Regenerating the answer…</div>'
    elif res.text_after == res.text_before:
        text = '<div class="x-diff">The regenerated answer is the same.</div>'
    else:
        text = f'<div class="x-diff">Answer: {text_diff(res.text_before, res.text_after)}</div>'
    return f'<div class="x-cfout" data-kl="{res.kl:.6f}">{table}{summary}{text}</div>'


def text_diff(before: str, after: str) -> str:
    """Word-level difference, removed words struck through, added words underlined (escaped)."""
    a, b = before.split(" "), after.split(" ")
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(html.escape(" ".join(a[i1:i2])))
            continue
        if i2 > i1:
            out.append(f"<del>{html.escape(' '.join(a[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins>{html.escape(' '.join(b[j1:j2]))}</ins>")
    return " ".join(out)
