"""One request normaliser for the page, the API and the CLI: raw settings in, a valid `RouterConfig` and the
notices to show out.

Usage::

    raw = RawRequest(prompt="Reverse: apple", library="lib", top_k="50", temperature=0, disabled=["nope"])
    done = normalise(raw, experts=["a", "b", "c"], tokenizer=base.tokenizer, context_length=2048)
    done.request.router          # RouterConfig(mode="arrow", top_k=3, temperature=1.0, disabled=())
    done.notices                 # ["Ignored unknown experts ['nope']...", "top-k 50 is more than...", ...]
    normalise(raw, experts=[...], strict=True).error   # the CLI: what the page would clamp is refused
    normalise(RawRequest("hi", centre="general:gk"), ["a", "b", "c"], names=["a", "b", "c", "gk"],
              defaults={"top_k": 2, "centre": "mean"})   # a library's recorded default router fills the gaps
    normalise(RawRequest("hi", input_centre="base"), ["a", "b"]).request.router.input_centre   # "base"
    normalise(RawRequest("hi", granularity="prompt"), ["a", "b"]).request.router.per_prompt    # True

Raw values arrive as the front end sends them: strings, floats from sliders, None for "not given". The page
clamps what is out of range and says so; with `strict=True` (the CLI) the first such problem is the error
instead. `RouterConfig.__post_init__` stays the last guard; nothing else re-checks these settings.

Centring (docs/design.md, "Centring"): `centre` is "none", "mean" or "general:<expert>", `centre_scope`
"prototypes" or "weights". A value the library cannot take (an unknown centring, `mean` over fewer than three
routed experts, a general expert the library does not hold) falls back to no centring with a notice.
Input centring (docs/design.md, "Input centring"): `input_centre` is "none" or "base" (subtract the base model's
mean layer input before scoring); an unknown value falls back to "none" with a notice.
Granularity (docs/design.md, "Prompt-level routing"): `granularity` is "token" (Arrow) or "prompt" (one expert
per prompt, picked from the per-token routing of the user's text); an unknown value falls back to "token".
`pick` is "mean" or "readout" (the library's fitted readout; `RoutedModel.set_router` refuses it where none is).
Routed layers (docs/design.md, "Routed layers"): `layers` is "all", a list of layer numbers or a string like
"0-3, 6"; with `model_layers` (the layers the model routes), layers outside them are dropped with a notice.
Expert scales (docs/design.md, "Expert scales"): `scales` is "default" (the library's fitted factors, if its
default router has any), "none" (Arrow's plain score) or a dict {expert: factor}; unknown experts' factors are
dropped and a bad factor falls back to no scales, each with a notice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from explorer.routing.config import (CENTRE_SCOPES, CENTRES, GRANULARITIES, INPUT_CENTRES, PICKS, RouterConfig,
                                     check_layers, check_scales, compact_layers, parse_layers)

DEFAULTS = {"top_k": 4, "temperature": 1.0, "max_new_tokens": 32, "centre": "none", "centre_scope": "prototypes",
            "input_centre": "none", "granularity": "token", "pick": "mean", "layers": None, "scales": None}
# what a library's default router may set
ROUTER_FIELDS = ("top_k", "temperature", "centre", "centre_scope", "input_centre", "granularity", "pick", "layers",
                 "scales")
SCALE_CHOICES = ("default", "none")  # the library's fitted expert scales, or Arrow's plain score
MEAN_MIN_EXPERTS = 3  # as `explorer.routing.centring.Centring.means`: below three, centred experts are alike


@dataclass
class RawRequest:
    """A request as it arrives (any types). None means "not given": the default is used."""

    prompt: Any = ""
    library: Any = ""
    mode: Any = "arrow"
    top_k: Any = None
    temperature: Any = None
    max_new_tokens: Any = None
    disabled: Any = ()  # a list of names, or one comma-separated string (CLI)
    chat: Any = True
    centre: Any = None  # "none" | "mean" | "general:<expert>"
    centre_scope: Any = None  # "prototypes" | "weights"
    input_centre: Any = None  # "none" | "base"
    granularity: Any = None  # "token" | "prompt"
    pick: Any = None  # "mean" | "readout" (per prompt)
    layers: Any = None  # "all" | "0-3, 6" | a list of layer numbers (Arrow routes there; the others run base)
    scales: Any = None  # "default" (the library's) | "none" | {expert: factor}


@dataclass(frozen=True)
class Limits:
    """What a front end allows. None = only the model's context limits the value."""

    max_new_tokens: int | None = 128  # the page's slider maximum
    prompt_tokens: int | None = 256  # longer user prompts are cut (a 5,000-token grid helps nobody)
    template_room: int = 64  # tokens kept free for the chat template's system and role tokens


