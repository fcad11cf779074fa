"""Arrow routing speed: ours against the base model and against PEFT's Arrow, from one interleaved run.

Usage::

    .venv/bin/python bench/arrow_speed.py            # ~5-8 min on 2 busy cores; writes bench/results/arrow_speed.json

SmolLM2-135M (fp32) with random rank-4 q/k/v/o experts (B non-zero), top-4, for E = 16 and E = 64:
routed/base forward on 64 tokens, routed/base generation tokens per second, ours/PEFT-Arrow forward on the same
adapters (PEFT via `create_arrow_model` on the exported PEFT folders), time to attach the library (from disk,
prototype cache cold and warm) and the trace on/off ratio; then prototypes for 256 experts at Phi-2 shapes
(hidden 2560, 32 layers, q/k/v/dense, rank 4) with the largest deviation from a dense SVD on a sample.

Timing: CPU time of this process (torch runs one intra-op thread here), so time the CPU spends on other
workers' jobs does not count; repetitions alternate between the compared sides so drift hits both alike.
Ratios are of medians. Goals are the issue's.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.routing.layer import compute_prototypes  # noqa: E402
from explorer.routing.inject import random_expert  # noqa: E402
from explorer.routing.model import RoutedModel, RouterConfig  # noqa: E402
from library_store.models import load_base_model  # noqa: E402
from library_store.store.library import ExpertLibrary  # noqa: E402

GOALS = {
    "forward_ratio": {16: 1.15, 64: 1.5}, "generation_ratio": {16: 0.85}, "vs_peft_forward": {16: 0.6, 64: 0.45},
    "attach_s": {64: 5.0}, "trace_ratio": 1.05, "phi2_prototypes_s": 5.0,
}
PROMPT = "Tell me about the history of Paris in a few sentences."


def cpu(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def interleaved(sides: dict, reps: int) -> dict[str, float]:
    """Median CPU seconds per side; each repetition runs every side once, in rotating order."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(cpu(sides[name]))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def bench_library(E, base, experts, lib_path, peft_paths, args) -> dict:
    res: dict = {"E": E}
    ids = torch.randint(200, 40000, (1, 64), generator=torch.Generator().manual_seed(E))
    if E == 64:  # attach from disk: weights read and checked, prototypes computed (cold) or cached (warm)
        for state in ("cold", "warm"):
            t0 = time.perf_counter()
            rm = RoutedModel.from_library(base, ExpertLibrary.open(lib_path), RouterConfig(top_k=4))
            res[f"attach_{state}_s"] = time.perf_counter() - t0
    else:
        rm = RoutedModel(base, experts[:E], RouterConfig(top_k=4))
    arrow, plain = RouterConfig(top_k=4), RouterConfig(mode="base")

    def fwd(router):
        def run():
            rm.set_router(router)
            base.model(input_ids=ids)
        return run

    prompt_ids = rm.encode(PROMPT)[0]
    n_new = args.new_tokens

    def gen(router):
        def run():
            rm.set_router(router)
            base.model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n_new,
                                min_new_tokens=n_new, do_sample=False, pad_token_id=base.tokenizer.pad_token_id)
        return run

    def traced():
        rm.set_router(arrow)
        with rm.capturing():
            base.model(input_ids=ids)

    t = interleaved({"base": fwd(plain), "routed": fwd(arrow), "traced": traced}, args.reps)
    res.update(base_forward_s=t["base"], routed_forward_s=t["routed"], forward_ratio=t["routed"] / t["base"],
               trace_ratio=t["traced"] / t["routed"])
    g = interleaved({"base": gen(plain), "routed": gen(arrow)}, args.gen_reps)
    res.update(base_tok_s=n_new / g["base"], routed_tok_s=n_new / g["routed"], generation_ratio=g["base"] / g["routed"])
    if E == 16 and not args.quick:  # the shared q/k/v matmul, measured: keep it only if it helps
        shared = {"on": [], "off": []}
        for rep in range(args.gen_reps):
            for share in (True, False):
                rm = RoutedModel(base, experts[:E], arrow, share_inputs=share)
                shared["on" if share else "off"].append(cpu(gen(arrow)))
        rm = RoutedModel(base, experts[:E], arrow)
        res["shared_qkv_generation_speedup"] = statistics.median(shared["off"]) / statistics.median(shared["on"])

    # PEFT's Arrow on the same adapters, on its own copy of the base model
    from peft import ArrowConfig, create_arrow_model

    peft_base = load_base_model(args.base_model).model
    t0 = time.perf_counter()
    peft = create_arrow_model(peft_base, peft_paths[:E], ArrowConfig(top_k=4, router_temperature=1.0)).eval()
    res["peft_attach_s"] = time.perf_counter() - t0
    peft(input_ids=ids)  # builds PEFT's prototypes, once
    rm.set_router(arrow)
    t = interleaved({"ours": lambda: base.model(input_ids=ids), "peft": lambda: peft(input_ids=ids)}, args.reps)
    res.update(peft_forward_s=t["peft"], ours_forward_s=t["ours"], vs_peft_forward=t["ours"] / t["peft"])
    del peft, peft_base
    rm.detach()
    gc.collect()
    return res


