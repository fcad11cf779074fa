"""Phi-2 scale: a random-weight model with Phi-2's exact config plus 64 and 256 random rank-4 experts on
q, k, v and dense: attach time, prototypes, peak memory, forward and generation ratios, trace size per token.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/phi2_scale.py             # CPU default: 4 of Phi-2's 32 layers, ~3 min
    .venv/bin/python bench/phi2_scale.py --layers 32 --device cuda      # the full 2.7B model (bench/gpu_check.sh)

Weights do not change speed, so the model is `random_base("phi2")`: PhiConfig(hidden 2560, 32 layers, 32 heads,
intermediate 10240, vocab 51200, partial_rotary_factor 0.4); `--layers` keeps fewer decoder layers (every
per-layer figure scales with it; the default run says how many it kept). Timing: CPU time of this process on
the CPU, synchronised wall time on CUDA; ratios: the median of per-repetition ratios (paired) and the ratio of
medians, of interleaved repetitions (see arrow_speed.py).
Memory: peak RSS of the process (ru_maxrss) after each stage and, on CUDA, peak allocated GPU memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench.eval_common import write_json  # noqa: E402

from arrow_speed import Clock, interleaved, ratio  # noqa: E402
from random_base import random_base, random_experts  # noqa: E402

from explorer.routing.config import RouterConfig  # noqa: E402
from explorer.routing.device import add_device_arguments, resolve_device, resolve_dtype, synchronize  # noqa: E402
from explorer.routing.model import RoutedModel  # noqa: E402
from explorer.routing.prototypes import compute_prototypes  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kB


def cuda_peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.no_grad()
def bench_library(E, base, experts, args, device, clock) -> dict:
    res = {"experts": E}
    t0 = time.perf_counter()
    rm = RoutedModel(base, experts[:E], RouterConfig(top_k=4))  # stacks + exact prototypes, on the model's device
    synchronize(device)
    res["attach_cold_s"] = time.perf_counter() - t0
    protos = {n: {s: st.prototypes[i] for s, st in rm._stacks.items()} for i, n in enumerate(rm.experts)}
    rm.detach()
    t0 = time.perf_counter()
    rm = RoutedModel(base, experts[:E], RouterConfig(top_k=4), prototypes=protos)  # prototypes cached
    synchronize(device)
    res["attach_warm_s"] = time.perf_counter() - t0
    # exact prototypes of every site's stack, timed on their own (cold minus warm attach, two single wall times,
    # was noisy enough to go negative)
    t0 = time.perf_counter()
    for st in rm._stacks.values():
        compute_prototypes(st.A, st.B)  # (E, r, d), (E, out, r) -> (E, d)
    synchronize(device)
    res["prototypes_s"] = time.perf_counter() - t0
    res["peak_rss_gb_after_attach"] = peak_rss_gb()
    ids = torch.randint(200, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(E)).to(device)
    arrow, plain = RouterConfig(top_k=4), RouterConfig(mode="base")
    model = base.model

    def fwd(router):
        def run():
            rm.set_router(router)
            model(input_ids=ids)
        return run

    def gen(router):
        def run():
            rm.set_router(router)
            model.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=base.tokenizer.pad_token_id)
        return run

    t = interleaved(clock, {"base": fwd(plain), "routed": fwd(arrow)}, args.reps)
    res.update(base_forward_s=statistics.median(t["base"]), forward_ratio=ratio(t, "routed", "base"))
    g = interleaved(clock, {"base": gen(plain), "routed": gen(arrow)}, args.reps)
    res.update(base_tok_s=args.new_tokens / statistics.median(g["base"]),
               routed_tok_s=args.new_tokens / statistics.median(g["routed"]),
               generation_ratio=ratio(g, "base", "routed"))
    rm.set_router(arrow)
    with rm.capturing() as records:
        model(input_ids=ids)
    routes = rm._assemble(records, args.tokens)
    L, M, T, _ = routes.shape
    res.update(trace_bytes_per_token=routes.nbytes / T, dense_trace_bytes_per_token=L * M * E * 4,
               trace_layers=L, peak_rss_gb=peak_rss_gb(), cuda_peak_gb=cuda_peak_gb(device))
    rm.detach()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept of Phi-2's 32 (32: the full model)")
    p.add_argument("--experts", type=int, nargs="+", default=[64, 256])
    p.add_argument("--tokens", type=int, default=64, help="forward length (and trace length)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per side")
    add_device_arguments(p, default="cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "phi2_scale.json"))
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    started = time.perf_counter()
    t0 = time.perf_counter()
    base = random_base("phi2", layers=args.layers, dtype=dtype, device=device)
    out = {"command": "python bench/phi2_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "layers": args.layers, "of_layers": 32, "device": str(device), "dtype": str(dtype), "rank": 4, "top_k": 4,
           "targets": base.targets, "params": sum(p.numel() for p in base.model.parameters()),
           "build_s": time.perf_counter() - t0, "peak_rss_gb_base": peak_rss_gb(), "torch": torch.__version__}
    t0 = time.perf_counter()
    experts = random_experts(base, max(args.experts))
    out["experts_build_s"] = time.perf_counter() - t0
    clock = Clock(device)
    out["libraries"] = []
    for E in args.experts:
        print(f"E={E} ...", flush=True)
        out["libraries"].append(bench_library(E, base, experts, args, device, clock))
        print(json.dumps(out["libraries"][-1]), flush=True)
    out["total_s"] = time.perf_counter() - started
    print(f"\nPhi-2 config, {args.layers} of 32 layers ({out['params'] / 1e9:.2f} B parameters), {device}, {dtype}, "
          f"rank-4 experts on {', '.join(base.targets)}, top-4")
    print("| experts | attach cold / warm s | prototypes s | forward ratio: paired · of medians (min-max) | "
          "generation ratio: paired · of medians (min-max) | trace B/token (dense) | peak RSS GB | CUDA peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["libraries"]:
        f, g = r["forward_ratio"], r["generation_ratio"]
        print(f"| {r['experts']} | {r['attach_cold_s']:.2f} / {r['attach_warm_s']:.2f} | {r['prototypes_s']:.2f} | "
              f"{f['paired']:.3f} · {f['median']:.3f} ({f['min']:.3f}-{f['max']:.3f}) | "
              f"{g['paired']:.3f} · {g['median']:.3f} ({g['min']:.3f}-{g['max']:.3f}) "
              f"| {r['trace_bytes_per_token']:.0f} ({r['dense_trace_bytes_per_token']}) | {r['peak_rss_gb']:.2f} | "
              f"{'-' if r['cuda_peak_gb'] is None else format(r['cuda_peak_gb'], '.2f')} |")
    print(f"total {out['total_s']:.0f} s")
    print(f"wrote {write_json(args.out, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