PAGE_LIMITS = Limits()
CLI_LIMITS = Limits(max_new_tokens=None, prompt_tokens=None)


@dataclass(frozen=True)
class RunRequest:
    """A valid request: what a run needs, nothing left to check."""

    prompt: str
    library: str
    router: RouterConfig
    chat: bool = True
    max_new_tokens: int = 32


@dataclass
class Normalised:
    request: RunRequest | None  # None when refused (see `error`)
    notices: list[str] = field(default_factory=list)
    error: str | None = None


class _Refused(Exception):
    """Raised inside `normalise` to stop at the first refusal."""


def normalise(raw: RawRequest, experts: list[str], tokenizer=None, context_length: int | None = None,
              limits: Limits = PAGE_LIMITS, strict: bool = False, names: list[str] | None = None,
              defaults: dict | None = None, model_layers: list[int] | None = None) -> Normalised:
    """`raw` checked against a library's routed `experts` (see module docstring). `names`: every expert of the
    library (a `general:<name>` centring may name one that is not routed; default `experts`). `defaults`: the
    library's default router (keys of ROUTER_FIELDS), used where `raw` gives None. `tokenizer` and
    `context_length` (of the base model) are needed to cut long prompts; without them the prompt is kept whole."""
    notices: list[str] = []
    given = {k: v for k, v in (defaults or {}).items() if k in ROUTER_FIELDS and v is not None}
    base = {**DEFAULTS, **given}

    def clamp(notice: str, refusal: str) -> None:
        if strict:
            raise _Refused(refusal)
        notices.append(notice)

    try:
        prompt = raw.prompt if isinstance(raw.prompt, str) else ""
        if not prompt.strip():
            raise _Refused("The prompt is empty: type something (or pick an example) and press Run.")
        temperature = _temperature(raw.temperature, base["temperature"], clamp)  # own settings, then the library's
        new_limit = limits.max_new_tokens
        if new_limit is None and context_length is not None:
            new_limit = context_length - 1
        max_new = _max_new(raw.max_new_tokens, new_limit, clamp)
        mode = str(raw.mode or "arrow").strip()
        kind = mode.split(":", 1)[0]
        disabled = _disabled(raw.disabled, experts, clamp)
        enabled = [e for e in experts if e not in disabled]
        if kind != "base" and not enabled:
            raise _Refused("Every expert is disabled: enable at least one to route." if experts else
                           "The library holds no experts: only mode 'base' can run.")
        if kind == "expert":
            name = mode.split(":", 1)[1]
            if name not in experts:
                raise _Refused(f"Unknown expert {name!r} in mode {mode!r}; the library has {experts}")
            if name in disabled:
                raise _Refused(f"Expert {name!r} is disabled; it cannot be used alone.")
        top_k = _top_k(raw.top_k, base["top_k"], len(enabled), kind, str(raw.library), clamp)
        centre, scope = _centring(raw, base, experts, list(names) if names is not None else experts, clamp)
        input_centre = _choice(raw.input_centre, base["input_centre"], INPUT_CENTRES, "input_centre", clamp,
                               "input centring")
        granularity = _choice(raw.granularity, base["granularity"], GRANULARITIES, "granularity", clamp)
        chosen = _choice(raw.pick, base["pick"], PICKS, "pick", clamp)
        layers = _layers(raw.layers, base["layers"], model_layers, clamp)
        scales = _scales(raw.scales, base["scales"], experts, clamp)
        prompt = _cut(prompt, max_new, tokenizer, context_length, limits, notices)
        router = RouterConfig(mode=mode, top_k=top_k, temperature=temperature, disabled=tuple(disabled),
                              centre=centre, centre_scope=scope, input_centre=input_centre,
                              granularity=granularity, pick=chosen, layers=layers, scales=scales)
    except (_Refused, ValueError) as exc:  # ValueError: RouterConfig's last guard (e.g. an unknown mode)
        return Normalised(request=None, notices=notices, error=str(exc))
    request = RunRequest(prompt=prompt, library=str(raw.library or ""), router=router, chat=bool(raw.chat),
                         max_new_tokens=max_new)
    return Normalised(request=request, notices=notices)


