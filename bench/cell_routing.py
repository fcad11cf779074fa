"""How often does a task's own expert win a single (layer, token) cell, not just the mean over layers?

The routing evaluation's headline asks whether the own expert has the largest *mean* weight over the user's
text. This asks the stricter, per-cell question the grid on the page shows: in what share of (layer, token)
cells is the own expert the top-1, and what weight does it carry there on average, over the user's text,
the generated tokens and the whole prompt. The library's default router is used per token (for a per-prompt
default: the evidence its pick reads), with greedy answers; cells at layers it does not route at are left out.

Usage::

    .venv/bin/python bench/cell_routing.py --library assets/libraries/demo-private \\
        --tasks date_iso_to_us,add,list_to_csv,sentiment_words --n 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import attach_from_args, library_arguments  # noqa: E402


def cell_shares(rm, task, expert: str, n: int, max_new: int) -> dict:
    """{which: (share of cells where `expert` is top-1, its mean weight)} over n held-out prompts."""
    e = rm.experts.index(expert)
    top: dict[str, list[float]] = {"user": [], "generated": [], "prompt": []}
    weight: dict[str, list[float]] = {k: [] for k in top}
    for ex in task.examples("heldout")[:n]:
        trace = rm.trace(ex.input, max_new_tokens=max_new)
        w, routed = trace.module_weights(), trace.routed()  # (L, T, E), (L, T): layers not routed are left out
        for which in top:
            pos = trace.positions(which)
            if pos:
                cells = w[:, pos][routed[:, pos]]  # (cells, E) routed (layer, token) cells
                top[which].append(float((cells.argmax(-1) == e).mean()))
                weight[which].append(float(cells[:, e].mean()))
    return {k: (float(np.mean(top[k])), float(np.mean(weight[k]))) for k in top if top[k]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--tasks", default="date_iso_to_us,add,list_to_csv,sentiment_words")
    ap.add_argument("--n", type=int, default=8, help="held-out prompts per task")
    ap.add_argument("--max-new", type=int, default=12)
    args = ap.parse_args(argv)
    from library_store.tasks import resolve_tasks

    from explorer.routing.model import with_router

    rm, source, own = attach_from_args(args)
    rm.set_router(with_router(rm, granularity="token"))  # a per-prompt default's evidence: its routing per token
    print(f"{Path(args.library).name}, router {rm.router.to_dict()} ({source}); {len(rm.experts)} experts")
    print("| task | own expert | top-1 share of cells: user · generated · prompt | own mean weight: user · generated |")
    print("|---|---|---|---|")
    for task in resolve_tasks("builtin:" + args.tasks):
        r = cell_shares(rm, task, own[task.name], args.n, args.max_new)
        tops = " · ".join(f"{r[k][0]:.2f}" for k in ("user", "generated", "prompt") if k in r)
        weights = " · ".join(f"{r[k][1]:.2f}" for k in ("user", "generated") if k in r)
        print(f"| {task.name} | {own[task.name]} | {tops} | {weights} |")
    rm.detach()


if __name__ == "__main__":
    main()
