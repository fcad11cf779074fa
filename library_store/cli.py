"""`python -m library_store`: inspect and maintain expert libraries from the shell.

Usage::

    python -m library_store create libs/mine --base-model smollm2-135m-instruct   # an empty library
    python -m library_store info libs/demo-private --json
    python -m library_store list libs/demo-private
    python -m library_store import libs/mine --peft ./my_adapter --name my-expert [--replace]   # or a .zip
    python -m library_store export-peft libs/mine ./peft_out   # every routable expert, for create_arrow_model
    python -m library_store pack libs/mine ./hub_repo [--license apache-2.0]   # a Hub model repository folder
    python -m library_store unpack ./hub_repo libs/copy       # back into a new library (checksums checked)
    python -m library_store similarity libs/mine [--json]      # ΔW cosine similarity of the experts
    python -m library_store export libs/mine my-expert ./out_dir
    python -m library_store remove libs/mine my-expert
    python -m library_store verify libs/mine          # exit 1 and one line per broken expert
    python -m library_store build ...                  # from library_store.training.build, when present

Errors print one line to stderr and exit 2 (no traceback).
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys

from library_store.models import BaseModelError
from library_store.store.library import ExpertLibrary, LibraryError

try:
    from library_store.training.build import add_build_commands
except ImportError:
    add_build_commands = None


def library_summary(lib: ExpertLibrary) -> dict:
    """The `info --json` object: format, base model, experts (index fields + availability), clusters, derived."""
    unavailable = set(lib.unavailable())
    experts = []
    for info in lib.infos():
        record = info.to_dict()
        experts.append({
            "name": info.name, "kind": info.kind, "tasks": info.tasks, "cluster": info.cluster, "rank": info.rank,
            "alpha": info.alpha, "target_modules": info.target_modules, "n_params": info.n_params,
            "train": record["train"], "checksum": info.checksum, "created": info.created,
            "available": info.name not in unavailable,
        })
    return {
        "path": str(lib.root),
        "format_version": lib.format_version,
        "base_model": lib.fingerprint,
        "experts": experts,
        "clusters": lib.clusters(),
        "derived": [{"kind": d["kind"], "key": d["key"], "meta": d["meta"], "size": d["size"]}
                    for d in lib.list_derived()],
        "n_scores": len(lib.scores()),
    }


def cmd_create(args) -> int:
    from pathlib import Path

    from library_store.models import load_base_model
    from library_store.store.io import INDEX
    from library_store.store.library import module_shapes

    root = Path(args.path)
    if (root / INDEX).exists():  # before loading the base model, which can take a while
        raise LibraryError(f"A library already exists at {root}; it is left as it is (open it, or choose "
                           "another path).")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise LibraryError(f"{root} exists and is not an empty directory; choose a new path for the library.")
    base = load_base_model(args.base_model)
    lib = ExpertLibrary.create(root, base.fingerprint, module_shapes=module_shapes(base.model))
    fp = lib.fingerprint
    print(f"created {lib.root} for {fp['source']} ({fp['architecture']}, {fp['num_layers']} layers, hidden "
          f"{fp['hidden_size']}, modules {', '.join(sorted(lib.module_shapes))})")
    return 0


def cmd_info(args) -> int:
    summary = library_summary(ExpertLibrary.open(args.path, readonly=True))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    base = summary["base_model"]
    print(f"library {summary['path']} (format {summary['format_version']})")
    print(f"base model: {base.get('source')} ({base.get('architecture')}, {base.get('num_layers')} layers, "
          f"hidden {base.get('hidden_size')})")
    print(f"experts: {len(summary['experts'])}, clusters: {len(summary['clusters'])}, "
          f"derived entries: {len(summary['derived'])}")
    for cluster, tasks in summary["clusters"].items():
        print(f"  {cluster}: {', '.join(tasks)}")
    _print_experts(summary["experts"])
    return 0


def _print_experts(experts: list[dict]) -> None:
    for e in experts:
        flag = "" if e["available"] else "  UNAVAILABLE"
        tasks = ",".join(e["tasks"]) or "-"
        print(f"{e['name']:<32} {e['kind']:<9} r={e['rank']:<3} {e['n_params']:>10,} params  "
              f"cluster={e['cluster'] or '-'}  tasks={tasks}{flag}")


def cmd_list(args) -> int:
    _print_experts(library_summary(ExpertLibrary.open(args.path, readonly=True))["experts"])
    return 0


def cmd_import(args) -> int:
    from pathlib import Path

    lib = ExpertLibrary.open(args.path, readonly=False)
    tasks = [t for t in (args.tasks or "").split(",") if t]
    if Path(args.peft).is_file():  # a .zip: through the upload checks (caps, no symlinks, no path tricks)
        from library_store.store.upload import intake_adapter

        info = intake_adapter(Path(args.peft), lib, args.name, tasks, replace=args.replace, kind=args.kind)
    else:
        info = lib.import_peft(args.peft, args.name, kind=args.kind, replace=args.replace, tasks=tasks)
    print(f"imported {info.name} (rank {info.rank}, {info.n_params:,} params, "
          f"targets {','.join(info.target_modules)})")
    return 0


def cmd_export(args) -> int:
    dest = ExpertLibrary.open(args.path, readonly=True).export(args.name, args.dest)
    print(f"exported {args.name} to {dest}")
    return 0


def cmd_remove(args) -> int:
    ExpertLibrary.open(args.path, readonly=False).remove(args.name)
    print(f"removed {args.name}")
    return 0


def cmd_export_peft(args) -> int:
    from library_store.store.share import export_peft

    lib = ExpertLibrary.open(args.path, readonly=True)
    dest = export_peft(lib, args.dest)
    print(f"exported {len(lib.routable_names())} experts to {dest} (see {dest}/README.md for create_arrow_model)")
    return 0


def cmd_pack(args) -> int:
    from library_store.store.share import pack

    lib = ExpertLibrary.open(args.path, readonly=True)
    out = pack(lib, args.out, license=args.license)
    print(f"packed {len(lib)} experts into {out} (model card {out}/README.md); push it with "
          f"`huggingface-cli upload <user>/<repo> {out}`")
    return 0


def cmd_unpack(args) -> int:
    from library_store.store.share import unpack

    lib = unpack(args.src, args.dest)
    print(f"unpacked {len(lib)} experts into {lib.root}")
    return 0


def cmd_similarity(args) -> int:
    from library_store.store.similarity import delta_similarity

    lib = ExpertLibrary.open(args.path, readonly=not args.record)
    if args.record and not lib.derived.writes_to_library:
        raise LibraryError(f"--record stores the map in the library, and {lib.root} cannot be written.")
    sim = delta_similarity(lib, map_method=args.map, record=args.record)
    if args.record:
        print(f"stored in {lib.root} (derived data 'delta-similarity'): the page reads it from there",
              file=sys.stderr)
    if args.json:
        print(json.dumps({"names": sim.names, "similarity": sim.similarity.round(6).tolist(),
                          "coords": sim.coords.round(6).tolist(), "labels": sim.labels, "method": sim.method,
                          "clusters": sim.clusters, "skipped": sim.skipped}, indent=2))
        return 0
    width = max([len(n) for n in sim.names] + [6])
    for name, row, label in zip(sim.names, sim.similarity, sim.labels):
        print(f"{name:<{width}} c{label}  " + " ".join(f"{v:+.2f}" for v in row))
    for name, why in sim.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    lib = ExpertLibrary.open(args.path, readonly=True)
    problems = lib.verify()
    for line in problems:
        print(f"BROKEN {line}")
    if problems:
        print(f"{len(problems)} problem(s) in {lib.root}", file=sys.stderr)
        return 1
    print(f"ok: {len(lib)} experts verified in {lib.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m library_store", description="Expert library tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", help="an empty library for a base model")
    p.add_argument("path")
    p.add_argument("--base-model", required=True,
                   help="built-in name (smollm2-135m-instruct, tiny-random-llama...), Hugging Face id or local dir")
    p.set_defaults(func=cmd_create)
    p = sub.add_parser("info", help="describe a library")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("list", help="one line per expert")
    p.add_argument("path")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("import", help="add an existing PEFT LoRA adapter directory (safetensors)")
    p.add_argument("path")
    p.add_argument("--peft", required=True, help="adapter directory (adapter_config.json + "
                   "adapter_model.safetensors) or a .zip of one")
    p.add_argument("--name", required=True)
    p.add_argument("--tasks", default="", help="comma-separated task names the expert is for")
    p.add_argument("--kind", default="imported", choices=["imported", "private", "warmup", "cluster"])
    p.add_argument("--replace", action="store_true", help="overwrite an expert of the same name (atomically)")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("export", help="copy an expert out as a PEFT adapter directory")
    p.add_argument("path")
    p.add_argument("name")
    p.add_argument("dest")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("export-peft", help="every routable expert as PEFT adapters + a create_arrow_model README")
    p.add_argument("path")
    p.add_argument("dest")
    p.set_defaults(func=cmd_export_peft)
    p = sub.add_parser("pack", help="the library as a folder ready to push as a Hugging Face model repository")
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--license", default="other", help="the model card's license field (e.g. apache-2.0, mit)")
    p.set_defaults(func=cmd_pack)
    p = sub.add_parser("unpack", help="a packed folder (e.g. a downloaded Hub repository) into a new library")
    p.add_argument("src")
    p.add_argument("dest")
    p.set_defaults(func=cmd_unpack)
    p = sub.add_parser("similarity", help="cosine similarity of the experts' weight updates (ΔW), with clusters")
    p.add_argument("path")
    p.add_argument("--map", default="auto", choices=["pca", "umap", "auto"],
                   help="2-D map method (default auto, as the page: UMAP from 10 experts up, else PCA)")
    p.add_argument("--record", action="store_true", help="store the map in the library itself (opened writable), "
                   "so the page never computes it; without it, a read-only library's map goes to the user cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_similarity)
    p = sub.add_parser("remove", help="delete an expert")
    p.add_argument("path")
    p.add_argument("name")
    p.set_defaults(func=cmd_remove)
    p = sub.add_parser("verify", help="re-hash every file and check shapes; exit 1 naming each broken expert")
    p.add_argument("path")
    p.set_defaults(func=cmd_verify)
    if add_build_commands is not None:
        add_build_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyError as exc:
        message = exc.args[0] if exc.args else str(exc)
    except (LibraryError, BaseModelError, ValueError, OSError, sqlite3.Error) as exc:
        message = str(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"error: {' | '.join(line.strip() for line in str(message).splitlines())}", file=sys.stderr)
    return 2
