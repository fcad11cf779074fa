"""Would the default router's top-k and temperature change if they were swept at its routed layers?

`bench/eval_routing.py --sweep` scores top-k x temperature x centring with every layer routed; the routed layers
are chosen after that, for the winner (`eval_sweep.choose_layers`). This probe asks whether that order matters:
it keeps the recorded default's centring, input centring and routed layers, scores every (top-k, temperature)
of the recorded grid again on the same training prompts (routing and exact match, per token, as the sweep
does), applies the same winner rule (`eval_sweep.choose`), and puts the recorded rows (every layer) beside the
new ones. No held-out prompt is used; nothing is written to the library.

Usage::

    .venv/bin/python bench/sweep_at_layers.py --library assets/libraries/demo-private --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import RESULTS, load_base, write_json  # noqa: E402

KEYS = ("top_k", "temperature")


def resweep(rm, base, tasks, own: dict, recorded, n: int, n_em: int, max_tokens: int = 4096) -> dict:
    """Every (top-k, T) of `recorded` (library_store's DefaultRouter) scored at its routed layers and centring.
    {"rows": new rows, "recorded_rows": the recorded sweep's rows of the same centring, "winner", "recorded"}."""
    from bench import eval_sweep as S

    chosen = S.router_of({**recorded.evidence["winner"], **recorded.router})
    token = replace(chosen, granularity="token", pick="mean")
    same = ("centre", "centre_scope", "input_centre")
    old = [r for r in recorded.evidence["rows"] if "refused" not in r
           and all(r.get(k) == getattr(chosen, k) for k in same)]
    prompts, em = S.training_sets(tasks, n, n_em)  # the same prompts as the recorded sweep's
    start, rows = rm.router, []
    try:
        for r in old:
            rm.set_router(replace(token, top_k=r["top_k"], temperature=r["temperature"]))
            rows.append({**{k: r[k] for k in (*same, *KEYS)}, "layers": list(chosen.layers or []),
                         **S.score_setting(rm, base, prompts, own, em, max_tokens)})
    finally:
        rm.set_router(start)
    winner = S.choose(rows)
    return {"rows": rows, "recorded_rows": old, "winner": {k: winner[k] for k in KEYS},
            "recorded": {k: getattr(chosen, k) for k in KEYS},
            "unchanged": all(winner[k] == getattr(chosen, k) for k in KEYS)}


def table(result: dict) -> str:
    """Markdown: each (top-k, T) at every layer (recorded) and at the routed layers (now)."""
    lines = ["| top-k | T | own text, every layer | at the routed layers | exact match, every layer | at the routed "
             "layers | median margin, every layer | at the routed layers |", "|---|---|---|---|---|---|---|---|"]
    old = {(r["top_k"], r["temperature"]): r for r in result["recorded_rows"]}

    def f(v):
        return "—" if v is None else f"{v:.3f}"
    for r in result["rows"]:
        o = old[(r["top_k"], r["temperature"])]
        lines.append(f"| {r['top_k']} | {r['temperature']:g} | {f(o['user'])} | {f(r['user'])} | {f(o.get('em'))} | "
                     f"{f(r.get('em'))} | {f(o.get('margin_median'))} | {f(r.get('margin_median'))} |")
    w, rec = result["winner"], result["recorded"]
    lines.append(f"\nWinner at the routed layers: top-{w['top_k']}, T {w['temperature']:g} (recorded: "
                 f"top-{rec['top_k']}, T {rec['temperature']:g}; {'unchanged' if result['unchanged'] else 'CHANGED'}).")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, help="training prompts per task routed (default: the recorded sweep's)")
    ap.add_argument("--sweep-em", type=int, help="training prompts per task answered (default: the recorded sweep's)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.eval_routing import library_tasks
    from explorer.routing.model import RoutedModel
    from library_store.store.library import ExpertLibrary
    from library_store.store.reports import read_default_router
    from library_store.tasks import resolve_tasks

    t0 = time.perf_counter()
    base = load_base(args.model)
    lib = ExpertLibrary.open(args.library, readonly=True, base=base)
    recorded = read_default_router(lib)
    if recorded is None:
        raise SystemExit(f"{args.library} has no recorded default router: run bench/eval_routing.py --sweep first.")
    own = library_tasks(lib)
    tasks = resolve_tasks("builtin:" + ",".join(sorted(own)))
    ev = recorded.evidence
    n = args.n or ev["train_prompts_per_task"]
    n_em = ev["em_prompts_per_task"] if args.sweep_em is None else args.sweep_em
    rm = RoutedModel.from_library(base, lib)
    try:
        result = resweep(rm, base, tasks, own, recorded, n, n_em)
    finally:
        rm.detach()
    label = Path(args.library).name
    result.update(library=label, train_prompts_per_task=n, em_prompts_per_task=n_em, seconds=time.perf_counter() - t0,
                  command=" ".join(["python"] + sys.argv), torch_threads=torch.get_num_threads(),
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_json(Path(args.out) / f"sweep-at-layers-{label}.json", result)
    print(table(result))
    print(f"time: {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
