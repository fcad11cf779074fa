"""Arrow routing speed: ours against the base model and against PEFT's Arrow, base and routed interleaved.

Usage::

    .venv/bin/python bench/arrow_speed.py                     # SmolLM2 fp32 on the CPU; writes bench/results/
    .venv/bin/python bench/arrow_speed.py --quick             # E=16 only, no PEFT / Phi-2 part (a smoke run)
    .venv/bin/python bench/arrow_speed.py --random-base --device cuda    # what bench/gpu_check.sh runs

SmolLM2-135M (or, with --random-base, random weights with its exact config) with random rank-4 q/k/v/o experts
(B non-zero), top-4, for E = 16 and E = 64: routed/base forward on 64 tokens, routed/base generation tokens per
second, ours/PEFT-Arrow forward on the same adapters (PEFT via `create_arrow_model`), time to attach the library
from disk (prototype cache cold and warm; the derived-data cache is an empty folder of this run, so "cold"
computes and writes every prototype whatever earlier runs cached), the trace on/off ratio, one expert alone /
base (mode "expert", how a per-prompt router answers; `alone_dense`: the same through the general fixed-weight
path, as before the one-expert path existed; issue 14 sets no goal for these), per-token generation without the
fused kernels (`generation_ratio_torch_ops`: prefill and steps on the torch ops they replace); then exact
prototypes for 256 experts at Phi-2 shapes (hidden 2560, 32 layers, q/k/v/dense, rank 4) against a dense SVD on
a sample.

Timing: on the CPU, CPU time of this process (torch runs one intra-op thread when OMP_NUM_THREADS=1), so time
the CPU spends on other jobs does not count; on CUDA, wall time after synchronising. Every repetition runs
each compared side once, in rotating order, so drift hits both alike. Reported per ratio: `paired`, the median
of the repetitions' own ratios (each pairs two calls made within one repetition, so slow drift of the host
cancels; the goals' verdicts read it), `median`, the ratio of the two sides' medians (what runs before
2026-11-30's fourth session reported), the spread min-max of the repetitions' ratios, and every repetition's
times. Goals are issue 14's.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from unittest import mock
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench.eval_common import write_json  # noqa: E402

from random_base import random_base, random_experts  # noqa: E402

from explorer.routing import fused  # noqa: E402
from explorer.routing.config import RouterConfig  # noqa: E402
from explorer.routing.device import add_device_arguments, resolve_device, resolve_dtype, synchronize  # noqa: E402
from explorer.routing.inject import CHUNK_FLOATS  # noqa: E402
from explorer.routing.prototypes import compute_prototypes  # noqa: E402
from explorer.routing.model import RoutedModel  # noqa: E402
from library_store.models import load_base_model  # noqa: E402
from library_store.store.library import ExpertLibrary  # noqa: E402
from library_store.store.user_cache import CACHE_ENV  # noqa: E402

# (figure, E) -> (goal, higher is better); issue 14's table
GOALS = {("forward_ratio", 16): (1.10, False), ("forward_ratio", 64): (1.25, False),
         ("generation_ratio", 16): (0.92, True), ("generation_ratio", 64): (0.85, True),
         ("vs_peft_forward", 16): (0.6, False), ("vs_peft_forward", 64): (0.45, False),
         ("attach_cold_s", 64): (2.0, False), ("trace_ratio", 16): (1.05, False), ("trace_ratio", 64): (1.05, False),
         ("phi2_prototypes_s", 256): (3.0, False)}
PROMPT = "Tell me about the history of Paris in a few sentences."


class Clock:
    """CPU time of this process on the CPU, synchronised wall time on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn) -> float:
        synchronize(self.device)
        t0 = time.perf_counter() if self.device.type == "cuda" else time.process_time()
        fn()
        synchronize(self.device)
        return (time.perf_counter() if self.device.type == "cuda" else time.process_time()) - t0


