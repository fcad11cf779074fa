"""Per-token counterfactuals: switch one expert off (or force it) at one grid cell, at every layer of that
token, or everywhere, and see the next-token distribution before and after, and the answer regenerated. No
gradio here.

Usage::

    cf = Counterfactual(layer=3, token=7, expert="reverse_word", action="off", scope="cell")
    with registry.lock:                      # the shared model: one run at a time
        out = next_token(routed, trace, cf)  # CounterfactualResult: top-5 before/after, KL, seconds
        regenerate(routed, trace, cf, out)   # fills out.text_after: the answer with the intervention

A per-prompt run (one expert answered every token, `trace.meta["pick"]`) is intervened on as it ran: the pick
alone, with the expert switched off (weight 0: the base layer there) or forced instead of it at the chosen cells.

The distribution at token t is the model's prediction of token t + 1. For the scopes "cell" and "token" the
intervention touches token t alone, so tokens 0..t run once (keeping a KV cache) and token t once more, with
the intervention, on that cache cut back to the tokens before it: one forward and one decoding step in all.
"everywhere" changes every token, so it runs the prefix twice. The regenerated answer keeps the tokens up to t
(the run's own context) and decodes greedily from there, with the intervention in force for token t (or for
every token, "everywhere").
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from explorer.routing.capture import last_logits_only, next_step_kwargs
from explorer.routing.trace import RoutingTrace

SCOPES = {"cell": "this layer only", "token": "every layer, this token", "everywhere": "every layer, every token"}
ACTIONS = {"off": "switch the expert off", "force": "force the expert (weight 1)"}
TOP = 5


@dataclass(frozen=True)
class Counterfactual:
    layer: int  # model layer number (scope "cell")
    token: int  # position in the full trace
    expert: str
    action: str = "off"  # "off" or "force"
    scope: str = "cell"  # "cell", "token" or "everywhere"

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"Unknown action {self.action!r}: use one of {list(ACTIONS)}.")
        if self.scope not in SCOPES:
            raise ValueError(f"Unknown scope {self.scope!r}: use one of {list(SCOPES)}.")

    def describe(self) -> str:
        what = "off" if self.action == "off" else "forced"
        where = {"cell": f"at layer {self.layer} of token #{self.token}",
                 "token": f"at every layer of token #{self.token}", "everywhere": "at every layer and token"}
        return f"expert {self.expert} {what} {where[self.scope]}"


@dataclass
class CounterfactualResult:
    cf: Counterfactual
    before: list[tuple[str, float]]  # top-5 next tokens (as shown) and probabilities, without the intervention
    after: list[tuple[str, float]]  # ... and with it
    kl: float  # KL(before || after) in nats, over the whole vocabulary
    seconds: float  # the distribution's cost (not the regeneration)
    text_before: str = ""  # the run's answer
    text_after: str | None = None  # the answer regenerated with the intervention (regenerate)
    changed_at: int | None = None  # first generated token that differs (index into the answer's tokens)
    new_tokens: list[int] = field(default_factory=list, repr=False)
    _cache: object = field(default=None, repr=False)  # the KV cache through token t, intervention in force


def check(trace: RoutingTrace, cf: Counterfactual) -> None:
    """ValueError (a page notice) for a counterfactual this run cannot answer."""
    if trace.router.kind != "arrow":
        raise ValueError(f"Counterfactuals change Arrow's routing; this run used mode {trace.router.mode!r}.")
    if trace.router.per_prompt and "pick" not in trace.meta:
        raise ValueError("This per-prompt run does not record its pick: run it again to try a counterfactual.")
    if cf.expert not in trace.experts:
        raise ValueError(f"Unknown expert {cf.expert!r}: this run routes over {trace.experts}.")
    if cf.expert in trace.router.disabled:
        raise ValueError(f"Expert {cf.expert!r} was disabled for this run: it cannot be switched off or forced.")
    if cf.layer not in trace.layers:
        raise ValueError(f"Layer {cf.layer} is not in this run (layers {trace.layers[0]}..{trace.layers[-1]}).")
    if not 0 <= cf.token < len(trace.tokens):
        raise ValueError(f"Token {cf.token} is not in this run (tokens 0..{len(trace.tokens) - 1}).")


def _top(logp: torch.Tensor, shown) -> list[tuple[str, float]]:
    p, ids = logp.exp().topk(TOP)
    return list(zip(shown(ids.tolist()), [float(x) for x in p]))


def _as_run(routed, trace: RoutingTrace):
    """The routing the run answered with: a per-prompt run's pick alone, else the router as set."""
    return routed.answering_with(trace.meta["pick"]["expert"]) if trace.router.per_prompt else nullcontext()


