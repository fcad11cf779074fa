"""How decisively does a library's routing pick, per prompt, under other top-k and temperatures?

Routes the first `--n` prompts of each task (training prompts by default: this probe informs a rule, so it never
reads held-out ones unless asked) per token with the library's default router, top-k and temperature replaced by
each `--settings` entry, and reports, as the pick by mean weight sees it: the share of prompts whose own expert
(MBC: its cluster) has the largest mean weight over the user's text, the median and lower quartile of the lead
over the runner-up (mean weight share), how many prompts lead by at least 0.05 (`eval_sweep.DECISIVE`), and how
many routed layers favour the pick. Per task: prompts right and the median lead.

Usage::

    .venv/bin/python bench/pick_lead.py --library assets/libraries/demo-mbc --threads 2 \\
        --settings 4:0.3 4:0.1 2:0.1 4:0.03 --every-layer 4:0.3
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import attach_from_args, library_arguments  # noqa: E402
from bench.eval_sweep import DECISIVE  # noqa: E402


def score(rm, base, prompts: dict[str, list[str]], own: dict[str, str]) -> dict:
    """{"right", "lead_median", "lead_q25", "decisive", "layers_for", "per_task": {task: (right, lead median)}}
    of the prompts routed per token under `rm.router`, each prompt's pick by mean weight over its user text."""
    from bench.eval_routing import route_prompts
    from explorer.routing.prompt_level import pick

    right, leads, votes, per_task = [], [], [], {}
    for task, texts in prompts.items():
        mine = []
        for trace in route_prompts(rm, base, texts):
            p = pick(trace)
            routed = trace.routed().any(axis=1)  # (L,) the layers routed at
            by_layer = np.asarray(p.by_layer)[routed]  # (L',) each layer's lead of the pick over the runner-up
            mine.append((p.expert == own[task], p.lead))
            votes.append(float((by_layer > 0).mean()))
        right += [r for r, _ in mine]
        leads += [lead for _, lead in mine]
        per_task[task] = (float(np.mean([r for r, _ in mine])), float(np.median([lead for _, lead in mine])))
    leads = np.asarray(leads)
    return {"right": float(np.mean(right)), "lead_median": float(np.median(leads)),
            "lead_q25": float(np.quantile(leads, 0.25)), "decisive": float((leads >= DECISIVE).mean()),
            "layers_for": float(np.median(votes)), "per_task": per_task}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-mbc"))
    ap.add_argument("--split", default="train", choices=("train", "heldout", "paraphrase"))
    ap.add_argument("--n", type=int, default=10, help="prompts per task")
    ap.add_argument("--settings", nargs="*", default=["4:0.3", "4:0.1", "2:0.1", "4:0.03"],
                    help="top_k:temperature, at the default's routed layers")
    ap.add_argument("--every-layer", nargs="*", default=[], help="top_k:temperature, routed at every layer")
    args = ap.parse_args(argv)

    from library_store.tasks import resolve_tasks

    rm, source, own = attach_from_args(args)
    base = rm.base
    tasks = resolve_tasks("builtin:" + ",".join(sorted(own)))
    prompts = {t.name: [e.input for e in t.examples(args.split)[:args.n]] for t in tasks}
    default = rm.router
    print(f"{Path(args.library).name}, default router {default.to_dict()} ({source}); {args.n} {args.split} prompts "
          "per task, routed per token, each picked by mean weight over the user's text")
    print("| top-k | T | layers | own expert picked | median lead | lower quartile | leads ≥ 0.05 | "
          "median share of routed layers favouring the pick | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [(s, True) for s in args.settings] + [(s, False) for s in args.every_layer]
    per_task = {}
    for setting, at_default_layers in rows:
        k, temp = setting.split(":")
        start = time.perf_counter()
        rm.set_router(replace(default, granularity="token", top_k=int(k), temperature=float(temp),
                              layers=default.layers if at_default_layers else None))
        r = score(rm, base, prompts, own)
        where = "default" if at_default_layers else "every"
        per_task[(setting, where)] = r["per_task"]
        print(f"| {k} | {temp} | {where} | {r['right']:.3f} | {r['lead_median']:.3f} | {r['lead_q25']:.3f} | "
              f"{r['decisive']:.2f} | {r['layers_for']:.2f} | {time.perf_counter() - start:.0f} |")
    print("\nPer task, prompts picked right / median lead:")
    print("| task | " + " | ".join(f"{s} ({w})" for s, w in per_task) + " |")
    print("|---|" + "---|" * len(per_task))
    for task in prompts:
        print(f"| {task} | " + " | ".join(f"{v[task][0]:.2f} / {v[task][1]:.3f}" for v in per_task.values()) + " |")
    rm.detach()


if __name__ == "__main__":
    main()
