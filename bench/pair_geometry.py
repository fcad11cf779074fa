"""How alike are two experts of a library, next to every other pair? A probe for confusions such as demo-private's
subtract -> add (docs/evaluation.md).

    .venv/bin/python bench/pair_geometry.py --library assets/libraries/demo-private --a subtract --b add \\
        --out bench/results/pair_geometry-demo-private.json

Per pair of routable experts, averaged over the sites: |cos| of their raw Arrow prototypes, |cos| of their
mean-centred prototypes, and the cosine of their learned updates once the library's mean update is taken out
(<ΔW_a - mean ΔW, ΔW_b - mean ΔW> over the norms; dense, so for small libraries). Per expert: its mean raw and
centred |cos| to all the others. Reads the library only; no model is loaded.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explorer.routing.centring import centred_prototypes, factor_means, site_ranks  # noqa: E402
from explorer.routing.inject import build_stacks  # noqa: E402
from library_store.store.library import ExpertLibrary  # noqa: E402


@torch.no_grad()
def mean_cos(vectors: dict[str, torch.Tensor], absolute: bool) -> torch.Tensor:
    """vectors {site: (E, n)} -> (E, E) cosine between every two experts' vectors, |cos| if `absolute`, averaged
    over the sites."""
    total = 0
    for v in vectors.values():
        unit = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)  # (E, n)
        c = unit @ unit.T  # (E, E)
        total = total + (c.abs() if absolute else c)
    return total / len(vectors)


@torch.no_grad()
def updates(stacks) -> dict[str, torch.Tensor]:
    """{site: (E, out · d)} each expert's ΔW = B A, less the library's mean ΔW at that site (dense)."""
    out = {}
    for site, st in stacks.items():
        dw = torch.einsum("eor,erd->eod", st.B, st.A).flatten(1)  # (E, out · d)
        out[site] = dw - dw.mean(0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--library", required=True)
    ap.add_argument("--a", required=True, help="one expert of the pair of interest")
    ap.add_argument("--b", required=True, help="the other")
    ap.add_argument("--out", help="write the table as JSON here")
    args = ap.parse_args(argv)
    lib = ExpertLibrary.open(args.library, readonly=True)
    names = lib.routable_names()
    for n in (args.a, args.b):
        if n not in names:
            raise SystemExit(f"No routable expert {n!r} in {args.library}; it has {names}")
    experts = [lib[n] for n in names]
    stacks = build_stacks(experts)
    ranks = site_ranks(experts, list(stacks))
    raw = {s: st.prototypes for s, st in stacks.items()}
    centred = centred_prototypes(stacks, ranks, {s: factor_means(st.A, st.B, ranks[s]) for s, st in stacks.items()})
    table = {"raw": mean_cos(raw, True), "centred": mean_cos(centred, True), "update": mean_cos(updates(stacks), False)}
    pairs = [{"a": names[i], "b": names[j], **{k: float(c[i, j]) for k, c in table.items()}}
             for i, j in itertools.combinations(range(len(names)), 2)]
    pairs.sort(key=lambda p: -p["centred"])
    experts_out = [{"expert": n, "raw": statistics.mean(p["raw"] for p in pairs if n in (p["a"], p["b"])),
                    "centred": statistics.mean(p["centred"] for p in pairs if n in (p["a"], p["b"]))} for n in names]
    experts_out.sort(key=lambda e: -e["raw"])
    rank = next(k for k, p in enumerate(pairs, 1) if {p["a"], p["b"]} == {args.a, args.b})
    pair = pairs[rank - 1]
    median = {k: statistics.median(p[k] for p in pairs) for k in ("raw", "centred", "update")}
    print(f"{args.a} / {args.b}: raw |cos| {pair['raw']:.3f}, centred |cos| {pair['centred']:.3f}, update cos "
          f"{pair['update']:.3f}; by centred |cos| pair {rank} of {len(pairs)}; medians over all pairs: raw "
          f"{median['raw']:.3f}, centred {median['centred']:.3f}, update {median['update']:.3f}")
    print("most alike pairs (centred |cos|):")
    for p in pairs[:6]:
        print(f"  {p['a']:>20} {p['b']:<20} raw {p['raw']:.3f} centred {p['centred']:.3f} update {p['update']:.3f}")
    print("each expert's mean |cos| to the others, raw · centred:")
    for e in experts_out:
        print(f"  {e['expert']:>20} {e['raw']:.3f} · {e['centred']:.3f}")
    if args.out:
        out = {"command": "python bench/pair_geometry.py " + " ".join(argv or sys.argv[1:]), "pair": pair,
               "pair_rank": rank, "pairs": pairs, "medians": median, "experts": experts_out}
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
