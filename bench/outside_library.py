"""Can the routing tell a library task from text no expert was trained for? The evidence for an "outside the
library" notice, which the page does not show: measured, it is not clean (docs/evaluation.md). The page flags a
pick with weak routing as uncertain instead (`weak_below`, bench/pick_confidence.py).

Routes, with the library's recorded default router and without generating, training prompts, held-out inputs and
held-out wordings of every task, and generic requests no task resembles. Two signals per prompt:
- the **routing strength**: the mean over the user's text, layers and modules of the top expert's raw score
  |(h - mu) · p_e| (`prompt_level.strength`): how strongly the text points along any expert's prototype at all;
- the readout's probability for its pick (what the uncertain-pick flag reads).

A notice's threshold is chosen on the **training prompts alone**, without any generic text: the strength that
95 % of them reach (their 5th percentile, rounded down to 0.01). Measured on held-out inputs and wordings (how often
a task prompt is wrongly called outside) and on two generic sets: the 20 requests an earlier probe wrote
(`GENERIC`, which saw only ROC AUCs), and 30 written for this check (`GENERIC_CHECK`); and, counted apart, 20
chat requests that start with "Write" (`GENERIC_WRITE`), the word many string-task wordings start with. The
input-centring calibration requests are not used: their centred scores are low by construction.

Prints each signal's ROC AUC (held-out task prompts against all generic ones), how many prompts of each set such a
notice would call outside, and how many the page's uncertain-pick flag marks: by the readout's probability alone, and
as the page flags (that, or routing strength under the readout's recorded `weak_below`).

Usage::

    .venv/bin/python bench/outside_library.py --library assets/libraries/demo-private --threads 2
"""
from __future__ import annotations

import argparse
import json
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
GENERIC_CHECK = (
    "Can you recommend a good science fiction novel?", "How long should I boil an egg?",
    "What is the difference between weather and climate?", "Write a haiku about autumn leaves.",
    "How do I fix a flat bicycle tyre?", "Why is the sky blue at noon and red at dusk?",
    "What was the Renaissance?", "Give me three ideas for a rainy weekend.", "How does a refrigerator keep food cold?",
    "Summarise the plot of Romeo and Juliet.", "What should I pack for a week of hiking?",
    "Is it better to rent or to buy a house?", "Explain what a black hole is.", "How do bees make honey?",
    "Write a short birthday message for my sister.", "What are some tips for sleeping better?",
    "Who painted the Mona Lisa?", "How do I start learning to play the guitar?", "What is machine learning?",
    "Tell me a story about a brave little mouse.", "Why do leaves change colour in the fall?",
    "How can I be more productive when working from home?", "What does a civil engineer do?",
    "Describe the smell of fresh rain.", "What is the capital of Australia?", "How do airplanes stay in the air?",
    "Give me a recipe for pancakes.", "What are the main causes of climate change?",
    "Hi there, what can you help me with?", "Why do we dream?",
)
GENERIC_WRITE = (  # written in the fifteenth session, before routing them: demo-mbc's string tasks say "Write ..." too
    "Write a short poem about the moon.", "Write a limerick about a cat who loves cheese.",
    "Write an email to my landlord about a broken heater.", "Write a tweet announcing our new coffee shop.",
    "Write a two-line rhyme about summer.", "Write a short story opening set on a train.",
    "Write a product description for a wooden chair.", "Write a toast for my best friend's wedding.",
    "Write a paragraph about why reading matters.", "Write a slogan for a recycling campaign.",
    "Write a polite reminder about tomorrow's meeting.", "Write three questions to ask in a job interview.",
    "Write a riddle about a clock.", "Write a short apology for being late.",
    "Write a motivational message for a runner.", "Write a description of a busy market.",
    "Write a bedtime story about a sleepy owl.", "Write an invitation to a garden party.",
    "Write a review of a pizza restaurant.", "Write a note to thank a neighbour for their help.",
)
PER_TASK = 10  # prompts per task and split
FIRST = {"train": 30, "heldout": 80, "paraphrase": 80}  # past the readout's training prompts and the other runs'


def signals(rm, prompt: str) -> dict:
    """One prompt's two signals (see the module docstring), and the lead a per-token run's lean would have: the pick by
    mean weight over the same per-token evidence (a per-token run routes the prompt exactly so)."""
    from explorer.routing.prompt_level import pick

    trace = rm.trace(prompt, max_new_tokens=0)
    chosen = trace.meta["pick"]  # the readout's pick, with its evidence's routing strength (prompt_level.strength)
    return {"prompt": prompt, "score": chosen["strength"], "p": chosen["confidence"], "pick": chosen["expert"],
            "lead": pick(trace.evidence).margin}