def interleaved(clock: Clock, sides: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per side per repetition; each repetition runs every side once, in rotating order."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(clock(sides[name]))
    return times


def ratio(times: dict, num: str, den: str) -> dict:
    """num/den: the median of the per-repetition ratios (`paired`), the ratio of medians, min and max of the
    per-repetition ratios, and the times themselves (seconds per repetition, in order)."""
    per_rep = [a / b for a, b in zip(times[num], times[den])]
    return {"paired": statistics.median(per_rep),
            "median": statistics.median(times[num]) / statistics.median(times[den]),
            "min": min(per_rep), "max": max(per_rep), "reps": len(per_rep),
            "times": {num: list(times[num]), den: list(times[den])}}


@torch.no_grad()
def bench_library(E, base, experts, lib_path, peft_paths, args, clock, device) -> dict:
    res: dict = {"E": E}
    ids = torch.randint(200, 40000, (1, 64), generator=torch.Generator().manual_seed(E)).to(device)
    peft_base = copy.deepcopy(base.model) if peft_paths else None  # before attach: a plain copy for PEFT
    if lib_path is not None and E == 64:  # attach from disk: weights read and checked, prototypes cold / warm
        for state in ("cold", "warm"):
            t0 = time.perf_counter()
            rm = RoutedModel.from_library(base, ExpertLibrary.open(lib_path), RouterConfig(top_k=4))
            synchronize(device)
            res[f"attach_{state}_s"] = time.perf_counter() - t0
    else:
        rm = RoutedModel(base, experts[:E], RouterConfig(top_k=4))
    base.model.to(device)
    arrow, plain = RouterConfig(top_k=args.top_k, input_centre=args.input_centre), RouterConfig(mode="base")
    rm.set_router(arrow)  # input centring measures its means here, once, outside the timed calls
    prompt_ids = rm.encode(PROMPT)[0].to(device)
    n_new = args.new_tokens

    def fwd(router):
        def run():
            rm.set_router(router)
            base.model(input_ids=ids)
        return run

    def gen(router):
        def run():
            rm.set_router(router)
            base.model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n_new,
                                min_new_tokens=n_new, do_sample=False, pad_token_id=base.tokenizer.pad_token_id)
        return run

    def traced():
        rm.set_router(arrow)
        with rm.capturing() as records:
            base.model(input_ids=ids)
        rm._assemble(records, ids.shape[1])

    # one expert alone (mode "expert", how a per-prompt router answers), and the same weights through the general
    # fixed-weight path (uniform over one enabled expert: how per-prompt answers ran before the one-expert path)
    one = experts[0].name
    alone = RouterConfig(mode=f"expert:{one}", input_centre=args.input_centre)
    dense = RouterConfig(mode="uniform", disabled=tuple(e.name for e in experts[1:E]), input_centre=args.input_centre)
    t = interleaved(clock, {"base": fwd(plain), "routed": fwd(arrow), "traced": traced, "alone": fwd(alone),
                            "alone_dense": fwd(dense)}, args.reps)
    res.update(base_forward_s=statistics.median(t["base"]), routed_forward_s=statistics.median(t["routed"]),
               forward_ratio=ratio(t, "routed", "base"), trace_ratio=ratio(t, "traced", "routed"),
               alone_forward_ratio=ratio(t, "alone", "base"), alone_dense_forward_ratio=ratio(t, "alone_dense", "base"))
    def torch_ops():  # per-token Arrow generation without the fused kernels (explorer/routing/fused.py)
        fused.set_enabled(False)
        try:
            gen(arrow)()
        finally:
            fused.set_enabled(True)

    g = interleaved(clock, {"base": gen(plain), "routed": gen(arrow), "routed_torch_ops": torch_ops,
                            "alone": gen(alone), "alone_dense": gen(dense)}, args.gen_reps)
    res.update(base_tok_s=n_new / statistics.median(g["base"]), routed_tok_s=n_new / statistics.median(g["routed"]),
               generation_ratio=ratio(g, "base", "routed"),  # time base / time routed = routed tok/s / base tok/s
               generation_ratio_torch_ops=ratio(g, "base", "routed_torch_ops"),
               alone_generation_ratio=ratio(g, "base", "alone"),
               alone_dense_generation_ratio=ratio(g, "base", "alone_dense"))
    if peft_paths:
        from peft import ArrowConfig, create_arrow_model

        t0 = time.perf_counter()
        peft = create_arrow_model(peft_base, peft_paths[:E],
                                  ArrowConfig(top_k=args.top_k, router_temperature=1.0)).eval()
        res["peft_attach_s"] = time.perf_counter() - t0
        peft.to(device)
        peft(input_ids=ids)  # builds PEFT's prototypes, once
        rm.set_router(arrow)
        t = interleaved(clock, {"ours": lambda: base.model(input_ids=ids), "peft": lambda: peft(input_ids=ids)},
                        args.reps)
        res.update(peft_forward_s=statistics.median(t["peft"]), ours_forward_s=statistics.median(t["ours"]),
                   vs_peft_forward=ratio(t, "ours", "peft"))
        del peft, peft_base
    rm.detach()
    gc.collect()
    return res


