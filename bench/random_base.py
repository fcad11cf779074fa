"""Random-weight base models with the real configs of SmolLM2-135M and Phi-2 (weights do not change speed).

Usage::

    base = random_base("smollm2")                    # LlamaConfig with SmolLM2-135M's sizes, fp32 on the CPU
    base = random_base("phi2", layers=4, device="cuda", dtype=torch.bfloat16)   # Phi-2 config, 4 of 32 layers
    experts = random_experts(base, 64, rank=4)       # random rank-4 LoRA experts on the base's targets

Built on the meta device and filled in place (normal(0, 0.02), norms at 1), so a 2.7B-parameter Phi-2 takes
seconds instead of the minutes of transformers' own initialisation. The tokenizer is SmolLM2's (its vocabulary
fits both). Used by bench/engine_profile.py, bench/phi2_scale.py and bench/arrow_speed.py (--random-base).
"""
from __future__ import annotations

import torch

from library_store.models import BaseModel, fingerprint, load_tokenizer, resolve_lora_targets
from library_store.testing import random_expert

SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5)
PHI2 = dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
            intermediate_size=10240, vocab_size=51200, max_position_embeddings=2048, partial_rotary_factor=0.4,
            layer_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def model_config(kind: str, layers: int | None = None):
    """The transformers config of `kind` ("smollm2" or "phi2"), optionally with fewer layers."""
    from transformers import LlamaConfig, PhiConfig

    sizes = {"smollm2": SMOLLM2, "phi2": PHI2}[kind]
    config = (LlamaConfig if kind == "smollm2" else PhiConfig)(**sizes)
    if layers is not None:
        config.num_hidden_layers = layers
    return config


@torch.no_grad()
def random_base(kind: str = "smollm2", layers: int | None = None, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0) -> BaseModel:
    """A BaseModel with `kind`'s architecture and random weights on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    config = model_config(kind, layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    # non-persistent buffers (rotary frequencies) were left empty by to_empty: take them from a 1-layer twin
    small = model_config(kind, 1)
    small.vocab_size = 8
    twin = AutoModelForCausalLM.from_config(small)
    twin_buffers = dict(twin.named_buffers())
    for name, buf in model.named_buffers():
        if name in twin_buffers:
            buf.copy_(twin_buffers[name].to(buf.dtype))
    model.eval()
    tok = load_tokenizer()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    source = f"random-{kind}"
    return BaseModel(model, tok, source, resolve_lora_targets(model), fingerprint(model, source))


def random_experts(base: BaseModel, n: int, rank: int = 4, alpha: float = 16.0, scale: float = 0.05) -> list:
    """n random LoRA experts on the base's default targets (B non-zero), seeded by their index."""
    return [random_expert(base, f"e{i:03d}", rank=rank, alpha=alpha, seed=i, scale=scale) for i in range(n)]
