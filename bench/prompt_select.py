"""Would a prompt-level choice answer better than per-token Arrow? A measurement for the next router, not a mode.

For each held-in prompt: route it with the library's default router (the page's start-up setting), take the
expert with the largest mean weight over the user's text (the choice own-text routing accuracy scores), then
answer greedily with that expert alone. Its exact match over the own expert's is compared with S5 (per-token
Arrow's exact match over the own expert's, from `bench/eval_routing.py`).

Usage::

    .venv/bin/python bench/prompt_select.py --library assets/libraries/demo-private --n 20
    .venv/bin/python bench/prompt_select.py --library assets/libraries/demo-mbc --n 20 --split paraphrase

Writes `bench/results/prompt_select-<library>[-<split>].json` and prints one row per task.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import RESULTS, attach_from_args, library_arguments, md_table, write_json  # noqa: E402
from bench.eval_sweep import exact_matches  # noqa: E402


def select_and_answer(rm, examples) -> tuple[list, list[int]]:
    """Each example's prompt-level choice under the current router (its winner over the user's text, the choice
    own-text accuracy scores) and the exact match of that expert alone: the per-prompt router with pick "mean",
    batched as the evaluation runs it (`bench/eval_sweep.per_prompt`)."""
    from dataclasses import replace

    from bench.eval_sweep import per_prompt

    default = rm.router
    rm.set_router(replace(default, granularity="prompt", pick="mean"))
    try:
        em, chosen = per_prompt(rm, rm.base, [ex.input for ex in examples],
                                lambda rows: exact_matches(rm.base, [examples[i] for i in rows]))
    finally:
        rm.set_router(default)
    return [c.expert for c in chosen], em


def main(argv=None) -> int:
    from explorer.routing.config import RouterConfig
    from library_store.tasks import resolve_tasks

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--n", type=int, default=20, help="examples per task")
    ap.add_argument("--split", choices=["heldout", "paraphrase"], default="heldout")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rm, source, own = attach_from_args(args)
    router = rm.router
    rows = {}
    for task in [t for t in resolve_tasks("builtin") if t.name in own and t.metric == "exact_match"]:
        examples = task.examples(args.split)[: args.n]
        picks, em = select_and_answer(rm, examples)
        rm.set_router(RouterConfig(mode=f"expert:{own[task.name]}"))
        mine = exact_matches(rm.base, examples)
        rm.set_router(router)
        rows[task.name] = {"own_expert": own[task.name], "n": len(examples),
                           "routed_right": float(np.mean([p == own[task.name] for p in picks])),
                           "select_em": float(np.mean(em)), "own_em": float(np.mean(mine))}
    sel, mine = (float(np.mean([r[k] for r in rows.values()])) for k in ("select_em", "own_em"))
    name = Path(args.library).name
    out = {"library": name, "split": args.split, "n": args.n, "router": router.to_dict(), "router_source": source,
           "select_mean": sel, "own_mean": mine, "ratio": sel / mine if mine else None, "tasks": rows,
           "command": "python bench/prompt_select.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "seconds": round(time.perf_counter() - t0, 1)}
    write_json(RESULTS / f"prompt_select-{name}{'' if args.split == 'heldout' else '-' + args.split}.json", out)
    print(md_table(["task", "own expert", "n", "prompt routed right", "chosen expert EM", "own expert EM"],
                   [[t, r["own_expert"], r["n"], f"{r['routed_right']:.2f}", f"{r['select_em']:.2f}",
                     f"{r['own_em']:.2f}"] for t, r in rows.items()]))
    print(f"\n{name}, {args.split}, router {router.to_dict()} ({source}): chosen expert EM {sel:.3f} / own "
          f"{mine:.3f} = {out['ratio']:.3f} ({out['seconds']:.0f} s)")
    rm.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
