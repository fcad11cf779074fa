"""Can the routing tell a library task from text no expert was trained for? A probe for a future "outside the
library" notice (nothing in the page uses it yet).

Routes, with the library's recorded default router and without generating, 5 held-out prompts per task (examples
81-85, past every other run's) and 20 generic requests written for this probe (not the calibration requests that
input centring is measured on, whose centred scores are low by construction). Two signals per prompt:
- the mean over the user's text, layers and modules of the top expert's raw score |(h - mu) · p_e| (the
  evidence trace's slots): how strongly the text points along any expert's prototype at all;
- the readout's probability for its pick (what the uncertain-pick flag reads).

Prints each signal's ROC AUC (task prompts against generic ones) and the ranges on both sides.

Usage::

    .venv/bin/python bench/outside_library.py --library assets/libraries/demo-private --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import library_arguments, write_json  # noqa: E402

GENERIC = (
    "What should I cook for dinner tonight?", "Explain gravity to a child.", "Who wrote Pride and Prejudice?",
    "Give me a motivational quote.", "How does the internet work?", "Suggest a name for a pet goldfish.",
    "What are the benefits of exercise?", "Describe a sunset over the ocean.", "How do vaccines work?",
    "Write a thank-you note to a teacher.", "What is the tallest mountain in the world?",
    "Tips for learning a new language?", "Why do cats purr?", "Plan a picnic menu for four people.",
    "What is inflation?", "Tell me a fun fact about octopuses.", "How can I save money on groceries?",
    "What causes earthquakes?", "Good evening! How are you?", "Describe the taste of coffee.",
)
FIRST, PER_TASK = 80, 5  # held-out examples 81-85 of each task


def signals(rm, prompt: str) -> dict:
    """One prompt's two signals (see the module docstring)."""
    trace = rm.trace(prompt, max_new_tokens=0)
    evidence = trace.evidence
    top = evidence.routes.scores[:, :, evidence.positions("user"), 0].astype(float)  # (L, M, P) top slot's |s|
    return {"prompt": prompt, "score": float(top.mean()), "p": trace.meta["pick"]["confidence"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    from bench.eval_common import attach_from_args
    from library_store.tasks import resolve_tasks

    start = time.time()
    rm, source, own = attach_from_args(args)
    if not rm.router.per_prompt or rm.router.pick != "readout":
        raise SystemExit(f"{args.library}: the probe reads a per-prompt readout pick; this library's default router "
                         "has none")
    tasks = resolve_tasks("builtin:" + ",".join(sorted(own)))
    task_rows = [signals(rm, ex.input) for t in tasks for ex in t.examples("heldout")[FIRST:FIRST + PER_TASK]]
    generic_rows = [signals(rm, p) for p in GENERIC]
    rm.detach()
    y = [1] * len(task_rows) + [0] * len(generic_rows)
    out = {"library": Path(args.library).name, "router": rm.router.to_dict(), "source": source, "signals": {},
           "command": "python bench/outside_library.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{out['library']}: {len(task_rows)} task prompts, {len(generic_rows)} generic ones")
    print("| signal | AUC | task prompts: min, median | generic: max, median |\n|---|---|---|---|")
    for key, label in (("score", "mean top raw score"), ("p", "readout probability")):
        task, gen = [r[key] for r in task_rows], [r[key] for r in generic_rows]
        auc = float(roc_auc_score(y, task + gen))
        out["signals"][key] = {"auc": auc, "task": [min(task), float(np.median(task))],
                               "generic": [max(gen), float(np.median(gen))]}
        print(f"| {label} | {auc:.3f} | {min(task):.3f}, {np.median(task):.3f} | {max(gen):.3f}, "
              f"{np.median(gen):.3f} |")
    out.update(task_rows=task_rows, generic_rows=generic_rows, seconds=round(time.time() - start, 1))
    write_json(Path(args.out) / f"outside_library-{out['library']}.json", out)


if __name__ == "__main__":
    main()