def _number(value, name: str, default, clamp) -> float:
    """A float from a slider, a string or None (the default)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        clamp(f"{name} {value!r} is not a number: using {default}.", f"{name} must be a number, got {value!r}")
        return default
    if math.isnan(number):
        clamp(f"{name} {value!r} is not a number: using {default}.", f"{name} must be a number, got {value!r}")
        return default
    return number


def _disabled(raw, experts: list[str], clamp) -> list[str]:
    names = raw.split(",") if isinstance(raw, str) else list(raw or ())
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in experts]
    if unknown:
        clamp(f"Ignored unknown experts {unknown}: the library has {experts}.",
              f"Cannot disable unknown experts {unknown}; the library has {experts}")
    return [n for n in dict.fromkeys(names) if n in experts]


def _top_k(raw, default, n_enabled: int, kind: str, library: str, clamp) -> int:
    limit = max(1, n_enabled) if kind == "arrow" else None  # other modes ignore top-k
    if raw is None or (isinstance(raw, str) and not raw.strip()):  # a default that does not fit is nobody's error
        return max(1, min(int(default), limit)) if limit is not None else max(1, int(default))
    value = _number(raw, "top-k", default, clamp)
    refusal = f"top_k must be between 1 and {limit} (the number of enabled experts), got {raw}" if limit else \
        f"top_k must be an integer >= 1, got {raw}"
    fallback = limit or int(default)
    return _whole(raw, value, "top-k", 1, limit, fallback, f"the {limit} enabled experts of {library}", clamp, refusal)


def _whole(raw, value: float, what: str, low: int, limit: int | None, fallback: int, limit_name: str, clamp,
           refusal: str) -> int:
    """`value` as a whole number in [low, limit] (limit None: no upper bound), each correction a notice."""
    n = int(round(value)) if math.isfinite(value) else fallback
    if n != value:
        clamp(f"{what} {raw} is not a whole number: using {n}.", refusal)
    if n < low:
        clamp(f"{what} {n} is less than {low}: using {low}.", refusal)
        n = low
    if limit is not None and n > limit:
        clamp(f"{what} {n} is more than {limit_name}: clamped to {limit}.", refusal)
        n = limit
    return n


def _temperature(raw, default, clamp) -> float:
    value = _number(raw, "temperature", default, clamp)
    if not 0 < value < math.inf:
        clamp(f"temperature {value} is outside (0, inf): using {default}.",
              f"temperature must be in (0, inf), got {value}")
        return default
    return value


def _text(value, default: str) -> str:
    return default if value is None or (isinstance(value, str) and not value.strip()) else str(value).strip()


def _centring(raw: RawRequest, base: dict, experts: list[str], names: list[str], clamp) -> tuple[str, str]:
    """(centre, scope) the library can take; anything else falls back to no centring with a notice."""
    centre, scope = _text(raw.centre, base["centre"]), _text(raw.centre_scope, base["centre_scope"])
    if scope not in CENTRE_SCOPES:
        clamp(f"Unknown centring scope {scope!r}: using {DEFAULTS['centre_scope']!r} "
              f"(choose {' or '.join(CENTRE_SCOPES)}).",
              f"Unknown centre scope {scope!r}: use one of {', '.join(CENTRE_SCOPES)}.")
        scope = DEFAULTS["centre_scope"]
    general = centre.split(":", 1)[1].strip() if centre.startswith("general:") else None
    if centre not in ("none", "mean") and not general:
        clamp(f"Unknown centring {centre!r}: using no centring (choose {', '.join(CENTRES)}).",
              f"Unknown centre {centre!r}: use one of {', '.join(CENTRES)}.")
        return "none", scope
    if centre == "mean" and len(experts) < MEAN_MIN_EXPERTS:
        why = (f"Centring with 'mean' needs at least {MEAN_MIN_EXPERTS} routed experts; this library routes "
               f"{len(experts)}. With one, its centred factors are zero (the expert minus itself: no prototype, no "
               "update); with two, both centred updates are the same matrix, so the router cannot tell them apart.")
        clamp(f"{why} Using no centring.", why)
        return "none", scope
    if general is not None and general not in names:
        clamp(f"No expert {general!r} to centre on (centre 'general:{general}'); the library has {names}. "
              "Using no centring.", f"No expert {general!r} to centre on (centre 'general:{general}'); the library "
                                    f"has {names}.")
        return "none", scope
    return (f"general:{general}" if general else centre), scope


def _scales(raw, default, experts: list[str], clamp) -> tuple:
    """The expert scales as RouterConfig takes them: "default" (or None) the library's, "none" none, a dict its
    valid part; unknown experts are dropped and a bad value falls back to none, with a notice (the CLI: refused)."""
    if raw is None or (isinstance(raw, str) and raw.strip() in ("", "default")) or raw is True:
        raw = default or {}
    elif raw is False or (isinstance(raw, str) and raw.strip() == "none"):
        return ()
    if not isinstance(raw, dict):
        clamp(f"Unknown expert scales {raw!r}: using none (choose {' or '.join(SCALE_CHOICES)}, or give factors "
              "per expert).", f"Unknown expert scales {raw!r}: use one of {', '.join(SCALE_CHOICES)}.")
        return ()
    unknown = sorted(str(k) for k in raw if k not in experts)
    if unknown:
        clamp(f"Ignored the scales of unknown experts {unknown}; the library routes {experts}.",
              f"Cannot scale unknown experts {unknown}; the library routes {experts}.")
    try:
        return check_scales({k: v for k, v in raw.items() if k in experts})
    except ValueError as exc:
        clamp(f"{exc}: using no expert scales.", str(exc))
        return ()


def _choice(raw, default: str, choices: tuple[str, ...], what: str, clamp, label: str | None = None) -> str:
    """One of `choices` for the field `what` (named `label` in messages); anything else (given, or a recorded
    default this version does not know) is the built-in default with a notice (the CLI: refused)."""
    value, label = _text(raw, default), label or what
    if value not in choices:
        clamp(f"Unknown {label} {value!r}: using {DEFAULTS[what]!r} (choose {' or '.join(choices)}).",
              f"Unknown {label} {value!r}: use one of {', '.join(choices)}.")
        return DEFAULTS[what]
    return value


def _layers(raw, default, model_layers: list[int] | None, clamp) -> tuple[int, ...] | None:
    """The routed layers: None or "" is the default, "all" every layer, else "0-3, 6" or a list of numbers;
    layers the model does not route are dropped with a notice (the CLI: refused)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raw = default
    try:
        layers = parse_layers(raw) if isinstance(raw, str) else None if raw is None else check_layers(raw)
    except ValueError as exc:
        clamp(f"{exc}: routing at every layer.", str(exc))
        return None
    if layers is None or model_layers is None:
        return layers
    kept = tuple(n for n in layers if n in model_layers)
    if len(kept) < len(layers):
        unknown = [n for n in layers if n not in model_layers]
        clamp(f"Ignored layers {unknown}: this model routes layers {compact_layers(model_layers)}.",
              f"Cannot route at layers {unknown}: this model routes layers {compact_layers(model_layers)}.")
    return kept or None


def _max_new(raw, limit: int | None, clamp) -> int:
    value = _number(raw, "max new tokens", DEFAULTS["max_new_tokens"], clamp)
    refusal = f"max_new_tokens must be between 0 and {limit}, got {raw}" if limit is not None else \
        f"max_new_tokens must be >= 0, got {raw}"
    return _whole(raw, value, "max new tokens", 0, limit, limit or 0, str(limit), clamp, refusal)


def _cut(prompt: str, max_new: int, tokenizer, context_length: int | None, limits: Limits,
         notices: list[str]) -> str:
    """The prompt's first tokens when it is longer than the front end's context (a notice says so). Without a
    prompt limit (the CLI) the prompt stays whole: the model keeps the context's last tokens and the trace says
    it was truncated."""
    if tokenizer is None or limits.prompt_tokens is None:
        return prompt
    limit = limits.prompt_tokens
    if context_length is not None:
        limit = min(limit, context_length - max_new - limits.template_room)
    limit = max(1, int(limit))
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if len(ids) <= limit:
        return prompt
    notices.append(f"The prompt was {len(ids):,} tokens ({len(prompt):,} characters): truncated to its first "
                   f"{limit} tokens, the page's context.")
    return tokenizer.decode(ids[:limit])
