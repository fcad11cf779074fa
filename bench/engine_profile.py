"""Where the time of one routed decode step and one 64-token forward goes (torch.profiler, per-op self CPU time).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/engine_profile.py            # E=16, SmolLM2-shaped random weights
    .venv/bin/python bench/engine_profile.py --experts 64 --rows 20 --device cuda

Base and routed are profiled interleaved, one call per profiling session, so both see the same load; the
table gives, per op, the self time per call of each side and the difference (what routing adds), largest
first; the fused C++ kernels appear as `fused::route_one` / `fused::route_rows`. Absolute times on a loaded
machine are not a benchmark (bench/arrow_speed.py is); the differences and the op counts are what docs/engine.md
quotes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_base import random_base, random_experts  # noqa: E402

from explorer.routing import fused  # noqa: E402
from explorer.routing.config import RouterConfig  # noqa: E402
from explorer.routing.device import resolve_device  # noqa: E402
from explorer.routing.model import RoutedModel  # noqa: E402


def cache_of(out):
    """The KV cache of a model output (`cache` in transformers >= 5.2x, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


CACHE_ARG = "cache" if "cache" in __import__("inspect").signature(
    __import__("transformers").LlamaForCausalLM.forward).parameters else "past_key_values"


@torch.no_grad()
def step_fn(base, ids, device):
    """A function running one decode step after a 32-token prefill (the cache is rebuilt per call: cropped)."""
    model = base.model
    out = model(input_ids=ids[:, :32], use_cache=True)
    cache, nxt = cache_of(out), ids[:, 32:33]

    @torch.no_grad()
    def run():
        model(input_ids=nxt, **{CACHE_ARG: cache}, use_cache=True)
        cache.crop(-1)  # drop the step's token again (negative: remove, in every transformers 4.4x-5.x)
    return run


def forward_fn(base, ids):
    return torch.no_grad()(lambda: base.model(input_ids=ids))


def visible_kernels() -> None:
    """The fused C++ kernels (explorer/routing/fused.py) are called through pybind, not torch's dispatcher, so
    the profiler would not list them: wrap each call in a `record_function` named after it (here only; the
    engine's hot path carries no such wrapper)."""
    from torch.profiler import record_function

    for getter, label in ((fused.kernel, "fused::route_one"), (fused.rows, "fused::route_rows")):
        fn = getter()
        if fn is None:
            continue

        def wrapped(*args, fn=fn, label=label):
            with record_function(label):
                return fn(*args)
        setattr(fused, getter.__name__, lambda wrapped=wrapped: wrapped)


def profile_pair(sides: dict, device, reps: int, rows: int) -> tuple[str, dict]:
    """Profile base and routed interleaved in one session (so both see the same load), then per op: self
    time per call of each side and the difference, largest difference first. Returns a markdown table and
    the total self time per call of each side (ms)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for fn in sides.values():
        fn()
    per: dict[str, dict[str, float]] = {name: {} for name in sides}
    calls: dict[str, dict[str, float]] = {name: {} for name in sides}
    for name, fn in [(n, f) for _ in range(reps) for n, f in sides.items()]:
        with profile(activities=acts) as prof:
            fn()
        for e in prof.key_averages():
            t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
            per[name][e.key] = per[name].get(e.key, 0.0) + t / reps / 1e3  # ms per call
            calls[name][e.key] = calls[name].get(e.key, 0.0) + e.count / reps
    a, b = list(sides)
    keys = sorted(set(per[a]) | set(per[b]), key=lambda k: -(per[b].get(k, 0) - per[a].get(k, 0)))
    lines = [f"| op | {a} ms | {b} ms | {b} - {a} ms | calls {a} / {b} |", "|---|---|---|---|---|"]
    for k in keys[:rows]:
        pa, pb = per[a].get(k, 0), per[b].get(k, 0)
        lines.append(f"| {k} | {pa:.2f} | {pb:.2f} | {pb - pa:+.2f} | "
                     f"{calls[a].get(k, 0):.0f} / {calls[b].get(k, 0):.0f} |")
    totals = {n: sum(v.values()) for n, v in per.items()}
    lines.append(f"| **total** | {totals[a]:.2f} | {totals[b]:.2f} | {totals[b] - totals[a]:+.2f} | "
                 f"{sum(calls[a].values()):.0f} / {sum(calls[b].values()):.0f} |")
    return "\n".join(lines), totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--reps", type=int, default=10, help="profiled calls per table")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trace", action="store_true", help="profile with routing capture on")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    visible_kernels()
    torch.manual_seed(0)
    base = random_base("smollm2", device=device)
    ids = torch.randint(200, 40000, (1, 64), device=device)
    rm = RoutedModel(base, random_experts(base, args.experts), RouterConfig(top_k=args.top_k))
    base.model.to(device)
    arrow, plain = RouterConfig(top_k=args.top_k), RouterConfig(mode="base")

    def routed(fn, router):
        def run():
            rm.set_router(router)
            if args.trace:
                with rm.capturing():  # recording only; assembling is timed by bench/trace_memory.py
                    fn()
            else:
                fn()
        return run

    rm.set_router(arrow)
    for name, fn in (("decode step", step_fn(base, ids, device)), ("forward 64 tokens", forward_fn(base, ids))):
        text, totals = profile_pair({"base": routed(fn, plain), "routed": routed(fn, arrow)}, device, args.reps,
                                    args.rows)
        print(f"\n## {name}, E={args.experts}, top-{args.top_k}{', tracing' if args.trace else ''}: "
              f"profiled self time per call base {totals['base']:.1f} ms, routed {totals['routed']:.1f} ms "
              f"(ratio {totals['routed'] / totals['base']:.3f})\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
