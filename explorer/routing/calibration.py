"""Input centring: the base model's mean input at every routing site, over a fixed set of generic prompts.

Usage::

    means = input_means(base, sites, store=library)   # {site: (d,)} cached as derived data `input-mean`
    group.set_shift([means[s] for s in group.sites])  # scores become (h - mu) · p_e

Why: a transformer's hidden states share one large common direction (measured on SmolLM2 at layer 15:
|mu| = 6.1 against a mean |h| of 7.5), so Arrow's score |h · p_e| is mostly |mu · p_e|, a constant per expert,
and the same one or two experts win every token whatever the prompt. Subtracting mu leaves what differs
between tokens. mu comes from the base model alone (no expert applied) on `CALIBRATION_PROMPTS`, generic chat
requests unrelated to any library task, so it depends on the base model and its chat template only, never on
a library's tasks or evaluation prompts. Measured in docs/routing.md.
"""
from __future__ import annotations

import hashlib
import json

import torch

INPUT_MEAN_KIND = "input-mean"
CALIBRATION_VERSION = 1
CALIBRATION_PROMPTS = (
    "Tell me about the history of Rome.", "What is the capital of France?", "Write a short poem about the sea.",
    "How do I bake bread at home?", "Explain photosynthesis in simple terms.",
    "Give me three tips for better sleep.", "What does a software engineer do?", "Summarise the plot of Hamlet.",
    "Why is the sky blue?", "Translate 'good morning' into Spanish.", "Recommend a book for a long flight.",
    "What is machine learning?", "Describe your favourite season and why.", "How many legs does a spider have?",
    "List some healthy breakfast ideas.", "hello", "Can you help me plan a trip to Japan?",
    "What is the difference between weather and climate?", "Write an email asking for a meeting next week.",
    "Explain how a bicycle works.",
)


def calibration_key(base, sites: list[str], chat: bool = True) -> dict:
    """What the means depend on: the base model, the prompts (and the chat template), the sites."""
    digest = hashlib.sha256(json.dumps([CALIBRATION_VERSION, CALIBRATION_PROMPTS, chat]).encode()).hexdigest()
    return {"base": base.fingerprint, "prompts": digest[:16], "chat": chat,
            "sites": hashlib.sha256("\n".join(sites).encode()).hexdigest()[:16]}


@torch.no_grad()
def measure_input_means(model: torch.nn.Module, tokenizer, sites: list[str], chat: bool = True,
                        prompts=CALIBRATION_PROMPTS) -> dict[str, torch.Tensor]:
    """{site: (d,) float32} the mean input of each site's layer over every token of `prompts` (each through
    the chat template). The caller makes sure no expert is applied (a RoutedModel in mode "base")."""
    from library_store.models import format_prompt

    sums: dict[str, torch.Tensor] = {}
    count = 0
    hooks = []

    def hook(site):
        def add(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (t, d)
            sums[site] = x.sum(0) + sums[site] if site in sums else x.sum(0)
        return add

    for site in sites:
        hooks.append(model.get_submodule(site).register_forward_pre_hook(hook(site)))
    device = next(model.parameters()).device
    try:
        for text in prompts:
            ids = tokenizer(format_prompt(tokenizer, text, chat), return_tensors="pt")["input_ids"].to(device)
            model(input_ids=ids)
            count += ids.shape[1]
    finally:
        for h in hooks:
            h.remove()
    return {s: (sums[s] / count).cpu() for s in sites}


def input_means(base, sites: list[str], store=None, chat: bool = True) -> dict[str, torch.Tensor]:
    """Cached `measure_input_means` of `base.model` (derived data of `store`, when given)."""
    key = calibration_key(base, sites, chat)
    hit = store.get_derived(INPUT_MEAN_KIND, key) if store is not None else None
    if hit is not None and set(hit[0]) == set(sites):
        return hit[0]
    means = measure_input_means(base.model, base.tokenizer, sites, chat)
    if store is not None:
        store.put_derived(INPUT_MEAN_KIND, key, means, meta={"what": "base model's mean input per routing site",
                                                             "prompts": len(CALIBRATION_PROMPTS)})
    return means
