"""Tiny random experts for the store tests, shaped for the tiny-random-llama twin (hidden 64, 2 layers)."""
from __future__ import annotations

import torch

from library_store.expert import PEFT_PREFIX, ExpertInfo, LoraExpert

# leaf -> (d_in, d_out) of tiny-random-llama (GQA: k/v project 64 -> 32)
LLAMA_SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}
# tiny-random-llama's fingerprint, written out so most store tests need not build the model (slow to import);
# test_store.py checks it still equals load_base_model("tiny-random-llama").fingerprint.
LLAMA_FP = {"source": "tiny-random-llama", "architecture": "llama", "hidden_size": 64, "num_layers": 2,
            "vocab_size": 49152, "config_hash": "7be222ef911e11fa"}


def random_weights(rank: int = 4, seed: int = 0, shapes: dict = LLAMA_SHAPES, layers=(0, 1)) -> dict:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in layers:
        for module, (d_in, d_out) in shapes.items():
            site = f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{module}"
            weights[f"{site}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen)  # (r, d_in)
            weights[f"{site}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen)  # (d_out, r)
    return weights


def random_expert(name: str, rank: int = 4, seed: int = 0, tasks=("t1",), **info) -> LoraExpert:
    return LoraExpert.from_state_dict(ExpertInfo(name=name, tasks=list(tasks), **info), random_weights(rank, seed))
