"""Would caching the chat template's prefix pay? A probe (seventh session), not a feature.

Every chat prompt starts with the same system turn: on SmolLM2, 25 of the 41 tokens of "Compute this sum: 47 + 28"
come before the user's text. Their KV cache (and routing) could be computed once per routing state and reused.
This probe measures, on demo-private with a per-token router (top-2, T 0.1, input centring), interleaved:
- `generate` of the page's examples (16 new tokens at most), whole prompt against a copy of the cached prefix;
- the evidence pass (the body, under capture) of one example, whole against cached prefix.
It also checks that the answers are the same.

Usage::

    .venv/bin/python bench/prefix_cache_probe.py --threads 2      # about 40 s
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_common import attach_from_args  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", default=str(ROOT / "assets" / "libraries" / "demo-private"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    from explorer.routing.config import RouterConfig
    from explorer.routing.trace import user_token_span

    rm, _, _ = attach_from_args(argparse.Namespace(model="smollm2-135m-instruct", library=args.library,
                                                   threads=args.threads))
    rm.set_router(RouterConfig(top_k=2, temperature=0.1, input_centre="base"))
    model, tok = rm.base.model, rm.base.tokenizer
    prompts = [e["prompt"] for e in json.loads((ROOT / "assets" / "examples.json").read_text())]

    def encode(p):
        text, ids, _ = rm._encode(p, 16, True)
        return ids, user_token_span(tok, text, p, ids.shape[1])[0]  # (1, t), tokens before the user's text

    ids, n_prefix = encode(prompts[0])
    with torch.no_grad():
        prefix = model.get_decoder()(input_ids=ids[:, :n_prefix], use_cache=True).past_key_values

        def run(ids, cached):
            extra = {"past_key_values": copy.deepcopy(prefix)} if cached else {}
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                  pad_token_id=tok.pad_token_id, return_dict_in_generate=True, **extra).sequences

        same = all(torch.equal(run(i, False), run(i, True)) for i, _ in map(encode, prompts))
        gen = {False: [], True: []}
        for rep in range(args.reps):
            for p in prompts:
                i, _ = encode(p)
                for cached in (False, True) if rep % 2 else (True, False):
                    t0 = time.perf_counter()
                    run(i, cached)
                    gen[cached].append(time.perf_counter() - t0)
        fwd = {False: [], True: []}
        i, _ = encode(prompts[1])
        for _ in range(3 * args.reps):
            for cached in (False, True):
                with rm.capturing():
                    t0 = time.perf_counter()
                    if cached:
                        model.get_decoder()(input_ids=i[:, n_prefix:], past_key_values=copy.deepcopy(prefix))
                    else:
                        model.get_decoder()(input_ids=i)
                    fwd[cached].append(time.perf_counter() - t0)
    r = [b / a for a, b in zip(gen[False], gen[True])]
    print(f"prefix {n_prefix} of {ids.shape[1]} tokens; same answers: {same}")
    print(f"generate: whole {1e3 * statistics.median(gen[False]):.0f} ms, cached prefix "
          f"{1e3 * statistics.median(gen[True]):.0f} ms, ratio {statistics.median(r):.3f} [{min(r):.2f}, {max(r):.2f}]")
    print(f"evidence pass: whole {1e3 * statistics.median(fwd[False]):.1f} ms, cached prefix "
          f"{1e3 * statistics.median(fwd[True]):.1f} ms")


if __name__ == "__main__":
    main()
