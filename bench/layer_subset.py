"""Would routing at a subset of layers, chosen on training prompts, make the mean weight name the own expert?

The per-layer accuracy curves (docs/routing.md) show layers that send the user's text elsewhere, and the fitted
readout (explorer/routing/readout.py) gets its 0.96-0.99 by weighing layers. This probe asks whether a router
that routes only where the library knows the task would lift own-text routing as the goals define it (largest
mean weight over the user's text), with no readout:

1. route the first 20 (`--n-train`) training prompts per task with the library's default router, per token, at
   every layer (its own routed layers, if it has any, set aside);
   choose the layer subset S by backward elimination: drop the layer whose removal most raises (or keeps) the
   training prompts' accuracy of the mean weight over S, until every removal would lower it;
2. score the mean weight over S on held-out inputs (20 per task) and held-out wordings (10 per task);
3. route again with the experts applied at S only (the other layers' B rows zeroed, so they add nothing, as a
   router that leaves them unrouted would) and score all three splits over S: what such a router would record.

It also prints the best k single layers on training prompts, for k = 4, 8, 12, 16, 20.

Usage::

    .venv/bin/python bench/layer_subset.py --library assets/libraries/demo-mbc --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import attach_from_args, library_arguments  # noqa: E402


def layer_weights(rm, base, texts: list[str], own: list[str], max_tokens: int = 4096):
    """(X (n, L, E) each prompt's mean weight per layer over the user's text, y (n,) its own expert's index),
    routed with the model's current router."""
    from bench.eval_routing import route_prompts
    from explorer.routing.readout import features

    L, E = len(rm.layers), len(rm.experts)
    X = [features(trace).reshape(L, E) for trace in route_prompts(rm, base, texts, max_tokens)]
    return np.array(X), np.array([rm.experts.index(e) for e in own])


def accuracy(data, layers: list[int]) -> float:
    """Share of prompts whose own expert has the largest mean weight over `layers`; data = (X (n, L, E), y (n,))."""
    X, y = data
    return float((X[:, layers].mean(1).argmax(-1) == y).mean())


def eliminate(data, layers: list, score=accuracy) -> list:
    """Backward elimination on `data`: drop layers (bench/module_subset.py: cells) while `score` does not fall; of
    equal scores, the last item is dropped."""
    best = score(data, layers)
    while len(layers) > 1:
        top, drop = max((score(data, [m for m in layers if m != d]), d) for d in layers)
        if top < best:
            break
        best, layers = top, [m for m in layers if m != drop]
    return layers


def every_layer(args):
    """The library of `args` attached with its default router, switched to route per token at every layer (its own
    routed layers, if any, set aside): the evidence the layer probes read. (RoutedModel, the router's source,
    {task: own expert}, the library's built-in tasks)."""
    from explorer.routing.model import with_router
    from library_store.tasks import resolve_tasks

    rm, source, own = attach_from_args(args)
    rm.set_router(with_router(rm, granularity="token", layers=None))
    return rm, source, own, resolve_tasks("builtin:" + ",".join(sorted(own)))


def split_prompts(tasks, own: dict[str, str], split: str, n: int) -> tuple[list[str], list[str]]:
    """The first n examples of `split` of every task: (their inputs, the expert trained on each one's task)."""
    pairs = [(e.input, own[task.name]) for task in tasks for e in task.examples(split)[:n]]
    return [x for x, _ in pairs], [e for _, e in pairs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-mbc"))
    ap.add_argument("--n-train", type=int, default=20, help="training prompts per task to choose S on")
    args = ap.parse_args(argv)
    from explorer.routing.layer import RoutedLinear
    from explorer.routing.model import with_router

    start = time.time()
    rm, source, own, tasks = every_layer(args)
    base, L = rm.base, len(rm.layers)

    def route(split: str, n: int):
        return layer_weights(rm, base, *split_prompts(tasks, own, split, n))

    def line(label: str, layers: list[int], splits) -> str:
        return f"| {label} | {len(layers)} | " + " | ".join(f"{accuracy(d, layers):.3f}" for d in splits) + " |"

    splits = route("train", args.n_train), route("heldout", 20), route("paraphrase", 10)
    every = list(range(L))
    chosen = eliminate(splits[0], every)
    rows = [line("every layer", every, splits), line("subset S, read from the full routing", chosen, splits)]
    for k in (4, 8, 12, 16, 20):
        best = sorted(sorted(every, key=lambda m: -accuracy(splits[0], [m]))[:k])
        rows.append(line(f"best {k} single layers", best, splits))
    groups = {id(m.group): m.group for m in base.model.modules() if isinstance(m, RoutedLinear)}.values()
    kept = {rm.layers[i] for i in chosen}  # model layer numbers, as the groups' trace keys name them
    for g in groups:  # experts apply at S only: the others' B rows are zeroed (this process only)
        if g.keys[0][0] not in kept:
            g.up.zero_()
            g.clear()
    rm.set_router(with_router(rm, granularity="token", layers=None))  # a new version: no cached result is reused
    rows.append(line("routed at S only", chosen, [route("train", args.n_train), route("heldout", 20),
                                                  route("paraphrase", 10)]))
    print(f"{Path(args.library).name}, router {rm.router.to_dict()} ({source}), {time.time() - start:.0f} s")
    print(f"S = {[rm.layers[i] for i in chosen]}")
    print("| layers read | how many | training prompts | held-out inputs | held-out wordings |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    rm.detach()


if __name__ == "__main__":
    main()
