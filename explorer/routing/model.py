"""`RoutedModel`: a base model + a library of LoRA experts + a router setting; generation and routing traces.

Usage::

    base = load_base_model("smollm2-135m-instruct")
    rm = RoutedModel.from_library(base, ExpertLibrary.open("assets/libraries/demo-mbc"), RouterConfig(top_k=4))
    rm.generate("Reverse the word: apple", max_new_tokens=16)
    trace = rm.trace("Reverse the word: apple", max_new_tokens=8)     # RoutingTrace, routing of every token
    rm.set_router(RouterConfig(mode="uniform"))    # the paper's uniform-merge baseline; "expert:<name>": one alone
    rm.detach()                                                      # the base model as it was

The base model is modified in place (its target layers are wrapped); one RoutedModel per base at a time.
"""
from __future__ import annotations

import functools
import logging
import threading
from contextlib import contextmanager
from dataclasses import replace

import torch

from explorer.routing.centring import Centring, site_ranks
from explorer.routing.capture import assemble, dense_by_key, next_step_kwargs, resolve_solo
from explorer.routing.calibration import input_means
from explorer.routing.config import RouterConfig, compact_layers, routed_layers
from explorer.routing.inject import (PROTOTYPE_KIND, build_stacks, module_leaves, prototype_config,
                                     unwrap_model, wrap_model)
from explorer.routing.layer import RoutedLinear
from explorer.routing.scales import routed_groups, scale_groups, scale_vector
from explorer.routing.state import RouterState
from explorer.routing.prompt_level import pick, record_decision
from explorer.routing.readout import find_readout, recorded_lead, recorded_weak
from explorer.routing.prototype_cache import _cache_prototypes, _expert_prototypes, _unroutable, library_identity
from explorer.routing.topk import TopKRoutes
from explorer.routing.trace import RoutingTrace, user_token_span
from library_store.expert import LoraExpert
from library_store.store.checks import check_finite

