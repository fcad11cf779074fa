"""Recompute the centring table of a recorded routing evaluation, and nothing else.

`bench/eval_routing.py` compares every centring option (none, mean on prototypes, mean on weights, each without
and with input centring) at the headline router's top-k and temperature. Since the demo libraries' default
routers pick one expert per prompt by a readout, those rows were refused: a readout is fitted for the default
router's centring only. The rows now compare each centring's per-token routing of the prompts (what a pick would
read), and this script fills them into the split's last result without routing anything else again: the
headline figures, the sweep, the default router and the readout stay as recorded.

It reads `bench/results/routing-<library>-<split>.json`, refuses if the library's experts changed since, routes
the same prompts under each centring, and rewrites the result's `centring` rows, its per-layer figure, the docs
and (with --record) the centring rows of the report stored in the library.

Usage::

    .venv/bin/python bench/eval_centring.py --library assets/libraries/demo-private --split heldout --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import FIGURES, RESULTS, load_base, write_json  # noqa: E402


def recentre(library: str, split: str, model: str, out: Path, figures: Path, docs: str, record: bool,
             label: str | None = None) -> dict:
    """The result of `routing-<label>-<split>.json` (label: the library's folder name) with its centring rows
    routed again, written back (see the module docstring)."""
    from bench import eval_sweep as S
    from bench.eval_docs import write_routing_doc
    from bench.eval_figures import layers_figure
    from bench.eval_routing import library_tasks
    from explorer.routing.config import RouterConfig
    from explorer.routing.model import RoutedModel
    from library_store.store.library import ExpertLibrary
    from library_store.store.reports import read_report, write_report
    from library_store.tasks import resolve_tasks

    label = label or Path(library).name
    path = out / f"routing-{label}-{split}.json"
    if not path.exists():
        raise SystemExit(f"No recorded evaluation at {path}: run bench/eval_routing.py --library {library} "
                         f"--split {split} first.")
    result = json.loads(path.read_text())
    base = load_base(model)
    lib = ExpertLibrary.open(library, readonly=True, base=base)
    if result["content_key"] != lib.content_key():
        raise SystemExit(f"{path} was computed on library content {result['content_key']}; {library} now holds "
                         f"{lib.content_key()}: run bench/eval_routing.py again.")
    writer = ExpertLibrary.open(library, readonly=False) if record else None
    report = read_report(writer, split) if writer is not None else None
    if record and report is None:
        raise SystemExit(f"--record: {library} stores no {split} report for its experts to update.")
    router = RouterConfig.from_dict(result["router"])
    tasks = resolve_tasks("builtin:" + ",".join(result["tasks"]))
    prompts = {t.name: [e.input for e in t.examples(split)[: result["n_per_task"]]] for t in tasks}
    start = time.time()
    rm = RoutedModel.from_library(base, lib, router)
    try:
        rows = S.centring_rows(rm, base, prompts, library_tasks(lib), router, S.centring_options(lib))
    finally:
        rm.detach()
    command = " ".join(["python"] + sys.argv)
    result.update(centring=rows, centring_command=command,
                  centring_date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    result["seconds"]["centring"] = time.time() - start
    layers_figure(result, label, split, figures)
    write_json(path, result)
    if docs:
        write_routing_doc(out, Path(docs))
    if writer is not None:
        write_report(writer, replace(report, centring=rows))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", required=True)
    ap.add_argument("--split", choices=["heldout", "paraphrase", "train"], default="heldout")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--figures", default=str(FIGURES))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "routing.md"), help="markdown regenerated ('' to skip)")
    ap.add_argument("--record", action="store_true", help="also update the report stored in the library")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    r = recentre(args.library, args.split, args.model, Path(args.out), Path(args.figures), args.docs, args.record)
    headline = r["accuracy"]["user"]["mean"]
    print(f"{Path(args.library).name} {args.split}: headline own text {headline:.3f}; "
          f"{r['seconds']['centring']:.0f} s")
    for c in r["centring"]:
        got = f"refused: {c['refused']}" if "refused" in c else f"own text {c['user']:.3f}, prompt {c['prompt']:.3f}"
        print(f"  centre {c['centre']:<5} scope {str(c['scope']):<10} input {c['input_centre']:<4} {got}")


if __name__ == "__main__":
    main()
