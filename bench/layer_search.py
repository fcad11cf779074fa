"""Is backward elimination the reason the routed layers miss? Other searches for the layer subset, same data.

`bench/layer_subset.py` and the evaluation's `choose_layers` pick the routed layers by backward elimination on
the accuracy of training prompts (a step function, so many removals tie). This probe routes the first
`--n-train` training prompts per task, 20 held-out inputs and 10 held-out wordings per task once, per token at
every layer, and compares subsets chosen on the training prompts alone by:

- `elim acc`: the evaluation's rule (backward elimination on accuracy);
- `elim acc+margin`: the same, ties broken by the mean own-expert margin (clipped to ±0.1);
- `elim soft τ`: elimination on the mean of sigmoid(margin / τ), a smooth accuracy;
- `local s<seed>`: random local search (flip one layer, keep it when accuracy+margin does not fall; 3,000 flips
  from a random start).

Every subset is scored as `layer_subset.py` scores it (the mean weight over the subset, read from the routing at
every layer) on all three splits, with the tasks each misses.

Usage::

    .venv/bin/python bench/layer_search.py --library assets/libraries/demo-private --n-train 100 --threads 2
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import library_arguments  # noqa: E402
from bench.layer_subset import accuracy, eliminate, every_layer, layer_weights, split_prompts  # noqa: E402


def margin(data, layers: list[int]) -> np.ndarray:
    """(n,) the own expert's mean weight over `layers` minus the best other expert's; data = (X (n, L, E), y)."""
    X, y = data
    m = X[:, layers].mean(1)  # (n, E)
    rows = np.arange(len(y))
    others = m.copy()
    others[rows, y] = -np.inf
    return m[rows, y] - others.max(1)


def acc_margin(data, layers: list[int]) -> float:
    return accuracy(data, layers) + 1e-3 * float(np.clip(margin(data, layers), -0.1, 0.1).mean())


def soft(tau: float):
    return lambda data, layers: float((1 / (1 + np.exp(-margin(data, layers) / tau))).mean())


def local_search(data, L: int, seed: int, flips: int = 3000) -> list[int]:
    rng = random.Random(seed)
    cur = sorted(rng.sample(range(L), rng.randint(L // 4, L)))
    best = acc_margin(data, cur)
    for _ in range(flips):
        cand = sorted(set(cur) ^ {rng.randrange(L)})
        if cand and (s := acc_margin(data, cand)) >= best:
            best, cur = s, cand
    return cur


def misses(data, layers: list[int], experts: list[str]) -> str:
    X, y = data
    ok = X[:, layers].mean(1).argmax(-1) == y
    return ", ".join(f"{experts[e]} {ok[y == e].mean():.2f}" for e in sorted(set(y.tolist())) if ok[y == e].mean() < 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--n-train", type=int, default=100, help="training prompts per task to choose on")
    args = ap.parse_args(argv)
    start = time.time()
    rm, source, own, tasks = every_layer(args)
    splits = [layer_weights(rm, rm.base, *split_prompts(tasks, own, split, n))
              for split, n in (("train", args.n_train), ("heldout", 20), ("paraphrase", 10))]
    experts, L = list(rm.experts), len(rm.layers)
    every = list(range(L))
    subsets = {"every layer": every, "elim acc": eliminate(splits[0], every),
               "elim acc+margin": eliminate(splits[0], every, acc_margin),
               **{f"elim soft {tau:g}": eliminate(splits[0], every, soft(tau)) for tau in (0.01, 0.03)},
               **{f"local s{seed}": local_search(splits[0], L, seed) for seed in range(3)}}
    print(f"{Path(args.library).name}, router {rm.router.to_dict()} ({source}), {time.time() - start:.0f} s")
    print("| search | layers | training prompts | held-out inputs | held-out wordings | misses (inputs; wordings) |")
    print("|---|---|---|---|---|---|")
    for name, layers in subsets.items():
        scores = " | ".join(f"{accuracy(d, layers):.3f}" for d in splits)
        print(f"| {name} | {len(layers)}: {[rm.layers[i] for i in layers]} | {scores} | "
              f"{misses(splits[1], layers, experts)}; {misses(splits[2], layers, experts)} |")
    rm.detach()


if __name__ == "__main__":
    main()
