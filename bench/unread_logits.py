"""What skipping unread logits saves (seventh session): the evidence pass of a per-prompt answer runs the model's
body alone, and the counterfactuals form the last position's logits alone. A/B in one process, interleaved: "old"
restores the whole forward (the LM head over every position), "new" is the code as it is.

Usage::

    .venv/bin/python bench/unread_logits.py --threads 2            # about 1.5 min on SmolLM2

Prints per case the old and new medians and the median and min-max of the per-repetition ratios new / old;
writes bench/results/unread_logits.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import RESULTS, attach_from_args, write_json  # noqa: E402

CF_PROMPT = "Add these numbers: 47 + 28. Then tell me whether the result is odd or even, in one short word."


def ratios(old: list[float], new: list[float]) -> dict:
    r = [b / a for a, b in zip(old, new)]
    return {"old_ms": round(1e3 * statistics.median(old), 1), "new_ms": round(1e3 * statistics.median(new), 1),
            "new_over_old": round(statistics.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}


def answers(args) -> dict:
    """A whole per-prompt answer of the page's examples, evidence through the whole model (old) or the body."""
    rm, _, _ = attach_from_args(argparse.Namespace(model=args.model, library=args.answer_library,
                                                   threads=args.threads))
    model = rm.base.model
    prompts = [e["prompt"] for e in json.loads((ROOT / "assets" / "examples.json").read_text())]
    t, said = {"old": [], "new": []}, {}

    def run(kind, prompt, n):
        if kind == "old":
            model.get_decoder = lambda: model  # the evidence pass through the whole model, as before
        else:
            model.__dict__.pop("get_decoder", None)
        t0 = time.perf_counter()
        out = rm.generate(prompt, max_new_tokens=n)
        return time.perf_counter() - t0, out

    for p in prompts[:2]:  # warm-up
        run("old", p, 2), run("new", p, 2)
    for rep in range(args.reps):
        for p in prompts:
            for kind in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                dt, out = run(kind, p, 16)
                t[kind].append(dt)
                said.setdefault(p, set()).add(out)
    model.__dict__.pop("get_decoder", None)
    return ratios(t["old"], t["new"]) | {"same_answers": all(len(v) == 1 for v in said.values())}


def counterfactuals(args) -> dict:
    """A counterfactual's next-token step per scope, whole logits (old) or the last position's."""
    from explorer.page import counterfactual as cfm
    from explorer.routing.capture import last_logits_only
    from explorer.routing.config import RouterConfig

    rm, _, _ = attach_from_args(argparse.Namespace(model=args.model, library=args.cf_library, threads=args.threads))
    rm.set_router(RouterConfig(top_k=min(4, len(rm.experts)), temperature=1.0))
    trace = rm.trace(CF_PROMPT, max_new_tokens=8)
    t: dict = {}
    for rep in range(args.reps + 1):
        for kind in ("old", "new") if rep % 2 else ("new", "old"):
            cfm.last_logits_only = (lambda m: {}) if kind == "old" else last_logits_only
            for scope in ("cell", "token", "everywhere"):
                case = cfm.Counterfactual(layer=trace.layers[len(trace.layers) // 2], token=trace.n_prompt - 1,
                                          expert=trace.most_used_expert(), scope=scope)
                seconds = cfm.next_token(rm, trace, case).seconds
                if rep:  # the first round warms up
                    t.setdefault(scope, {}).setdefault(kind, []).append(seconds)
    cfm.last_logits_only = last_logits_only
    return {"prompt_tokens": trace.n_prompt} | {s: ratios(v["old"], v["new"]) for s, v in t.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--answer-library", default=str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--cf-library", default=str(ROOT / "assets" / "libraries" / "demo-mbc"))
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    start = time.time()
    out = {"answers": answers(args), "counterfactuals": counterfactuals(args), "reps": args.reps,
           "threads": args.threads, "seconds": None}
    out["seconds"] = round(time.time() - start, 1)
    write_json(Path(RESULTS) / "unread_logits.json", out)
    a = out["answers"]
    print(f"per-prompt answer of the examples: old {a['old_ms']} ms, new {a['new_ms']} ms, new/old "
          f"{a['new_over_old']} [{a['min']}, {a['max']}], same answers: {a['same_answers']}")
    for scope in ("cell", "token", "everywhere"):
        c = out["counterfactuals"][scope]
        print(f"counterfactual {scope}: old {c['old_ms']} ms, new {c['new_ms']} ms, new/old {c['new_over_old']} "
              f"[{c['min']}, {c['max']}]")
    print(f"({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
