"""Where Arrow prototypes point, with and without centring; how fast centring is.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/prototype_geometry.py --library assets/libraries/demo-private
    OMP_NUM_THREADS=1 .venv/bin/python bench/prototype_geometry.py --library L --skip-phi2 --out /tmp/geometry.json

1. For a library trained from one shared LoRA init (a copy in a temporary folder; nothing is written to it): per
   site, the mean and max |cos| between different experts' prototypes, and the share of each prototype's squared
   length inside the 4-dimensional row space of the shared init A (rebuilt from the experts' training seed on
   the base model), for centre "none" and "mean" (docs/design.md, "Centring").
2. How long `set_router` takes to switch centring on that library attached to its base model (cold, then warm).
3. Centred prototypes for 256 random experts at Phi-2 shapes (hidden 2560, 32 layers, q/k/v/dense, rank 4):
   the factor means plus the batched exact prototypes of the centred factors, CPU time of this process (the
   issue's goal is 3 s), next to the raw prototypes of the same factors.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.routing.centring import centred_prototypes, factor_means, site_ranks  # noqa: E402
from explorer.routing.config import RouterConfig  # noqa: E402
from explorer.routing.inject import build_stacks  # noqa: E402
from explorer.routing.state import SiteStack  # noqa: E402
from explorer.routing.prototypes import compute_prototypes  # noqa: E402
from explorer.routing.model import RoutedModel  # noqa: E402
from library_store.models import load_base_model  # noqa: E402
from library_store.store.library import ExpertLibrary  # noqa: E402


def cpu(fn):
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


@torch.no_grad()
def geometry(protos: dict[str, torch.Tensor], init_rows: dict[str, torch.Tensor]) -> dict:
    """protos {site: (E, d)}, init_rows {site: (r, d)} -> mean / max |cos| between experts, mean init share."""
    cos_mean, cos_max, inside = [], [], []
    for site, p in protos.items():
        E = p.shape[0]
        unit = p / p.norm(dim=1, keepdim=True).clamp(min=1e-12)  # (E, d)
        c = (unit @ unit.T).abs()  # (E, E)
        off = c[~torch.eye(E, dtype=torch.bool)]  # (E (E - 1),)
        cos_mean.append(float(off.mean()))
        cos_max.append(float(off.max()))
        q, _ = torch.linalg.qr(init_rows[site].double().T)  # (d, r) orthonormal basis of the init row space
        share = ((unit.double() @ q) ** 2).sum(1)  # (E,) squared length inside it
        inside.append(float(share.mean()))
    return {"mean_abs_cos": statistics.mean(cos_mean), "max_abs_cos": max(cos_max),
            "init_share": statistics.mean(inside), "init_share_max_site": max(inside)}


def shared_init(base, lib, names) -> tuple[dict[str, torch.Tensor], float]:
    """The LoRA init A {site: (r, d)} the experts were trained from (their common seed), and the largest
    relative distance ||A_e - A_init|| / ||A_init|| over experts and sites (small: they did start there)."""
    from library_store.training.train import TrainConfig, lora_init_state

    infos = [lib.info(n) for n in names]
    seeds = {i.train.seed if i.train.init_seed is None else i.train.init_seed for i in infos}
    if len(seeds) != 1:
        raise SystemExit(f"The experts were trained from {len(seeds)} different inits; no shared init to measure.")
    info = infos[0]
    state = lora_init_state(base, TrainConfig(seed=seeds.pop(), rank=info.rank, alpha=info.alpha,
                                              targets=info.target_modules))
    init = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v
            for k, v in state.items() if k.endswith(".lora_A.weight")}
    drift = max(float((a - init[s]).norm() / init[s].norm()) for n in names for s, (a, _) in lib[n].factors().items())
    return init, drift


def library_part(library: str, out: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "lib"
        shutil.copytree(library, copy)
        lib = ExpertLibrary.open(copy, readonly=True)
        names = lib.routable_names()
        experts = [lib[n] for n in names]
        print(f"{len(experts)} experts from {library}; loading the base model ...", flush=True)
        base = load_base_model(lib.fingerprint["source"])
        init, drift = shared_init(base, lib, names)
        stacks = build_stacks(experts)
        ranks = site_ranks(experts, list(stacks))
        raw = {s: st.prototypes for s, st in stacks.items()}
        means = {s: factor_means(st.A, st.B, ranks[s]) for s, st in stacks.items()}
        centred = centred_prototypes(stacks, ranks, means)
        out["library"] = {"path": library, "experts": len(experts), "sites": len(stacks),
                          "max_relative_drift_from_init": drift,
                          "none": geometry(raw, init), "mean": geometry(centred, init)}

        rm = RoutedModel(base, experts, RouterConfig(top_k=4))
        switches = []
        for router in [RouterConfig(top_k=4, centre="mean"),
                       RouterConfig(top_k=4, centre="mean", centre_scope="weights"),
                       RouterConfig(top_k=4), RouterConfig(top_k=4, centre="mean"),
                       RouterConfig(top_k=4, centre="mean", centre_scope="weights")]:
            t0 = time.perf_counter()
            _, c = cpu(lambda: rm.set_router(router))
            switches.append({"to": f"{router.centre}/{router.centre_scope}", "cpu_s": c,
                             "wall_s": time.perf_counter() - t0})
        out["switch"] = switches


def phi2_part(out: dict, n_experts=256, layers=32, modules=("q_proj", "k_proj", "v_proj", "dense"), d=2560, r=4):
    gen = torch.Generator().manual_seed(0)
    stacks, ranks = {}, {}
    for layer in range(layers):
        for m in modules:
            site = f"model.layers.{layer}.self_attn.{m}"
            A = torch.randn(n_experts, r, d, generator=gen) / d ** 0.5  # (E, r, d)
            B = torch.randn(n_experts, d, r, generator=gen) * 0.05  # (E, out, r)
            stacks[site] = SiteStack(site, torch.zeros(n_experts, d), A, B, torch.ones(n_experts))
            ranks[site] = torch.full((n_experts,), r)
    means, t_means = cpu(lambda: {s: factor_means(st.A, st.B, ranks[s]) for s, st in stacks.items()})
    protos, t_protos = cpu(lambda: centred_prototypes(stacks, ranks, means))
    site = next(iter(stacks))
    st = stacks[site]
    check = compute_prototypes(st.A - means[site].A, st.B - means[site].B)  # (E, d) the same, one site alone
    worst = float((1 - (check * protos[site]).sum(1).abs()).max())
    _, t_raw = cpu(lambda: centred_prototypes(stacks, ranks, {}))  # no mean: the raw prototypes, same batching
    out["phi2"] = {"experts": n_experts, "sites": len(stacks), "shape": [d, d], "rank": r,
                   "means_s": t_means, "centred_prototypes_s": t_protos, "centred_total_s": t_means + t_protos,
                   "raw_prototypes_s": t_raw, "max_one_minus_abs_cos_vs_unbatched": worst, "goal_s": 3.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library", default=str(ROOT / "assets" / "libraries" / "demo-private"))
    p.add_argument("--skip-library", action="store_true")
    p.add_argument("--skip-phi2", action="store_true")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    out = {"command": "python bench/prototype_geometry.py " + " ".join(argv or sys.argv[1:]),
           "torch_threads": torch.get_num_threads()}
    if not args.skip_library:
        library_part(args.library, out)
        lib = out["library"]
        print(f"\nPrototype geometry, {lib['experts']} experts x {lib['sites']} sites "
              f"(experts' A moved at most {lib['max_relative_drift_from_init']:.1%} from the shared init)")
        print(f"{'centre':8} {'mean |cos|':>11} {'max |cos|':>10} {'in init rows':>13} {'worst site':>11}")
        for c in ("none", "mean"):
            g = lib[c]
            print(f"{c:8} {g['mean_abs_cos']:11.3f} {g['max_abs_cos']:10.3f} {g['init_share']:13.1%} "
                  f"{g['init_share_max_site']:11.1%}")
        print("\nset_router switch (this library on its base model):")
        for s in out["switch"]:
            print(f"  -> {s['to']:20} {s['cpu_s']:.3f} s CPU, {s['wall_s']:.3f} s wall")
    if not args.skip_phi2:
        print("\nPhi-2 shapes ...", flush=True)
        phi2_part(out)
        ph = out["phi2"]
        print(f"Centred prototypes, {ph['experts']} experts x {ph['sites']} sites at {ph['shape']}, rank {ph['rank']}: "
              f"means {ph['means_s']:.2f} s + prototypes {ph['centred_prototypes_s']:.2f} s = "
              f"{ph['centred_total_s']:.2f} s CPU (goal <= 3 s; raw prototypes {ph['raw_prototypes_s']:.2f} s); "
              f"batched vs alone 1-|cos| <= {ph['max_one_minus_abs_cos_vs_unbatched']:.1e}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
