"""Fit a library's expert scales on training prompts and, with `--record`, add them to its default router.

Arrow scores every expert on one scale, |h · p_e|, yet on shared text one expert can lead its sibling at every
prompt (bench/operator_twins.py: on demo-private, add leads subtract by about 0.03 of mean weight on both tasks'
text, while the operation moves that by about 0.02, always the right way). One factor per expert, c_e |h · p_e|
(`RouterConfig.scales`, geometric mean 1 so the temperature keeps its meaning), removes such a standing lead.

The factors are fitted on the user's text of the first `--n` *training* prompts per task, under the library's
recorded default router (its per-token evidence, at its routed layers): each prompt's own expert should have the
largest mean top-k weight (a hinge on the margin, through the top-k softmax; bench/routing_scores.py,
`fit_offset`). Fitted on recorded inputs, the later layers' inputs are those of the unscaled routing; the
evaluation afterwards routes for real. They are adopted only if the own-text accuracy of the *next* `--n`
training prompts per task rises (held-out prompts choose nothing). `--record` writes the default router with the
scales and this evidence; the per-prompt pick's readout depends on the evidence, so fit it again afterwards:

    .venv/bin/python bench/fit_scales.py --library assets/libraries/demo-private --threads 2 --record
    .venv/bin/python bench/eval_routing.py --library assets/libraries/demo-private --split heldout --n 20 \\
        --threads 2 --sweep-granularity --record
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import attach_from_args, library_arguments  # noqa: E402
from bench.routing_scores import (Sites, fit_on_training, prompt_owners, prompt_weights,  # noqa: E402
                                 routed_scores)


def accuracy_of(scores: list[torch.Tensor], y: torch.Tensor, prompt_of: torch.Tensor, factors: torch.Tensor,
                top_k: int, temperature: float) -> float:
    """Own-text accuracy of prompts from their user-text tokens' Arrow scores (N, G, E) per routed group (own expert
    y (N,), prompt prompt_of (N,), prompts numbered from 0), the scores times `factors` (E,)."""
    mean = prompt_weights([s * factors / temperature for s in scores], prompt_of, top_k)  # (n_prompts, E)
    return float((mean.argmax(1) == prompt_owners(y, prompt_of)).float().mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    library_arguments(ap, str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--n", type=int, default=20, help="training prompts per task to fit on (and as many to check)")
    ap.add_argument("--record", action="store_true", help="add the scales to the library's default router")
    args = ap.parse_args(argv)
    from explorer.routing.config import RouterConfig
    from explorer.routing.model import with_router
    from explorer.routing.readout import readout_key
    from library_store.store.library import ExpertLibrary
    from library_store.store.reports import read_default_router, read_readout, write_default_router
    from library_store.tasks import resolve_tasks

    start = time.time()
    writer = ExpertLibrary.open(args.library, readonly=False) if args.record else None
    if writer is not None and writer.readonly:
        raise SystemExit(f"--record: the library at {args.library} is not writable.")
    rm, source, own = attach_from_args(args)
    recorded = read_default_router(writer) if writer is not None else None
    if writer is not None and recorded is None:
        raise SystemExit("--record adds scales to a recorded default router: this library has none; run "
                         "bench/eval_routing.py --sweep --record first.")
    rm.set_router(with_router(rm, granularity="token", scales=()))  # the per-token evidence, unscaled
    sites = Sites(rm)
    tasks = resolve_tasks("builtin:" + ",".join(sorted(own)))
    with torch.no_grad():
        scores, y, prompt_of = fit_on_training(rm, sites, tasks, own, args.n, bias=False, scale=True)
        check = [(e.input, rm.experts.index(own[t.name])) for t in tasks
                 for e in t.examples("train")[args.n: 2 * args.n]]
        ones, st = torch.ones(len(rm.experts)), (rm.router.top_k, rm.router.temperature)
        fit = [accuracy_of(scores, y, prompt_of, c, *st) for c in (ones, sites.scale)]  # the fit's own routing
        held = routed_scores(rm, sites, check)  # prompts 21-40, routed once
        checked = [accuracy_of(*held, c, *st) for c in (ones, sites.scale)]
        acc = {"fit_before": fit[0], "fit_after": fit[1], "check_before": checked[0], "check_after": checked[1]}
    sites.remove()
    rm.detach()
    scales = {name: round(float(c), 4) for name, c in zip(rm.experts, sites.scale)}
    adopt = acc["check_after"] > acc["check_before"]
    print(f"{Path(args.library).name}, router {rm.router.to_dict()} ({source}), {time.time() - start:.0f} s")
    print("scales:", scales)
    print(f"own text, training prompts 1-{args.n} (fitted on): {acc['fit_before']:.3f} -> {acc['fit_after']:.3f}; "
          f"prompts {args.n + 1}-{2 * args.n} (the check): {acc['check_before']:.3f} -> {acc['check_after']:.3f}: "
          f"{'adopt' if adopt else 'keep Arrow plain'}")
    if writer is not None:
        if not adopt:
            raise SystemExit("Not recorded: the scales did not raise the check prompts' accuracy.")
        router = replace(RouterConfig.from_dict(recorded.router), scales=scales)
        if router.per_prompt and router.pick == "readout" and read_readout(writer, readout_key(router)) is None:
            router = replace(router, pick="mean")  # until the readout is fitted on the scaled evidence (below)
        router = router.to_dict()
        evidence = {**recorded.evidence, "scales": {"factors": scales, "n_fit": args.n, **acc,
                                                    "command": " ".join(["python"] + sys.argv)}}
        write_default_router(writer, router, evidence, recorded.command,
                             datetime.now(timezone.utc).isoformat(timespec="seconds"))
        print("recorded; now fit the pick readout again: bench/eval_routing.py --sweep-granularity --record")


if __name__ == "__main__":
    main()
