"""The explorer page: the only module that imports gradio. Layout and event wiring only; the work is done by
`explorer.page.session.Explorer` (model, libraries, runs) and `explorer.page.plots` (figures).

Usage::

    explorer = Explorer("smollm2-135m-instruct", ["assets/libraries/demo-mbc"])
    demo = build_demo(explorer)
    launch(demo, host="127.0.0.1", port=7860)              # queue on, no share link unless share=True

Every event has an api_name; `route` returns the routing trace as JSON among its outputs, so
`gradio_client.Client(url).predict(prompt, ..., api_name="/route")` gets the same data as the page.
"""
from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls

import gradio as gr  # noqa: E402

from explorer.page import plots  # noqa: E402
from explorer.page.session import MAX_NEW_TOKENS, Explorer, RunRequest  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples.json"
# System fonts only: the page must not fetch anything from outside (no Google Fonts, no CDN).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])
CSS = """
#notice p { margin: 0.2em 0; }
#status { font-size: 0.9em; opacity: 0.85; }
.compare textarea { font-family: var(--font-mono); font-size: 0.9em; }
"""
INTRO = """# LoRA Expert Library Explorer
Every token, at every layer, is routed over a library of LoRA experts by **Arrow** (each expert's top singular
direction scores the token's hidden state; the top-k experts mix). Type a prompt and press **Run** to see which
expert each token used; the **Library** tab shows which tasks' adapters are alike (MBC clustering)."""
COLOUR_BY = [("expert", "expert"), ("MBC cluster", "cluster")]
NO_TRACE = "Press Run to route a prompt."


