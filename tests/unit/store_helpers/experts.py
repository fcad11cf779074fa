"""The tiny-random-llama twin's shapes for the store tests, so most of them need not build the model (slow to
import); the experts themselves come from `library_store.testing.random_expert`.

Usage::

    lib = ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)
    lib.add(random_expert(LLAMA, "alpha", tasks=["add"], seed=0))
"""
from __future__ import annotations

from library_store.expert import ExpertInfo, LoraExpert
from library_store.testing import random_expert

# leaf -> (d_in, d_out) of tiny-random-llama (GQA: k/v project 64 -> 32)
LLAMA_SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}
# tiny-random-llama's fingerprint, written out; test_store.py checks it still equals
# load_base_model("tiny-random-llama").fingerprint.
LLAMA_FP = {"source": "tiny-random-llama", "architecture": "llama", "hidden_size": 64, "num_layers": 2,
            "vocab_size": 49152, "config_hash": "7be222ef911e11fa"}


def sites(shapes: dict = LLAMA_SHAPES, layers=(0, 1)) -> dict[str, tuple[int, int]]:
    """site -> (d_in, d_out), what `random_expert` accepts in place of a model."""
    return {f"model.layers.{layer}.self_attn.{module}": shape for layer in layers for module, shape in shapes.items()}


LLAMA = sites()


def random_weights(rank: int = 4, seed: int = 0, shapes: dict = LLAMA_SHAPES, layers=(0, 1)) -> dict:
    """PEFT-keyed random weights for those shapes (the weights of `random_expert`)."""
    return random_expert(sites(shapes, layers), "w", rank=rank, seed=seed).weights


__all__ = ["LLAMA", "LLAMA_FP", "LLAMA_SHAPES", "ExpertInfo", "LoraExpert", "random_expert", "random_weights", "sites"]
