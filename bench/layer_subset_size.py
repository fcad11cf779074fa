"""How many training prompts should choose the routed layers? A check on training prompts only.

`bench/eval_routing.py --sweep-layers N` chooses the routed layers by backward elimination on the first N training
prompts per task (bench/layer_subset.py). This probe asks which N a rule that never sees held-out prompts would
pick: it routes the first `max(--sizes)` training prompts per task and the `--n-val` training prompts after them,
per token at every layer, once; for each N it chooses the subset on the first N and scores the mean weight over
that subset on the validation prompts (read from the full routing, so every N is scored on the same hidden
states). Held-out prompts are never routed.

Usage::

    .venv/bin/python bench/layer_subset_size.py --library assets/libraries/demo-private --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import library_arguments  # noqa: E402
from bench.layer_subset import accuracy, eliminate, every_layer, layer_weights  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40, 60, 100], help="training prompts per task")
    ap.add_argument("--n-val", type=int, default=40, help="validation prompts per task, the training prompts after")
    args = ap.parse_args(argv)
    start = time.time()
    rm, source, own, tasks = every_layer(args)
    top = max(args.sizes)
    pairs = [(e.input, own[t.name], i) for t in tasks for i, e in enumerate(t.examples("train")[: top + args.n_val])]
    X, y = layer_weights(rm, rm.base, [p for p, _, _ in pairs], [e for _, e, _ in pairs])  # (n, L, E), (n,)
    index = [i for _, _, i in pairs]
    val = [k for k, i in enumerate(index) if i >= top]
    every = list(range(X.shape[1]))
    print(f"{Path(args.library).name}, router {rm.router.to_dict()} ({source}), {time.time() - start:.0f} s; "
          f"validation: training prompts {top}-{top + args.n_val - 1} of every task ({len(val)})")
    print("| chosen on (per task) | layers | accuracy on its own prompts | on the validation prompts |")
    print("|---|---|---|---|")
    print(f"| every layer | {len(every)} | | {accuracy((X[val], y[val]), every):.3f} |")
    for n in args.sizes:
        fit = [k for k, i in enumerate(index) if i < n]
        chosen = eliminate((X[fit], y[fit]), every)
        print(f"| {n} | {len(chosen)} | {accuracy((X[fit], y[fit]), chosen):.3f} | "
              f"{accuracy((X[val], y[val]), chosen):.3f} |")
    rm.detach()


if __name__ == "__main__":
    main()