def load_examples(path: Path = EXAMPLES) -> list[dict]:
    """[{"family": ..., "prompt": ...}]; a missing file gives a single free-text example."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return [{"family": "free text", "prompt": "Explain in one sentence what a LoRA adapter is."}]


def _md(lines: list[str], kind: str = "note") -> str:
    """Escaped page messages (they may quote library names or settings)."""
    mark = "⚠️" if kind == "error" else "ℹ️"
    return "\n\n".join(f"{mark} {html.escape(line)}" for line in lines)


def build_demo(explorer: Explorer, examples: list[dict] | None = None) -> gr.Blocks:
    """The page over one `Explorer`: Explore tab (run, grids, comparisons, interventions, downloads) and
    Library tab (similarity map, cosine matrix, experts table)."""
    examples = examples if examples is not None else load_examples()
    names = explorer.library_names
    first = names[0] if names else None

    # ------------------------------------------------------------ callbacks (thin: session and plots work)

    def ensure_loaded(progress) -> str | None:
        if not explorer.ready:
            ok = explorer.wait(progress=lambda frac, what: progress(frac, desc=what))
            if not ok:
                return explorer.error
        return None

    def figures(state, module, colour_by, expert, show_template):
        """heatmap, expert weight, entropy, usage, routing change, token strip."""
        if not state or state.get("trace") is None:
            empty = plots.note_figure("Routing", NO_TRACE)
            return empty, empty, empty, empty, plots.note_figure("Routing change", NO_TRACE), gr.update(value=[])
        trace = explorer.view(state["trace"], show_template)
        groups = explorer.groups(trace.meta.get("library", "")) if colour_by == "cluster" else None
        strip, colours = plots.token_strip(trace, module, groups)
        expert = expert if expert in trace.experts else plots.most_used_expert(trace) or trace.experts[0]
        ref = state.get("reference")
        diff = (plots.diff_heatmap(explorer.view(ref, show_template), trace, module) if ref is not None else
                plots.note_figure("Routing change", "Disable experts (intervention) and press Run to see how "
                                                    "routing and output change."))
        return (plots.top1_heatmap(trace, module, groups), plots.expert_heatmap(trace, expert, module),
                plots.entropy_heatmap(trace, module), plots.usage_bar(trace, explorer.groups(trace.meta.get(
                    "library", ""))), diff, gr.HighlightedText(value=strip, color_map=colours))

    def on_token(state, module, show_template, evt: gr.SelectData):
        if not state or state.get("trace") is None:
            return plots.note_figure("One token's experts", NO_TRACE)
        index = evt.index if isinstance(evt.index, int) else (evt.index or [-1])[0]
        return plots.token_experts(explorer.view(state["trace"], show_template), int(index), module)

    def route(prompt, library, chat, top_k, temperature, max_new, disabled, module, colour_by, expert,
              show_template, progress=gr.Progress()):
        error = ensure_loaded(progress)
        request = RunRequest(prompt=prompt or "", library=library or "", chat=bool(chat), top_k=int(top_k),
                             temperature=float(temperature), max_new_tokens=int(max_new),
                             disabled=tuple(disabled or ()))
        result = explorer.run(request) if error is None else None
        if result is None or result.error:
            message = _md([error or result.error], "error")
            blank = plots.note_figure("Routing", NO_TRACE)
            return (message, "", blank, blank, blank, blank, blank, gr.update(value=[]), "", "", None, gr.update(),
                    gr.update())
        trace = result.trace
        state = {"trace": trace, "reference": result.reference, "request": request}
        top = plots.most_used_expert(trace)
        expert = expert if expert in trace.experts and expert else top
        figs = figures(state, module, colour_by, expert, show_template)
        ref_text = result.reference.text if result.reference is not None else ""
        notes = result.notices + ([f"Intervention: experts {', '.join(request.disabled)} disabled."]
                                  if request.disabled else [])
        return (_md(notes), trace.text, *figs, ref_text, trace.to_json(), state,
                gr.update(choices=[("mean over modules", plots.MEAN)] + [(m, m) for m in trace.modules]),
                gr.update(choices=trace.experts, value=expert))

    def compare(prompt, library, chat, max_new, state):
        if not state or state.get("trace") is None:
            return "", "", "", ""
        request = state.get("request") or RunRequest(prompt=prompt or "", library=library or "", chat=bool(chat),
                                                     max_new_tokens=int(max_new))
        texts = explorer.compare(request, state["trace"])
        single = next((k for k in texts if k.startswith("most-used")), "most-used expert")
        return (texts.get("base", ""), texts.get("uniform merge", ""),
                gr.update(value=texts.get(single, ""), label=single), texts.get("arrow", ""))

    def on_library(library, progress=gr.Progress()):
        error = ensure_loaded(progress)
        analysis = explorer.analysis(library or "")
        experts = explorer.expert_names(library or "")
        status = explorer.status() if error is None else error
        note = _md([analysis.note]) if analysis.note else ""
        return (status, gr.update(choices=experts, value=[]), gr.update(choices=experts, value=None),
                gr.update(value=min(4, max(1, len(experts)))),  # no lower maximum: too high is clamped, with a notice
                plots.similarity_map(analysis), plots.cosine_matrix(analysis), analysis.experts, note,
                f"Library **{html.escape(library or '')}**: {len(experts)} routed experts. "
                f"{html.escape(analysis.summary)} Tasks whose warm-up adapters are alike are synergistic when "
                "trained together: MBC trains one expert per cluster.")

    def export(state, module, colour_by, expert, show_template, library):
        out = Path(tempfile.mkdtemp(prefix="explorer-export-"))
        files = []
        if state and state.get("trace") is not None:
            trace = state["trace"]
            (out / "trace.csv").write_text(trace.to_csv())
            (out / "trace.json").write_text(trace.to_json())
            files += [out / "trace.csv", out / "trace.json"]
            for name, fig in zip(("heatmap", "expert", "entropy", "usage", "change"),
                                 figures(state, module, colour_by, expert, show_template)[:5]):
                files.append(out / f"{name}.html")
                files[-1].write_text(plots.figure_html(fig))
        analysis = explorer.analysis(library or "")
        for name, fig in (("similarity-map", plots.similarity_map(analysis)),
                          ("cosine-matrix", plots.cosine_matrix(analysis))):
            files.append(out / f"{name}.html")
            files[-1].write_text(plots.figure_html(fig))
        return [str(f) for f in files]

    # ------------------------------------------------------------ layout

    with gr.Blocks(title="LoRA Expert Library Explorer") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            library = gr.Dropdown(choices=names, value=first, label="Library", scale=1)
            status = gr.Markdown("Loading the model…", elem_id="status")
        state = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Explore", id="explore"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Type a prompt, or pick an "
                                            "example below", elem_id="prompt")
                        gr.Examples(examples=[[e["prompt"]] for e in examples], inputs=[prompt],
                                    label="Examples (one per task family, and free text)",
                                    example_labels=[f"{e['family']}: {e['prompt'][:48]}" for e in examples])
                    with gr.Column(scale=2):
                        with gr.Row():
                            chat = gr.Checkbox(value=True, label="Chat template")
                            run = gr.Button("Run", variant="primary", elem_id="run")
                        top_k = gr.Slider(1, 16, value=4, step=1, label="top-k experts per token")
                        temperature = gr.Slider(0.1, 5.0, value=1.0, step=0.1, label="temperature")
                        max_new = gr.Slider(0, MAX_NEW_TOKENS, value=32, step=1, label="max new tokens")
                        disabled = gr.Dropdown(choices=[], multiselect=True, value=[], allow_custom_value=True,
                                               label="Intervention: disable experts")
                notice = gr.Markdown(elem_id="notice")
                text = gr.Textbox(label="Generated text (Arrow)", interactive=False, elem_id="generated")
                with gr.Row():
                    module = gr.Dropdown(choices=[("mean over modules", plots.MEAN)], value=plots.MEAN,
                                         label="Module")
                    colour_by = gr.Radio(COLOUR_BY, value="expert", label="Colour by")
                    show_template = gr.Checkbox(value=False, label="Show chat-template tokens")
                heatmap = gr.Plot(label="Top-1 expert per token and layer", elem_id="heatmap")
                with gr.Accordion("Token by token: click a token to see its experts at every layer", open=True):
                    strip = gr.HighlightedText(label="Tokens, coloured by their top expert (mean over layers)",
                                               combine_adjacent=False, show_legend=True, elem_id="token-strip",
                                               interactive=False)
                    token_plot = gr.Plot(label="One token's experts", elem_id="token-experts")
                with gr.Row():
                    usage = gr.Plot(label="Expert usage", elem_id="usage")
                    with gr.Column():
                        expert = gr.Dropdown(choices=[], label="Expert to show", allow_custom_value=True)
                        expert_plot = gr.Plot(label="Expert weight", elem_id="expert-weight")
                entropy = gr.Plot(label="Routing entropy", elem_id="entropy")
                gr.Markdown("### The same prompt four ways")
                with gr.Row(elem_classes="compare"):
                    base_text = gr.Textbox(label="base model", interactive=False, lines=4)
                    uniform_text = gr.Textbox(label="uniform merge", interactive=False, lines=4)
                    single_text = gr.Textbox(label="most-used expert", interactive=False, lines=4)
                    arrow_text = gr.Textbox(label="arrow", interactive=False, lines=4)
                with gr.Accordion("Intervention: what changed", open=False):
                    ref_text = gr.Textbox(label="Text with no expert disabled", interactive=False)
                    diff = gr.Plot(label="Routing change", elem_id="diff")
                with gr.Accordion("Downloads: trace (CSV, JSON) and every figure (standalone HTML)", open=False):
                    export_button = gr.Button("Prepare downloads")
                    files = gr.File(label="Files", file_count="multiple", interactive=False)
                trace_json = gr.Textbox(visible=False, label="trace JSON")
            with gr.Tab("Library", id="library"):
                library_summary = gr.Markdown()
                library_note = gr.Markdown(elem_id="library-note")
                similarity = gr.Plot(label="Adapter-similarity map", elem_id="similarity-map")
                cosine = gr.Plot(label="Cosine similarity", elem_id="cosine-matrix")
                table = gr.Dataframe(label="Experts", interactive=False, elem_id="experts-table")

        # ------------------------------------------------------------ events
        library_outputs = [status, disabled, expert, top_k, similarity, cosine, table, library_note,
                           library_summary]
        demo.load(on_library, inputs=[library], outputs=library_outputs, api_name="status")
        library.change(on_library, inputs=[library], outputs=library_outputs, api_name="library")
        route_inputs = [prompt, library, chat, top_k, temperature, max_new, disabled, module, colour_by, expert,
                        show_template]
        route_outputs = [notice, text, heatmap, expert_plot, entropy, usage, diff, strip, ref_text, trace_json,
                         state, module, expert]
        compare_args = dict(fn=compare, inputs=[prompt, library, chat, max_new, state],
                            outputs=[base_text, uniform_text, single_text, arrow_text])
        run.click(route, route_inputs, route_outputs, api_name="route").then(**compare_args, api_name="compare")
        prompt.submit(route, route_inputs, route_outputs, api_name="route_submit").then(
            **compare_args, api_name="compare_submit")
        view_inputs = [state, module, colour_by, expert, show_template]
        for control, name in ((module, "view_module"), (colour_by, "view_colour"), (expert, "view_expert"),
                              (show_template, "view_template")):
            control.change(figures, view_inputs, [heatmap, expert_plot, entropy, usage, diff, strip], api_name=name)
        strip.select(on_token, [state, module, show_template], [token_plot], api_name="token")
        export_button.click(export, view_inputs + [library], [files], api_name="export")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           **kwargs):
    """Queue on, bound to `host` (localhost unless told), a public link only with share=True."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, theme=THEME, css=CSS,
                       footer_links=["api"], **kwargs)
