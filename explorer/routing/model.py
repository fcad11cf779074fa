"""`RoutedModel`: a base model + a library of LoRA experts + a router setting; generation and routing traces.

Usage::

    base = load_base_model("smollm2-135m-instruct")
    rm = RoutedModel.from_library(base, ExpertLibrary.open("assets/libraries/demo-mbc"), RouterConfig(top_k=4))
    rm.generate("Reverse the word: apple", max_new_tokens=16)
    trace = rm.trace("Reverse the word: apple", max_new_tokens=8)     # RoutingTrace, routing of every token
    rm.set_router(RouterConfig(mode="uniform"))                      # the paper's uniform-merge baseline
    rm.set_router(RouterConfig(mode="expert:reverse_word"))          # one expert alone
    rm.detach()                                                      # the base model as it was

The base model is modified in place (its target layers are wrapped); one RoutedModel per base at a time.
"""
from __future__ import annotations

import functools
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from explorer.routing.layer import MODES, RoutedLinear, RouterState
from explorer.routing.inject import (PROTOTYPE_KIND, build_stacks, join_prototypes, module_leaves, prototype_config,
                             unwrap_model, wrap_model)
from explorer.routing.trace import RoutingTrace
from library_store.expert import LoraExpert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    """How tokens are sent to experts.

    mode: "arrow" (per-token top-k routing), "base" (no experts), "uniform" (average of all enabled experts'
    updates, the paper's baseline) or "expert:<name>" (that expert alone).
    """

    mode: str = "arrow"
    top_k: int = 4  # mttl's example uses 4; PEFT's default is 3
    temperature: float = 1.0  # softmax(score / T) over the top-k; the paper uses 1
    disabled: tuple[str, ...] = ()  # experts left out of routing and of the uniform merge

    def __post_init__(self):
        kind = self.mode.split(":", 1)[0]
        if kind not in MODES or (kind == "expert") != (":" in self.mode) or self.mode.endswith(":"):
            raise ValueError(f"Unknown router mode {self.mode!r}: use arrow, base, uniform or expert:<name>.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1 (at most the number of enabled experts), got {self.top_k!r}")
        if not self.temperature > 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be in (0, inf), got {self.temperature!r}")
        object.__setattr__(self, "disabled", tuple(self.disabled))

    @property
    def kind(self) -> str:
        return self.mode.split(":", 1)[0]


