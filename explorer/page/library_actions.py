"""The Library tab's event handlers: plain functions of a `Session` and the components' values, each returning
{component key: value}; `explorer.page.ui_library` wires them, tests call them directly (no server).

Usage::

    session = Session(Registry("tiny-random-llama", ["/tmp/lib"]))
    show(session, "lib")                          # report card, map (its default kind), experts table (SHOW_OUTPUTS)
    switch_map(session, "lib", "delta")           # the ΔW map instead of the warm-up map
    upload(session, "lib", ["adapter.zip"], "my-expert", "add, subtract", False)   # message + refreshed tab
    ask_remove(session, "lib", "my-expert"); remove(session, "lib", "my-expert")    # confirm, then remove
    router_controls(session, "lib")               # the Explore controls set to the library's default router

Every refusal of the store (hostile or bad uploads, duplicate names, committed libraries) becomes a message;
the library is then unchanged (the store guarantees it, `library_store.store.upload`).
"""
from __future__ import annotations

import html
import logging
import threading
import time

from explorer.page.events import Update, ensure_loaded, messages, update
from explorer.page.plots import cosine_matrix, note_figure, similarity_map
from explorer.page.report_plots import confusion_heatmap, layer_curve, report_card
from explorer.page.session import Session
from explorer.routing.config import GRANULARITIES, INPUT_CENTRES, PICKS, compact_layers

log = logging.getLogger(__name__)

MAP_KINDS = [("warm-up weights (MBC)", "mbc"), ("weight updates ΔW", "delta")]
SHOW_OUTPUTS = ("lib_summary", "lib_note", "map_kind", "similarity", "cosine", "table", "report", "confusion",
                "layers", "remove_name")
MAP_OUTPUTS = ("similarity", "cosine", "lib_note")
EDIT_OUTPUTS = ("edit_msg", "confirm_row", "lib_changed", *SHOW_OUTPUTS)


def default_map_kind(session: Session, library: str) -> str:
    """"mbc" when the library has a warm-up (MBC) map, else "delta" (any library has a ΔW map)."""
    return "mbc" if session.registry.analysis(library).coords is not None else "delta"


def _maps(session: Session, library: str, kind: str) -> dict:
    analysis = session.registry.library_map(library, kind)
    return {"similarity": similarity_map(analysis), "cosine": cosine_matrix(analysis),
            "lib_note": messages([analysis.note]) if analysis.note else "", "summary": analysis.summary}


def show(session: Session, library, progress=None) -> dict:
    """The tab for `library` (page load and library switch): summary, report card, default map, table."""
    from explorer.routing.config import RouterConfig
    from explorer.routing.readout import readout_key
    from library_store.store.reports import read_default_router, read_readout, read_report

    error = ensure_loaded(session, progress)
    reg, library = session.registry, str(library or "")
    if error is not None or library not in reg.libs:
        why = error or f"Library {library!r} is not available: " + reg.problems.get(library, "unknown library.")
        return {"lib_summary": "", "lib_note": messages([why], "error"), "map_kind": update(visible=False),
                "similarity": note_figure("Similarity map", why), "cosine": note_figure("Cosine similarity", why),
                "table": None, "report": "", "confusion": confusion_heatmap(None), "layers": layer_curve(None),
                "remove_name": update(choices=[], value=None)}
    kind = default_map_kind(session, library)
    maps = _maps(session, library, kind)
    lib, served, copy = reg.libs[library], reg.paths[library], reg.user_copy_of(library)
    report, default = read_report(lib), read_default_router(lib)
    readout = None
    if default is not None and default.router.get("pick") == "readout":
        try:
            readout = read_readout(lib, readout_key(RouterConfig.from_dict(default.router)))
        except ValueError:  # a default router the engine would refuse too: the card shows it without the readout
            pass
    card = report_card(report, default, library, str(served), readout and readout[1])
    where = f" Served from your copy at {_code(str(copy))} (the committed library is unchanged)." if copy else ""
    summary = (f"Library **{html.escape(library)}**: {len(reg.expert_names(library))} routed experts, "
               f"{len(lib)} in all. {html.escape(maps.pop('summary'))}{where}")
    out = {"lib_summary": summary, **maps,
           "map_kind": update(value=kind, visible=kind == "mbc", choices=MAP_KINDS),
           "table": reg.analysis(library).experts, "report": card,
           "confusion": confusion_heatmap(report), "layers": layer_curve(report),
           "remove_name": update(choices=lib.names(), value=None)}
    return {k: out[k] for k in SHOW_OUTPUTS}