log = logging.getLogger(__name__)


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
                 prototypes: dict[str, dict[str, torch.Tensor]] | None = None, share_inputs: bool = True,
                 general: list[LoraExpert] = (), store=None, site_prototypes: dict[str, torch.Tensor] | None = None):
        """`general`: experts a `centre="general:<name>"` router may subtract (not routed); `store`: the
        library, which caches centred prototypes and supplies `general` experts by name (see from_library);
        `prototypes` {name: {site: (d,)}} or `site_prototypes` {site: (E, d)}: known prototypes (a cache)."""
        self.base = base
        self.experts: list[str] = [e.name for e in experts]
        self.unavailable: dict[str, str] = {}  # expert name -> why it was skipped (from_library)
        self.library: dict = {}  # {"name", "path", "content"} when built by from_library (see library_identity)
        self._lock = threading.RLock()
        self._state = RouterState()
        wanted = {s for e in experts for s in e.factors()}
        sites = [name for name, _ in base.model.named_modules() if name in wanted]  # model order
        extra = sorted(wanted - set(sites))
        if extra:
            raise LookupError(f"The experts target layers that {base.source} does not have: e.g. {extra[:3]}")
        self._stacks = build_stacks(experts, prototypes, site_order=sites, site_prototypes=site_prototypes)
        self.sites = list(self._stacks)
        self._keys = wrap_model(base.model, self._stacks, self._state, share_inputs)  # site -> (layer, module index)
        self._share_inputs = share_inputs
        self._centring = Centring(self._stacks, site_ranks(experts, self.sites), prototype_config(experts),
                                  {g.name: g for g in general}, store)
        self._wrapped = ("none", None)  # the centring the wrapped layers hold (see set_router)
        self._store = store
        self._shifted: str | None = None  # the input centring the wrapped layers hold (None: unknown, set it)
        self._scaled: tuple = ()  # the expert scales the wrapped layers' prototypes hold (scales.py)
        self._means: dict[str, torch.Tensor] | None = None  # input means per site, measured once
        self.layers = sorted({k[0] for k in self._keys.values()})
        self.modules = module_leaves(self.sites)
        self.readouts: dict = {}  # readout_key(router) -> Readout (per-prompt pick "readout"; see readout.py)
        self._readout = None  # the readout of the router as set (or None); `lead` (set_router): its flag lead
        self.router = RouterConfig(mode="base")
        self.set_router(router)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_library(cls, base, library, router: RouterConfig = RouterConfig(),
                     names: list[str] | None = None) -> "RoutedModel":
        """Attach `names` (default: `library.routable_names()`, i.e. not an MBC library's warm-up experts);
        broken ones are skipped and listed in `.unavailable`. Refuses a library made for another base model.
        Prototypes are cached in the library's derived data. The one loader: the page, the CLI and the
        evaluation all attach libraries here, and `.library` (its identity) goes into every trace.
        A `centre="general:<name>"` router loads that expert from the library (any kind, usually `general`)."""
        library.check_base(base.fingerprint)
        experts, unavailable = [], {}
        for name in library.routable_names() if names is None else names:
            try:
                expert = library[name]
                check_finite(name, expert.weights)  # a file changed behind the store's back
                experts.append(expert)
            except Exception as exc:  # ExpertUnavailable, a file gone bad, NaN weights: skip it, say why
                unavailable[name] = f"{type(exc).__name__}: {exc}"
                log.warning("expert %s skipped: %s", name, exc)
        while True:
            config = prototype_config(experts)
            hit = library.get_derived(PROTOTYPE_KIND, config) if experts else None
            cached = {} if hit else _expert_prototypes(library, experts)  # the whole set's entry, or each one's
            try:
                rm = cls(base, experts, router, prototypes=cached, store=library,
                         site_prototypes=hit[0] if hit else None)
                break
            except (torch.linalg.LinAlgError, RuntimeError) as exc:  # one bad expert must not take the rest down
                culprits = _unroutable(experts, exc)
                if not culprits:
                    raise
                for name, why in culprits.items():
                    unavailable[name] = why
                    log.warning("expert %s skipped: %s", name, why)
                experts = [e for e in experts if e.name not in culprits]
        rm.unavailable = unavailable
        rm.library = library_identity(library, experts)
        if experts and hit is None:
            _cache_prototypes(library, rm, experts, config, cached)
        return rm

    @_serialized
    def detach(self) -> None:
        """Restore the base model's plain layers."""
        unwrap_model(self.base.model)

    # ------------------------------------------------------------ router

    @_serialized
    def set_router(self, router: RouterConfig) -> None:
        """Switch mode / top_k / temperature / disabled experts / centring / scales; checked against this library.
        A new centring re-stacks the routed layers from memory (prototypes cached per centring), no reload."""
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
        layers = routed_layers(router, self.layers)  # these three may refuse (ValueError): nothing has changed yet
        factors = scale_vector(router.scales, self.experts)
        readout = find_readout(self.readouts, self._store, router) if router.per_prompt and router.pick == "readout" \
            else None
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
        centring = (router.centre, None if router.centre == "none" else router.centre_scope)
        if centring != self._wrapped:  # may refuse the centring (ValueError): nothing has changed yet
            stacks = self._centring.stacks(router.centre, router.centre_scope)
            if self.sites and isinstance(self.base.model.get_submodule(self.sites[0]), RoutedLinear):  # attached
                self._keys = wrap_model(self.base.model, stacks, self._state, self._share_inputs)
                self._shifted, self._scaled = None, ()  # new groups: unit prototypes; scales and shift set below
            self._wrapped = centring
        if router.scales != self._scaled:  # the shift μ · c_e p_e follows the scaled prototypes
            scale_groups(routed_groups(self.base.model, self.sites), factors)
            self._shifted, self._scaled = None, router.scales
        if router.input_centre != self._shifted:
            self._set_shift(router.input_centre)
        self._readout, self.lead = readout, recorded_lead(self.readouts, self._store, router)  # flags leans too
        self.weak = recorded_weak(self.readouts, self._store, router)  # and weak routing (prompt_level.strength)
        st.mode, st.top_k, st.temperature = router.kind, router.top_k, float(router.temperature)
        st.mask = None if n_on == len(self.experts) else ~enabled
        st.fixed, st.layers = fixed, layers
        st.version += 1
        self.router = router

    def _set_shift(self, input_centre: str) -> None:
        """Input centring on or off in every routed group (means measured once, in mode "base", and cached)."""
        groups = routed_groups(self.base.model, self.sites)
        if input_centre == "base" and groups and self._means is None:
            mode, self._state.mode = self._state.mode, "base"
            try:
                self._means = input_means(self.base, self.sites, self._store)
            finally:
                self._state.mode = mode
        for group in groups:
            group.set_shift([self._means[s] for s in group.sites] if input_centre == "base" else None)
        self._shifted = input_centre

    # ------------------------------------------------------------ running

    @torch.no_grad()
    @_serialized
    def logits(self, input_ids) -> torch.Tensor:
        """(batch, tokens, vocab) logits of the routed model."""
        ids = torch.as_tensor(input_ids).to(self.device)
        if ids.dim() == 1:
            ids = ids[None]
        return self.base.model(input_ids=ids).logits

    def encode(self, prompt: str, max_new_tokens: int = 0, chat: bool = True) -> tuple[torch.Tensor, bool]:
        """(1, t) prompt ids, cut to the last (context - max_new_tokens) tokens; and whether it was cut."""
        _, ids, truncated = self._encode(prompt, max_new_tokens, chat)
        return ids, truncated

    def _encode(self, prompt: str, max_new_tokens: int, chat: bool) -> tuple[str, torch.Tensor, bool]:
        """The formatted prompt, its (1, t) kept ids and whether it was cut (see `encode`)."""
        text = self.base.format_prompt(prompt, chat)
        ids = self.base.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        room = self.base.context_length - max_new_tokens
        if max_new_tokens < 0 or room < 1:
            raise ValueError(f"max_new_tokens must be between 0 and {self.base.context_length - 1} "
                             f"(the context length minus one), got {max_new_tokens}")
        if ids.shape[1] == 0:
            raise ValueError("The prompt is empty.")
        return (text, ids[:, -room:], True) if ids.shape[1] > room else (text, ids, False)

    @property
    def device(self) -> torch.device:
        """Where the base model (and so every routed buffer) lives; inputs are moved there."""
        return next(self.base.model.parameters()).device

    @torch.no_grad()
    def _generate(self, ids: torch.Tensor, max_new_tokens: int, streamer=None):
        tok = self.base.tokenizer
        ids = ids.to(self.device)
        return self.base.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=tok.pad_token_id,
                                        return_dict_in_generate=True, streamer=streamer)

    @torch.no_grad()
    @_serialized
    def generate(self, prompt: str, max_new_tokens: int = 32, chat: bool = True) -> str:
        """Greedy continuation of the prompt (chat template by default); the new text only."""
        ids, _ = self.encode(prompt, max_new_tokens, chat)
        if max_new_tokens == 0:
            return ""
        with self._answering(prompt, chat, max_new_tokens):
            out = self._generate(ids, max_new_tokens)
        return self.base.tokenizer.decode(out.sequences[0, ids.shape[1]:].tolist(), skip_special_tokens=True)

    @contextmanager
    def _answering(self, prompt: str, chat: bool, max_new_tokens: int):
        """Inside: the router as set; for a per-prompt router, the prompt's pick alone (yields the evidence
        trace, or None for a per-token router)."""
        if not self.router.per_prompt:
            yield None
            return
        evidence = self._trace(prompt, max_new_tokens, chat, None, answer=False)  # the same (maybe cut) prompt
        evidence.router = replace(self.router, granularity="token")
        chosen = self.choose(evidence)
        evidence.meta["pick"] = chosen.record()
        with self.answering_with(chosen.expert):
            yield evidence

    def choose(self, evidence: RoutingTrace):
        """The per-prompt router's PromptPick for an evidence trace (its readout's, with pick "readout")."""
        return pick(evidence, self._readout, self.lead, self.weak)

    @contextmanager
    def answering_with(self, expert: str):
        """Every token run meanwhile uses `expert` alone, weight 1 (as mode "expert:<name>"), the router's
        centring kept: how a per-prompt router applies its pick (see explorer/routing/prompt_level.py)."""
        if expert not in self.experts:
            raise ValueError(f"Unknown expert {expert!r}; the library has {self.experts}")
        st = self._state
        with self._lock:  # the answer's routing is shared state: no other call runs under it
            saved = st.mode, st.fixed
            st.fixed = torch.zeros(len(self.experts))  # (E,)
            st.fixed[self.experts.index(expert)] = 1.0
            st.mode, st.version = "expert", st.version + 1
            try:
                yield
            finally:
                st.mode, st.fixed = saved
                st.version += 1

    @torch.no_grad()
    @_serialized
    def trace(self, prompt: str, max_new_tokens: int = 0, chat: bool = True, streamer=None) -> RoutingTrace:
        """Generate greedily while recording the routing weights of every prompt and generated token; the
        trace also records the formatted prompt, where the user's own tokens are, the router and the library.
        `streamer` (a transformers streamer) gets the new tokens as they are generated (the page streams).
        A per-prompt router's trace holds the applied routing (its pick alone) and, as `.evidence`, the prompt
        routed per token, which the pick was made from."""
        with self._answering(prompt, chat, max_new_tokens) as evidence:
            trace = self._trace(prompt, max_new_tokens, chat, streamer)
        trace.evidence = evidence
        record_decision(trace, self.lead, self.weak)  # meta "pick" (per prompt) or "lean" (per token): prompt_level
        return trace

    def _trace(self, prompt: str, max_new_tokens: int, chat: bool, streamer, answer: bool = True) -> RoutingTrace:
        """One routed run, recorded; `answer=False`: the prompt alone (cut as for `max_new_tokens`)."""
        formatted, ids, truncated = self._encode(prompt, max_new_tokens, chat)
        with self.capturing() as records:
            if max_new_tokens > 0 and answer:
                out = self._generate(ids, max_new_tokens, streamer)
                seq = out.sequences  # (1, t_prompt + n_new)
                if seq.shape[1] > ids.shape[1]:  # the last new token was never fed back: route it too
                    self.base.model(input_ids=seq[:, -1:], use_cache=True, **next_step_kwargs(self.base.model, out))
            else:
                seq = ids
                self.base.model.get_decoder()(input_ids=ids.to(self.device))  # no logits are read: skip the LM head
        token_ids = seq[0].tolist()
        routes = self._assemble(records, len(token_ids))
        n_prompt = ids.shape[1]
        return RoutingTrace(
            tokens=self.display_tokens(token_ids), token_ids=token_ids,
            is_generated=[i >= n_prompt for i in range(len(token_ids))],
            layers=self.layers, modules=self.modules, experts=list(self.experts), routes=routes,
            router=self.router, text=self.base.tokenizer.decode(token_ids[n_prompt:], skip_special_tokens=True),
            prompt=prompt, formatted_prompt=formatted, truncated=truncated,
            user_span=user_token_span(self.base.tokenizer, formatted, prompt, n_prompt),
            library=dict(self.library),
            meta={"base_model": self.base.source, "chat": chat, "unavailable": dict(self.unavailable)},
        )

    @contextmanager
    def overriding(self, expert: str, force: bool = False, layers: list[int] | None = None):
        """A counterfactual on top of the router while inside: `expert` switched off (or, `force`, alone with
        weight 1) at those model layers (None: every layer), for every token the model runs meanwhile.

        Usage: ``with rm.overriding("e1", layers=[3]): rm.logits(ids)`` (see explorer/page/counterfactual.py)."""
        if expert not in self.experts:
            raise ValueError(f"Unknown expert {expert!r}; the library has {self.experts}")
        st = self._state
        routed = self.layers if st.layers is None or st.mode != "arrow" else sorted(st.layers)
        unknown = [x for x in layers or () if x not in routed]
        if unknown:
            raise ValueError(f"Layers {unknown} are not routed: this router routes layers {compact_layers(routed)}.")
        with self._lock:  # the override is shared state: no other call runs under it
            st.override = (self.experts.index(expert), bool(force), None if layers is None else frozenset(layers))
            st.version += 1
            try:
                yield
            finally:
                st.override = None
                st.version += 1

    @contextmanager
    def capturing(self):
        """Record routing without changing any output.

        Usage: ``with rm.capturing() as records: rm.logits(ids)``, then ``rm.routing_weights(records)`` or
        ``rm._assemble(records, n_tokens)``; records are per routed-group and per routed-layer call, in call
        order (KV-cache steps append their new tokens); their format is in `RouterState`'s docstring.
        """
        if self._state.capture is not None:
            raise RuntimeError("A routing capture is already running on this model.")
        records: list = []
        self._state.capture, self._state.pending = records, 0
        try:
            yield records
        finally:
            self._state.capture = None
        resolve_solo(records)

    def routing_weights(self, records: list) -> dict[str, torch.Tensor]:
        """Captured records -> {site: (tokens, E)} (sites in model order)."""
        by_key = dense_by_key(records, len(self.experts))
        return {s: by_key[self._keys[s]] for s in self.sites if self._keys[s] in by_key}

    def _assemble(self, records: list, n_tokens: int) -> TopKRoutes:
        """Records of one capture -> sparse routes (layers, modules, tokens, top-k) with drill-down data."""
        return assemble(records, self.layers, self.modules, len(self.experts), n_tokens)

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
