"""The Library tab's report card as pure functions: a stored `RoutingReport` in, plotly figures and
Markdown out (no gradio, no model, nothing computed from experts: the evaluation computed it).

Usage::

    report = read_report(lib)                          # library_store.store.reports; None: never evaluated
    confusion_heatmap(report)                          # task x expert mean own-text weight
    layer_curve(report)                                # own-text routing accuracy per layer
    report_card(report, read_default_router(lib), "demo-private", "assets/libraries/demo-private")  # Markdown

Every number shown comes with the command that produced it. See docs/design.md, "Routing report card".
"""
from __future__ import annotations

import html
from dataclasses import fields
from typing import TYPE_CHECKING

import plotly.graph_objects as go

from explorer.page.plots import LOOK, esc, note_figure
from explorer.routing.config import RouterConfig, compact_layers, describe_router

if TYPE_CHECKING:
    from library_store.store.reports import DefaultRouter, RoutingReport

EVAL_COMMAND = "python bench/eval_routing.py --library {path} --record"
GOALS = {"private": 0.95, "cluster": 0.98}  # own-text routing accuracy the product aims for (issue 13)
ACCURACIES = (("user", "the user's own text"), ("user+generated", "user text + generated tokens"),
              ("generated", "generated tokens"), ("all", "all tokens (chat template included)"))


def _code(text: str) -> str:
    """Inline code that cannot break out of its backticks (a path may hold any character)."""
    return "`" + html.escape(text).replace("`", "'") + "`"


def confusion_heatmap(report: "RoutingReport | None") -> go.Figure:
    """Task x expert mean routing weight over the user's own tokens: a routing that explains is diagonal."""
    if report is None or not report.confusion:
        return note_figure("Task x expert routing", "No routing report for this library yet.")
    z = [[float(x) for x in row] for row in report.confusion]  # (tasks, experts)
    experts, tasks = [esc(e) for e in report.experts], [esc(t) for t in report.tasks]
    # colour from 0 (no weight) to the largest cell: plotly ignores a zmin without its zmax, and an auto range
    # stretched demo-mbc's 0.21-0.32 (four experts splitting every token almost evenly) over the whole scale
    top = max((x for row in z for x in row), default=0.0) or 1.0
    fig = go.Figure(go.Heatmap(z=z, x=experts, y=tasks, zmin=0, zmax=top, colorscale="Viridis", xgap=1, ygap=1,
                               colorbar=dict(title="weight"),
                               hovertemplate="task %{y} · expert %{x}<br>mean weight %{z:.3f}<extra></extra>"))
    fig.update_layout(title=dict(text=f"Mean routing weight over the user's own text<br><sup>{esc(report.split)} "
                                      f"prompts, {esc(report.level)} level</sup>", x=0.01), **LOOK,  # fits half a row
                      height=max(360, 120 + 22 * len(tasks)), margin=dict(l=20, r=20, t=60, b=20),
                      xaxis=dict(title="expert", tickangle=-45, automargin=True),
                      yaxis=dict(title="task", autorange="reversed", automargin=True))
    return fig


def layer_curve(report: "RoutingReport | None") -> go.Figure:
    """Own-text routing accuracy of each layer on its own: which layers know the task."""
    layers = (report.per_layer or {}).get("layers") if report is not None else None
    if not layers:
        return note_figure("Routing accuracy per layer", "No per-layer accuracy recorded for this library.")
    acc = [None if a is None else float(a) for a in report.per_layer["accuracy"]]  # None: a layer not routed
    fig = go.Figure(go.Scatter(x=list(layers), y=acc, mode="lines+markers", name="per layer",
                               hovertemplate="layer %{x}: %{y:.1%}<extra></extra>"))
    overall = report.accuracy.get("user")
    if overall is not None:
        routed = "routed layers" if None in acc else "all layers"
        fig.add_hline(y=float(overall), line_dash="dot", annotation_text=f"{routed} {float(overall):.0%}")
    fig.update_layout(title=dict(text="Own-text routing accuracy per layer", x=0.01), **LOOK, height=340,
                      xaxis=dict(title="layer", dtick=1), yaxis=dict(title="accuracy", range=[0, 1.02],
                                                                     tickformat=".0%"),
                      margin=dict(l=60, r=20, t=60, b=50))
    return fig


def _router_text(router: dict) -> str:
    return html.escape(describe_router(router))


