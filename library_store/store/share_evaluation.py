"""What a shared library says about its routing: the evaluation's records travel in a pack, and the export's PEFT
snippet carries the recorded default router as far as PEFT's Arrow can express it.

Usage::

    records = pack_evaluation(lib, folder)          # writes folder/evaluation/*.safetensors; records for the manifest
    n = unpack_evaluation(lib, src, records)        # checked, then stored as the unpacked library's derived data
    args, general, notes = peft_arrow(router, paths)  # ArrowConfig arguments, general adapters, what PEFT lacks

The records are the derived data `bench/eval_routing.py --record` writes (library_store/store/reports.py): the
routing reports, the default router with its evidence, and per-prompt pick readouts. They are keyed by the
library's content (a hash of the experts' checksums), which an unpacked library shares with its source, so
they stay valid; a record of another content is not carried.
"""
from __future__ import annotations

import re
from pathlib import Path

from library_store.store.errors import LibraryError
from library_store.store.reports import READOUT_KIND, REPORT_KIND, ROUTER_KIND

KINDS = (REPORT_KIND, ROUTER_KIND, READOUT_KIND)
FOLDER = "evaluation"
_FILE = re.compile(rf"{FOLDER}/[a-z-]+-[0-9a-f]+\.safetensors")


def pack_evaluation(lib, folder: Path) -> list[dict]:
    """The library's evaluation records of its current content, as manifest entries {kind, config, meta, file};
    tensors (a readout's coefficients) are written under `folder/evaluation/`."""
    from safetensors.torch import save_file

    content = lib.content_key()
    out = []
    for entry in lib.list_derived():
        if entry["kind"] not in KINDS or entry["config"].get("content") != content:
            continue
        tensors, meta = lib.get_derived(entry["kind"], entry["config"])
        file = None
        if tensors:
            file = f"{FOLDER}/{entry['kind']}-{entry['key']}.safetensors"
            (folder / FOLDER).mkdir(exist_ok=True)
            save_file(dict(tensors), str(folder / file))
        out.append({"kind": entry["kind"], "config": entry["config"], "meta": meta, "file": file})
    return out


def unpack_evaluation(lib, src: Path, records) -> int:
    """Store a pack's evaluation records in `lib` (opened writable, its experts already unpacked); returns how
    many. A malformed record is refused naming it; records of another content than `lib`'s are skipped (the
    evaluation does not describe these experts)."""
    from library_store.store.peft_layout import load_weights

    if records is None:
        return 0
    if not isinstance(records, list):
        raise LibraryError(f"{src}: 'evaluation' in the manifest is not a list.")
    content, n = lib.content_key(), 0
    for i, rec in enumerate(records):
        file = rec.get("file") if isinstance(rec, dict) else None
        ok = (isinstance(rec, dict) and rec.get("kind") in KINDS and isinstance(rec.get("config"), dict)
              and isinstance(rec.get("meta"), dict)
              and (file is None or (isinstance(file, str) and _FILE.fullmatch(file) is not None)))
        if not ok:
            raise LibraryError(f"{src}: evaluation record {i} is malformed (kind one of {', '.join(KINDS)}, a config "
                               f"and meta object, and a file under {FOLDER}/ or none); nothing was unpacked.")
        if rec["config"].get("content") != content:
            continue
        path = src / rec["file"] if rec["file"] else None
        if path is not None and (path.is_symlink() or not path.is_file()):
            raise LibraryError(f"{src}: evaluation file {rec['file']} is missing or a symlink; nothing was unpacked.")
        tensors = load_weights(path) if path is not None else {}
        lib.put_derived(rec["kind"], rec["config"], tensors, rec["meta"])
        n += 1
    return n


def peft_arrow(router: dict, paths: list[str]) -> tuple[str, list[str] | None, list[str]]:
    """A recorded router (RouterConfig.to_dict() form) in PEFT's terms: ArrowConfig's arguments, the general
    adapters for `create_arrow_model` (None: no GenKnowSub), and a note for each setting PEFT cannot express."""
    args = f"top_k={router.get('top_k', 3)}, router_temperature={float(router.get('temperature', 1.0)):g}"
    general, notes = None, []
    centre, scope = router.get("centre", "none"), router.get("centre_scope", "prototypes")
    if centre == "mean" and scope == "weights":  # PEFT's GenKnowSub over every task adapter (tests: equivalence)
        args += ", use_gks=True"
        general = list(paths)
    elif centre.startswith("general:"):
        args += ", use_gks=True"
        general = [centre.split(":", 1)[1]]
        notes.append(f"GenKnowSub subtracts the general adapter `{general[0]}`: export it too (`export-peft --names`)"
                     + ("" if scope == "weights" else "; PEFT also subtracts it from the applied weights, which this "
                        "library's router does not (centre scope `prototypes`)") + ".")
    elif centre == "mean":
        notes.append("The library routes on centred prototypes but applies its experts as trained (centre `mean`, "
                     "scope `prototypes`); PEFT's GenKnowSub would centre the applied weights too, so the snippet "
                     "leaves centring off.")
    if router.get("input_centre", "none") == "base":
        notes.append("The library scores |(h − μ) · p| with μ the base model's mean input per layer (input "
                     "centring); PEFT's Arrow scores |h · p|, so its routing differs.")
    if router.get("granularity", "token") == "prompt":
        notes.append(f"The library picks one expert per prompt (by {router.get('pick', 'mean')}) and answers with it "
                     "alone; PEFT's Arrow routes every token, so the snippet gives the per-token routing the pick "
                     "is made from, not the pick.")
    if router.get("scales"):
        f = router["scales"].values()
        notes.append(f"The library multiplies each expert's score by a factor fitted on its training prompts (expert "
                     f"scales, {min(f):.2f}-{max(f):.2f}); PEFT's Arrow scores every expert alike, so its routing "
                     "differs.")
    if router.get("disabled"):
        notes.append(f"Disabled in the library's default: {', '.join(router['disabled'])} (left out of `paths`).")
    return args, general, notes
