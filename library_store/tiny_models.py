"""Tiny random-weight twins of the two architectures the product supports: a base-model source for tests,
benches and page demos that need no download (`load_base_model("tiny-random-llama")`).

Usage::

    model = tiny_random_model("tiny-random-phi")     # 2 layers, hidden 64, SmolLM2's vocabulary, seeded
"""
from __future__ import annotations

import torch
from torch import nn

TINY_MODELS = ("tiny-random-phi", "tiny-random-llama")


def tiny_random_model(kind: str, seed: int = 0) -> nn.Module:
    """A seeded random-weight Phi or Llama (2 layers, hidden 64) with SmolLM2's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2)
    torch.manual_seed(seed)
    if kind == "tiny-random-phi":
        model = PhiForCausalLM(PhiConfig(**common, partial_rotary_factor=0.5))
    elif kind == "tiny-random-llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True))
    else:
        raise ValueError(kind)
    return model.eval()
