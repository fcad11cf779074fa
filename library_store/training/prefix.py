"""The shared-prefix KV cache: run the token prefix every row starts with (the chat template's system turn,
~25 tokens of every prompt) once, then feed each batch only its own tokens. Exact: a causal model's prefix
states do not depend on what follows, and Arrow routing is per token. Training and evaluation both use it.

Usage::

    n = common_prefix_length(rows)                      # rows: token id lists; each keeps >= 1 own token
    shared = SharedPrefix(model.get_decoder(), rows[0][:n])
    out = decoder(input_ids=suffixes, attention_mask=mask, use_cache=True, **shared.kwargs(len(suffixes)))

Under autograd (training) the prefix's keys and values carry the gradients of the LoRA weights: build one
`SharedPrefix` per step and take its cache once with `copy=False`.
"""
from __future__ import annotations

import copy as _copy
import inspect

import torch


def common_prefix_length(rows: list[list[int]], limit: int | None = None) -> int:
    """Length of the token prefix all rows share, leaving every row at least one token of its own, and at most
    `limit` (e.g. where the first target token of a training example sits)."""
    if not rows:
        return 0
    n = min(len(r) for r in rows) - 1
    if limit is not None:
        n = min(n, limit)
    first = rows[0]
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def cache_kwarg(decoder) -> str:
    """transformers 5 renamed `past_key_values` to `cache` in some models; the name this decoder takes."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache of a decoder output, under either name."""
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


class SharedPrefix:
    """The KV cache of a prefix, computed once; `cache(b)` repeats it over a batch of b rows."""

    def __init__(self, decoder, prefix: list[int]):
        self.decoder, self.length = decoder, len(prefix)
        self._cache = None
        if prefix:
            self._cache = output_cache(decoder(input_ids=torch.tensor([prefix]), use_cache=True))  # (1, p)

    def cache(self, batch: int, copy: bool = True):
        """The prefix cache repeated over `batch` rows (None without a prefix). `copy=False` hands out the
        cache itself (once: the decoder then appends to it), as training does to keep the autograd graph."""
        if self._cache is None:
            return None
        out = _copy.deepcopy(self._cache) if copy else self._cache
        out.batch_repeat_interleave(batch)
        return out

    def kwargs(self, batch: int, copy: bool = True) -> dict:
        """`{cache keyword: cache}` for the decoder call, or {} without a prefix."""
        cache = self.cache(batch, copy)
        return {} if cache is None else {cache_kwarg(self.decoder): cache}
