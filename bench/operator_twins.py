"""Does the routing read the operation? Two sibling tasks' prompts routed beside twins that differ only in it.

Every held-out input of task `--a` (default subtract) is asked again as task `--b` (default add): the same numbers,
the operator flipped (`' - '` to `' + '`), and `--b`'s wording of the same index (both tasks' wordings are listed
in the same order, tasks/wordings.py); and every input of `--b` likewise as `--a`. Both prompts of a twin pair
are routed per token with the library's default router at its routed layers, as the own-text accuracy reads
them. Per twin pair, `Δ = weight(a) − weight(b)`, each weight the mean over the user's text; the pair's *task
effect* is Δ of the `--a` prompt minus Δ of its `--b` twin. If the routing read the operation, the task effect
would be large and positive; if the two experts' weights barely move when only the operation changes, the
routing cannot tell the two tasks apart, whatever else it reads. `auc`: how well Δ alone, with the best single
threshold of any, would tell task a's prompts from task b's (1: perfectly; 0.5: not at all); a threshold at 0 is
what the own-text accuracy uses.

Pairs are split into wordings the two tasks share word for word (`What is {x}?`: the prompts differ in one
token) and wordings that name the operation ("Subtract these numbers: {x}").

Usage::

    .venv/bin/python bench/operator_twins.py --library assets/libraries/demo-private --threads 2 [--expert-scales none]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import attach_from_args, library_arguments, md_table  # noqa: E402

OPERATORS = {"add": " + ", "subtract": " - ", "multiply_small": " x "}


def raw_input(wording: str, text: str) -> str:
    """The `{x}` a prompt was filled with: `text` less the wording's text around `{x}`."""
    head, tail = wording.split("{x}")
    if not (text.startswith(head) and text.endswith(tail)):
        raise ValueError(f"{text!r} was not asked in the wording {wording!r}")
    return text[len(head): len(text) - len(tail)]


def twin(example, source: str, target: str) -> tuple[str, bool]:
    """`example` (of task `source`) asked as task `target`: (the twin prompt, whether the two wordings are the
    same text)."""
    from library_store.tasks.builtin import wordings_for
    from library_store.tasks.core import fill

    ws, wt = wordings_for(source), wordings_for(target)
    src, tgt = ws.train + ws.heldout, wt.train + wt.heldout
    i = src.index(example.wording)
    x = raw_input(example.wording, example.input)
    if OPERATORS[source] not in x:
        raise ValueError(f"{x!r} holds no {OPERATORS[source]!r}")
    return fill(tgt[i], x.replace(OPERATORS[source], OPERATORS[target])), src[i] == tgt[i]


def user_weights(rm, base, texts: list[str]) -> np.ndarray:
    """(n, E) each prompt's mean weight per expert over the user's text and the routed layers."""
    from bench.layer_subset import layer_weights

    X, _ = layer_weights(rm, base, texts, [rm.experts[0]] * len(texts))  # (n, L, E)
    return X.mean(1)


def twin_table(W: np.ndarray, Wt: np.ndarray, shared: np.ndarray, from_a: np.ndarray, ea: int, eb: int,
               own: np.ndarray) -> list[dict]:
    """Rows of the probe from the prompts' weights W (n, E), their twins' Wt (n, E), whether each pair's wordings
    are shared, whether the prompt is of task a, the two experts' columns, and each prompt's own column."""
    delta, delta_t = W[:, ea] - W[:, eb], Wt[:, ea] - Wt[:, eb]  # (n,) each
    effect = np.where(from_a, delta - delta_t, delta_t - delta)  # Δ(a prompt) − Δ(its b twin)
    twin_own = np.where(own == ea, eb, ea)
    rows = []
    groups = (("shared wording", shared), ("wording names the operation", ~shared), ("all", np.ones_like(shared)))
    for name, keep in groups:
        # Δ of every prompt of task a (the a prompts and the twins of b prompts), then of every prompt of task b
        da = np.r_[delta[keep & from_a], delta_t[keep & ~from_a]]
        db = np.r_[delta_t[keep & from_a], delta[keep & ~from_a]]
        if keep.any():
            rows.append({"pairs": name, "n": int(keep.sum()),
                         "own_right": float((W[keep].argmax(1) == own[keep]).mean()),
                         "twin_right": float((Wt[keep].argmax(1) == twin_own[keep]).mean()),
                         "weight_a": float(np.concatenate([W[keep & from_a, ea], Wt[keep & ~from_a, ea]]).mean()),
                         "weight_b": float(np.concatenate([Wt[keep & from_a, eb], W[keep & ~from_a, eb]]).mean()),
                         "task_effect": float(effect[keep].mean()),
                         "task_effect_positive": float((effect[keep] > 0).mean()),
                         "auc": float(roc_auc_score(np.r_[np.ones(len(da)), np.zeros(len(db))], np.r_[da, db])),
                         "abs_delta": float(np.abs(np.concatenate([delta[keep], delta_t[keep]])).mean())})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--a", default="subtract", choices=sorted(OPERATORS), help="task counted positive")
    ap.add_argument("--b", default="add", choices=sorted(OPERATORS), help="its sibling, counted negative")
    ap.add_argument("--split", default="heldout", choices=("heldout", "paraphrase", "train"))
    ap.add_argument("--n", type=int, default=20, help="prompts per task")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--expert-scales", default="default", choices=("default", "none"),
                    help="the default router's expert scales, or none (Arrow's plain score, as before they existed)")
    args = ap.parse_args(argv)
    from explorer.routing.model import with_router
    from library_store.tasks import resolve_tasks

    if args.a == args.b:
        ap.error("--a and --b must be two different tasks")
    rm, source, own = attach_from_args(args)
    missing = [t for t in (args.a, args.b) if t not in own]
    if missing:
        ap.error(f"no routed expert of {Path(args.library).name} was trained on {missing}; its tasks: {sorted(own)}")
    scales = rm.router.scales if args.expert_scales == "default" else ()
    rm.set_router(with_router(rm, granularity="token", scales=scales))  # the per-token evidence, at the routed layers
    texts, twins, shared, from_a, owns = [], [], [], [], []
    for task in resolve_tasks(f"builtin:{args.a},{args.b}"):
        other = args.b if task.name == args.a else args.a
        for e in task.examples(args.split)[: args.n]:
            t, same = twin(e, task.name, other)
            texts.append(e.input), twins.append(t), shared.append(same), from_a.append(task.name == args.a)
            owns.append(rm.experts.index(own[task.name]))
    W, Wt = user_weights(rm, rm.base, texts), user_weights(rm, rm.base, twins)  # (n, E) each
    rows = twin_table(W, Wt, np.array(shared), np.array(from_a), rm.experts.index(own[args.a]),
                      rm.experts.index(own[args.b]), np.array(owns))
    print(f"{Path(args.library).name}, router {rm.router.to_dict()} ({source}), {args.split}, {args.n} per task; "
          f"a = {own[args.a]}, b = {own[args.b]}")
    keys = list(rows[0])
    print(md_table(keys, [[f"{r[k]:.3f}" if isinstance(r[k], float) else r[k] for k in keys] for r in rows]))
    if args.out:
        args.out.write_text(json.dumps({"library": Path(args.library).name, "router": rm.router.to_dict(),
                                        "split": args.split, "a": args.a, "b": args.b, "rows": rows}, indent=1))
    rm.detach()


if __name__ == "__main__":
    main()