def _serialized(method):
    """One call at a time per model: the router state and the trace buffer are shared by every layer, so a
    page serving two requests at once must not interleave them (re-entrant for calls from inside)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class RoutedModel:
    """A base model whose target layers route every token over a library of experts (see module docstring).
    Safe to share between threads: public calls run one at a time."""

    def __init__(self, base, experts: list[LoraExpert], router: RouterConfig = RouterConfig(),
                 prototypes: dict[str, dict[str, torch.Tensor]] | None = None, share_inputs: bool = True):
        self.base = base
        self.experts: list[str] = [e.name for e in experts]
        self.unavailable: dict[str, str] = {}  # expert name -> why it was skipped (from_library)
        self._lock = threading.RLock()
        self._state = RouterState()
        wanted = {s for e in experts for s in e.factors()}
        sites = [name for name, _ in base.model.named_modules() if name in wanted]  # model order
        extra = sorted(wanted - set(sites))
        if extra:
            raise LookupError(f"The experts target layers that {base.source} does not have: e.g. {extra[:3]}")
        self._stacks = build_stacks(experts, prototypes, site_order=sites)
        self.sites = list(self._stacks)
        self._keys = wrap_model(base.model, self._stacks, self._state, share_inputs)  # site -> (layer, module index)
        self.layers = sorted({k[0] for k in self._keys.values()})
        self.modules = module_leaves(self.sites)
        self.router = RouterConfig(mode="base")
        self.set_router(router)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_library(cls, base, library, router: RouterConfig = RouterConfig(),
                     names: list[str] | None = None) -> "RoutedModel":
        """Attach `names` (default: `library.routable_names()`, i.e. not an MBC library's warm-up experts);
        broken ones are skipped and listed in `.unavailable`. Refuses a library made for another base model.
        Prototypes are cached in the library's derived data."""
        library.check_base(base.fingerprint)
        experts, unavailable = [], {}
        for name in library.routable_names() if names is None else names:
            try:
                experts.append(library[name])
            except Exception as exc:  # ExpertUnavailable, or a file gone bad: skip it, say why
                unavailable[name] = f"{type(exc).__name__}: {exc}"
                log.warning("expert %s skipped: %s", name, exc)
        config = prototype_config(experts)
        hit = library.get_derived(PROTOTYPE_KIND, config) if experts else None
        cached = join_prototypes(hit[0], [e.name for e in experts]) if hit else None
        rm = cls(base, experts, router, prototypes=cached)
        rm.unavailable = unavailable
        if experts and hit is None:
            try:  # one entry for the whole set: one write, and one read next time
                library.put_derived(PROTOTYPE_KIND, config, {s: st.prototypes for s, st in rm._stacks.items()},
                                    {"experts": rm.experts})
            except Exception as exc:  # a read-only library still routes; it just recomputes next time
                log.info("prototypes not cached: %s", exc)
        return rm

    @_serialized
    def detach(self) -> None:
        """Restore the base model's plain layers."""
        unwrap_model(self.base.model)

    # ------------------------------------------------------------ router

    @_serialized
    def set_router(self, router: RouterConfig) -> None:
        """Switch mode / top_k / temperature / disabled experts; checked against this library."""
        unknown = [n for n in router.disabled if n not in self.experts]
        if unknown:
            raise ValueError(f"Cannot disable unknown experts {unknown}; the library has {self.experts}")
        enabled = torch.tensor([n not in router.disabled for n in self.experts], dtype=torch.bool)
        n_on = int(enabled.sum())
        st = self._state
        if router.kind != "base" and n_on == 0:
            what = "The library holds no experts" if not self.experts else "Every expert is disabled"
            raise ValueError(f"{what}: mode {router.mode!r} needs at least one; use mode='base'.")
        if router.kind == "arrow" and router.top_k > n_on:
            raise ValueError(f"top_k must be between 1 and {n_on} (the number of enabled experts), "
                             f"got {router.top_k}")
        fixed = None
        if router.kind == "uniform":
            fixed = enabled.float() / n_on  # (E,)
        elif router.kind == "expert":
            name = router.mode.split(":", 1)[1]
            if name not in self.experts:
                raise ValueError(f"Unknown expert {name!r} in mode {router.mode!r}; the library has {self.experts}")
            if name in router.disabled:
                raise ValueError(f"Expert {name!r} is disabled; it cannot be used alone.")
            fixed = torch.zeros(len(self.experts))
            fixed[self.experts.index(name)] = 1.0
        st.mode, st.top_k, st.temperature = router.kind, router.top_k, float(router.temperature)
        st.mask = None if n_on == len(self.experts) else ~enabled
        st.fixed = fixed
        st.version += 1
        self.router = router

    # ------------------------------------------------------------ running

    @torch.no_grad()
    @_serialized
    def logits(self, input_ids) -> torch.Tensor:
        """(batch, tokens, vocab) logits of the routed model."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        return self.base.model(input_ids=ids).logits

    def encode(self, prompt: str, max_new_tokens: int = 0, chat: bool = True) -> tuple[torch.Tensor, bool]:
        """(1, t) prompt ids, cut to the last (context - max_new_tokens) tokens; and whether it was cut."""
        text = self.base.format_prompt(prompt, chat)
        ids = self.base.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        room = self.base.context_length - max_new_tokens
        if max_new_tokens < 0 or room < 1:
            raise ValueError(f"max_new_tokens must be between 0 and {self.base.context_length - 1} "
                             f"(the context length minus one), got {max_new_tokens}")
        if ids.shape[1] == 0:
            raise ValueError("The prompt is empty.")
        return (ids[:, -room:], True) if ids.shape[1] > room else (ids, False)

    @torch.no_grad()
    def _generate(self, ids: torch.Tensor, max_new_tokens: int):
        tok = self.base.tokenizer
        return self.base.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=tok.pad_token_id,
                                        return_dict_in_generate=True)

    @torch.no_grad()
    @_serialized
    def generate(self, prompt: str, max_new_tokens: int = 32, chat: bool = True) -> str:
        """Greedy continuation of the prompt (chat template by default); the new text only."""
        ids, _ = self.encode(prompt, max_new_tokens, chat)
        if max_new_tokens == 0:
            return ""
        out = self._generate(ids, max_new_tokens)
        return self.base.tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    @_serialized
    def trace(self, prompt: str, max_new_tokens: int = 0, chat: bool = True) -> RoutingTrace:
        """Generate greedily while recording the routing weights of every prompt and generated token."""
        ids, truncated = self.encode(prompt, max_new_tokens, chat)
        with self.capturing() as records:
            if max_new_tokens > 0:
                out = self._generate(ids, max_new_tokens)
                seq = out.sequences  # (1, t_prompt + n_new)
                if seq.shape[1] > ids.shape[1]:  # the last new token was never fed back: route it too
                    self.base.model(input_ids=seq[:, -1:], cache=out.cache, use_cache=True)
            else:
                seq = ids
                self.base.model(input_ids=ids)
        token_ids = seq[0].tolist()
        weights = self._assemble(records, len(token_ids))
        new = seq[0, ids.shape[1]:]
        return RoutingTrace(
            tokens=self.display_tokens(token_ids), token_ids=token_ids,
            is_generated=[i >= ids.shape[1] for i in range(len(token_ids))],
            layers=self.layers, modules=self.modules, experts=list(self.experts), weights=weights.numpy(),
            top_k=self.router.top_k, temperature=float(self.router.temperature), mode=self.router.mode,
            text=self.base.tokenizer.decode(new, skip_special_tokens=True), prompt=prompt, truncated=truncated,
            meta={"base_model": self.base.source, "disabled": list(self.router.disabled), "chat": chat,
                  "unavailable": dict(self.unavailable)},
        )

    @contextmanager
    def capturing(self):
        """Record routing weights without changing any output.

        Usage: ``with rm.capturing() as records: rm.logits(ids)``; records is a list of ((layer, module index),
        (t, E) weights), one per routed-layer call, in call order (KV-cache steps append their new tokens).
        """
        if self._state.capture is not None:
            raise RuntimeError("A routing capture is already running on this model.")
        records: list = []
        self._state.capture = records
        try:
            yield records
        finally:
            self._state.capture = None

    def routing_weights(self, records: list) -> dict[str, torch.Tensor]:
        """Captured records -> {site: (tokens, E)} (sites in model order)."""
        site_of = {k: s for s, k in self._keys.items()}
        by_site: dict[str, list] = {}
        for key, w in records:
            by_site.setdefault(site_of[key], []).append(w)
        return {s: torch.cat(by_site[s]) for s in self.sites if s in by_site}

    def _assemble(self, records: list, n_tokens: int) -> torch.Tensor:
        """Per-call (key, (t, E)) records, in call order -> (layers, modules, tokens, experts)."""
        out = torch.zeros(len(self.layers), len(self.modules), n_tokens, len(self.experts))
        by_key: dict[tuple[int, int], list[torch.Tensor]] = {}
        for key, w in records:
            by_key.setdefault(key, []).append(w.float())
        li = {layer: i for i, layer in enumerate(self.layers)}
        for (layer, mod), ws in by_key.items():
            w = torch.cat(ws)  # (tokens, E)
            if w.shape[0] != n_tokens:
                raise RuntimeError(f"trace of layer {layer} {self.modules[mod]}: {w.shape[0]} routed tokens "
                                   f"for {n_tokens} tokens")
            out[li[layer], mod] = w
        return out

    def display_tokens(self, token_ids: list[int]) -> list[str]:
        """Each id decoded on its own (readable spaces and newlines); the raw token where that gives '\\ufffd'
        (a byte-level piece of a multi-byte character)."""
        tok = self.base.tokenizer
        raw = tok.convert_ids_to_tokens(token_ids)
        shown = [tok.decode([i]) for i in token_ids]
        return [s if "\ufffd" not in s else r for s, r in zip(shown, raw)]

    def __repr__(self) -> str:
        return (f"RoutedModel(base={self.base.source!r}, experts={len(self.experts)}, sites={len(self.sites)}, "
                f"router={self.router})")


def with_router(rm: RoutedModel, **changes) -> RouterConfig:
    """The current router with some fields changed, e.g. ``rm.set_router(with_router(rm, top_k=2))``."""
    return replace(rm.router, **changes)
