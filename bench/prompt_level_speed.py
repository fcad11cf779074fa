"""What does one expert per prompt cost? Per-token Arrow against per-prompt routing (pick by mean weight and by
the library's readout), answering the page's example prompts greedily, interleaved and repeated.

Usage::

    .venv/bin/python bench/prompt_level_speed.py --library assets/libraries/demo-private --reps 5

Per prompt and router: wall time of `RoutedModel.generate` (the per-prompt routers add one forward over the prompt,
the evidence, then answer with their pick alone) and the tokens it produced (answers differ, so time per new token
is shown too). Prints medians and min-max of the ratios per-prompt / per-token over prompts x repetitions;
writes `bench/results/prompt_level_speed-<library>.json`. Ratios only: hosts differ several-fold here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import RESULTS, attach_from_args, library_arguments, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=16)
    args = ap.parse_args(argv)
    rm, source, _ = attach_from_args(args)
    base_router = rm.router
    routers = {"per token": replace(base_router, granularity="token", pick="mean"),
               "per prompt, mean": replace(base_router, granularity="prompt", pick="mean")}
    try:
        rm.set_router(replace(base_router, granularity="prompt", pick="readout"))
        routers["per prompt, readout"] = rm.router
    except ValueError as exc:  # no readout fitted for this library: the other two still compare
        print(f"(no readout: {exc})")
    prompts = [e["prompt"] for e in json.loads((ROOT / "assets" / "examples.json").read_text())]
    tok = rm.base.tokenizer
    times = {k: [] for k in routers}
    new = {k: [] for k in routers}
    for name, router in routers.items():  # warm-up: caches, first-call allocations
        rm.set_router(router)
        rm.generate(prompts[0], max_new_tokens=2)
    for _ in range(args.reps):
        for p in prompts:
            for name, router in routers.items():  # interleaved: drift hits every router alike
                rm.set_router(router)
                t0 = time.perf_counter()
                text = rm.generate(p, max_new_tokens=args.max_new)
                times[name].append(time.perf_counter() - t0)
                new[name].append(max(1, len(tok(text, add_special_tokens=False).input_ids)))
    rm.set_router(base_router)
    ref = np.array(times["per token"])
    ref_tok = ref / np.array(new["per token"])
    rows = {}
    for name in routers:
        t = np.array(times[name])
        per_tok = t / np.array(new[name])
        rows[name] = {"median_s": float(np.median(t)), "ratio_median": float(np.median(t / ref)),
                      "ratio_min": float(np.min(t / ref)), "ratio_max": float(np.max(t / ref)),
                      "per_new_token_ratio_median": float(np.median(per_tok / ref_tok)),
                      "new_tokens_mean": float(np.mean(new[name]))}
        print(f"{name:22s} median {rows[name]['median_s'] * 1000:7.1f} ms  / per token: "
              f"{rows[name]['ratio_median']:.2f} [{rows[name]['ratio_min']:.2f}, {rows[name]['ratio_max']:.2f}]  "
              f"per new token {rows[name]['per_new_token_ratio_median']:.2f}  ({rows[name]['new_tokens_mean']:.1f} "
              "new tokens)")
    name = Path(args.library).name
    write_json(RESULTS / f"prompt_level_speed-{name}.json", {
        "library": name, "router": base_router.to_dict(), "router_source": source, "reps": args.reps,
        "max_new_tokens": args.max_new, "prompts": prompts, "rows": rows,
        "command": "python bench/prompt_level_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    rm.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
