"""Per layer, which of two experts does each one's task text favour? (The confusion of a pair, layer by layer.)

Routes the first `--n` held-out inputs and wordings of two tasks per token at every layer (the library's default
top-k, temperature and centring; its routed layers set aside) and prints, per layer, the mean over prompts of
`weight(a) − weight(b)`, each weight the mean over the user's text. If the two rows move together, each layer
favours one expert whatever the prompt, and the task shifts that only a little; the layers where they part are
the ones that know the difference.

Usage::

    .venv/bin/python bench/pair_layers.py --library assets/libraries/demo-private --a subtract --b add --threads 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import library_arguments  # noqa: E402
from bench.layer_subset import every_layer, layer_weights  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--a", default="subtract", help="task whose expert is counted positive")
    ap.add_argument("--b", default="add", help="task whose expert is counted negative")
    ap.add_argument("--n", type=int, default=20, help="prompts per task and split")
    args = ap.parse_args(argv)
    rm, source, own, tasks = every_layer(args)
    ea, eb = rm.experts.index(own[args.a]), rm.experts.index(own[args.b])
    print(f"{Path(args.library).name}, router {rm.router.to_dict()} ({source}), at every layer; "
          f"rows: mean over prompts of weight({own[args.a]}) - weight({own[args.b]}) per layer")
    print("| prompts | split | " + " | ".join(str(x) for x in rm.layers) + " | layers > 0 on half the prompts |")
    print("|---|---|" + "---|" * (len(rm.layers) + 1))
    for task in (t for t in tasks if t.name in (args.a, args.b)):
        for split in ("heldout", "paraphrase"):
            texts = [e.input for e in task.examples(split)[: args.n]]
            X, _ = layer_weights(rm, rm.base, texts, [own[task.name]] * len(texts))  # (n, L, E)
            diff = X[:, :, ea] - X[:, :, eb]  # (n, L)
            ahead = [rm.layers[i] for i in np.flatnonzero((diff > 0).mean(0) >= 0.5)]
            print(f"| {task.name} | {split} | " + " | ".join(f"{v:+.2f}" for v in diff.mean(0)) + f" | {ahead} |")
    rm.detach()


if __name__ == "__main__":
    main()
