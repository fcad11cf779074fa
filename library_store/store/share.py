"""Share a library: every routable expert as PEFT adapters for `create_arrow_model`, or the whole library as a
folder ready to push as a Hugging Face model repository, and back.

Usage::

    export_peft(lib, "out/peft")          # out/peft/<name>/ (PEFT adapter dirs), README.md, experts.json
    pack(lib, "out/hub", license="apache-2.0")   # README.md (model card), library.json, experts/<name>/
    lib = unpack("out/hub", "libs/copy")  # a new library with the same experts (same checksums)

A pack holds no SQLite file: `library.json` (base-model fingerprint, module shapes, every expert's record and
checksum, clusters, routing defaults when recorded, the evaluation's records: routing reports, the default router
and its evidence, pick readouts) plus PEFT's own files and `evaluation/*.safetensors`, so it reads anywhere. Unpacking
treats the folder as untrusted (it came from the Hub): safetensors only, no symlinks, every file's checksum
checked against the manifest, every expert checked like an upload; the library is built aside and renamed into
place, so a refused pack leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from library_store.expert import ExpertInfo, LoraExpert
from library_store.store.errors import LibraryError
from library_store.store.io import INDEX, fsync_path, read_meta, sha256_file
from library_store.store.peft_layout import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from library_store.store.reports import ROUTER_KIND, default_router
from library_store.store.share_evaluation import pack_evaluation, peft_arrow, unpack_evaluation

PACK_FORMAT = 1
MANIFEST = "library.json"
HF_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # built-in name -> Hub id
DEFAULT_LICENSE = "other"  # the card says to choose one before pushing
ROUTER_META = "router_defaults"  # a library's recorded routing defaults (meta key), e.g. {"top_k": 3}


def hub_base_model(source: str) -> str | None:
    """The Hub id of a base-model source, or None (a local path or a test twin has none)."""
    if source in HF_IDS:
        return HF_IDS[source]
    looks_local = source.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(source))
    return source if "/" in source and not looks_local else None


def _empty_dest(dest) -> Path:
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise LibraryError(f"Destination {dest} exists and is not an empty directory.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def _finish(tmp: Path, dest: Path) -> Path:
    if dest.exists():
        dest.rmdir()
    os.rename(tmp, dest)
    fsync_path(dest.parent)
    return dest


def export_router(lib) -> tuple[dict, str]:
    """The router an export or a pack describes: (settings, where they come from). The evaluated default router
    (bench/eval_routing.py --record) first, else the recorded routing defaults, else top-3 at temperature 1."""
    chosen = default_router(lib)
    if chosen:
        return chosen, "the library's default router, chosen by its evaluation"
    recorded = router_defaults(lib)
    return {"top_k": 3, "temperature": 1.0, **recorded}, ("the library's recorded routing defaults" if recorded
                                                         else "none recorded: PEFT's top-3 at temperature 1")


def router_defaults(lib) -> dict:
    """The routing defaults recorded in the library (e.g. {"top_k": 3, "temperature": 1.0}), or {}."""
    with lib._read() as con:
        return dict(read_meta(con).get(ROUTER_META) or {})


def record_router_defaults(lib, defaults: dict) -> None:
    """Record the settings this library routes best with (the pack's model card and export README show them)."""
    blob = json.dumps(dict(defaults), sort_keys=True)
    with lib._write() as w:
        w.commit([("INSERT OR REPLACE INTO meta VALUES (?, ?)", (ROUTER_META, blob))])


# ---------------------------------------------------------------- export for PEFT's Arrow


def export_peft(lib, dest, names: list[str] | None = None) -> Path:
    """Write each expert (default: the routable ones) as `dest/<name>/`, plus README.md and experts.json."""
    names = lib.routable_names() if names is None else list(names)
    if not names:
        raise LibraryError(f"The library at {lib.root} has no routable experts to export.")
    dest = _empty_dest(dest)
    tmp = dest.parent / f".exporting-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name in names:
            lib.export(name, tmp / name)
        infos = [lib.info(n) for n in names]
        (tmp / "experts.json").write_text(json.dumps([i.to_dict() for i in infos], indent=2) + "\n")
        (tmp / "README.md").write_text(_arrow_readme(lib, infos))
        return _finish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _arrow_readme(lib, infos: list[ExpertInfo]) -> str:
    source = lib.fingerprint.get("source", "")
    hub = hub_base_model(source)
    base_line = (f'AutoModelForCausalLM.from_pretrained("{hub}")' if hub else
                 f'AutoModelForCausalLM.from_pretrained("<path to {source}>")')
    router, origin = export_router(lib)
    router = {**router, "top_k": min(router.get("top_k", 3), len(infos))}
    config, general, notes = peft_arrow(router, [i.name for i in infos])
    general_arg = (", general_adapter_paths=[" + ", ".join(f'"{g}"' for g in general) + "]"
                   if general is not None and general != [i.name for i in infos] else
                   ", general_adapter_paths=paths" if general is not None else "")
    differs = ("\nWhat PEFT's Arrow cannot express of it:\n" + "".join(f"- {n}\n" for n in notes)) if notes else ""
    mixed = sorted({i.rank for i in infos}) if len({i.rank for i in infos}) > 1 else None
    targets = {tuple(i.target_modules) for i in infos}
    paths = ",\n    ".join(f'"{i.name}"' for i in infos)
    order = "\n".join(f"| task_{k} | {i.name} | {', '.join(i.tasks) or '-'} | {i.rank} | {i.alpha:g} |"
                      for k, i in enumerate(infos))
    warn = ""
    if mixed or len(targets) > 1:
        warn = ("\n**Note:** PEFT's `create_arrow_model` needs one rank and one set of target modules for every "
                f"adapter; these experts have ranks {sorted({i.rank for i in infos})} and "
                f"{len(targets)} target sets, so load them into PEFT in groups that agree.\n")
    return f"""# {len(infos)} LoRA experts for Arrow routing

Exported from the expert library `{lib.root.name}` (base model `{source}`). Each folder is a PEFT LoRA adapter
(`{CONFIG_FILE}` + `{WEIGHTS_FILE}`); load them all into PEFT's Arrow router, run from this folder:

```python
from peft import ArrowConfig, create_arrow_model
from transformers import AutoModelForCausalLM

base = {base_line}
paths = [
    {paths},
]
config = ArrowConfig({config})
model = create_arrow_model(base, paths, config{general_arg})
```

The settings are {origin}.
{differs}{warn}
PEFT names the adapters `task_0`, `task_1`, ... in the order of `paths`:

| PEFT name | expert | tasks | rank | alpha |
|---|---|---|---|---|
{order}

PEFT computes each prototype with 15 power-iteration steps (approximate when the top two singular values are
close); this library computes them exactly, so routing can differ on such ties. To match it exactly, after a
first forward pass overwrite each Arrow layer's `prototypes` buffer with the top right singular vector of
B_e A_e of every adapter. `experts.json` holds each expert's record (tasks, rank, alpha, checksum).
"""


# ---------------------------------------------------------------- pack / unpack (a Hub model repository)


def pack(lib, out, license: str = DEFAULT_LICENSE) -> Path:
    """Write the whole library (every expert, the cluster table, routing defaults) as a Hub-ready folder."""
    problems = lib.verify()
    if problems:
        raise LibraryError(f"The library at {lib.root} has problems; fix them before packing: {problems[0]}")
    dest = _empty_dest(out)
    tmp = dest.parent / f".packing-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        infos = lib.infos()
        for info in infos:
            lib.export(info.name, tmp / "experts" / info.name)
        manifest = {"format": PACK_FORMAT, "base_fingerprint": lib.fingerprint,
                    "module_shapes": {k: list(v) for k, v in lib.module_shapes.items()},
                    "experts": [i.to_dict() for i in infos], "clusters": lib.clusters(),
                    "router_defaults": router_defaults(lib), "evaluation": pack_evaluation(lib, tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(lib, infos, manifest, license))
        return _finish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_card(lib, infos: list[ExpertInfo], manifest: dict, license: str) -> str:
    source = lib.fingerprint.get("source", "")
    hub = hub_base_model(source)
    front = [f"license: {license}", "library_name: peft"]
    if hub:
        front.append(f"base_model: {hub}")
    front.append("tags:\n" + "\n".join(f"- {t}" for t in ("lora", "arrow", "mixture-of-experts", "lora-explorer")))
    rows = "\n".join(f"| {i.name} | {i.kind} | {', '.join(i.tasks) or '-'} | {i.cluster or '-'} | {i.rank} | "
                     f"{i.alpha:g} | {i.n_params:,} | `{(i.checksum or '')[:12]}` |" for i in infos)
    router = manifest["router_defaults"]
    router_text = (", ".join(f"{k}={v}" for k, v in sorted(router.items())) if router else
                   "none recorded (the explorer's defaults apply)")
    chosen = next((r["meta"] for r in manifest.get("evaluation") or () if r["kind"] == ROUTER_KIND), None)
    if chosen:
        settings = ", ".join(f"{k}={v}" for k, v in chosen["router"].items() if k != "disabled" or v)
        router_text = (f"{settings} (chosen by the library's evaluation: `{chosen.get('command') or '?'}`; its "
                       f"routing reports and evidence are in `{MANIFEST}`)")
    license_note = ("\n**License:** not chosen yet (`license: other`); set it before pushing.\n"
                    if license == DEFAULT_LICENSE else "")
    base_note = hub or f"`{source}` (not on the Hub; fingerprint in `{MANIFEST}`)"
    return f"""---
{chr(10).join(front)}
---

# Expert library `{lib.root.name}`

{len(infos)} LoRA experts for Arrow routing on {base_note}.
{license_note}
| expert | kind | tasks | cluster | rank | alpha | params | sha256 |
|---|---|---|---|---|---|---|---|
{rows}

Routing defaults: {router_text}.

## Use

Each `experts/<name>/` folder is a PEFT LoRA adapter. To get the library back (checksums checked):

```
python -m library_store unpack <this folder> libs/{lib.root.name}
```
"""


def unpack(src, dest) -> "ExpertLibrary":  # noqa: F821 - ExpertLibrary, imported lazily
    """A new library at `dest` (must not exist or be empty) from a packed folder; returns it, opened writable."""
    from library_store.store.library import ExpertLibrary
    from library_store.store.upload import check_upload_weights, stage_upload

    src = Path(src)
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise LibraryError(f"{src} has no {MANIFEST}; it is not a packed library.") from None
    except (ValueError, RecursionError) as exc:
        raise LibraryError(f"{src / MANIFEST} is not valid JSON: {exc}") from None
    _check_manifest(manifest, src / MANIFEST)
    dest = Path(dest)
    if (dest / INDEX).exists():
        raise LibraryError(f"A library already exists at {dest}; unpack into a new folder.")
    dest = _empty_dest(dest)
    tmp = dest.parent / f".unpacking-{uuid.uuid4().hex}"
    try:
        lib = ExpertLibrary.create(tmp, manifest["base_fingerprint"], module_shapes=manifest.get("module_shapes"))
        for record in manifest["experts"]:
            _unpack_expert(lib, src, record, stage_upload, check_upload_weights)
        lib.set_clusters(manifest.get("clusters") or {})
        if manifest.get("router_defaults"):
            record_router_defaults(lib, manifest["router_defaults"])
        unpack_evaluation(lib, src, manifest.get("evaluation"))
        (tmp / ".lock").unlink(missing_ok=True)
        _finish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExpertLibrary.open(dest, readonly=False)


def _check_manifest(manifest, path: Path) -> None:
    """The manifest's shape and every expert name, before any path is built from one."""
    from library_store.store.errors import checked_name

    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else "?"
        raise LibraryError(f"{path}: pack format {found} is not {PACK_FORMAT}; upgrade the package to unpack it.")
    if not isinstance(manifest.get("base_fingerprint"), dict) or not isinstance(manifest.get("experts"), list):
        raise LibraryError(f"{path} has no base_fingerprint or experts list; it is not a packed library.")
    for record in manifest["experts"]:
        if not isinstance(record, dict):
            raise LibraryError(f"{path}: an expert record is not a JSON object.")
        checked_name(record.get("name"), "expert name in the pack")  # a name is a folder: no '..' or '/'


def _unpack_expert(lib, src: Path, record: dict, stage_upload, check_upload_weights) -> None:
    import tempfile

    try:
        info = ExpertInfo.from_dict(record)
    except TypeError as exc:
        raise LibraryError(f"{src / MANIFEST}: expert record {record.get('name')!r} is malformed ({exc}).") from None
    folder = src / "experts" / info.name
    with tempfile.TemporaryDirectory(prefix="lora-unpack-") as t:
        staged = stage_upload(folder, Path(t))  # no symlinks, size caps, safetensors only
        if sha256_file(staged / WEIGHTS_FILE) != info.checksum:
            raise LibraryError(f"Expert {info.name!r} in {src}: {WEIGHTS_FILE} does not match the checksum in "
                               f"{MANIFEST} (damaged or edited); nothing was unpacked.")
        read, weights = read_adapter(staged, info.name, info.kind)
    if (read.rank, read.alpha) != (info.rank, info.alpha):
        raise LibraryError(f"Expert {info.name!r} in {src}: its {CONFIG_FILE} says r={read.rank}, "
                           f"alpha={read.alpha:g}; {MANIFEST} says r={info.rank}, alpha={info.alpha:g}.")
    expert = LoraExpert(info, weights)
    check_upload_weights(expert, lib)
    stored = lib.add(expert)
    if stored.checksum != info.checksum:  # re-written bytes differ: say so rather than keep a silent change
        raise LibraryError(f"Expert {info.name!r}: stored weights differ from the pack's ({stored.checksum[:12]} vs "
                           f"{info.checksum[:12]}).")