# The sweep's measures of its winning setting (bench/eval_sweep.py), in words; the router settings themselves are
# already in the router's description.
_WINNER_MEASURES = (("user", "own-text routing accuracy"), ("prompt", "accuracy over all prompt tokens"),
                    ("em", "exact match"), ("margin_median", "median top-1 margin"),
                    ("entropy_median", "median routing entropy"))


def _scales_text(fit) -> list[str]:
    """The card's line on the expert scales (bench/fit_scales.py's evidence), or none."""
    if not isinstance(fit, dict) or not fit.get("factors"):
        return []
    n, f = int(fit.get("n_fit", 20)), fit["factors"]
    low, high = min(f, key=f.get), max(f, key=f.get)
    return [f"- Expert scales (each expert's score times a factor), fitted on training prompts 1-{n} per task: own "
            f"text right {float(fit['fit_before']):.0%} → {float(fit['fit_after']):.0%} there, and "
            f"{float(fit['check_before']):.0%} → {float(fit['check_after']):.0%} on prompts {n + 1}-{2 * n}, the "
            f"check that adopted them; factors from {f[low]:.2f} ({html.escape(low)}) to {f[high]:.2f} "
            f"({html.escape(high)}). Fitted by {_code(fit.get('command') or '(command not recorded)')}."]


