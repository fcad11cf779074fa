"""Prompt-level routing (`RouterConfig(granularity="prompt")`): route the prompt per token as evidence, pick one
expert, answer with it alone. No model here: the decision is a pure function of the evidence trace.

Usage::

    rm.set_router(RouterConfig(top_k=2, temperature=0.1, input_centre="base", granularity="prompt"))
    trace = rm.trace("Please compute 25 + 19", max_new_tokens=8)
    trace.evidence                 # RoutingTrace of the prompt alone, routed per token (granularity "token")
    choice = pick(trace.evidence)  # PromptPick: the expert, its mean weight, the runner-up and theirs
    trace.routes                   # what was applied: `choice.expert` alone, weight 1, at every token and layer

Why: per-token Arrow mixes several experts in every cell, and on held-in tasks that mixing loses most of what the
own expert alone gets right (S5), while the expert with the largest mean weight over the user's text, the very
choice own-text routing accuracy scores, answers like the own expert whenever it is right (docs/evaluation.md,
"Choosing one expert per prompt"). The evidence is kept in the trace, so the page can show why.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from explorer.routing.trace import RoutingTrace

UNCERTAIN_BELOW = 0.5  # a readout pick below this probability is flagged, unless the readout records its own threshold
UNCERTAIN_LEAD = 0.02  # a mean-weight pick leading its runner-up by less than this is flagged where no readout for
# the same router records a lead of its own (readout.recorded_lead). 0.02: the largest Youden's J on both demo
# libraries' training prompts pooled (bench/pick_confidence.py; 0.05 flagged 62-74 % of their picks)


@dataclass(frozen=True)
class PromptPick:
    """One prompt's decision: the expert that answers and the evidence margin behind it."""

    expert: str
    weight: float  # its mean routing weight over the evidence tokens (every layer, mean over modules)
    runner_up: str | None  # the expert with the next largest mean weight (None: one expert)
    runner_weight: float
    over: str  # "user" (the user's own text) or "prompt" (no user text located: every prompt token)
    rule: str = "mean"  # "mean" (largest mean weight) or "readout" (the fitted readout's most probable class)
    confidence: float | None = None  # readout: the pick's probability
    runner_confidence: float | None = None  # readout: the runner-up's probability
    by_mean: str | None = None  # readout: the expert the mean weight alone would have picked
    threshold: float | None = None  # readout: the probability under which the pick is flagged uncertain
    answered: bool = True  # False: a per-token run's lean (`lean`), which no expert answered alone
    lead_below: float = UNCERTAIN_LEAD  # by mean weight: flagged under this lead (the library's, where recorded)
    # why it beat the runner-up, per evidence layer: by mean weight, the layer's weight lead (their mean over the
    # routed layers is `margin`; a layer not routed leads by 0);
    # by readout, the layer's share of the logit margin (their sum plus `bias` is the margin)
    by_layer: tuple[float, ...] | None = None
    bias: float | None = None  # readout: the intercepts' share of the logit margin
    strength: float | None = None  # how strongly the evidence points along any prototype (`strength`)
    weak_below: float | None = None  # the strength under which the pick is flagged (None: none recorded)

    def record(self) -> dict:
        """What a trace keeps of it (`trace.meta["pick"]`): every field, `uncertain`, and the one-line `describe()`
        text."""
        by_layer = None if self.by_layer is None else [float(x) for x in self.by_layer]  # JSON: a list
        return {**asdict(self), "by_layer": by_layer, "uncertain": self.uncertain, "text": self.describe()}

    @property
    def uncertain(self) -> bool:
        """True when the evidence hardly decided: a readout pick under its readout's threshold (`threshold`, chosen on
        training prompts; `UNCERTAIN_BELOW` when none was), a mean-weight pick (or lean) ahead of its runner-up by
        less than `lead_below` (recorded with the library's readout for the router; `UNCERTAIN_LEAD` when none
        was), or either from evidence weaker than `weak_below` (`weak`). How often such picks are wrong on the demo
        libraries: docs/evaluation.md, "Uncertain picks" and "Weak routing is flagged too"."""
        if self.runner_up is None:
            return False
        if self.rule == "readout":
            return self.confidence < self._below or self.weak
        return self.margin < self.lead_below or self.weak

    @property
    def weak(self) -> bool:
        """A pick whose evidence points along the experts' prototypes less strongly than 95 % of the library's
        training prompts do (`weak_below`, recorded with the readout): text unlike any the library was trained on,
        whatever the readout's probability or the lead."""
        return self.strength is not None and self.weak_below is not None and self.strength < self.weak_below

    @property
    def _below(self) -> float:
        """The probability a readout pick must reach: its readout's threshold, else `UNCERTAIN_BELOW`."""
        return UNCERTAIN_BELOW if self.threshold is None else self.threshold

    @property
    def margin(self) -> float:
        return self.weight - self.runner_weight

    @property
    def lead(self) -> float:
        """How far the pick is ahead of its runner-up on the scale that decided it: a readout's probability, else
        the mean weight (1.0 with no runner-up)."""
        if self.runner_up is None:
            return 1.0
        return self.confidence - self.runner_confidence if self.rule == "readout" else self.margin

    def describe(self) -> str:
        """One line for the page's notice and the CLI, e.g. "Per prompt: the readout of your text's routing
        picked add (p 0.91; next subtract 0.05; the mean weight agrees); add alone answered." An uncertain pick
        adds why, e.g. "Uncertain pick (p under 0.35)." """
        text = self._decision()
        if not self.uncertain:
            return text
        reasons = []
        if self.rule == "readout" and self.confidence < self._below:
            reasons.append(f"p under {self._below:g}")
        if self.rule != "readout" and self.margin < self.lead_below:
            reasons.append(f"lead under {self.lead_below:g}")
        if self.weak:
            reasons.append(f"routing strength {self.strength:.2f} under {self.weak_below:g}: unlike the library's "
                           "training prompts")
        why = " and ".join(reasons)
        return f"{text} {'Uncertain pick' if self.answered else 'Undecided'} ({why})."

    def _decision(self) -> str:
        where = "your text" if self.over == "user" else "the prompt"
        if not self.answered:
            second = f"; next {self.runner_up} {self.runner_weight:.2f}" if self.runner_up else ""
            return f"Per token: {where} leans to {self.expert} (mean weight {self.weight:.2f}{second})."
        if self.rule == "readout":
            second = f"; next {self.runner_up} {self.runner_confidence:.2f}" if self.runner_up else ""
            mean = "the mean weight agrees" if self.by_mean == self.expert else f"by mean weight: {self.by_mean}"
            return (f"Per prompt: the readout of {where}'s routing picked {self.expert} (p {self.confidence:.2f}"
                    f"{second}; {mean}); {self.expert} alone answered.")
        second = f"; next {self.runner_up} {self.runner_weight:.2f}" if self.runner_up else ""
        return (f"Per prompt: {where} gave {self.expert} the largest mean weight ({self.weight:.2f}{second}); "
                f"{self.expert} alone answered.")


