"""The instrument's cell-level handlers: a grid click (drill-down), a map pick (which cells light up), a strip
click (one token's experts) and the per-token counterfactual. Plain functions of a `Session` returning (or
yielding) {component key: value}, like `explorer.page.callbacks`; `event` is the browser's event data (a dict,
None from the API, where the `cell` / `pick` text is used instead).

Usage::

    drill(session, state, "lib", "mean", "1, 7", None)        # {"drill": html, "cell": "1, 7", "cf_expert": ...}
    highlight(session, state, "lib", "mean", "expert", "weight", False, "reverse_word", None)
    *_, out = counterfactual(session, state, "lib", "1, 7", "reverse_word", "off", "cell")

A click costs no model call (the trace holds what the panel shows); a counterfactual takes the model's lock.
Clicks before a run, after the library changed, on a grid of an earlier run, or naming what the run does not
have come back as notices, never tracebacks.
"""
from __future__ import annotations

import logging

from explorer.page import instrument, plots
from explorer.page.callbacks import NO_TRACE, _groups, view_of
from explorer.page.events import Update, update
from explorer.page.counterfactual import Counterfactual, next_token, regenerate
from explorer.page.drill import CellError, cell_detail, check_cell, highlight as lit, parse_cell
from explorer.page.session import RunResult, Session

log = logging.getLogger(__name__)

DRILL_OUTPUTS = ("drill", "cell", "cf_expert", "cf_panel")
HIGHLIGHT_OUTPUTS = ("selection", "selection_json")
TOKEN_OUTPUTS = ("token_plot",)
CF_OUTPUTS = ("cf_out",)
ACTIONS = [("switch it off", "off"), ("force it (weight 1)", "force")]
SCOPES = [("this layer", "cell"), ("every layer, this token", "token"), ("everywhere", "everywhere")]


def _event(event) -> dict:
    return event if isinstance(event, dict) else {}


def drill(session: Session, state: RunResult | None, library, module, cell, event=None) -> dict:
    """A grid click: the cell's experts (DRILL_OUTPUTS). From the browser the cell comes with the event (and the
    run it was drawn for); from the API, from `cell` ("layer, token", token = position in the full trace)."""
    ev = _event(event)
    try:
        layer, token = parse_cell(ev if "layer" in ev else cell)
        detail = cell_detail(state, layer, token, module or plots.MEAN, library=library, run_id=ev.get("run"))
    except CellError as exc:
        return {"drill": instrument.note_html(str(exc), "error"), "cell": update(), "cf_expert": update(),
                "cf_panel": update()}
    return {"drill": instrument.drill_html(detail), "cell": f"{layer}, {token}",
            "cf_expert": update(choices=state.shown.experts, value=(state.trace.meta.get("pick") or {}).get(
                "expert", detail.top_weight)), "cf_panel": update(open=True)}  # per prompt: the pick answered


def _pick_experts(session: Session, state: RunResult, name: str) -> set[str]:
    """What a map pick names: an expert, a task (its expert) or a cluster (its experts)."""
    trace = state.shown
    if name in trace.experts:
        return {name}
    reg = session.registry
    analysis = reg.explore_map(state.request.library)
    serve = instrument.task_experts(analysis, trace.experts)
    if serve.get(name):
        return {serve[name]}
    groups = reg.groups(state.request.library)
    return {e for e in trace.experts if groups.get(e) == name or serve.get(name) == e} | \
        {serve[t] for t, c in analysis.cluster_of.items() if c == name and serve.get(t)}


def highlight(session: Session, state: RunResult | None, library, module, colour_by, grid_by, show_template, pick,
              event=None) -> dict:
    """A map pick (a point: task or expert; a legend entry: cluster): the grid cells and strip tokens whose top
    expert it is (HIGHLIGHT_OUTPUTS). The browser lights them at once; this says how many and lists them."""
    name = str(_event(event).get("name") or pick or "").strip()
    try:
        check_cell(state, library, state.shown.layers[0] if state and state.trace else 0, 0)
    except CellError as exc:
        return {"selection": _note(str(exc)), "selection_json": {}}
    experts = _pick_experts(session, state, name)
    if not experts:
        return {"selection": _note(f"{name!r} is no expert, task or cluster of this run."), "selection_json": {}}
    view, positions = view_of(session, state, show_template)
    hit = lit(state.shown, view, experts, _groups(session, state, colour_by), module or plots.MEAN,
              "contribution" if grid_by == "contribution" else "weight", positions)
    text = (f"**{_md(name)}** → {_md(hit.label)}: {len(hit.cells)} grid cells and {len(hit.tokens)} tokens "
            f"have it as their top {'cluster' if colour_by == 'cluster' else 'expert'}.")
    return {"selection": text, "selection_json": {"label": hit.label, "cells": hit.cells, "tokens": hit.tokens}}


def _md(text: str) -> str:
    """Markdown-safe: no markup, no HTML."""
    return "".join("\\" + ch if ch in "\\`*_{}[]()#+-.!|<>&" else ch for ch in str(text))


def _note(text: str) -> str:
    return f"ℹ️ {_md(text)}"


def token(session: Session, state: RunResult | None, module, cell, event=None) -> dict:
    """A strip click (or a cell's token from the API): that token's experts at every layer."""
    ev = _event(event)
    if state is None or state.trace is None:
        return {"token_plot": plots.note_figure("One token's experts", NO_TRACE)}
    try:
        position = int(ev["token"]) if "token" in ev else parse_cell(cell)[1]
    except (CellError, TypeError, ValueError) as exc:
        return {"token_plot": plots.note_figure("One token's experts", str(exc))}
    trace = state.shown
    return {"token_plot": plots.token_experts(trace, position, module if module in trace.modules else plots.MEAN)}


def counterfactual(session: Session, state: RunResult | None, library, cell, expert, action, scope):
    """The cell's counterfactual (CF_OUTPUTS): the next-token top-5 before/after and KL first, then the answer
    regenerated with the intervention."""
    try:
        layer, position = parse_cell(cell)
        check_cell(state, library, layer, position)
        trace = state.trace  # a per-prompt run's cells are its evidence, but the run (its pick) is what changes
        cf = Counterfactual(layer, position, str(expert or ""), str(action or "off"), str(scope or "cell"))
    except (CellError, ValueError) as exc:
        yield {"cf_out": instrument.note_html(str(exc), "error")}
        return
    reg = session.registry
    try:
        result = reg.model_thread.call(_intervene, reg, state, cf, False)
    except ValueError as exc:  # unknown expert, another mode: a notice
        yield {"cf_out": instrument.note_html(str(exc), "error")}
        return
    yield {"cf_out": instrument.counterfactual_html(result)}
    result = reg.model_thread.call(_intervene, reg, state, cf, True)
    yield {"cf_out": instrument.counterfactual_html(result)}


def _intervene(reg, state, cf: Counterfactual, answer: bool):
    """The counterfactual's next-token distributions, and with `answer` the answer regenerated (model thread)."""
    with reg.lock:
        routed = reg.attach(state.request.library)
        routed.set_router(state.trace.router)
        result = next_token(routed, state.trace, cf)  # again with `answer`: the KV cache must be this lock's
        return regenerate(routed, state.trace, result) if answer else result


__all__ = ["ACTIONS", "CF_OUTPUTS", "DRILL_OUTPUTS", "HIGHLIGHT_OUTPUTS", "SCOPES", "TOKEN_OUTPUTS", "Update",
           "counterfactual", "drill", "highlight", "token"]