@torch.no_grad()
def bench_phi2_prototypes(n_experts=256, layers=32, modules=4, d=2560, r=4, sample=2) -> dict:
    """Prototype time at Phi-2 shapes, batched the way attaching does it (chunks of <= 128 MB)."""
    sites = layers * modules
    per_chunk = max(1, (1 << 25) // (n_experts * r * 2 * d))  # sites per batched call, as in attach
    gen = torch.Generator().manual_seed(0)
    total, done, kept = 0.0, 0, None
    while done < sites:
        n = min(per_chunk, sites - done)
        A = torch.randn(n * n_experts, r, d, generator=gen) / d ** 0.5  # (n E, r, d)
        B = torch.randn(n * n_experts, d, r, generator=gen) * 0.05  # (n E, out, r)
        t0 = time.process_time()
        protos = compute_prototypes(A, B)  # (n E, d)
        total += time.process_time() - t0
        if kept is None:
            kept = (A[:sample].clone(), B[:sample].clone(), protos[:sample].clone())
        done += n
        del A, B, protos
    A, B, protos = kept
    worst_cos, worst_abs, dense_s = 0.0, 0.0, []
    for i in range(sample):
        t0 = time.process_time()
        v = torch.linalg.svd(B[i].double() @ A[i].double()).Vh[0]  # dense (d, d) SVD: the slow, obvious way
        dense_s.append(time.process_time() - t0)
        p = protos[i].double()
        cos = float(torch.dot(p, v))
        worst_cos = max(worst_cos, 1 - abs(cos))
        worst_abs = max(worst_abs, float((p - torch.sign(torch.tensor(cos)) * v).abs().max()))
    return {"experts": n_experts, "sites": sites, "shape": [d, d], "rank": r, "phi2_prototypes_s": total,
            "sample": sample, "max_one_minus_abs_cos": worst_cos, "max_abs_diff": worst_abs,
            "dense_svd_s_per_module": statistics.mean(dense_s),
            "dense_svd_whole_library_h": statistics.mean(dense_s) * sites * n_experts / 3600}


def verdict(value, goal, higher_is_better=False) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    return f"{'ok ' if ok else 'MISS'} (goal {'>=' if higher_is_better else '<='} {goal})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--reps", type=int, default=5, help="forward repetitions per side")
    p.add_argument("--gen-reps", type=int, default=3, help="generation repetitions per side")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--quick", action="store_true", help="E=16 only, no Phi-2 part (a smoke run)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "arrow_speed.json"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    base = load_base_model(args.base_model)
    experts = [random_expert(base.model, base.targets, f"e{i:02d}", rank=4, alpha=16, seed=i) for i in range(64)]
    out = {"command": "python bench/arrow_speed.py", "base_model": args.base_model, "rank": 4, "top_k": 4,
           "targets": base.targets, "torch_threads": torch.get_num_threads(), "goals": GOALS, "libraries": []}
    with tempfile.TemporaryDirectory() as tmp:
        lib = ExpertLibrary.create(Path(tmp) / "lib", base)
        for e in experts:
            lib.add(e)
        peft_paths = [str(lib.export(e.name, Path(tmp) / "peft" / e.name)) for e in experts]
        for E in (16,) if args.quick else (16, 64):
            print(f"E={E} ...", flush=True)
            out["libraries"].append(bench_library(E, base, experts, Path(tmp) / "lib", peft_paths, args))
    if not args.quick:
        print("Phi-2 prototypes ...", flush=True)
        out["phi2"] = bench_phi2_prototypes()
    out["total_s"] = time.perf_counter() - started

    print(f"\nArrow routing speed ({args.base_model}, rank 4, top-4, CPU time, medians of interleaved runs)")
    for r in out["libraries"]:
        E = r["E"]
        print(f"E={E}")
        print(f"  routed/base forward, 64 tokens : {r['forward_ratio']:.2f}  "
              f"({r['routed_forward_s']*1e3:.0f} / {r['base_forward_s']*1e3:.0f} ms)  "
              + verdict(r["forward_ratio"], GOALS["forward_ratio"][E]))
        line = (f"  routed/base generation tok/s   : {r['generation_ratio']:.2f}  "
                f"({r['routed_tok_s']:.1f} / {r['base_tok_s']:.1f} tok/s)")
        print(line + ("  " + verdict(r["generation_ratio"], GOALS["generation_ratio"][E], True)
                      if E in GOALS["generation_ratio"] else ""))
        print(f"  ours/PEFT-Arrow forward        : {r['vs_peft_forward']:.2f}  "
              f"({r['ours_forward_s']*1e3:.0f} / {r['peft_forward_s']*1e3:.0f} ms)  "
              + verdict(r["vs_peft_forward"], GOALS["vs_peft_forward"][E]))
        print(f"  trace on/off forward           : {r['trace_ratio']:.3f}  " + verdict(r["trace_ratio"], 1.05))
        if "attach_cold_s" in r:
            print(f"  attach from disk, cold / warm  : {r['attach_cold_s']:.2f} s / {r['attach_warm_s']:.2f} s  "
                  + verdict(r["attach_cold_s"], 5.0) + f"   (PEFT create_arrow_model: {r['peft_attach_s']:.1f} s)")
        if "shared_qkv_generation_speedup" in r:
            print(f"  shared q/k/v matmul, gen speed : x{r['shared_qkv_generation_speedup']:.2f}")
    if "phi2" in out:
        ph = out["phi2"]
        print(f"Phi-2 shapes: prototypes for {ph['experts']} experts x {ph['sites']} sites: "
              f"{ph['phi2_prototypes_s']:.2f} s  " + verdict(ph["phi2_prototypes_s"], 5.0))
        print(f"  vs dense SVD on {ph['sample']} samples: max 1-|cos| {ph['max_one_minus_abs_cos']:.1e}, "
              f"max |diff| {ph['max_abs_diff']:.1e}; dense SVD {ph['dense_svd_s_per_module']:.1f} s per module "
              f"(~{ph['dense_svd_whole_library_h']:.0f} h for the library)")
    print(f"total {out['total_s']:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