def _code(text: str) -> str:
    return "`" + html.escape(text).replace("`", "'") + "`"


def warm_maps(session: Session, library) -> dict:
    """The Library tab was opened: when the library's ΔW map is (or after one upload would be) a UMAP map, compile
    UMAP in a background thread now (once per process, 13-15 s), so that an upload's new map does not wait for it.
    Nothing is shown."""
    from library_store.training.mbc import UMAP_MIN_EXPERTS, umap_warmed, warm_umap

    lib = session.registry.libs.get(str(library or ""))
    if lib is not None and not umap_warmed() and len(lib.names()) + 1 >= UMAP_MIN_EXPERTS:
        threading.Thread(target=warm_umap, name="umap-warm-up", daemon=True).start()
    return {}


def switch_map(session: Session, library, kind) -> dict:
    """The map the radio asks for (MAP_OUTPUTS)."""
    kind = kind if kind in dict(MAP_KINDS).values() else default_map_kind(session, str(library or ""))
    maps = _maps(session, str(library or ""), kind)
    maps.pop("summary")
    return maps


def _edited(session: Session, library: str, message: str) -> dict:
    return {"edit_msg": message, "confirm_row": update(visible=False), "lib_changed": f"{library}@{time.time():.6f}",
            **show(session, library)}


def _refused(message: str) -> dict:
    return {"edit_msg": messages([message], "error"), "confirm_row": update(visible=False)}


def _tasks(text) -> list[str]:
    parts = text if isinstance(text, (list, tuple)) else str(text or "").split(",")
    return [t.strip() for t in parts if str(t).strip()]


def _files(files) -> list[str]:
    """Gradio gives a path, a list of paths, or file objects with `.name` / dicts with "path"."""
    if files is None:
        return []
    items = files if isinstance(files, (list, tuple)) else [files]
    out = []
    for f in items:
        out.append(f.get("path") if isinstance(f, dict) else getattr(f, "name", f))
    return [str(p) for p in out if p]


def upload(session: Session, library, files, name, tasks, replace, progress=None) -> dict:
    """Add the uploaded adapter (its two files, a folder's files, or a .zip) as `name` (EDIT_OUTPUTS, or only
    the message when refused)."""
    from library_store.store.errors import DuplicateExpert, LibraryError

    error = ensure_loaded(session, progress)
    if error is not None:
        return _refused(error)
    library, paths = str(library or ""), _files(files)
    if not paths:
        return _refused("Choose the adapter to upload first: adapter_config.json and adapter_model.safetensors, "
                        "or a .zip of them.")
    try:
        edit = session.registry.add_expert(library, paths, name if isinstance(name, str) else "", _tasks(tasks),
                                           replace=bool(replace))
    except DuplicateExpert as exc:
        return _refused(f"{exc} Tick “Replace an expert of the same name” and upload again to replace it.")
    except (LibraryError, ValueError, OSError) as exc:  # the store's refusals: the library is unchanged
        return _refused(str(exc))
    except Exception as exc:  # noqa: BLE001 - a page shows a message, never a traceback
        log.exception("upload failed")
        return _refused(f"The upload failed: {type(exc).__name__}: {exc}")
    info = edit.info
    computed = ("prototypes of the new expert computed" if edit.computed == 1 else
                f"prototypes of {edit.computed} experts computed" if edit.computed is not None else
                "prototypes computed when the library is next routed")
    lines = [f"Added expert {info.name} to {library} (rank {info.rank}, {len(info.target_modules)} module kinds"
             f"{', tasks ' + ', '.join(info.tasks) if info.tasks else ''}). It takes part in routing now: "
             f"{computed}; stored in {edit.seconds['store']:.2f} s, attached in {edit.seconds['attach']:.2f} s."]
    if edit.copied:
        lines.append(f"{library} is a committed demo library and is never modified: the expert went into your copy "
                     f"at {edit.path}, which the page serves as {library} from now on.")
    return _edited(session, library, messages(lines))


