"""Build scaling: the same tiny build locally and on a local Ray (Ray's cost per expert), then a projection of
a 256-expert Phi-2 library on N GPU workers.

Usage::

    .venv/bin/python bench/build_scaling.py            # 8 experts; writes bench/results/build_scaling.json
    .venv/bin/python bench/build_scaling.py --quick    # 2 experts, 5 steps: checks the bench runs (~1-2 min)
    .venv/bin/python bench/build_scaling.py --phi2-expert-s 600 --gpus 1,8,64   # your own measured GPU time

MEASURED here (tiny-random-llama, the first E built-in tasks, fp32 so equality is bit for bit):
  - local: `build private` in this process, one expert after another;
  - Ray, 1 worker (warm): the same build as Ray tasks on a local Ray with 1 CPU; against the local build this
    isolates what Ray adds per expert (dispatch, a worker's model cache lookup, safetensors through the object
    store, the driver's poll) without any parallel speed-up;
  - Ray, W workers (warm): the same on W CPUs (speed-up bounded by the cores this machine really has free);
  - Ray start (ray.init) and a cold first build (workers import torch and load the model once);
  - that every Ray-built expert equals the local one (checksums).
PROJECTED (nothing of it runs here; there is no GPU): wall time of 256 Phi-2 experts on N GPU workers =
  model load once per worker + ceil(256 / N) * (per-expert GPU time + the measured Ray cost per expert).
  The per-expert GPU time is --phi2-expert-s if given, else a FLOP estimate, labelled as such: LoRA training
  costs ~4 * params * tokens FLOPs per step (forward 2, backward to the activations 2; the frozen weights get no
  gradient), at an assumed sustained --gpu-tflops.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from library_store.models import load_base_model  # noqa: E402
from library_store.tasks import resolve_tasks  # noqa: E402
from library_store.tasks import builtin_names  # noqa: E402
from library_store.training.build import build_private  # noqa: E402
from library_store.training.ray_build import RayExecutor  # noqa: E402
from library_store.training.train import TrainConfig  # noqa: E402

PHI2_PARAMS = 2.78e9
N_EXPERTS = 256


def _build(base, tasks, out: Path, config: TrainConfig, executor=None) -> tuple[float, dict]:
    start = time.perf_counter()
    lib = build_private(base, tasks, out, config, save_dtype="fp32", executor=executor)
    return time.perf_counter() - start, lib.checksums()


def _start_ray(cpus: int, temp_dir: str) -> float:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    return time.perf_counter() - start


def measure(n: int, steps: int, workers: int, work: Path) -> dict:
    """Wall times (s) of the same n-expert build: local, Ray cold / warm with 1 worker, Ray warm with W."""
    import ray

    import torch

    torch.set_num_threads(1)  # as each Ray worker (cpus_per_expert=1): equal thread counts give equal sums
    base = load_base_model("tiny-random-llama")
    tasks = resolve_tasks("builtin:" + ",".join(builtin_names(include_variants=False)[:n]))
    config = TrainConfig(steps=steps, batch_size=4, progress=False)
    out: dict = {"experts": n, "steps": steps, "workers": workers}
    out["local_s"], reference = _build(base, tasks, work / "local", config)
    same = True
    for cpus in (1, workers):
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        try:
            out[f"ray_start_s_{cpus}"] = _start_ray(cpus, temp_dir)
            ex = RayExecutor(cpus_per_expert=1)
            cold, sums = _build(base, tasks, work / f"ray{cpus}-cold", config, ex)
            warm, warm_sums = _build(base, tasks, work / f"ray{cpus}-warm", config, ex)
            same &= sums == reference == warm_sums
            out[f"ray{cpus}_cold_s"], out[f"ray{cpus}_warm_s"] = cold, warm
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    out["ray_equals_local"] = same
    out["local_per_expert_s"] = out["local_s"] / n
    out["ray_overhead_per_expert_s"] = (out["ray1_warm_s"] - out["local_s"]) / n
    out[f"speedup_{workers}_workers"] = out["local_s"] / out[f"ray{workers}_warm_s"]
    return out


def phi2_expert_seconds(args) -> tuple[float, str]:
    if args.phi2_expert_s:
        return args.phi2_expert_s, "given (--phi2-expert-s)"
    flops = 4 * PHI2_PARAMS * args.phi2_batch * args.phi2_seq * args.phi2_steps
    how = (f"FLOP estimate, not measured: 4 x {PHI2_PARAMS:.2e} params x {args.phi2_batch}x{args.phi2_seq} tokens "
           f"x {args.phi2_steps} steps at {args.gpu_tflops:g} sustained TFLOP/s")
    return flops / (args.gpu_tflops * 1e12), how


def project(expert_s: float, overhead_s: float, load_s: float, gpus: list[int]) -> list[dict]:
    rows = []
    for n in gpus:
        waves = math.ceil(N_EXPERTS / n)
        wall = load_s + waves * (expert_s + max(overhead_s, 0.0))
        rows.append({"gpu_workers": n, "waves": waves, "wall_h": wall / 3600})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per tiny expert")
    ap.add_argument("--workers", type=int, default=2, help="Ray CPUs for the parallel run")
    ap.add_argument("--quick", action="store_true", help="2 experts, 5 steps, nothing written")
    ap.add_argument("--phi2-expert-s", type=float, default=None, help="measured seconds per Phi-2 expert on one GPU")
    ap.add_argument("--phi2-steps", type=int, default=1000, help="assumed steps per Phi-2 expert")
    ap.add_argument("--phi2-batch", type=int, default=8)
    ap.add_argument("--phi2-seq", type=int, default=512, help="assumed tokens per example")
    ap.add_argument("--gpu-tflops", type=float, default=100.0,
                    help="assumed sustained bf16 TFLOP/s per GPU (an A100 at ~1/3 of peak)")
    ap.add_argument("--phi2-load-s", type=float, default=60.0, help="assumed Phi-2 load per worker (once)")
    ap.add_argument("--gpus", default="1,8,32,64,256", help="GPU worker counts to project")
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/build_scaling.json)")
    args = ap.parse_args()
    if args.quick:
        args.experts, args.steps = 2, 5
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))  # token auth without a ~/.ray/auth_token file

    work = Path(tempfile.mkdtemp(prefix="build-scaling-"))
    try:
        measured = measure(args.experts, args.steps, args.workers, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    expert_s, how = phi2_expert_seconds(args)
    rows = project(expert_s, measured["ray_overhead_per_expert_s"], args.phi2_load_s,
                   [int(g) for g in args.gpus.split(",")])

    m = measured
    print(f"MEASURED on this machine: {m['experts']} tiny experts x {m['steps']} steps")
    print(f"  local build                 {m['local_s']:7.1f} s  ({m['local_per_expert_s']:.2f} s/expert)")
    w = args.workers
    print(f"  ray start (1 / {w} CPUs)        {m['ray_start_s_1']:7.1f} / {m[f'ray_start_s_{w}']:.1f} s")
    print(f"  ray 1 worker, cold / warm   {m['ray1_cold_s']:7.1f} / {m['ray1_warm_s']:.1f} s")
    print(f"  ray {args.workers} workers, cold / warm  {m[f'ray{args.workers}_cold_s']:7.1f} / "
          f"{m[f'ray{args.workers}_warm_s']:.1f} s  (speed-up {m[f'speedup_{args.workers}_workers']:.2f}x)")
    print(f"  Ray cost per expert (warm 1 worker - local) / n: {m['ray_overhead_per_expert_s']:+.2f} s")
    print(f"  Ray experts equal the local ones: {m['ray_equals_local']}")
    print(f"PROJECTED: {N_EXPERTS} Phi-2 experts, {expert_s / 60:.1f} min per expert ({how}), "
          f"+ {args.phi2_load_s:.0f} s model load per worker")
    for r in rows:
        print(f"  {r['gpu_workers']:4d} GPU workers: {r['waves']:3d} waves, {r['wall_h']:7.2f} h")
    if not args.quick or args.out:
        path = Path(args.out or ROOT / "bench" / "results" / "build_scaling.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"measured": measured, "projected": {
            "phi2_expert_s": expert_s, "phi2_expert_s_source": how, "phi2_load_s": args.phi2_load_s,
            "experts": N_EXPERTS, "rows": rows}}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
