"""`RoutingTrace`: the one record of a routing decision, shared by the CLI, the page, the benches and the tests.

Usage::

    trace = routed.trace("Reverse the word: apple", max_new_tokens=8)
    trace.weights.shape          # (layers, modules, tokens, experts); zeros where an expert was not in the top-k
    trace.to_frame()             # long table: token_index, token, is_generated, layer, module, expert, weight
    RoutingTrace.from_json(trace.to_json()) == trace
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd


@dataclass(eq=False)
class RoutingTrace:
    tokens: list[str]  # as the tokenizer shows them (convert_ids_to_tokens, decoded for display)
    token_ids: list[int]
    is_generated: list[bool]  # False for prompt tokens, True for generated ones
    layers: list[int]
    modules: list[str]  # e.g. ["q_proj", "k_proj", "v_proj", "o_proj"]
    experts: list[str]
    weights: np.ndarray  # (layer, module, token, expert), float32
    top_k: int
    temperature: float
    mode: str = "arrow"
    text: str = ""  # the generated text
    prompt: str = ""  # the prompt as given (before the chat template)
    truncated: bool = False  # the prompt was cut to fit the context
    meta: dict = field(default_factory=dict)  # anything else: base model, library, disabled experts...

    def __post_init__(self):
        self.weights = np.asarray(self.weights, dtype=np.float32)
        expected = (len(self.layers), len(self.modules), len(self.tokens), len(self.experts))
        if self.weights.shape != expected:
            raise ValueError(f"weights shape {self.weights.shape} != (layers, modules, tokens, experts) {expected}")

    def __eq__(self, other) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        a, b = self.to_dict(), other.to_dict()
        return a.pop("weights") == b.pop("weights") and a == b

    @property
    def n_prompt(self) -> int:
        return len(self.is_generated) - sum(self.is_generated)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["weights"] = self.weights.tolist()
        return data

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "RoutingTrace":
        return cls(**{**data, "weights": np.asarray(data["weights"], dtype=np.float32)})

    @classmethod
    def from_json(cls, text: str) -> "RoutingTrace":
        return cls.from_dict(json.loads(text))

    def to_frame(self) -> pd.DataFrame:
        """Long table, one row per (layer, module, token, expert)."""
        L, M, T, E = self.weights.shape
        li, mi, ti, ei = np.meshgrid(np.arange(L), np.arange(M), np.arange(T), np.arange(E), indexing="ij")
        return pd.DataFrame({
            "token_index": ti.ravel(),
            "token": np.asarray(self.tokens, dtype=object)[ti.ravel()],
            "is_generated": np.asarray(self.is_generated, dtype=bool)[ti.ravel()],
            "layer": np.asarray(self.layers)[li.ravel()],
            "module": np.asarray(self.modules, dtype=object)[mi.ravel()],
            "expert": np.asarray(self.experts, dtype=object)[ei.ravel()],
            "weight": self.weights.ravel(),
        })

    def to_csv(self) -> str:
        return self.to_frame().to_csv(index=False)