def strength(evidence: RoutingTrace, over: str = "user") -> float:
    """How strongly the text points along any expert's prototype: the mean over the `over` tokens, the routed layers
    and the modules of the top slot's raw Arrow score |(h - mu) · p| (NaN: no score recorded). Text outside every
    expert's tasks scores lower (bench/outside_library.py: ROC AUC 0.92-0.96 against generic requests)."""
    if evidence.routes.scores is None:  # a trace kept without the drill-down detail
        return float("nan")
    top = evidence.routes.scores[:, :, evidence.positions(over), 0].astype(np.float64)  # (L, M, P), NaN: not routed
    finite = top[np.isfinite(top)]
    return float(finite.mean()) if finite.size else float("nan")


def pick(evidence: RoutingTrace, readout=None, lead: float = UNCERTAIN_LEAD, weak: float | None = None) -> PromptPick:
    """The expert with the largest mean weight over the user's own tokens (every prompt token when the user's
    text was not located), as `RoutingTrace.winner("user")` chooses; ties go to the first expert in library
    order; it is flagged uncertain when it leads by less than `lead`, or its evidence's `strength` is under `weak`.
    With a `readout` (explorer/routing/readout.py): its most probable expert instead, flagged by its threshold and
    its `weak_below`. ValueError when the evidence routed nothing (no tokens, or every weight 0)."""
    over = "user" if evidence.user_span[1] > evidence.user_span[0] else "prompt"
    mean = evidence.usage(over)  # (E,)
    if mean.size == 0 or not mean.max() > 0:
        raise ValueError("Per-prompt routing found no routing weight on the prompt: nothing to pick.")
    order = np.argsort(-mean, kind="stable")  # largest first, library order among equals
    first = int(order[0])
    second = int(order[1]) if mean.size > 1 else None
    per_layer = evidence.module_weights()[:, evidence.positions(over)].mean(axis=1)  # (L, E), mean over tokens
    s = strength(evidence, over)
    s = s if np.isfinite(s) else None
    by_mean = PromptPick(expert=evidence.experts[first], weight=float(mean[first]),
                         runner_up=None if second is None else evidence.experts[second],
                         runner_weight=0.0 if second is None else float(mean[second]), over=over, lead_below=lead,
                         by_layer=None if second is None else tuple(per_layer[:, first] - per_layer[:, second]),
                         strength=s, weak_below=weak)
    if readout is None:
        return by_mean
    p = readout.probabilities(evidence)  # (C,)
    ranked = np.argsort(-p, kind="stable")
    chosen = readout.classes[int(ranked[0])]
    runner = readout.classes[int(ranked[1])] if len(ranked) > 1 else None
    weight = dict(zip(evidence.experts, mean.tolist()))
    layers, bias = readout.layer_margins(evidence, chosen, runner) if runner else (None, None)
    return PromptPick(expert=chosen, weight=float(weight[chosen]), runner_up=runner,
                      runner_weight=float(weight[runner]) if runner else 0.0, over=over, rule="readout",
                      confidence=float(p[ranked[0]]), runner_confidence=float(p[ranked[1]]) if runner else None,
                      by_mean=by_mean.expert, threshold=readout.uncertain_below,
                      by_layer=None if layers is None else tuple(layers), bias=bias,
                      strength=s, weak_below=readout.weak_below)


def lean(trace: RoutingTrace, lead: float = UNCERTAIN_LEAD, weak: float | None = None) -> PromptPick | None:
    """What a per-token run's own routing leans to: the pick by mean weight over the user's text (`pick`), marked
    `answered=False` (every token was routed on its own), and flagged as a mean-weight pick is when its lead is
    under `lead` or its routing strength under `weak`. None when the trace routed nothing."""
    try:
        return replace(pick(trace, lead=lead, weak=weak), answered=False)
    except ValueError:
        return None


def record_decision(trace: RoutingTrace, lead: float = UNCERTAIN_LEAD, weak: float | None = None) -> None:
    """What a run decided, in `trace.meta`: a per-prompt run's "pick" (moved from its evidence's meta, a
    `PromptPick.record()`), or a per-token Arrow run's "lean" (`lean`, flagged under `lead` or strength `weak`);
    fixed-weight modes decide nothing."""
    if trace.evidence is not None:
        trace.meta["pick"] = trace.evidence.meta.pop("pick")
    elif trace.mode == "arrow" and (leaning := lean(trace, lead, weak)) is not None:
        trace.meta["lean"] = leaning.record()
