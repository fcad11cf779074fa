"""The explorer page: with `explorer.page.ui_library` (the Library tab), the only module that imports gradio. It
lays the Explore view out and wires events; the work is done by `explorer.page.callbacks` and
`explorer.page.callbacks_cell` (module-level handlers returning or yielding {component key: value}), over a
`explorer.page.session.Session` (runs, views) and its `Registry` (model, libraries).

The instrument (grid, linked map, drill-down) is `gr.HTML` drawn by `static/*.js` with the plotly.js of the
installed plotly package, served by the app (`gr.set_static_paths`): no CDN. `gr.Plot` has no click events, so
the JS sends clicks to Python listeners through custom events ('cell', 'strip', 'pick') and links the grid and
the map in the browser (window events 'explorer-pick', 'explorer-hover').

Usage::

    session = Session(Registry("smollm2-135m-instruct", ["assets/libraries/demo-mbc"]))
    demo = build_demo(session)
    launch(demo, host="127.0.0.1", port=7860)              # queue on, no share link unless share=True

Every event has an api_name (listed in docs/page_api.md); `route` streams the answer and returns the routing
trace as JSON among its outputs, so `gradio_client.Client(url).submit(prompt, ..., api_name="/route")` gets the
same data as the page.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls

import gradio as gr  # noqa: E402
import plotly  # noqa: E402

from explorer.page import callbacks as cb  # noqa: E402
from explorer.page import callbacks_cell as cc  # noqa: E402
from explorer.page import instrument  # noqa: E402
from explorer.page.session import MAX_NEW_TOKENS, Session  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples.json"
STATIC = Path(__file__).resolve().parent / "static"
# plotly.js from the installed plotly package, served by the app: the instrument works offline, no CDN.
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
# System fonts only: the page must not fetch anything from outside (no Google Fonts, no CDN).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])
CSS = (STATIC / "page.css").read_text()
TITLE = ("**LoRA Expert Library Explorer** · every token, at every layer, routed over a library of LoRA experts by "
         "**Arrow**. Click a grid cell for its experts, a map point to light its cells.")
COLOUR_BY = [("expert", "expert"), ("cluster", "cluster")]


def _js(name: str) -> str:
    return (STATIC / name).read_text()


def _plotly_head() -> str:
    return f'<script src="/gradio_api/file={PLOTLY_JS.as_posix()}"></script>'


def load_examples(path: Path = EXAMPLES) -> list[dict]:
    """[{"family": ..., "prompt": ...}]; a missing file gives a single free-text example."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return [{"family": "free text", "prompt": "Explain in one sentence what a LoRA adapter is."}]


def _event(fn, session: Session, components: dict):
    """Gradio's view of handler `fn`: the session bound; a `progress` parameter gets gradio's progress tracker
    an `index` parameter the select event (its index passed on) and an `event` parameter the browser's event
    data (a dict; None from the API); {key: value} becomes {component: value}, an `Update` a `gr.update`.
    Generator handlers (streaming) stay generators."""
    params, hints = [], {}
    for p in list(inspect.signature(fn).parameters.values())[1:]:
        if p.name == "progress":
            p = p.replace(default=gr.Progress())
        elif p.name == "index":
            p, hints["index"] = p.replace(annotation=gr.SelectData), gr.SelectData
        elif p.name == "event":
            p, hints["event"] = p.replace(annotation=gr.EventData, default=inspect.Parameter.empty), gr.EventData
        params.append(p)

    def convert(out: dict) -> dict:
        return {components[k]: gr.update(**v.props) if isinstance(v, cb.Update) else v for k, v in out.items()}

    def unpack(a):
        if isinstance(a, gr.SelectData):
            return a.index
        return a._data if isinstance(a, gr.EventData) else a

    def call(args):
        return fn(session, *[unpack(a) for a in args])

    if inspect.isgeneratorfunction(fn):
        def handler(*args):
            for out in call(args):
                yield convert(out)
    else:
        def handler(*args):
            return convert(call(args))
    handler.__signature__, handler.__annotations__, handler.__name__ = inspect.Signature(params), hints, fn.__name__
    return handler


