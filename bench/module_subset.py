"""Would reading (or routing at) a subset of modules make the mean weight name the own expert?

The per-module accuracies in docs/routing.md differ widely (demo-private: k_proj 0.84, o_proj 0.36 over the user's
text), yet the goals' measure averages all four. This probe routes training prompts (20 per task), held-out inputs
(20) and held-out wordings (10) per token with the library's default router (its routed layers kept), keeps each
prompt's mean weight per (layer, module, expert) over the user's text, and scores on every split:

1. the mean over each subset of modules (read from the same full routing);
2. backward elimination over (layer, module) cells chosen on training prompts only.

Usage::

    .venv/bin/python bench/module_subset.py --library assets/libraries/demo-private --threads 2
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import attach_from_args, library_arguments  # noqa: E402
from bench.layer_subset import eliminate, split_prompts  # noqa: E402


def cell_weights(rm, base, texts, own):
    """(X (n, L, M, E) mean weight over the user's text per cell, y (n,) own expert index)."""
    from bench.eval_routing import route_prompts

    X = []
    for trace in route_prompts(rm, base, texts, 4096):
        pos = trace.positions("user") or trace.positions("prompt")
        X.append(trace.weights[:, :, pos].mean(2))  # (L, M, T, E) -> (L, M, E)
    return np.array(X, dtype=np.float64), np.array([rm.experts.index(e) for e in own])


def accuracy(data, cells) -> float:
    """cells: bool (L, M) mask of the cells read."""
    X, y = data
    return float((X[:, cells].mean(1).argmax(-1) == y).mean())


def mask_of(cells: list[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
    """(L, M) bool mask of a list of (layer, module) index pairs."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(np.array(cells, dtype=int).reshape(-1, 2).T)] = True
    return mask


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    args = ap.parse_args(argv)
    from explorer.routing.model import with_router
    from library_store.tasks import resolve_tasks

    start = time.time()
    rm, source, own = attach_from_args(args)
    rm.set_router(with_router(rm, granularity="token"))
    base = rm.base
    tasks = resolve_tasks("builtin:" + ",".join(sorted(own)))

    def route(split, n):
        return cell_weights(rm, base, *split_prompts(tasks, own, split, n))

    splits = route("train", 20), route("heldout", 20), route("paraphrase", 10)
    X0 = splits[0][0]
    L, M = X0.shape[1:3]
    routed = X0.sum((0, 3)) > 0  # (L, M) cells the router routes at
    print(f"{Path(args.library).name}, router {rm.router.to_dict()} ({source}), {time.time() - start:.0f} s")
    print("| modules read | cells | training | held-out inputs | held-out wordings |\n|---|---|---|---|---|")
    for k in range(M, 0, -1):
        for mods in itertools.combinations(range(M), k):
            cells = routed.copy()
            cells[:, [m for m in range(M) if m not in mods]] = False
            name = ",".join(rm.modules[m] for m in mods)
            print(f"| {name} | {cells.sum()} | " + " | ".join(f"{accuracy(d, cells):.3f}" for d in splits) + " |")
    kept = eliminate(splits[0], [tuple(c) for c in np.argwhere(routed).tolist()],
                     score=lambda data, cells: accuracy(data, mask_of(cells, (L, M))))
    chosen = mask_of(kept, (L, M))
    print(f"| cells by elimination | {chosen.sum()} | " + " | ".join(f"{accuracy(d, chosen):.3f}" for d in splits)
          + " |")
    print("kept per module:", {rm.modules[m]: int(chosen[:, m].sum()) for m in range(M)})
    rm.detach()


if __name__ == "__main__":
    main()
