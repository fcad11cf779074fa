"""`RoutingTrace`: the one record of a routing decision, shared by the CLI, the page, the benches and the tests.

Usage::

    trace = routed.trace("Reverse the word: apple", max_new_tokens=8)
    trace.weights.shape            # (layers, modules, tokens, experts); zeros where an expert was not in the top-k
    trace.routes                   # what is stored: the top-k of every (layer, module, token) (see topk.py)
    trace.cell(layer=3, token=7)   # drill-down: per module, each chosen expert's score, weight, margin, contribution
    names, idx, c = trace.top_contributor()   # (L, T) the expert that added the most, not the most weighted
    trace.positions("user")        # the user's own tokens (not the chat template's), from the tokenizer's offsets
    trace.crop("user+generated")   # the same trace without the template's tokens
    trace.usage("prompt")          # (experts,) what this query needed; trace.winner("user") names the top one
    names, idx, w = trace.top_expert(groups={"reverse_word": "words"})   # (L, T) winner per token and layer
    trace.to_frame()               # long table: token_index, token, is_generated, layer, module, expert, weight, routed
    RoutingTrace.from_json(trace.to_json()) == trace

Every reduction the page, the CLI and the evaluation show is a method here, so they cannot disagree.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields, replace

import numpy as np
import pandas as pd

from explorer.routing.config import RouterConfig
from explorer.routing.topk import CellExpert, TopKRoutes, json_floats

log = logging.getLogger(__name__)

MEAN = "mean"  # the module selector's "mean over modules"
WHICH = ("all", "prompt", "user", "generated", "user+generated")
_SENTINEL = "\ue000user-text\ue001"  # private-use characters: no template or tokenizer adds them


def user_token_span(tokenizer, formatted: str, user_text: str, n_prompt_tokens: int) -> tuple[int, int]:
    """[start, end) token positions of the user's own text inside the formatted prompt.

    Usage: ``user_token_span(base.tokenizer, base.format_prompt(text), text, n_prompt)``

    One algorithm for the whole product: `formatted` is tokenized as the model saw it
    (`add_special_tokens=False`) with its offset mapping, and a token belongs to the user's text when its
    character span overlaps the text's (so a token the template merged into the text counts as the user's).
    The text is located through the tokenizer's chat template (the template applied to a sentinel gives the
    exact prefix and suffix), so a prompt that quotes the template ("<|im_start|>system ...") or a word of the
    system prompt is still found in the right place. (0, n_prompt_tokens) when the text cannot be found or the
    tokenizer gives no offsets. When the prompt was truncated from the left to its last `n_prompt_tokens`
    tokens, positions refer to the kept tokens (the span may then start at 0, or be empty).
    """
    try:
        offsets = tokenizer(formatted, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError) as exc:  # a slow (Python) tokenizer has no offsets
        log.warning("no offset mapping from %s: every prompt token counts as the user's (%s)",
                    type(tokenizer).__name__, exc)
        return (0, n_prompt_tokens)
    where = locate_user_text(tokenizer, formatted, user_text)
    if where is None:
        return (0, n_prompt_tokens)
    start, end = where
    hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if not hits:
        return (0, n_prompt_tokens)
    cut = max(0, len(offsets) - n_prompt_tokens)  # tokens dropped on the left
    return (max(hits[0] - cut, 0), max(hits[-1] + 1 - cut, 0))


def locate_user_text(tokenizer, formatted: str, user_text: str) -> tuple[int, int] | None:
    """[start, end) characters of `user_text` in `formatted` (see `user_token_span`), or None."""
    if not user_text:
        return None
    if formatted == user_text:  # chat template off
        return (0, len(user_text))
    frame = _template_frame(tokenizer)
    if frame is not None:
        prefix, suffix = frame
        if formatted.startswith(prefix) and formatted.endswith(suffix) and len(formatted) >= len(prefix) + len(suffix):
            middle = formatted[len(prefix): len(formatted) - len(suffix)]
            for text in (user_text, user_text.strip()):  # some templates strip the message
                i = middle.find(text) if text else -1
                if i >= 0:
                    return (len(prefix) + i, len(prefix) + i + len(text))
    for text in (user_text, user_text.strip()):  # another formatting: the first occurrence
        i = formatted.find(text) if text else -1
        if i >= 0:
            return (i, i + len(text))
    return None


def _template_frame(tokenizer) -> tuple[str, str] | None:
    """(prefix, suffix) the chat template puts around one user turn (with the generation prompt), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # a template that refuses a lone user turn: fall back to searching
        log.info("chat template not usable to locate the user's text: %s", exc)
        return None
    if not isinstance(text, str) or text.count(_SENTINEL) != 1:
        return None
    prefix, suffix = text.split(_SENTINEL)
    return prefix, suffix


