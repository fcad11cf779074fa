"""Do the page's example prompts show what they claim? Each example of `assets/examples.json` that names a
`task` and an `answer` is answered and routed by a library with its recorded default router (the page's
start-up setting), and checked: the task's own expert (MBC: its cluster) has the largest mean weight over the
user's text, by a clear margin over the next one (and, per prompt, the pick is not flagged uncertain), and the
greedy answer is right. Free-text examples are only shown. With a per-prompt default router the shares are read
from the trace's evidence (the per-token routing that made the pick), not from the applied routing (the pick
alone, 100 %); with a readout pick, the lead is the readout's probability over its runner-up.

Usage::

    .venv/bin/python bench/check_examples.py --library assets/libraries/demo-mbc
    .venv/bin/python bench/check_examples.py --library assets/libraries/demo-private --prompts "Please compute 25 + 19"

Prints one line per example (winner, its mean weight share, the runner-up's, the answer) and exits 1 when a
checked example fails. `--prompts` tries other texts (no checks), to pick candidates.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import attach_from_args, library_arguments  # noqa: E402
from bench.eval_sweep import DECISIVE  # noqa: E402

EXAMPLES = ROOT / "assets" / "examples.json"
MIN_LEAD = DECISIVE  # the winner must lead the runner-up by this much (0.05) on the scale that picked: decisive
# routing, as a library's default router must (bench/eval_sweep.py)


def shares(trace) -> dict[str, float]:
    """Mean weight over the user's text per routed expert (an MBC library routes over its clusters), summing
    to about 1."""
    mean = trace.module_weights()[:, trace.positions("user")].mean(axis=(0, 1))  # (E,)
    return {n: float(m) for n, m in zip(trace.experts, mean / max(mean.sum(), 1e-12))}


def check(rm, example: dict, own: dict[str, str], max_new: int) -> dict:
    from bench.eval_common import exact_match

    trace = rm.trace(example["prompt"], max_new_tokens=max_new)
    evidence = trace.evidence if trace.evidence is not None else trace  # per prompt: the routing that picked
    chosen = trace.meta.get("pick") or {}
    if chosen.get("rule") == "readout":  # the readout's probabilities are what decided
        ranked = [(chosen["expert"], chosen["confidence"])] + \
            ([(chosen["runner_up"], chosen["runner_confidence"])] if chosen.get("runner_up") else [])
    else:
        ranked = sorted(shares(evidence).items(), key=lambda kv: -kv[1])
    out = {"prompt": example["prompt"], "family": example.get("family"), "answer": trace.text.strip(),
           "winner": ranked[0][0], "share": ranked[0][1], "runner_up": ranked[1] if len(ranked) > 1 else None,
           "basis": "readout probability" if chosen.get("rule") == "readout" else "mean weight share"}
    task = example.get("task")
    if task:
        want = own.get(task)
        out.update(expected=want, routed_ok=ranked[0][0] == want,
                   decisive=(len(ranked) < 2 or ranked[0][1] - ranked[1][1] >= MIN_LEAD)
                   and not chosen.get("uncertain"),
                   answer_ok=bool(exact_match(trace.text, example["answer"])))
        out["ok"] = out["routed_ok"] and out["decisive"] and out["answer_ok"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-mbc"))
    ap.add_argument("--examples", default=str(EXAMPLES))
    ap.add_argument("--prompts", nargs="*", help="try these texts instead (printed, not checked)")
    ap.add_argument("--max-new", type=int, default=16)
    args = ap.parse_args(argv)

    rm, source, own = attach_from_args(args)
    examples = [{"prompt": p} for p in args.prompts] if args.prompts else json.loads(Path(args.examples).read_text())
    print(f"{Path(args.library).name}, router {rm.router.to_dict()} ({source})")
    failed = 0
    for ex in examples:
        r = check(rm, ex, own, args.max_new)
        runner = f", next {r['runner_up'][0]} {r['runner_up'][1]:.0%}" if r["runner_up"] else ""
        verdict = "" if "ok" not in r else (" OK" if r["ok"] else
                                             f" FAIL (routed {r['routed_ok']}, decisive {r['decisive']}, "
                                             f"answer {r['answer_ok']})")
        failed += "ok" in r and not r["ok"]
        print(f"- {r['prompt']!r} -> {r['winner']} {r['share']:.0%}{runner} ({r['basis']}); answer "
              f"{r['answer']!r}{verdict}")
    rm.detach()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
