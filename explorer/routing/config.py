"""`RouterConfig`: how tokens are sent to experts. Plain data, checked on construction; no torch here.

Usage::

    router = RouterConfig(top_k=2, temperature=0.8, disabled=("copy_word",))
    RouterConfig.from_dict(router.to_dict()) == router
    RouterConfig(mode="uniform"); RouterConfig(mode="expert:reverse_word"); RouterConfig(mode="base")
    RouterConfig(centre="mean", centre_scope="weights")      # PEFT's GenKnowSub over the routed experts
    RouterConfig(centre="general:general-knowledge")          # subtract one `general` expert of the library
    RouterConfig(top_k=2, granularity="prompt")               # route the prompt, then answer with its winner alone
    RouterConfig(layers=(0, 1, 2, 12, 15))                    # Arrow routes at these layers; the others run base
    RouterConfig(scales={"subtract": 1.2, "add": 0.9})        # per-expert score factors fitted on training prompts

Whether a setting fits a given library (top_k at most the number of enabled experts, known names) is checked by
`RoutedModel.set_router`; the maths of each mode is in docs/design.md, "Routing", and of centring in "Centring".
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("arrow", "base", "uniform", "expert")
CENTRES = ("none", "mean", "general:<expert>")
CENTRE_SCOPES = ("prototypes", "weights")
INPUT_CENTRES = ("none", "base")
GRANULARITIES = ("token", "prompt")
PICKS = ("mean", "readout")


@dataclass(frozen=True)
class RouterConfig:
    """How tokens are sent to experts.

    mode: "arrow" (per-token top-k routing), "base" (no experts), "uniform" (average of all enabled experts'
    updates, the paper's baseline) or "expert:<name>" (that expert alone).
    centre: "none", "mean" (subtract the mean of the routed experts' factors, A_e - mean A, B_e - mean B) or
    "general:<name>" (subtract that expert's factors; usually a library expert of kind `general`).
    centre_scope: "prototypes" (route on centred prototypes, apply the experts as trained) or "weights"
    (route on centred prototypes and apply the centred experts too: PEFT's GenKnowSub).
    input_centre: "none" (Arrow's score |h · p_e|) or "base" (score |(h - mu) · p_e|, mu the base model's mean
    input at that layer over a fixed set of generic prompts: the hidden state's shared direction, which
    otherwise picks the same experts for every token; see docs/design.md, "Input centring").
    granularity (arrow mode): "token" (every token at every layer routed on its own: Arrow) or "prompt" (the
    prompt is routed per token as evidence, the expert with the largest mean weight over the user's text is
    picked, and every token is then answered by that expert alone; see docs/design.md, "Prompt-level routing").
    Other modes ignore it.
    pick (per prompt): "mean" (the largest mean weight over the user's text) or "readout" (the library's fitted
    readout of the per-layer weights, explorer/routing/readout.py; refused by `set_router` where none is fitted).
    layers (arrow mode): None (route at every routed layer) or the model layers Arrow routes at; the others run
    their base layers, add no expert and record no routing (chosen where the library knows the task: see
    docs/design.md, "Routed layers"). Modes uniform and expert, and a per-prompt answer's pick, apply at every
    layer.
    scales: per-expert factors of Arrow's score, |h · p_e| × c_e (a factor folds into the prototype, c_e p_e),
    as (name, factor) pairs sorted by name (a dict is accepted); empty: Arrow's plain score. Fitted on a
    library's training prompts by bench/fit_scales.py (docs/design.md, "Expert scales"); unnamed experts keep 1.
    """

    mode: str = "arrow"
    top_k: int = 4  # mttl's example uses 4; PEFT's default is 3
    temperature: float = 1.0  # softmax(score / T) over the top-k; the paper uses 1
    disabled: tuple[str, ...] = ()  # experts left out of routing and of the uniform merge
    centre: str = "none"  # see docs/design.md, "Centring"
    centre_scope: str = "prototypes"
    input_centre: str = "none"
    granularity: str = "token"
    pick: str = "mean"
    layers: tuple[int, ...] | None = None
    scales: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        kind = self.mode.split(":", 1)[0] if isinstance(self.mode, str) else None
        if kind not in MODES or (kind == "expert") != (":" in self.mode) or self.mode.endswith(":"):
            raise ValueError(f"Unknown router mode {self.mode!r}: use arrow, base, uniform or expert:<name>.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError("top_k must be an integer >= 1 (at most the number of enabled experts), "
                             f"got {self.top_k!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be in (0, inf), got {self.temperature!r}")
        if isinstance(self.disabled, str):  # ("e1") is a string, not a tuple: a one-name typo, not 2 names
            raise ValueError(f"disabled must be a list of expert names, got the string {self.disabled!r}")
        object.__setattr__(self, "disabled", tuple(self.disabled))
        centre = self.centre
        if not isinstance(centre, str) or not (centre in ("none", "mean") or
                                               (centre.startswith("general:") and centre != "general:")):
            raise ValueError(f"Unknown centre {centre!r}: use one of {', '.join(CENTRES)}.")
        if self.centre_scope not in CENTRE_SCOPES:
            raise ValueError(f"Unknown centre_scope {self.centre_scope!r}: use one of {', '.join(CENTRE_SCOPES)}.")
        if self.input_centre not in INPUT_CENTRES:
            raise ValueError(f"Unknown input_centre {self.input_centre!r}: use one of {', '.join(INPUT_CENTRES)}.")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"Unknown granularity {self.granularity!r}: use one of {', '.join(GRANULARITIES)}.")
        if self.pick not in PICKS:
            raise ValueError(f"Unknown pick {self.pick!r}: use one of {', '.join(PICKS)}.")
        if self.layers is not None:
            object.__setattr__(self, "layers", check_layers(self.layers))
        object.__setattr__(self, "scales", check_scales(self.scales))

    @property
    def kind(self) -> str:
        """"arrow", "base", "uniform" or "expert" (the mode without an expert's name)."""
        return self.mode.split(":", 1)[0]

    @property
    def per_prompt(self) -> bool:
        """Arrow routing that picks one expert per prompt (granularity "prompt")."""
        return self.kind == "arrow" and self.granularity == "prompt"

    @property
    def general(self) -> str | None:
        """The expert subtracted by `centre="general:<name>"`, else None."""
        return self.centre.split(":", 1)[1] if self.centre.startswith("general:") else None

    def to_dict(self) -> dict:
        """Every field; `layers` and `scales` only when set (a router without them reads as it did before they
        existed)."""
        d = {"mode": self.mode, "top_k": self.top_k, "temperature": float(self.temperature),
             "disabled": list(self.disabled), "centre": self.centre, "centre_scope": self.centre_scope,
             "input_centre": self.input_centre, "granularity": self.granularity, "pick": self.pick}
        if self.layers is not None:
            d["layers"] = list(self.layers)
        if self.scales:
            d["scales"] = dict(self.scales)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "RouterConfig":
        """The inverse of `to_dict`; unknown keys are refused (a typo must not silently become a default).
        A dict written before centring existed has no centre fields: it reads as centre "none" (and without
        input_centre, as "none"; without granularity, as "token"; without pick, as "mean")."""
        unknown = sorted(set(data) - {"mode", "top_k", "temperature", "disabled", "centre", "centre_scope",
                                      "input_centre", "granularity", "pick", "layers", "scales"})
        if unknown:
            raise ValueError(f"Unknown RouterConfig fields {unknown}")
        return cls(**{**data, "disabled": tuple(data.get("disabled", ()))})


def check_scales(value) -> tuple[tuple[str, float], ...]:
    """`scales` as (name, factor) pairs sorted by name, from a dict or pairs; refuses a factor that is not a
    finite number > 0 and a name given twice."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"scales must map expert names to factors > 0, got {value!r}")
    pairs = list(value.items()) if isinstance(value, dict) else [tuple(p) for p in value]
    names = [p[0] for p in pairs]
    if any(len(p) != 2 or not isinstance(p[0], str) for p in pairs) or len(set(names)) != len(names):
        raise ValueError(f"scales must map distinct expert names to factors > 0, got {value!r}")
    for name, f in pairs:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < float("inf"):
            raise ValueError(f"The scale of expert {name!r} must be a finite number > 0, got {f!r}")
    return tuple(sorted((name, float(f)) for name, f in pairs))


def check_layers(value) -> tuple[int, ...]:
    """`layers` as a sorted tuple of distinct layer numbers; refuses a string, an empty list or a non-integer."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"layers must be a list of layer numbers (or None for every layer), got {value!r}")
    layers = list(value)
    if not layers or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in layers):
        raise ValueError(f"layers must be a non-empty list of layer numbers >= 0 (or None for every layer), "
                         f"got {value!r}")
    return tuple(sorted(set(layers)))


def routed_layers(router: RouterConfig, layers: list[int]) -> frozenset | None:
    """The model layers Arrow routes at under `router` (None: every one of `layers`, the model's routed layers);
    refuses a layer the model does not route."""
    if router.layers is None:
        return None
    unknown = [n for n in router.layers if n not in layers]
    if unknown:
        raise ValueError(f"Cannot route at layers {unknown}: the routed layers are {compact_layers(layers)}.")
    return frozenset(router.layers)


def compact_layers(layers) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for n in sorted(layers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def parse_layers(text: str) -> tuple[int, ...] | None:
    """"0-2, 5, 7-8" -> (0, 1, 2, 5, 7, 8); "" or "all" -> None (every layer). Refuses anything else."""
    text = (text or "").strip()
    if text.lower() in ("", "all"):
        return None
    out = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ValueError(f"Routed layers must look like '0-3, 6, 12-15' (or 'all'), got {text!r}") from None
    return check_layers(out)


def describe_router(router: dict) -> str:
    """A recorded router (`RouterConfig.to_dict`, possibly from an older version: missing fields read as their
    defaults) in words, e.g. "top-k 2, temperature 0.1, no centring, input centring base, one expert per prompt,
    picked by the fitted readout"; the page's report card and the evaluation docs both say it this way."""
    parts = [f"top-k {router.get('top_k')}", f"temperature {router.get('temperature')}"]
    centre = router.get("centre") or "none"
    parts.append("no centring" if centre == "none" else f"centre {centre} ({router.get('centre_scope')})")
    if (router.get("input_centre") or "none") != "none":
        parts.append(f"input centring {router['input_centre']}")
    if router.get("layers") is not None:
        parts.append(f"routed at layers {compact_layers(router['layers'])}")
    if router.get("scales"):
        low, high = min(router["scales"].values()), max(router["scales"].values())
        parts.append(f"expert scales {low:.2f}-{high:.2f} fitted on training prompts")
    if router.get("granularity") == "prompt":
        parts.append("one expert per prompt" + (", picked by the fitted readout" if router.get("pick") == "readout"
                                                else ", picked by mean weight"))
    return ", ".join(str(p) for p in parts)