def build_demo(session: Session, examples: list[dict] | None = None) -> gr.Blocks:
    """The page over one `Session`: the Explore view (prompt, streamed answer, grid | map | drill-down,
    counterfactual; comparisons, more figures and downloads on demand) and the Library tab."""
    examples = examples if examples is not None else load_examples()
    names = session.registry.library_names
    first = names[0] if names else None
    gr.set_static_paths([PLOTLY_JS])  # the one file the page serves from outside the project
    head = _plotly_head()

    with gr.Blocks(title="LoRA Expert Library Explorer", fill_width=True) as demo:
        with gr.Row(equal_height=True, elem_id="header"):
            gr.Markdown(TITLE, elem_id="title")
            library = gr.Dropdown(choices=names, value=first, label="Library", scale=0, min_width=220,
                                  elem_id="library")
            status = gr.Markdown("Loading the model…", elem_id="status")
        state = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Explore", id="explore"):
                with gr.Row(equal_height=True, elem_id="ask"):
                    prompt = gr.Textbox(label="Prompt", lines=2, max_lines=4, elem_id="prompt", scale=5,
                                        placeholder="Type a prompt, or pick an example")
                    with gr.Column(scale=0, min_width=110):
                        run = gr.Button("Run", variant="primary", elem_id="run")
                        chat = gr.Checkbox(value=True, label="chat template", elem_id="chat")
                    text = gr.Textbox(label="Generated text (as routed), streamed", interactive=False, lines=2,
                                      max_lines=4, elem_id="generated", scale=5)
                notice = gr.Markdown(elem_id="notice")
                with gr.Row(equal_height=True, elem_id="settings"):
                    example = gr.Dropdown(choices=[(f"{e['family']}: {e['prompt'][:60]}", e["prompt"])
                                                   for e in examples], value=None, label="examples",
                                          min_width=150, elem_id="examples")
                    top_k = gr.Slider(1, 16, value=4, step=1, label="top-k", min_width=110, elem_id="top-k")
                    temperature = gr.Slider(0.1, 5.0, value=1.0, step=0.1, label="temperature", min_width=110,
                                            elem_id="temperature")
                    centre = gr.Dropdown(choices=["none", "mean"], value="none", label="centre", min_width=110,
                                         elem_id="centre")
                    centre_scope = gr.Radio(["prototypes", "weights"], value="prototypes", label="centre scope",
                                            min_width=190, elem_id="centre-scope")
                    # no `info` line: the control row must stay short so grid and map fit 1440 x 900
                    input_centre = gr.Radio(["none", "base"], value="none", label="input centring",
                                            min_width=120, elem_id="input-centre")
                    max_new = gr.Slider(0, MAX_NEW_TOKENS, value=32, step=1, label="new tokens", min_width=110,
                                        elem_id="max-new")
                    disabled = gr.Dropdown(choices=[], multiselect=True, value=[], allow_custom_value=True,
                                           label="disable experts", min_width=130)
                    module = gr.Dropdown(choices=[cb.MODULE_MEAN], value=cb.MODULE_MEAN[1], label="module",
                                         min_width=110, elem_id="module")
                    colour_by = gr.Radio(COLOUR_BY, value="expert", label="colour by", min_width=150)
                    grid_by = gr.Radio(cb.GRID_BY, value="weight", label="grid: top expert by", min_width=170,
                                       elem_id="grid-by")
                    show_template = gr.Checkbox(value=False, label="show chat template", min_width=90)
                    # last: the first row keeps its controls, these two share the second's room
                    granularity = gr.Radio([("per token", "token"), ("per prompt", "prompt")], value="token",
                                           label="routing", min_width=150, elem_id="granularity")
                    pick_by = gr.Radio([("mean weight", "mean"), ("readout", "readout")], value="mean",
                                       label="pick by (per prompt)", min_width=150, elem_id="pick-by")
                    route_layers = gr.Textbox(value="all", label="routed layers", max_lines=1, min_width=150,
                                              elem_id="route-layers", placeholder="all, or e.g. 0-3, 12")
                    # the library's fitted factors per expert (docs/design.md, "Expert scales"), or Arrow plain
                    expert_scales = gr.Radio([("fitted", "default"), ("none", "none")], value="none",
                                             label="expert scales", min_width=150, elem_id="expert-scales")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=6, min_width=420):
                        grid = gr.HTML(instrument.note_html(cb.NO_TRACE), elem_id="grid", head=head,
                                       js_on_load=_js("grid.js"), min_height=380)
                    with gr.Column(scale=3, min_width=260):
                        linked_map = gr.HTML(instrument.note_html("Loading the library's map…"), elem_id="map",
                                             head=head, js_on_load=_js("map.js"), min_height=380)
                        selection = gr.Markdown(elem_id="selection")
                        pick = gr.Textbox(visible=False, label="pick: an expert, task or cluster")
                    with gr.Column(scale=3, min_width=280):
                        drill = gr.HTML(instrument.note_html("Click a grid cell to see its experts."),
                                        elem_id="drill", js_on_load=_js("panel.js"))
                        with gr.Accordion("Counterfactual for this cell", open=False, elem_id="cf-panel") as cf_panel:
                            cell = gr.Textbox(label="cell (layer, token)", max_lines=1, elem_id="cell")
                            cf_expert = gr.Dropdown(choices=[], label="expert", allow_custom_value=True,
                                                    elem_id="cf-expert")
                            cf_action = gr.Radio(cc.ACTIONS, value="off", label="action", elem_id="cf-action")
                            cf_scope = gr.Radio(cc.SCOPES, value="cell", label="where", elem_id="cf-scope")
                            cf_run = gr.Button("Run counterfactual", elem_id="cf-run")
                            cf_out = gr.HTML("", elem_id="cf-out")
                with gr.Accordion("The same prompt three other ways (base, uniform merge, one expert)",
                                  open=False) as compare_panel:
                    compare_button = gr.Button("Compare", elem_id="compare")
                    with gr.Row(elem_classes="compare"):
                        base_text = gr.Textbox(label="base model", interactive=False, lines=3)
                        uniform_text = gr.Textbox(label="uniform merge", interactive=False, lines=3)
                        single_text = gr.Textbox(label="most-used expert", interactive=False, lines=3)
                        arrow_text = gr.Textbox(label="this run (as routed)", interactive=False, lines=3)
                with gr.Accordion("More figures: which layers decided, one token, one expert, entropy, usage, "
                                  "intervention", open=False) as more:
                    decision = gr.Plot(label="Which layers decided the pick (or the lean)", elem_id="decision")
                    token_plot = gr.Plot(label="One token's experts (click a token in the strip)",
                                         elem_id="token-experts")
                    with gr.Row():
                        usage = gr.Plot(label="Expert usage", elem_id="usage")
                        with gr.Column():
                            expert = gr.Dropdown(choices=[], label="Expert to show", allow_custom_value=True)
                            expert_plot = gr.Plot(label="Expert weight", elem_id="expert-weight")
                    entropy = gr.Plot(label="Routing entropy", elem_id="entropy")
                    ref_text = gr.Textbox(label="Text with no expert disabled (intervention)", interactive=False)
                    diff = gr.Plot(label="Routing change", elem_id="diff")
                with gr.Accordion("Downloads: trace (CSV, JSON) and every figure (standalone HTML)", open=False):
                    export_button = gr.Button("Prepare downloads")
                    files = gr.File(label="Files", file_count="multiple", interactive=False)
                trace_json = gr.Textbox(visible=False, label="trace JSON")
                selection_json = gr.JSON(visible=False, label="selection")
            with gr.Tab("Library", id="library") as library_page:
                tab = _library_tab(session, library)

        # ------------------------------------------------------------ events
        # the callbacks' keys are the components' names above
        c = {k: v for k, v in locals().items() if isinstance(v, (gr.components.Component, gr.Accordion))}
        c.update({k: v for k, v in tab.items() if k not in c})

        def wire(trigger, fn, inputs, outputs, api_name, **kw):
            return trigger(_event(fn, session, c), [c[k] for k in inputs], [c[k] for k in outputs],
                           api_name=api_name, **kw)

        wire(demo.load, cb.library, ["library"], cb.LIBRARY_OUTPUTS, "status")
        wire(library.change, cb.library, ["library"], cb.LIBRARY_OUTPUTS, "library")
        for trigger, name in ((demo.load, "router_defaults_load"), (library.change, "router_defaults")):
            wire(trigger, cb.router_controls, ["library"], list(cb.ROUTER_OUTPUTS), name)
        if "lib_changed" in tab:  # an expert added or removed: the Explore view follows
            wire(tab["lib_changed"].change, cb.library, ["library"], cb.LIBRARY_OUTPUTS, "library_edited")
        wire(example.change, cb.example, ["example"], ["prompt"], "example")
        from explorer.page.library_actions import warm_maps  # imported by the Library tab above

        wire(library_page.select, warm_maps, ["library"], [], "warm_maps")  # an upload's UMAP map: compiled ahead
        # input_centre, granularity, pick, route_layers, expert_scales last: API clients written before them keep
        # their argument positions
        route_inputs = ["prompt", "library", "chat", "top_k", "temperature", "centre", "centre_scope", "max_new",
                        "disabled", "module", "colour_by", "grid_by", "show_template", "input_centre", "granularity",
                        "pick_by", "route_layers", "expert_scales"]
        for trigger, suffix in ((run.click, ""), (prompt.submit, "_submit")):
            routed = wire(trigger, cb.route, route_inputs, cb.ROUTE_OUTPUTS, "route" + suffix)
            wire(routed.then, cb.figures, ["state", "module", "expert", "show_template"], cb.FIGURE_OUTPUTS,
                 "figures" + suffix)
        wire(compare_button.click, cb.compare, ["state"], cb.COMPARE_OUTPUTS, "compare")
        grid_inputs = ["state", "module", "colour_by", "grid_by", "show_template"]
        for control, name in ((module, "view_module"), (colour_by, "view_colour"), (grid_by, "view_grid"),
                              (show_template, "view_template")):
            wire(control.input, cb.grid, grid_inputs, cb.GRID_OUTPUTS, name)
        wire(expert.input, cb.figures, ["state", "module", "expert", "show_template"], cb.FIGURE_OUTPUTS,
             "view_expert")
        wire(grid.cell, cc.drill, ["state", "library", "module", "cell"], cc.DRILL_OUTPUTS, "drill")
        wire(grid.strip, cc.token, ["state", "module", "cell"], cc.TOKEN_OUTPUTS, "token")
        wire(linked_map.pick, cc.highlight, ["state", "library", "module", "colour_by", "grid_by", "show_template",
                                             "pick"], cc.HIGHLIGHT_OUTPUTS, "highlight")
        wire(cf_run.click, cc.counterfactual, ["state", "library", "cell", "cf_expert", "cf_action", "cf_scope"],
             cc.CF_OUTPUTS, "counterfactual")
        wire(export_button.click, cb.export, ["state", "module", "colour_by", "expert", "show_template", "library"],
             ["files"], "export")
    return demo


def _library_tab(session: Session, library) -> dict:
    """The Library tab (explorer.page.ui_library): report card, map, experts, upload and removal."""
    from explorer.page.ui_library import library_tab

    return library_tab(session, library)



def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           **kwargs):
    """Queue on, bound to `host` (localhost unless told), a public link only with share=True."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, theme=THEME, css=CSS,
                       footer_links=["api"], **kwargs)
