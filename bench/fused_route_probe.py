"""The fused one-token step against the torch ops it replaces, on one routed group, one thread.

Usage::

    .venv/bin/python bench/fused_route_probe.py      # the first run on a machine compiles it (about 25 s)

One routed group of a decoding step (q/k/v of SmolLM2: G 3, E 16, r 4, d 576, top-4, T 1): the engine's torch
ops (`RoutedGroup._one_token`: scores, |.|, top-k, softmax, gather the chosen A rows, A h, weight, gather B,
one bmm) and `explorer/routing/fused.py`'s C++ step, on the same inputs. Prints the largest difference and
microseconds per call of each (median of 5 rounds of 2,000 calls). docs/engine.md, "A fused one-token kernel".
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explorer.routing import fused  # noqa: E402

G, E, R, D, OUT, K = 3, 16, 4, 576, 576, 4


def main() -> int:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(G * E, D, generator=gen)
    protos /= protos.norm(dim=1, keepdim=True)  # (G E, d) unit prototypes
    a_rows = torch.randn(G * E, R * D, generator=gen) / 24  # (G E, r d)
    up = torch.randn(G * E, R * OUT, generator=gen) * 0.05  # (G E, r out)
    h = torch.randn(D, generator=gen)  # (d,)
    offsets = (torch.arange(G) * E).view(G, 1)

    def torch_ops() -> torch.Tensor:  # RoutedGroup._one_token without shift, mask or capture
        top, idx = torch.mv(protos, h).view(G, -1).abs().topk(K, dim=-1)  # (G, k)
        flat = (idx + offsets).view(-1)  # (G k,)
        z = torch.mv(a_rows.index_select(0, flat).view(G * K * R, -1), h)  # (G k r,)
        a = z.view(G, K, R) * top.softmax(-1).unsqueeze(-1)  # (G, k, r)
        return torch.bmm(a.view(G, 1, K * R), up.index_select(0, flat).view(G, K * R, -1)).view(G, -1)

    t0 = time.perf_counter()
    step = fused.kernel()
    if step is None:
        print("the fused step did not build here (see the warning); nothing to compare")
        return 1
    print(f"built or loaded in {time.perf_counter() - t0:.1f} s")

    no_shift, no_mask, outs = torch.empty(0), torch.empty(0, dtype=torch.bool), torch.tensor([OUT] * G)

    def fused_step() -> torch.Tensor:
        return step(h, protos, no_shift, a_rows, up, no_mask, G, E, R, K, 1.0, outs)

    print(f"largest difference {(torch_ops() - fused_step()).abs().max().item():.1e}")
    for name, fn in (("torch ops", torch_ops), ("fused", fused_step)):
        rounds = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(2000):
                fn()
            rounds.append((time.perf_counter() - t) / 2000 * 1e6)
        print(f"{name}: {statistics.median(rounds):.1f} µs per call (rounds {min(rounds):.1f}-{max(rounds):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
