"""`python -m library_store`: inspect and maintain expert libraries from the shell.

Usage::

    python -m library_store info libs/demo-private --json
    python -m library_store list libs/demo-private
    python -m library_store import libs/mine --peft ./my_adapter --name my-expert [--replace]
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
    info = ExpertLibrary.open(args.path).import_peft(args.peft, args.name, kind=args.kind, replace=args.replace)
    print(f"imported {info.name} (rank {info.rank}, {info.n_params:,} params, "
          f"targets {','.join(info.target_modules)})")
    return 0


def cmd_export(args) -> int:
    dest = ExpertLibrary.open(args.path, readonly=True).export(args.name, args.dest)
    print(f"exported {args.name} to {dest}")
    return 0


def cmd_remove(args) -> int:
    ExpertLibrary.open(args.path).remove(args.name)
    print(f"removed {args.name}")
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
    p = sub.add_parser("info", help="describe a library")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("list", help="one line per expert")
    p.add_argument("path")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("import", help="add an existing PEFT LoRA adapter directory (safetensors)")
    p.add_argument("path")
    p.add_argument("--peft", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--name", required=True)
    p.add_argument("--kind", default="imported", choices=["imported", "private", "warmup", "cluster"])
    p.add_argument("--replace", action="store_true", help="overwrite an expert of the same name (atomically)")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("export", help="copy an expert out as a PEFT adapter directory")
    p.add_argument("path")
    p.add_argument("name")
    p.add_argument("dest")
    p.set_defaults(func=cmd_export)
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
