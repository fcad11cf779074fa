"""The Explore view's event handlers: plain functions of a `Session` and the components' values, each returning
(or, streaming, yielding) {component key: value}. `explorer.page.ui` wires them to the components named by those
keys; tests call them directly. The cell-level handlers (drill-down, map pick, counterfactual) are in
`explorer.page.callbacks_cell`.

Usage::

    session = Session(Registry("tiny-random-llama", ["/tmp/lib"]))
    *texts, out = route(session, "Reverse the word: apple", "lib", True, 2, 1.0, "none", "prototypes", 4, [],
                        "mean", "expert", "weight", False, "base")  # a generator: the answer so far, then all
    out["text"], out["trace_json"], out["grid"]                 # the answer, the trace as JSON, the grid's HTML
    compare(session, out["state"])                              # {"base_text": ..., "single_text": Update(...)}

A value is what the component shows; `Update(props)` changes other properties too (choices, label...). Every
handler takes the session first; `progress` is a callable (fraction, description) or None.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from explorer.page import instrument, pick_plots, plots
from explorer.page.events import Update, ensure_loaded, messages, update  # noqa: F401 (part of this API)
from explorer.page.library_actions import router_controls as library_router_controls
from explorer.page.request import RawRequest
from explorer.page.session import RunResult, Session
from explorer.page.stream import stream_run

NO_TRACE = "Press Run to route a prompt."
MODULE_MEAN = ("mean", plots.MEAN)  # "module: mean" (of all modules); a longer label is cut at this width
GRID_BY = [("weight", "weight"), ("contribution", "contribution")]

# The outputs of each event, in the order the API returns them (gradio_client indexes by position).
ROUTE_OUTPUTS = ("notice", "text", "grid", "ref_text", "trace_json", "state", "module", "expert", "cf_expert",
                 "drill", "cf_out")
GRID_OUTPUTS = ("grid",)
FIGURE_OUTPUTS = ("expert_plot", "entropy", "usage", "diff", "decision")  # new ones last: API positions hold
COMPARE_OUTPUTS = ("base_text", "uniform_text", "single_text", "arrow_text")
LIBRARY_OUTPUTS = ("status", "disabled", "expert", "linked_map")
ROUTER_OUTPUTS = ("top_k", "temperature", "centre", "centre_scope", "input_centre", "granularity", "pick_by",
                  "route_layers", "expert_scales")


def view_of(session: Session, state: RunResult, show_template) -> tuple:
    """(view, positions): what the grid shows of the run, and each shown token's place in the full trace."""
    trace = state.shown
    view = session.view(trace, bool(show_template))
    positions = list(range(len(trace.tokens))) if view is trace else trace.positions("user+generated")
    return view, positions


def _groups(session: Session, state: RunResult, colour_by) -> dict | None:
    return session.registry.groups(state.request.library) if colour_by == "cluster" else None


# ---------------------------------------------------------------- Explore: run and views


def grid(session: Session, state: RunResult | None, module, colour_by, grid_by, show_template) -> dict:
    """The grid (with legend and token strip) of the last run, as the view controls ask (GRID_OUTPUTS)."""
    if state is None or state.trace is None:
        return {"grid": instrument.note_html(NO_TRACE)}
    view, positions = view_of(session, state, show_template)
    module = module if module == plots.MEAN or module in view.modules else plots.MEAN
    return {"grid": instrument.grid_html(state, view, positions, module, _groups(session, state, colour_by),
                                         by="contribution" if grid_by == "contribution" else "weight")}


def figures(session: Session, state: RunResult | None, module, expert, show_template) -> dict:
    """The detail figures of the last run (FIGURE_OUTPUTS): one expert's weight, entropy, usage, change, and which
    layers decided its pick (or lean)."""
    if state is None or state.trace is None:
        empty = plots.note_figure("Routing", NO_TRACE)
        return dict.fromkeys(FIGURE_OUTPUTS, empty)
    trace = session.view(state.shown, bool(show_template))
    module = module if module == plots.MEAN or module in trace.modules else plots.MEAN
    expert = expert if expert in trace.experts else trace.most_used_expert() or trace.experts[0]
    diff = (plots.diff_heatmap(session.view(state.reference, bool(show_template)), trace, module)
            if state.reference is not None else
            plots.note_figure("Routing change", "Disable experts (intervention) and press Run to see how routing "
                                                "and output change."))
    return {"expert_plot": plots.expert_heatmap(trace, expert, module), "entropy": plots.entropy_heatmap(trace, module),
            "usage": plots.usage_bar(trace, session.registry.groups(state.request.library)), "diff": diff,
            "decision": pick_plots.decision_layers(state.trace)}