def choose_outside(train: list[float]) -> float:
    """The strength 95 % of training prompts reach: their 5th percentile, rounded down to 0.01."""
    return float(np.floor(np.percentile(train, 5) * 100) / 100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--n", type=int, default=PER_TASK, help="prompts per task and split")
    ap.add_argument("--rows", help="an earlier run's JSON: re-summarise its rows without routing")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    from explorer.routing.config import RouterConfig

    start = time.time()
    if args.rows:
        old = json.loads(Path(args.rows).read_text())
        router, source, rows = RouterConfig.from_dict(old["router"]), old["source"], old["rows"]
        command, seconds = old["command"], old["seconds"]
    else:
        router, source, rows = route_all(args)
        command = "python bench/outside_library.py " + " ".join(argv if argv is not None else sys.argv[1:])
        seconds = round(time.time() - start, 1)
    name = Path(args.library).name
    threshold = choose_outside([r["score"] for r in rows["train"]])
    out = {"library": name, "router": router.to_dict(), "source": source, "n": args.n, "signals": {},
           "outside_below": threshold, "rule": "the 5th percentile of the training prompts' strengths, rounded down",
           "flagged": {k: flagged(rs, threshold) for k, rs in rows.items()}, "command": command, "seconds": seconds}
    below, weak = uncertain_below(args.library, router)
    out["uncertain_p"] = {"below": below, **{k: flagged(rs, below, "p") for k, rs in rows.items()}}
    out["uncertain"] = {"below": below, "weak_below": weak,
                        **{k: flagged_either(rs, below, weak) for k, rs in rows.items()}}
    from bench.pick_confidence import lead_in_use

    lead = lead_in_use(args.library, router)  # the lead under which the page flags a lean
    if all("lead" in r for rs in rows.values() for r in rs):  # a per-token run's lean: its lead, or weak routing
        out["lean"] = {"lead_below": lead, "weak_below": weak, **{k: flagged_either(rs, lead, weak, "lead")
                                                                  for k, rs in rows.items()}}
        out["lean_lead"] = {k: flagged(rs, lead, "lead") for k, rs in rows.items()}
    task = rows["heldout"] + rows["paraphrase"]
    generic = rows["generic"] + rows["generic_check"]
    y = [1] * len(task) + [0] * len(generic)
    print(f"{name}: {len(task)} held-out task prompts, {len(generic)} generic ones; routing {seconds:.0f} s")
    print("| signal | AUC | held-out task prompts: min, median | generic: max, median |\n|---|---|---|---|")
    for key, label in (("score", "routing strength"), ("p", "readout probability")):
        t, g = [r[key] for r in task], [r[key] for r in generic]
        auc = float(roc_auc_score(y, t + g))
        out["signals"][key] = {"auc": auc, "task": [min(t), float(np.median(t))],
                               "generic": [max(g), float(np.median(g))]}
        print(f"| {label} | {auc:.3f} | {min(t):.3f}, {np.median(t):.3f} | {max(g):.3f}, {np.median(g):.3f} |")
    weak_text = "" if weak is None else f" or routing strength under {weak:g}"
    print(f"\nOutside the library below strength {threshold:g} (chosen on training prompts), against the page's "
          f"uncertain-pick flag (p under {below:g}{weak_text}):\n| prompts | n | called outside | flagged by p alone | "
          "flagged uncertain |\n|---|---|---|---|---|")
    shown = [(k, v) for k, v in SETS if k in rows]  # an older run's rows (--rows) may lack a set
    for key, label in shown:
        f, q, u = out["flagged"][key], out["uncertain_p"][key], out["uncertain"][key]
        print(f"| {label} | {f['n']} | {f['flagged']} ({f['share']:.1%}) | {q['flagged']} ({q['share']:.1%}) | "
              f"{u['flagged']} ({u['share']:.1%}) |")
    if "lean" in out:
        print(f"\nA per-token run's lean, flagged under a lead of {out['lean']['lead_below']:g}{weak_text}:\n"
              "| prompts | flagged by the lead alone | flagged |\n|---|---|---|")
        for key, label in shown:
            q, u = out["lean_lead"][key], out["lean"][key]
            print(f"| {label} | {q['flagged']} ({q['share']:.1%}) | {u['flagged']} ({u['share']:.1%}) |")
    out["rows"] = rows
    write_json(Path(args.out) / f"outside_library-{name}.json", out)


SETS = (("train", "training prompts"), ("heldout", "held-out inputs"), ("paraphrase", "held-out wordings"),
        ("generic", "generic requests (the earlier probe's 20)"), ("generic_check", "generic requests (30 new)"),
        ("generic_write", "generic requests starting \"Write\" (20, not in the AUCs)"))


def route_all(args) -> tuple:
    """Every split's rows, routed with the library's default router: (router, its source, {split: rows})."""
    from bench.eval_common import attach_from_args
    from library_store.tasks import resolve_tasks

    rm, source, own = attach_from_args(args)
    if not rm.router.per_prompt or rm.router.pick != "readout":
        raise SystemExit(f"{args.library}: the check reads a per-prompt readout pick; this library's default router "
                         "has none")
    tasks = resolve_tasks("builtin:" + ",".join(sorted(own)))
    rows = {split: [signals(rm, ex.input) | {"task": t.name} for t in tasks
                    for ex in t.examples(split)[FIRST[split]:FIRST[split] + args.n]] for split in FIRST}
    rows["generic"] = [signals(rm, p) for p in GENERIC]
    rows["generic_check"] = [signals(rm, p) for p in GENERIC_CHECK]
    rows["generic_write"] = [signals(rm, p) for p in GENERIC_WRITE]
    rm.detach()
    return rm.router, source, rows


def flagged(rows: list[dict], threshold: float, key: str = "score") -> dict:
    """How many rows fall under the threshold on `key` (the strength, or "p" the readout's probability)."""
    n = sum(r[key] < threshold for r in rows)
    return {"n": len(rows), "flagged": int(n), "share": n / max(1, len(rows))}


def flagged_either(rows: list[dict], below: float, weak: float | None, key: str = "p") -> dict:
    """How many rows the page flags uncertain: p (or the lean's `key` "lead") under `below`, or routing strength under
    `weak` (when recorded)."""
    n = sum(r[key] < below or (weak is not None and r["score"] < weak) for r in rows)
    return {"n": len(rows), "flagged": int(n), "share": n / max(1, len(rows))}


def uncertain_below(library: str, router) -> tuple[float, float | None]:
    """The readout probability and the routing strength under which the page flags a pick uncertain, as the
    library records them (strength None: not recorded)."""
    from explorer.routing.readout import find_readout
    from library_store.store.library import ExpertLibrary

    readout = find_readout({}, ExpertLibrary.open(library), router)
    return readout.uncertain_below, readout.weak_below


if __name__ == "__main__":
    main()