@dataclass(eq=False)
class RoutingTrace:
    tokens: list[str]  # as the tokenizer shows them (each id decoded on its own, for display)
    token_ids: list[int]
    is_generated: list[bool]  # False for prompt tokens, True for generated ones (prompt first)
    layers: list[int]
    modules: list[str]  # e.g. ["q_proj", "k_proj", "v_proj", "o_proj"]
    experts: list[str]
    # what was routed, sparse: the top-k of every (layer, module, token) and, for traces made by RoutedModel,
    # the drill-down detail. `RoutingTrace(..., weights=dense)` (L, M, T, E) is accepted and converted;
    # `.weights` gives the dense (L, M, T, E) float32 array back, expanded on each read.
    routes: TopKRoutes
    router: RouterConfig = field(default_factory=RouterConfig)  # the setting used
    text: str = ""  # the generated text
    prompt: str = ""  # the user's text as given (before the chat template)
    formatted_prompt: str = ""  # the prompt after the chat template: what was tokenized
    user_span: tuple[int, int] = (0, 0)  # [start, end) of the user's own tokens among the prompt tokens
    truncated: bool = False  # the prompt was cut (from the left) to fit the context
    library: dict = field(default_factory=dict)  # {"name", "path", "content"}; empty for a bare model
    meta: dict = field(default_factory=dict)  # anything else: base model, chat, unavailable experts...
    # per-prompt routing (router.granularity "prompt"): the prompt routed per token, the evidence for the
    # pick (explorer/routing/prompt_level.py); `routes` then hold what was applied, the pick alone
    evidence: "RoutingTrace | None" = None

    def __post_init__(self):
        if not isinstance(self.routes, TopKRoutes):  # dense weights (the constructor's `weights=`)
            self.routes = TopKRoutes.from_dense(self.routes)
        expected = (len(self.layers), len(self.modules), len(self.tokens), len(self.experts))
        if self.routes.shape != expected:
            raise ValueError(f"weights shape {self.routes.shape} != (layers, modules, tokens, experts) {expected}")
        if not (len(self.token_ids) == len(self.is_generated) == len(self.tokens)):
            raise ValueError(f"{len(self.tokens)} tokens, {len(self.token_ids)} ids and "
                             f"{len(self.is_generated)} is_generated flags: they must agree")
        if isinstance(self.router, dict):
            self.router = RouterConfig.from_dict(self.router)
        s, e = self.user_span = (int(self.user_span[0]), int(self.user_span[1]))
        if not 0 <= s <= e <= self.n_prompt:
            raise ValueError(f"user_span {self.user_span} is not inside the {self.n_prompt} prompt tokens")

    def __eq__(self, other) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        return self.routes == other.routes and self._plain() == other._plain() and self.evidence == other.evidence

    @property
    def weights(self) -> np.ndarray:
        """(layers, modules, tokens, experts) float32 routing weights, 0 for experts outside the top-k."""
        return self.routes.dense()

    # ---------------------------------------------------------------- the router, read-only

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def temperature(self) -> float:
        return float(self.router.temperature)

    @property
    def mode(self) -> str:
        return self.router.mode

    @property
    def n_prompt(self) -> int:
        return len(self.is_generated) - sum(self.is_generated)

    # ---------------------------------------------------------------- positions and crops

    def positions(self, which: str = "all") -> list[int]:
        """Token positions: "all", "prompt", "user" (the user's own text), "generated" or "user+generated"."""
        n, T = self.n_prompt, len(self.tokens)
        user = list(range(*self.user_span))
        chosen = {"all": lambda: list(range(T)), "prompt": lambda: [i for i in range(T) if not self.is_generated[i]],
                  "user": lambda: user, "generated": lambda: [i for i in range(T) if self.is_generated[i]],
                  "user+generated": lambda: user + [i for i in range(n, T) if self.is_generated[i]]}
        if which not in chosen:
            raise ValueError(f"Unknown token selection {which!r}; use one of {WHICH}")
        return chosen[which]()

    def crop(self, which: str | list[int]) -> "RoutingTrace":
        """A trace restricted to some token positions (a `positions` name, or increasing positions); the
        user span and the generated flags follow the kept tokens."""
        keep = self.positions(which) if isinstance(which, str) else [int(i) for i in which]
        if any(b <= a for a, b in zip(keep, keep[1:])) or (keep and not 0 <= keep[0] <= keep[-1] < len(self.tokens)):
            raise ValueError(f"crop needs increasing positions between 0 and {len(self.tokens) - 1}, got {keep[:8]}")
        s, e = self.user_span
        start = sum(1 for i in keep if i < s)
        end = start + sum(1 for i in keep if s <= i < e)
        return replace(self, tokens=[self.tokens[i] for i in keep], token_ids=[self.token_ids[i] for i in keep],
                       is_generated=[self.is_generated[i] for i in keep],
                       routes=self.routes.take(keep), user_span=(start, end),
                       library=dict(self.library), meta=dict(self.meta))

    # ---------------------------------------------------------------- reductions (numpy)

    def module_weights(self, module: str = MEAN) -> np.ndarray:
        """(L, T, E) weights of one module, or their mean over modules ("mean")."""
        return self._per_expert(self.routes.weights, module)

    def routed(self, module: str = MEAN) -> np.ndarray:
        """(L, T) bool: cells where some expert had weight (False at a layer the router does not route at)."""
        return self.module_weights(module).sum(-1) > 0

    def _per_expert(self, values: np.ndarray, module: str) -> np.ndarray:
        """(L, M, T, k) slot values -> (L, T, E) of one module, or the mean over modules (summed in module
        order, then divided: the same float32 result as the dense array's mean)."""
        r = self.routes
        mods = range(len(self.modules)) if module == MEAN else [self._module_index(module)]
        L, M, T, E = r.shape
        out = np.zeros((L, T, E), dtype=np.float32)
        for m in mods:
            one = np.zeros((L, T, E + 1), dtype=np.float32)  # the spare column takes unused slots
            slot = np.where(r.experts[:, m] < 0, E, r.experts[:, m]).astype(np.intp)  # (L, T, k)
            np.put_along_axis(one, slot, values[:, m].astype(np.float32), axis=-1)
            out += one[..., :E]
        return out / np.float32(M) if module == MEAN and M else out

    def entropy(self, module: str = MEAN) -> np.ndarray:
        """(L, T) entropy in nats of the routing weights of one module; for "mean", the mean of the modules'
        entropies (how spread each router's own choice is, not the spread of the averaged weights)."""
        w = self.routes.weights if module == MEAN else self.routes.weights[:, [self._module_index(module)]]
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(w > 0, w * np.log(w), 0.0).sum(axis=-1)  # (L, M, T)
        return h.mean(axis=1).astype(np.float32)  # (L, T)

    def usage(self, which: str = "prompt", module: str = MEAN) -> np.ndarray:
        """(E,) mean weight over the routed layers and the chosen positions: what this query needed (sums to 1 in
        arrow mode; zeros when no position is chosen). A layer the router does not route at (no weight there,
        `RouterConfig.layers`) is left out of the mean."""
        pos = self.positions(which)
        if not pos:
            return np.zeros(len(self.experts), dtype=np.float32)
        w = self.module_weights(module)[:, pos]  # (L, P, E)
        routed = w.any(axis=(1, 2))  # (L,) layers with weight somewhere (weights are >= 0): the routed ones
        return (w[routed] if routed.any() else w).mean(axis=(0, 1))  # (E,)

    def top_expert(self, module: str = MEAN, groups: dict[str, str] | None = None
                   ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The winner of every (layer, token): names, idx (L, T) into names, weight (L, T) of the winner.
        With `groups` (expert -> cluster) the experts' weights are summed per group first and the names are
        the groups' (sorted; an expert missing from `groups` is its own group)."""
        names, w = self._grouped(self.module_weights(module), groups)  # (L, T, G)
        if not names:
            L, T = w.shape[:2]
            return names, np.zeros((L, T), dtype=int), np.zeros((L, T), dtype=np.float32)
        idx = w.argmax(axis=-1)  # (L, T)
        return names, idx, np.take_along_axis(w, idx[..., None], axis=-1)[..., 0]

    def top_contributor(self, module: str = MEAN, groups: dict[str, str] | None = None, relative: bool = False
                        ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Like `top_expert`, by contribution ‖w_e · s_e · B_e A_e h‖ instead of weight: names, idx (L, T) into
        names, value (L, T) the winner's contribution (mean over modules for "mean"; a group's is the sum of
        its experts'). `relative` divides each module's contributions by its base output's norm first.
        Raises ValueError for a trace without drill-down data (one made from dense weights)."""
        r = self.routes
        if r.contribution is None:
            raise ValueError("This trace has no contribution data (it was made from dense weights).")
        c = r.contribution.astype(np.float32)  # (L, M, T, k)
        if relative:
            with np.errstate(divide="ignore", invalid="ignore"):
                c = np.nan_to_num(c / r.base_norm.astype(np.float32)[..., None], nan=0.0, posinf=0.0)
        names, v = self._grouped(self._per_expert(c, module), groups)  # (L, T, G)
        if not names:
            L, T = v.shape[:2]
            return names, np.zeros((L, T), dtype=int), np.zeros((L, T), dtype=np.float32)
        idx = v.argmax(axis=-1)  # (L, T)
        return names, idx, np.take_along_axis(v, idx[..., None], axis=-1)[..., 0]

    def cell(self, layer: int, token: int) -> dict[str, list[CellExpert]]:
        """Drill-down of one grid cell: {module: [CellExpert, ...]} for layer `layer` (a model layer number, as
        in `.layers`) and token position `token` (in this trace), chosen experts largest weight first, each with
        its raw score |h · p|, weight, margin over the next expert's score (for the last chosen one: over the
        best expert left out), contribution and contribution relative to the base layer's output norm. Fields
        the trace does not hold (made from dense weights) are None. Costs no model call."""
        if layer not in self.layers:
            raise ValueError(f"Unknown layer {layer}; this trace routes layers {self.layers}")
        if not 0 <= token < len(self.tokens):
            raise ValueError(f"token {token} is outside this trace's {len(self.tokens)} tokens")
        li = self.layers.index(layer)
        return {m: self.routes.cell(li, mi, token, self.experts) for mi, m in enumerate(self.modules)}

    def winner(self, which: str = "user", groups: dict[str, str] | None = None, layers: list[int] | None = None,
               module: str = MEAN) -> str | None:
        """The expert (or group) with the largest mean weight over those positions and layers; None when
        nothing was routed there (no positions, no experts, or every weight 0 as in base mode)."""
        pos = self.positions(which)
        w = self.module_weights(module)  # (L, T, E)
        if layers is not None:
            unknown = [x for x in layers if x not in self.layers]
            if unknown:
                raise ValueError(f"Unknown layers {unknown}; this trace routes layers {self.layers}")
            w = w[[self.layers.index(x) for x in layers]]
        names, w = self._grouped(w[:, pos], groups)  # (L', P, G)
        if not names or w.shape[0] == 0 or w.shape[1] == 0:
            return None
        mean = w.mean(axis=(0, 1))  # (G,)
        return names[int(mean.argmax())] if mean.max() > 0 else None

    def most_used_expert(self) -> str | None:
        """The winner over the prompt tokens."""
        return self.winner("prompt")

    def _module_index(self, module: str) -> int:
        if module not in self.modules:
            raise ValueError(f"Unknown module {module!r}; this trace routes {self.modules} (or {MEAN!r}).")
        return self.modules.index(module)

    def _grouped(self, w: np.ndarray, groups: dict[str, str] | None) -> tuple[list[str], np.ndarray]:
        """(..., E) -> names, (..., G): a group's weight is the sum of its experts'."""
        if not groups:
            return list(self.experts), w
        names = sorted({groups.get(e, e) for e in self.experts})
        member = np.array([[groups.get(e, e) == g for g in names] for e in self.experts],
                          dtype=np.float32).reshape(len(self.experts), len(names))  # (E, G)
        return names, w @ member

    # ---------------------------------------------------------------- serialisation

    def to_dict(self, dense: bool = True) -> dict:
        """JSON-ready. "routes" holds what is stored (top-k and drill-down data); with `dense` (the default,
        what the CLI's --json documents) also "weights", the (L, M, T, E) nested lists."""
        data = self._plain()
        data["routes"] = self.routes.to_dict()
        data["evidence"] = None if self.evidence is None else self.evidence.to_dict(dense)
        if dense:
            data["weights"] = json_floats(self.weights)
        return data

    def _plain(self) -> dict:
        """Every field but the routes and the evidence, JSON-ready."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("routes", "evidence")}
        data.update(router=self.router.to_dict(), user_span=list(self.user_span),
                    tokens=list(self.tokens), token_ids=[int(i) for i in self.token_ids],
                    is_generated=[bool(g) for g in self.is_generated], layers=[int(x) for x in self.layers],
                    modules=list(self.modules), experts=list(self.experts), library=dict(self.library),
                    meta=dict(self.meta))
        return data

    def to_json(self, indent: int | None = None, dense: bool = True) -> str:
        return json.dumps(self.to_dict(dense), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "RoutingTrace":
        """The inverse of `to_dict`; also reads traces saved before the router was one field, or with dense
        weights only (before sparse routes)."""
        data = dict(data)
        dense = data.pop("weights", None)
        routes = data.pop("routes", None)
        data["routes"] = TopKRoutes.from_dict(routes) if routes is not None else np.asarray(dense, dtype=np.float32)
        if isinstance(data.get("evidence"), dict):
            data["evidence"] = cls.from_dict(data["evidence"])
        legacy = {k: data.pop(k) for k in ("mode", "top_k", "temperature") if k in data}
        if "router" not in data:
            disabled = tuple(data.get("meta", {}).get("disabled", ()))
            data["router"] = RouterConfig(**legacy, disabled=disabled)
        return cls(**{**data, "user_span": tuple(data.get("user_span", (0, 0)))})

    @classmethod
    def from_json(cls, text: str) -> "RoutingTrace":
        return cls.from_dict(json.loads(text))

    def to_frame(self) -> pd.DataFrame:
        """Long table, one row per (layer, module, token, expert); `routed` is False where the router did not route
        (a layer left out, or a fixed-weight mode), so a weight of 0 there means no routing, not an unchosen expert."""
        L, M, T, E = self.routes.shape
        li, mi, ti, ei = np.meshgrid(np.arange(L), np.arange(M), np.arange(T), np.arange(E), indexing="ij")
        return pd.DataFrame({
            "token_index": ti.ravel(),
            "token": np.asarray(self.tokens, dtype=object)[ti.ravel()],
            "is_generated": np.asarray(self.is_generated, dtype=bool)[ti.ravel()],
            "layer": np.asarray(self.layers)[li.ravel()],
            "module": np.asarray(self.modules, dtype=object)[mi.ravel()],
            "expert": np.asarray(self.experts, dtype=object)[ei.ravel()],
            "weight": self.weights.ravel(),
            "routed": np.repeat((self.routes.weights.sum(-1) > 0)[..., None], E, -1).ravel(),  # (L, M, T) -> rows
        })

    def to_csv(self) -> str:
        return self.to_frame().to_csv(index=False)


_dataclass_init = RoutingTrace.__init__


def _init(self, *args, weights=None, **kwargs):
    """The dataclass's constructor, also taking dense `weights=` (L, M, T, E) in place of `routes` (what
    traces were built from before sparse routes; `dataclasses.replace(trace, weights=...)` too)."""
    if weights is not None:
        kwargs["routes"] = weights
    _dataclass_init(self, *args, **kwargs)


RoutingTrace.__init__ = _init