def next_token(routed, trace: RoutingTrace, cf: Counterfactual) -> CounterfactualResult:
    """Before/after next-token distributions at token `cf.token` (see module docstring). Call with the
    registry's lock held and `routed`'s router set to the run's (`trace.router`)."""
    check(trace, cf)
    with _as_run(routed, trace):
        return _next_token(routed, trace, cf)


def regenerate(routed, trace: RoutingTrace, result: CounterfactualResult) -> CounterfactualResult:
    """The answer regenerated greedily from token t + 1 (the intervention kept in force "everywhere"), as
    long as the run's answer (or its token budget). Call right after `next_token`, lock still held."""
    with _as_run(routed, trace):
        return _regenerate(routed, trace, result)


@torch.no_grad()
def _next_token(routed, trace: RoutingTrace, cf: Counterfactual) -> CounterfactualResult:
    t0 = time.perf_counter()
    model, t = routed.base.model, cf.token
    last = last_logits_only(model)  # every call below reads the last position's logits alone
    seq = torch.tensor([trace.token_ids[: t + 1]], device=routed.device)  # (1, t + 1)
    layers = [cf.layer] if cf.scope == "cell" else None
    force = cf.action == "force"
    if cf.scope == "everywhere":
        before = model(input_ids=seq, **last).logits[0, -1]
        with routed.overriding(cf.expert, force=force, layers=None):
            out = model(input_ids=seq, use_cache=True, **last)
        after = out.logits[0, -1]
    else:
        # One forward of tokens 0..t gives "before"; its KV cache, cut back to the tokens before t (which the
        # intervention leaves alone), serves the second run of token t alone: one forward plus one step.
        first = model(input_ids=seq, use_cache=True, **last)
        before = first.logits[0, -1]
        if _unused(trace, cf):  # nothing to run again: and a step would differ from the forward by rounding
            out, after = first, before
        else:
            step = {}
            if t > 0:
                step = next_step_kwargs(model, first)
                next(iter(step.values())).crop(-1)  # drop token t: back to the tokens before it
            with routed.overriding(cf.expert, force=force, layers=layers):
                out = model(input_ids=seq[:, t:], use_cache=True, **step, **last)
            after = out.logits[0, -1]
    lb, la = before.float().log_softmax(-1), after.float().log_softmax(-1)  # (V,)
    kl = float((lb.exp() * (lb - la)).sum().clamp_min(0))
    result = CounterfactualResult(cf, _top(lb, routed.display_tokens), _top(la, routed.display_tokens), kl,
                                  time.perf_counter() - t0, text_before=trace.text)
    result._cache = (out, int(after.argmax()))
    return result


def _unused(trace: RoutingTrace, cf: Counterfactual) -> bool:
    """Switching off an expert that token t's routing gives no weight where the intervention applies (its layer,
    or every layer for scope "token") changes nothing: the run's trace says so without a model call."""
    if cf.action != "off" or cf.scope == "everywhere":
        return False
    layers = [cf.layer] if cf.scope == "cell" else trace.layers
    return all(c.expert != cf.expert or c.weight == 0
               for layer in layers for cells in trace.cell(layer, cf.token).values() for c in cells)


@torch.no_grad()
def _regenerate(routed, trace: RoutingTrace, result: CounterfactualResult) -> CounterfactualResult:
    cf, model = result.cf, routed.base.model
    out, nxt = result._cache
    n_prompt, total = trace.n_prompt, len(trace.token_ids)
    budget = max(total - n_prompt, int(trace.meta.get("max_new_tokens", 0) or 0))
    eos = routed.base.tokenizer.eos_token_id
    ids = list(trace.token_ids[: cf.token + 1])
    rest = trace.token_ids[cf.token + 1: n_prompt]  # prompt tokens after t: fed as they are
    hold = routed.overriding(cf.expert, force=cf.action == "force", layers=None) if cf.scope == "everywhere" \
        else None
    if hold is not None:
        hold.__enter__()
    try:
        if rest:
            out = model(input_ids=torch.tensor([rest], device=routed.device), use_cache=True,
                        **next_step_kwargs(model, out), **last_logits_only(model))
            ids += rest
            nxt = int(out.logits[0, -1].argmax())
        while len(ids) - n_prompt < budget:
            ids.append(nxt)
            if nxt == eos or len(ids) - n_prompt >= budget:
                break
            out = model(input_ids=torch.tensor([[nxt]], device=routed.device), use_cache=True,
                        **next_step_kwargs(model, out))
            nxt = int(out.logits[0, -1].argmax())
    finally:
        if hold is not None:
            hold.__exit__(None, None, None)
    new = ids[n_prompt:]
    old = trace.token_ids[n_prompt:]
    result.new_tokens = new
    result.text_after = routed.base.tokenizer.decode(new, skip_special_tokens=True)
    result.changed_at = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b),
                             None if len(old) == len(new) else min(len(old), len(new)))
    result._cache = None
    return result