def _winner_text(winner: dict) -> str:
    """"own-text routing accuracy 0.825, ..., median routing entropy 1.21": 3 significant digits; unknown keys
    kept as they are, after the known ones."""
    def num(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    known = [f"{label} {num(winner[k])}" for k, label in _WINNER_MEASURES if winner.get(k) is not None]
    skip = {k for k, _ in _WINNER_MEASURES} | {f.name for f in fields(RouterConfig)}
    rest = [f"{k} {num(v)}" for k, v in winner.items() if k not in skip and v is not None]
    return html.escape(", ".join(known + rest))


def _granularity_text(gran: dict) -> str:
    """"- Per token or per prompt, by training exact match: per token 0.46, per prompt by mean 0.93 (picks lead by a
    median 0.04), per prompt by readout 0.91 (... 0.53; chosen)." The median lead is shown where the evaluation
    recorded one (since 2026-12-01): a per-prompt candidate that hardly leads cannot win however well it answers."""
    chosen = gran.get("winner") or {}
    parts = []
    for g in gran["rows"]:
        name = "per token" if g["granularity"] == "token" else f"per prompt by {g.get('pick', 'mean')}"
        notes = [f"picks lead by a median {float(g['lead_median']):.2f}"] if g.get("lead_median") is not None else []
        if (g["granularity"], g.get("pick", "mean")) == (chosen.get("granularity"), chosen.get("pick", "mean")):
            notes.append("chosen")
        parts.append(f"{name} {float(g['em']):.2f}" + (f" ({'; '.join(notes)})" if notes else ""))
    return "- Per token or per prompt, by training exact match: " + html.escape(", ".join(parts)) + "."


def _uncertain_text(readout_meta: dict) -> list[str]:
    """The readout's uncertain-pick threshold, the mean-weight lead recorded beside it, and how flagged picks fared
    (bench/pick_confidence.py --record); nothing for one not recorded, or whose record is not numbers (a library
    edited by hand)."""
    lines = []
    for key, evidence, label in _FLAGS:
        if readout_meta.get(key) is not None:
            lines += _flag_lines(label, readout_meta[key], readout_meta.get(evidence) or {})
    return lines


_FLAGS = (  # (the readout meta's value, its evidence, the card's line)
    ("uncertain_below", "uncertain_evidence", "Uncertain picks: the page flags a pick the readout gives under p {:g}"),
    ("weak_below", "weak_evidence", "Weak routing: the page also flags a pick (or a per-token lean) whose routing "
                                    "strength (how strongly the text points along any prototype) is under {:g}"),
    ("uncertain_lead", "uncertain_lead_evidence", "Per-token leans and picks by mean weight: the page flags them when "
                                                  "they lead the runner-up by less than {:g}"))


def _flag_lines(label: str, t, evidence: dict) -> list[str]:
    """One flag's rule and, per held-out split, how the picks it flags fared; [] when a value is not a number."""
    try:
        lines = [f"- {label.format(float(t))} (chosen on training prompts)."]
        for split, name in (("heldout", "held-out inputs"), ("paraphrase", "held-out wordings")):
            e = evidence.get(split)
            if not e:
                continue
            flagged, confident = e.get("accuracy_flagged"), e.get("accuracy_confident")
            parts = [f"{float(e['flagged']):.0%} of picks flagged"]
            if flagged:
                parts.append(f"right {float(flagged[0]):.0%} of the time")
            if confident:
                parts.append(f"the others right {float(confident[0]):.0%}")
            lines.append(f"  On {name}: " + ", ".join(parts) + ".")
        if evidence.get("command"):
            lines.append(f"  Measured by {_code(evidence['command'])}.")
    except (TypeError, ValueError, KeyError, IndexError, AttributeError):
        return []
    return lines


def report_card(report: "RoutingReport | None", default: "DefaultRouter | None", library: str,
                path: str, readout_meta: dict | None = None) -> str:
    """Markdown: the verdict, the accuracies, the default router and its evidence, each with its command;
    `readout_meta`, the default router's pick readout's meta, adds its uncertain-pick threshold and evidence."""
    name = html.escape(library)
    if report is None and default is None:
        return (f"### Does {name}'s routing explain?\nNot evaluated yet (or its experts changed since the last "
                "evaluation). Run\n\n" + _code(EVAL_COMMAND.format(path=path)) + "\n\nto measure it; this tab "
                "then shows the task x expert routing, the per-layer accuracy and the default router it chose.")
    lines = [f"### Does {name}'s routing explain?"]
    if report is not None:
        user = report.accuracy.get("user")
        goal = GOALS.get(report.level, GOALS["private"])
        if user is not None:
            verdict = "yes" if user >= goal else "partly" if user >= 0.5 else "no"
            lines.append(f"**{verdict}**: on {html.escape(report.split)} prompts the task's own "
                         f"{'cluster expert' if report.level == 'cluster' else 'expert'} gets the largest mean "
                         f"weight over the user's own text for **{user:.0%}** of prompts (goal ≥ {goal:.0%}; "
                         f"{report.n_per_task} prompts per task, {len(report.tasks)} tasks, router: "
                         f"{_router_text(report.router)}).")
        rows = [f"| {label} | {report.accuracy[key]:.1%} |" for key, label in ACCURACIES if key in report.accuracy]
        if rows:
            lines += ["", "| tokens | routing accuracy |", "|---|---|", *rows]
        if report.accuracy.get("pick") is not None:
            lines.append(f"\nOne expert per prompt: the expert that answered was the task's own for "
                         f"**{report.accuracy['pick']:.0%}** of prompts.")
        overall = (report.s5 or {}).get("overall")
        if overall is not None:
            lines.append(f"\nHeld-in exact match with this router / own expert's (S5): **{float(overall):.2f}**.")
        lines.append(f"\nProduced by {_code(report.command or '(command not recorded)')}"
                     + (f" on {html.escape(report.date)}" if report.date else "") + ".")
    else:
        lines.append("No routing report for the experts this library holds now. Run " +
                     _code(EVAL_COMMAND.format(path=path)) + ".")
    lines.append("\n#### Default router")
    if default is None:
        lines.append("None recorded: the page starts with the built-in defaults (top-k 4, temperature 1, no "
                     "centring).")
    else:
        lines.append(f"The page and the CLI start with: **{_router_text(default.router)}**.\n")
        rule, winner = default.evidence.get("rule"), default.evidence.get("winner")
        if rule:
            lines.append(f"- Why: {html.escape(str(rule))}.")
        if isinstance(winner, dict):
            lines.append(f"- The winner's figures on training prompts: {_winner_text(winner)}.")
        gran = default.evidence.get("granularity")
        if isinstance(gran, dict) and gran.get("rows"):
            lines.append(_granularity_text(gran))
        chosen = default.evidence.get("layers")
        if isinstance(chosen, dict) and chosen.get("subset"):
            lines.append(f"- Routed layers, chosen on training prompts: own text right {float(chosen['every']):.0%} "
                         f"with every layer, {float(chosen['alone']):.0%} routed at layers "
                         f"{compact_layers(chosen['subset'])} alone: "
                         + ("adopted." if chosen.get("layers") else "not adopted (not better by over a point)."))
        lines += _scales_text(default.evidence.get("scales"))
        sweep = default.evidence.get("rows") or default.evidence.get("sweep") or []  # eval_sweep writes "rows"
        if sweep:
            lines.append(f"- {len(sweep)} settings swept on "
                         f"{html.escape(str(default.evidence.get('split', 'train')))} prompts only, never on held-out "
                         "ones.")
        lines.append(f"- Chosen by {_code(default.command or '(command not recorded)')}.")
        lines += _uncertain_text(readout_meta or {})
    return "\n".join(lines)
