"""What a click shows, read from a run's trace alone (no model call, no gradio): the drill-down of one grid
cell, and the grid cells and strip tokens a map pick lights up.

Usage::

    cell = parse_cell("3, 7")                             # (layer 3, token position 7), or raise CellError
    detail = cell_detail(result, *cell, module="mean")   # CellDetail: rows per expert, per module, top expert
    lit = highlight(trace, view, {"reverse_word"}, groups=None)   # Highlight: the (layer, token) cells and tokens

Token positions are positions in the full trace (what the grid's columns carry), whatever the view crops.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from explorer.routing.trace import MEAN, RoutingTrace


class CellError(ValueError):
    """A click the page answers with a notice: no run yet, another library, a stale or unknown cell."""


@dataclass
class ExpertRow:
    """One chosen expert of a cell (mean over the modules that chose it, or one module's values)."""

    expert: str
    weight: float  # routing weight (mean over modules: 0 where a module did not choose it)
    score: float | None  # raw |h · p| (mean over the modules that chose it)
    margin: float | None  # score minus the next expert's
    contribution: float | None  # ‖w_e · s_e · B_e A_e h‖
    relative: float | None  # contribution / ‖base layer output‖


@dataclass
class CellDetail:
    layer: int
    token: int  # position in the full trace
    text: str  # the token as the tokenizer shows it
    generated: bool
    rows: list[ExpertRow]  # the module selector's choice ("mean": over modules), largest weight first
    modules: dict[str, list[ExpertRow]] = field(default_factory=dict)  # every module's own choice
    top_weight: str | None = None  # expert with the largest weight at this cell
    top_contribution: str | None = None  # expert that added the most (may differ: worth seeing)


@dataclass
class Highlight:
    label: str  # what was picked (expert or cluster)
    cells: list[tuple[int, int]]  # (layer, token position) whose top expert (or cluster) is the pick
    tokens: list[int]  # token positions whose strip colour (top over layers) is the pick


_CELL = re.compile(r"^\s*(?:layer\s*)?(-?\d+)\s*[,;: ]\s*(?:token\s*)?(-?\d+)\s*$", re.IGNORECASE)


def parse_cell(cell) -> tuple[int, int]:
    """(layer, token) from "3, 7", "layer 3, token 7", [3, 7] or {"layer": 3, "token": 7}."""
    if isinstance(cell, dict):
        cell = (cell.get("layer"), cell.get("token"))
    if isinstance(cell, (list, tuple)) and len(cell) == 2:
        try:
            return int(cell[0]), int(cell[1])
        except (TypeError, ValueError):
            pass
    match = _CELL.match(str(cell or ""))
    if not match:
        raise CellError(f"Cannot read the cell {str(cell)[:40]!r}: give it as 'layer, token' (e.g. '3, 7').")
    return int(match.group(1)), int(match.group(2))


def check_cell(result, library: str | None, layer: int, token: int, run_id: int | None = None) -> RoutingTrace:
    """The run's shown trace (`RunResult.shown`) when (layer, token) is a cell of it, else a CellError saying why."""
    if result is None or getattr(result, "trace", None) is None:
        raise CellError("Press Run first: there is no routing to drill into yet.")
    trace = result.shown
    if library and result.request is not None and library != result.request.library:
        raise CellError(f"The library changed to {library!r} since this run (over "
                        f"{result.request.library!r}): press Run to route over it, then click a cell.")
    if run_id is not None and int(run_id) != result.run_id:
        raise CellError("That cell belongs to an earlier run: the grid has been redrawn. Click the grid again.")
    if layer not in trace.layers:
        raise CellError(f"Layer {layer} is not in this run (layers {trace.layers[0]}..{trace.layers[-1]}).")
    if not 0 <= token < len(trace.tokens):
        raise CellError(f"Token {token} is not in this run (tokens 0..{len(trace.tokens) - 1}).")
    return trace


def _mean_rows(per_module: dict[str, list]) -> list[ExpertRow]:
    """Per expert, the mean weight over every module (0 where not chosen) and the mean of the other values
    over the modules that chose it."""
    n = max(1, len(per_module))
    seen: dict[str, list] = {}
    for rows in per_module.values():
        for r in rows:
            seen.setdefault(r.expert, []).append(r)

    def mean(rows, name):
        vals = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        return float(np.mean(vals)) if vals else None

    out = [ExpertRow(e, sum(r.weight for r in rows) / n, mean(rows, "score"), mean(rows, "margin"),
                     mean(rows, "contribution"), mean(rows, "relative")) for e, rows in seen.items()]
    return sorted(out, key=lambda r: -r.weight)


def cell_detail(result, layer: int, token: int, module: str = MEAN, library: str | None = None,
                run_id: int | None = None) -> CellDetail:
    """The drill-down of one cell of `result`'s trace (see module docstring); CellError for a bad click."""
    trace = check_cell(result, library, layer, token, run_id)
    raw = trace.cell(layer, token)  # {module: [CellExpert, ...]}: stored at trace time, no model call
    modules = {m: [ExpertRow(c.expert, c.weight, c.score, c.margin, c.contribution, c.relative) for c in cells]
               for m, cells in raw.items()}
    rows = _mean_rows(modules) if module == MEAN or module not in modules else modules[module]
    top_c = None
    if trace.routes.contribution is not None:
        names, idx, _ = trace.top_contributor(module if module in modules else MEAN)
        top_c = names[int(idx[trace.layers.index(layer), token])] if names else None
    return CellDetail(layer=layer, token=token, text=trace.tokens[token], generated=trace.is_generated[token],
                      rows=rows, modules=modules, top_weight=rows[0].expert if rows else None,
                      top_contribution=top_c)


def grid_labels(trace: RoutingTrace, module: str, groups: dict[str, str] | None,
                by: str = "weight") -> tuple[list[str], np.ndarray]:
    """names and (L, T) index of each cell's winner: by routing weight or by contribution; -1 where nothing was
    routed (a layer the router does not route at)."""
    if by == "contribution" and trace.routes.contribution is not None:
        names, idx, _ = trace.top_contributor(module, groups)
    else:
        names, idx, _ = trace.top_expert(module, groups)
    return names, np.where(trace.routed(module), idx, -1)  # (L, T)


def highlight(trace: RoutingTrace, view: RoutingTrace, pick: set[str], groups: dict[str, str] | None = None,
              module: str = MEAN, by: str = "weight", positions: list[int] | None = None) -> Highlight:
    """Cells of `view` (the grid's tokens; `positions` = their places in `trace`) whose winner is in `pick`
    (expert names; with `groups`, their clusters), and the strip tokens whose winner over layers is."""
    labels = {groups.get(p, p) for p in pick} if groups else set(pick)
    names, idx = grid_labels(view, module, groups, by)  # (L, T)
    hit = np.isin(idx, [i for i, n in enumerate(names) if n in labels])  # (L, T); -1 (not routed) never
    positions = positions if positions is not None else list(range(len(view.tokens)))
    cells = [(view.layers[li], positions[ti]) for li, ti in zip(*np.nonzero(hit))]
    strip = [positions[ti] for ti, label in enumerate(strip_labels(view, module, groups)) if label in labels]
    return Highlight(label=", ".join(sorted(labels)), cells=cells, tokens=strip)


def strip_labels(view: RoutingTrace, module: str = MEAN, groups: dict[str, str] | None = None) -> list[str | None]:
    """Each token's winner over all layers (expert, or cluster with `groups`); None where nothing was routed.
    The same as `view.crop([t]).winner("all", groups)` for every t, in one pass."""
    w = view.module_weights(module).mean(axis=0)  # (T, E)
    names = list(view.experts)
    if groups:
        names = sorted({groups.get(e, e) for e in view.experts})
        member = np.array([[groups.get(e, e) == g for g in names] for e in view.experts], dtype=np.float32)
        w = w @ member.reshape(len(view.experts), len(names))  # (T, G)
    if not names:
        return [None] * len(view.tokens)
    idx = w.argmax(axis=-1)  # (T,)
    return [names[i] if w[t, i] > 0 else None for t, i in enumerate(idx)]
