"""The Library tab's gradio components and events. With `explorer.page.ui`, the only modules that import gradio;
the work is done by `explorer.page.library_actions` (handlers returning {component key: value}).

Usage (inside `ui.build_demo`)::

    with gr.Tab("Library", id="library"):
        tab = library_tab(session, library)      # library: the page's library dropdown; returns {key: component}
    tab["lib_changed"].change(...)               # fires after an expert was added or removed: refresh Explore

`library_tab` lays the tab out (report card, similarity map with its MBC / ΔW switch, experts table, add and
remove an expert) and, given the page's library dropdown, wires its own events: the tab refreshes on page load
and on a library switch (api "library_tab"), "library_map", "upload_expert", "ask_remove", "remove_expert",
"cancel_remove". Keys are `library_actions`' output keys plus the inputs named below.
"""
from __future__ import annotations

import inspect

import gradio as gr

from explorer.page import library_actions as act
from explorer.page.events import Update
from explorer.page.session import Session

UPLOAD_HELP = """#### Add an expert
Upload a PEFT LoRA adapter for this library's base model: its `adapter_config.json` and
`adapter_model.safetensors`, or a `.zip` of them. It is checked (base model, shapes, rank, finite weights, safe
files only: no pickles, links or zip bombs) and takes part in routing at once. A committed demo library is never
modified: the expert goes into your copy of it, which the page then serves."""


def _handler(fn, session: Session, components: dict):
    """Gradio's view of `fn`: the session bound, `progress` given gradio's tracker, {key: value} turned into
    {component: value} and `Update`s into `gr.update`s."""
    params = []
    for p in list(inspect.signature(fn).parameters.values())[1:]:
        params.append(p.replace(default=gr.Progress()) if p.name == "progress" else p)

    def handler(*args):
        out = fn(session, *args)
        return {components[k]: gr.update(**v.props) if isinstance(v, Update) else v
                for k, v in out.items() if k in components}

    handler.__signature__, handler.__name__ = inspect.Signature(params), fn.__name__
    return handler


def library_tab(session: Session, library: gr.Dropdown | None = None) -> dict:
    """The tab's components by key (see module docstring); events wired when `library` is given."""
    c: dict = {}
    c["lib_summary"] = gr.Markdown(elem_id="library-summary")
    with gr.Accordion("Report card: does this library's routing explain?", open=True):
        c["report"] = gr.Markdown(elem_id="report-card")
        with gr.Row():
            c["confusion"] = gr.Plot(label="Task x expert routing", elem_id="report-confusion")
            c["layers"] = gr.Plot(label="Accuracy per layer", elem_id="report-layers")
    c["map_kind"] = gr.Radio(act.MAP_KINDS, value="mbc", label="Map of", visible=False, elem_id="map-kind")
    c["lib_note"] = gr.Markdown(elem_id="library-note")
    c["similarity"] = gr.Plot(label="Similarity map", elem_id="similarity-map")
    c["cosine"] = gr.Plot(label="Cosine similarity", elem_id="cosine-matrix")
    c["table"] = gr.Dataframe(label="Experts", interactive=False, elem_id="experts-table")
    with gr.Accordion("Add or remove an expert", open=True):
        c["edit_msg"] = gr.Markdown(elem_id="edit-msg")
        gr.Markdown(UPLOAD_HELP)
        with gr.Row():
            c["files"] = gr.File(label="Adapter files or .zip", file_count="multiple", type="filepath",
                                 elem_id="upload-files")
            with gr.Column():
                c["name"] = gr.Textbox(label="Expert name", max_lines=1, elem_id="upload-name")
                c["tasks"] = gr.Textbox(label="Tasks (optional, comma-separated)", max_lines=1,
                                        elem_id="upload-tasks")
                c["replace"] = gr.Checkbox(label="Replace an expert of the same name", value=False,
                                           elem_id="upload-replace")
                c["add"] = gr.Button("Add expert", variant="primary", elem_id="upload-button")
        with gr.Row():
            c["remove_name"] = gr.Dropdown(choices=[], label="Expert to remove", elem_id="remove-name")
            c["remove"] = gr.Button("Remove…", elem_id="remove-button")
        with gr.Row(visible=False) as confirm_row:
            c["confirm"] = gr.Button("Yes, remove it", variant="stop", elem_id="remove-confirm")
            c["cancel"] = gr.Button("Cancel", elem_id="remove-cancel")
        c["confirm_row"] = confirm_row
        c["lib_changed"] = gr.Textbox(visible=False, label="library changed")
    if library is not None:
        _wire(session, c, library)
    return c


def _wire(session: Session, c: dict, library: gr.Dropdown) -> None:
    comps = {**c, "library": library}

    def on(triggers, fn, inputs, outputs, api_name):
        return gr.on(triggers, _handler(fn, session, comps), [comps[k] for k in inputs],
                     [comps[k] for k in outputs], api_name=api_name)

    on(None, act.show, ["library"], act.SHOW_OUTPUTS, "library_tab")  # page load and library switch
    on([c["map_kind"].input], act.switch_map, ["library", "map_kind"], act.MAP_OUTPUTS, "library_map")
    on([c["add"].click], act.upload, ["library", "files", "name", "tasks", "replace"], act.EDIT_OUTPUTS,
       "upload_expert")
    on([c["remove"].click], act.ask_remove, ["library", "remove_name"], ["edit_msg", "confirm_row"], "ask_remove")
    on([c["confirm"].click], act.remove, ["library", "remove_name"], act.EDIT_OUTPUTS, "remove_expert")
    on([c["cancel"].click], act.cancel_remove, [], ["edit_msg", "confirm_row"], "cancel_remove")
