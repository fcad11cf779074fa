"""Memory of a routing trace, dense (before) against sparse top-k with drill-down data (after), and the cost
of recording it.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/trace_memory.py            # ~2 min: E=16 and E=256, 300 tokens
    .venv/bin/python bench/trace_memory.py --experts 16 --tokens 300 --reps 5

SmolLM2-shaped random weights (30 layers x q/k/v/o), random rank-4 experts, top-4. "dense" is the
(layers, modules, tokens, experts) float32 array traces stored before; "sparse" is `trace.routes.nbytes`.
The on/off ratio is of CPU-time medians of a 64-token forward, capture on and off interleaved.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_base import random_base, random_experts  # noqa: E402

from explorer.routing.config import RouterConfig  # noqa: E402
from explorer.routing.model import RoutedModel  # noqa: E402
from explorer.routing.trace import RoutingTrace  # noqa: E402


def on_off(rm, ids, reps: int) -> dict:
    times = {"off": [], "on": []}
    with torch.no_grad():
        for rep in range(reps):
            for side in (("off", "on") if rep % 2 else ("on", "off")):
                t0 = time.process_time()
                if side == "on":
                    with rm.capturing() as records:
                        rm.base.model(input_ids=ids)
                    rm._assemble(records, ids.shape[1])
                else:
                    rm.base.model(input_ids=ids)
                times[side].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"trace_on_s": med["on"], "trace_off_s": med["off"], "trace_ratio": med["on"] / med["off"],
            "trace_ratio_min": min(times["on"]) / min(times["off"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[16, 256])
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--reps", type=int, default=5, help="on/off repetitions (0: skip the timing)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "trace_memory.json"))
    args = p.parse_args(argv)
    base = random_base("smollm2")
    ids = torch.randint(200, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    for E in args.experts:
        rm = RoutedModel(base, random_experts(base, E), RouterConfig(top_k=4))
        with torch.no_grad(), rm.capturing() as records:
            rm.base.model(input_ids=ids)
        routes = rm._assemble(records, args.tokens)
        tokens = [str(i) for i in ids[0].tolist()]
        trace = RoutingTrace(tokens=tokens, token_ids=ids[0].tolist(), is_generated=[False] * args.tokens,
                             layers=rm.layers, modules=rm.modules, experts=rm.experts, routes=routes)
        L, M, T, _ = routes.shape
        row = {"experts": E, "tokens": T, "layers": L, "modules": M, "dense_bytes": L * M * T * E * 4,
               "sparse_bytes": routes.nbytes,
               "sparse_weights_only_bytes": routes.experts.nbytes + routes.weights.nbytes,
               "json_dense_bytes": len(trace.to_json()), "json_sparse_bytes": len(trace.to_json(dense=False))}
        if args.reps and E == args.experts[0]:
            row.update(on_off(rm, ids[:, :64], args.reps))
        rows.append(row)
        print(json.dumps(row), flush=True)
        rm.detach()
    print(f"\nTrace memory, {args.tokens} tokens, SmolLM2 shape (30 layers x 4 modules), top-4")
    print("| experts | dense float32 (before) | sparse + drill-down (after) | of which top-k ids + weights |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['experts']} | {r['dense_bytes'] / 1e6:.2f} MB | {r['sparse_bytes'] / 1e6:.2f} MB | "
              f"{r['sparse_weights_only_bytes'] / 1e6:.2f} MB |")
    if "trace_ratio" in rows[0]:
        print(f"trace on/off, 64-token forward, E={rows[0]['experts']}: median {rows[0]['trace_ratio']:.3f}, "
              f"min/min {rows[0]['trace_ratio_min']:.3f} (goal <= 1.05)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