def route(session: Session, prompt, library, chat, top_k, temperature, centre, centre_scope, max_new, disabled,
          module, colour_by, grid_by, show_template, input_centre=None, granularity=None, pick_by=None,
          route_layers=None, expert_scales=None, progress=None):
    """Run, streaming: the answer as it is generated ({"text": so far}), then every ROUTE_OUTPUTS key.
    `input_centre` ("none" | "base"), `granularity` ("token" | "prompt"), `pick_by` ("mean" | "readout"),
    `route_layers` ("all", "0-3, 6") and `expert_scales` ("default": the library's fitted factors | "none"), None:
    the library's default, come last so that API clients written before them keep their argument positions."""
    error = ensure_loaded(session, progress)
    if error is None:
        raw = RawRequest(prompt=prompt, library=library, chat=chat, top_k=top_k, temperature=temperature,
                         max_new_tokens=max_new, disabled=disabled, centre=centre, centre_scope=centre_scope,
                         input_centre=input_centre, granularity=granularity, pick=pick_by, layers=route_layers,
                         scales=expert_scales)
        steps = stream_run(session, raw)
    else:
        steps = iter([RunResult(trace=None, error=error)])
    for step in steps:
        if isinstance(step, str):
            yield {"text": step}
            continue
        yield _finished(session, step, module, colour_by, grid_by, show_template)


def _finished(session: Session, result: RunResult, module, colour_by, grid_by, show_template) -> dict:
    cleared = {"drill": instrument.note_html("Click a grid cell to see its experts."), "cf_out": ""}
    if result.error:
        return {"notice": messages([result.error], "error"), "text": "", "grid": instrument.note_html(NO_TRACE),
                "ref_text": "", "trace_json": "", "state": None, "module": update(), "expert": update(),
                "cf_expert": update(), **cleared}
    trace, disabled = result.trace, result.request.router.disabled
    notes = result.notices + ([f"Intervention: experts {', '.join(disabled)} disabled."] if disabled else [])
    notice = messages(notes)
    if trace.evidence is not None:  # the pick first, flagged when the evidence hardly decided
        chosen = trace.meta["pick"]
        said = messages([chosen["text"] + " Grid: its per-token evidence."],
                        "warning" if chosen.get("uncertain") else "note")
        notice = "\n\n".join(filter(None, [said, notice]))
    top = trace.most_used_expert()
    return {"notice": notice, "text": trace.text,
            **grid(session, result, module, colour_by, grid_by, show_template),
            "ref_text": result.reference.text if result.reference is not None else "",
            "trace_json": trace.to_json(dense=False), "state": result,
            "module": update(choices=[MODULE_MEAN] + [(m, m) for m in trace.modules]),
            "expert": update(choices=trace.experts, value=top), "cf_expert": update(choices=trace.experts, value=top),
            **cleared}


def compare(session: Session, state: RunResult | None) -> dict:
    """The same prompt three other ways (COMPARE_OUTPUTS), for the last run of this visitor; on demand, and
    cached per request, so it never holds up an answer."""
    if state is None or state.trace is None:
        return dict.fromkeys(COMPARE_OUTPUTS, "")
    texts = session.compare(state.request, state.trace)
    single = next((k for k in texts if k.startswith(("most-used", "runner-up"))), "most-used expert")
    return {"base_text": texts.get("base", ""), "uniform_text": texts.get("uniform merge", ""),
            "single_text": update(value=texts.get(single, ""), label=single), "arrow_text": texts.get("arrow", "")}


def export(session: Session, state: RunResult | None, module, colour_by, expert, show_template, library) -> dict:
    """Downloads: the trace (CSV, JSON) and every figure as a standalone HTML page, in a fresh temp folder."""
    out = Path(tempfile.mkdtemp(prefix="explorer-export-"))
    files, pages = [], {}
    if state is not None and state.trace is not None:
        files = [out / "trace.csv", out / "trace.json"]
        files[0].write_text(state.trace.to_csv())
        files[1].write_text(state.trace.to_json())
        view = session.view(state.shown, bool(show_template))
        groups = _groups(session, state, colour_by)
        pages = {"heatmap": plots.top1_heatmap(view, module, groups),
                 "contribution": plots.top1_heatmap(view, module, groups, by="contribution")}
        figs = figures(session, state, module, expert, show_template)
        pages.update(zip(("expert", "entropy", "usage", "change", "decision"), (figs[k] for k in FIGURE_OUTPUTS)))
    analysis = session.registry.explore_map(library or "")
    pages.update({"similarity-map": plots.similarity_map(analysis), "cosine-matrix": plots.cosine_matrix(analysis)})
    for name, fig in pages.items():
        files.append(out / f"{name}.html")
        files[-1].write_text(plots.figure_html(fig))
    return {"files": [str(f) for f in files]}


def example(session: Session, choice) -> dict:
    """An example picked from the list: its prompt in the prompt box."""
    return {"prompt": str(choice or "")}


# ---------------------------------------------------------------- library switch


def library(session: Session, name, progress=None) -> dict:
    """The page's load and a library switch: status, the library's experts in the controls, the linked map."""
    error = ensure_loaded(session, progress)
    reg, name = session.registry, name or ""
    experts = reg.expert_names(name)
    return {"status": reg.status() if error is None else error, "disabled": update(choices=experts, value=[]),
            "expert": update(choices=experts, value=None),
            "linked_map": instrument.map_html(reg.explore_map(name), experts, reg.groups(name))}


def router_controls(session: Session, name) -> dict:
    """The router controls (ROUTER_OUTPUTS) set to the library's default router. Waits for the model like
    `library`: on the page's load the libraries are registered only once the model is ready."""
    if ensure_loaded(session) is not None or name not in session.registry.libs:
        return {key: update() for key in ROUTER_OUTPUTS}
    return library_router_controls(session, name)