@torch.no_grad()
def bench_phi2_prototypes(n_experts=256, layers=32, modules=4, d=2560, r=4, sample=2, device="cpu") -> dict:
    """Prototype time at Phi-2 shapes, batched the way attaching does it (chunks of CHUNK_FLOATS)."""
    sites = layers * modules
    per_chunk = max(1, CHUNK_FLOATS // (n_experts * r * 2 * d))  # sites per batched call, as in attach
    gen = torch.Generator().manual_seed(0)
    clock = Clock(torch.device(device))
    total, done, kept = 0.0, 0, None
    while done < sites:
        n = min(per_chunk, sites - done)
        A = (torch.randn(n * n_experts, r, d, generator=gen) / d ** 0.5).to(device)  # (n E, r, d)
        B = (torch.randn(n * n_experts, d, r, generator=gen) * 0.05).to(device)  # (n E, out, r)
        out = {}
        total += clock(lambda: out.setdefault("p", compute_prototypes(A, B)))  # (n E, d)
        if kept is None:
            kept = (A[:sample].cpu(), B[:sample].cpu(), out["p"][:sample].cpu())
        done += n
        del A, B, out
    A, B, protos = kept
    worst_cos, dense_s = 0.0, []
    for i in range(sample):
        t0 = time.process_time()
        v = torch.linalg.svd(B[i].double() @ A[i].double()).Vh[0]  # dense (d, d) SVD: the slow, obvious way
        dense_s.append(time.process_time() - t0)
        worst_cos = max(worst_cos, 1 - abs(float(torch.dot(protos[i].double(), v))))
    return {"experts": n_experts, "sites": sites, "shape": [d, d], "rank": r, "phi2_prototypes_s": total,
            "sample": sample, "max_one_minus_abs_cos": worst_cos, "dense_svd_s_per_module": statistics.mean(dense_s)}


def verdict(value: float, key: tuple) -> str:
    if key not in GOALS:
        return ""
    goal, higher = GOALS[key]
    ok = value >= goal if higher else value <= goal
    return f"{'ok' if ok else 'MISS'} ({'>=' if higher else '<='} {goal})"


def table(out: dict) -> str:
    """The results as a markdown table with the goals."""
    rows = ["| figure | E | paired median | ratio of medians | min-max | goal (on the paired median) |",
            "|---|---|---|---|---|---|"]

    def row(name, E, r):
        if isinstance(r, dict):
            rows.append(f"| {name} | {E} | {r['paired']:.3f} | {r['median']:.3f} | {r['min']:.3f}-{r['max']:.3f} "
                        f"(n={r['reps']}) | {verdict(r['paired'], (name, E))} |")
        else:
            rows.append(f"| {name} | {E} | {r:.2f} | | | {verdict(r, (name, E))} |")

    for r in out["libraries"]:
        for name in ("forward_ratio", "generation_ratio", "vs_peft_forward", "trace_ratio", "attach_cold_s",
                     "attach_warm_s", "peft_attach_s", "generation_ratio_torch_ops", "alone_forward_ratio",
                     "alone_generation_ratio",
                     "alone_dense_forward_ratio", "alone_dense_generation_ratio"):
            if name in r:
                row(name, r["E"], r[name])
    if "phi2" in out:
        row("phi2_prototypes_s", out["phi2"]["experts"], out["phi2"]["phi2_prototypes_s"])
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--random-base", action="store_true", help="random weights with SmolLM2's config (no download)")
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--reps", type=int, default=15, help="forward repetitions per side (>= 5; a forward is cheap, "
                   "and host noise moved a 7-repetition median by up to 0.1 here)")
    p.add_argument("--gen-reps", type=int, default=7, help="generation repetitions per side (>= 5; 5 left a "
                   "generation ratio's spread at 0.82-1.03 on a noisy host)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--top-k", type=int, default=4, help="routed top-k (the issue's table: 4)")
    p.add_argument("--input-centre", choices=["none", "base"], default="none",
                   help="input centring (the demo libraries' default routers use base)")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    p.add_argument("--quick", action="store_true", help="E=16 only, 3 repetitions, no PEFT, no Phi-2 part")
    add_device_arguments(p, default="cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "arrow_speed.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.experts, args.reps, args.gen_reps, args.no_peft = [16], 3, 3, True
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    started = time.perf_counter()
    base = random_base("smollm2", dtype=dtype) if args.random_base else load_base_model(args.base_model, dtype=dtype)
    base.model.to(device)
    experts = random_experts(base, max(args.experts))
    out = {"command": "python bench/arrow_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "base_model": base.source, "rank": 4, "top_k": args.top_k, "input_centre": args.input_centre,
           "device": str(device), "dtype": str(dtype),
           "targets": base.targets, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "goals": {f"{k[0]}@{k[1]}": v[0] for k, v in GOALS.items()}, "libraries": []}
    clock = Clock(device)
    # derived data (prototypes, input means) in an empty folder of this run: until 2026-12-02 a "cold" attach found
    # the prototypes an earlier run on the machine had cached for the same seeded experts
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {CACHE_ENV: str(Path(tmp) / "derived")}):
        lib_path, peft_paths = None, []
        if 64 in args.experts or not args.no_peft:  # the library on disk: attach timing, PEFT's adapter folders
            lib_path = Path(tmp) / "lib"
            lib = ExpertLibrary.create(lib_path, base)
            for e in experts:
                lib.add(e)
            if not args.no_peft:
                peft_paths = [str(lib.export(e.name, Path(tmp) / "peft" / e.name)) for e in experts]
        for E in args.experts:
            print(f"E={E} ...", flush=True)
            out["libraries"].append(bench_library(E, base, experts, lib_path, peft_paths, args, clock, device))
    if not args.quick:
        print("Phi-2 prototypes ...", flush=True)
        out["phi2"] = bench_phi2_prototypes(device=str(device))
    out["total_s"] = time.perf_counter() - started
    print(f"\nArrow routing speed ({base.source}, {device}, {dtype}, rank 4, top-{args.top_k}, input centring "
          f"{args.input_centre}; medians of per-repetition ratios and ratios of medians, "
          f"min-max of per-repetition ratios)\n" + table(out))
    for r in out["libraries"]:
        print(f"E={r['E']}: forward {r['routed_forward_s'] * 1e3:.0f} / {r['base_forward_s'] * 1e3:.0f} ms, "
              f"generation {r['routed_tok_s']:.1f} / {r['base_tok_s']:.1f} tok/s (routed / base)")
    print(f"total {out['total_s']:.0f} s")
    print(f"wrote {write_json(args.out, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