def ask_remove(session: Session, library, name) -> dict:
    """First step of a removal: say what will happen and show the confirmation buttons."""
    library = str(library or "")
    if library not in session.registry.libs or not name or name not in session.registry.libs[library]:
        return {"edit_msg": messages([f"Choose an expert of {library} to remove."], "error"),
                "confirm_row": update(visible=False)}
    copy = " (a committed demo library: the expert is removed from your copy; the original stays)" \
        if session.registry.user_copy_of(library) is None and _committed(session.registry.paths[library]) else ""
    return {"edit_msg": messages([f"Remove expert {name} from {library}{copy}? It stops routing at once."]),
            "confirm_row": update(visible=True)}


def _committed(path) -> bool:
    from library_store.store.user_copy import is_committed_asset

    return is_committed_asset(path)


def cancel_remove(session: Session) -> dict:
    return {"edit_msg": "", "confirm_row": update(visible=False)}


def remove(session: Session, library, name) -> dict:
    """Second step: remove `name` (EDIT_OUTPUTS, or only the message when refused)."""
    from library_store.store.errors import LibraryError

    library = str(library or "")
    try:
        edit = session.registry.remove_expert(library, str(name or ""))
    except (LibraryError, ValueError, KeyError, OSError) as exc:
        return _refused(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
    lines = [f"Removed expert {name} from {library}; routing continues over the others."]
    if edit.copied:
        lines.append(f"The committed library is unchanged: the page now serves your copy at {edit.path}.")
    return _edited(session, library, messages(lines))


def router_controls(session: Session, library) -> dict:
    """The Explore tab's router controls set to the library's default router (keys top_k, temperature, centre,
    centre_scope, input_centre, granularity, pick_by, route_layers, expert_scales); centre choices are none, mean and
    general:<name> for the library's `general` experts; an input centring the page does not offer shows as
    "none"."""
    reg, library = session.registry, str(library or "")
    router = reg.default_router(library)
    n = max(1, len(reg.expert_names(library)))
    general = [f"general:{i.name}" for i in reg.libs[library].infos() if i.kind == "general"] \
        if library in reg.libs else []
    centres = ["none", "mean", *general]
    centre = router["centre"] if router["centre"] in centres else "none"
    return {"top_k": update(value=min(int(router["top_k"]), n)), "temperature": update(value=router["temperature"]),
            "centre": update(choices=centres, value=centre), "centre_scope": update(value=router["centre_scope"]),
            "input_centre": update(value=router["input_centre"] if router["input_centre"] in INPUT_CENTRES else "none"),
            "granularity": update(value=router["granularity"] if router["granularity"] in GRANULARITIES else "token"),
            "pick_by": update(value=router["pick"] if router["pick"] in PICKS else "mean"),
            "route_layers": update(value="all" if router.get("layers") is None else compact_layers(router["layers"])),
            # offered only where the library's default router has fitted factors
            "expert_scales": update(value="default" if router.get("scales") else "none",
                                    interactive=bool(router.get("scales")))}


__all__ = ["EDIT_OUTPUTS", "MAP_KINDS", "MAP_OUTPUTS", "SHOW_OUTPUTS", "Update", "ask_remove", "cancel_remove",
           "default_map_kind", "remove", "router_controls", "show", "switch_map", "upload"]
