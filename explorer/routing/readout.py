"""The per-prompt pick's readout (`RouterConfig(granularity="prompt", pick="readout")`): a multinomial logistic
regression from the evidence's per-layer routing of the user's text to the expert that should answer, fitted on
the library's *training* prompts. No model here: a pure function of the evidence trace.

Usage::

    readout = fit_readout(traces, labels)        # per-token evidence traces of training prompts, own experts
    readout.probabilities(evidence)              # (C,) over readout.classes
    rm.readouts[readout_key(rm.router)] = readout  # in memory (the bench); or stored in the library:
    store_readout(lib, readout, rm.router)       # library_store.store.readouts; RoutedModel loads it itself

Why: the mean weight over layers throws away *which layers* send the text where. On demo-private the expert with
the largest mean weight is the own expert for 0.825 of held-out prompts; a linear readout of the (layer, expert)
mean weights, fitted on 20 training prompts per task, names it for 0.96 (docs/evaluation.md). The weights are
Arrow's own; the readout only reads them. Experts with no training task (an upload, a `general` expert) are
never picked by it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from explorer.routing.prompt_level import UNCERTAIN_BELOW, UNCERTAIN_LEAD

# what shapes the evidence ("layers" and "scales" only when set: the keys of readouts fitted before they existed stay)
READOUT_FIELDS = ("top_k", "temperature", "centre", "centre_scope", "input_centre", "disabled", "layers", "scales")
READOUT_KIND = "pick-readout"


def readout_key(router) -> str:
    """The router settings the evidence depends on, as one string (granularity and pick do not change it)."""
    d = router.to_dict()
    return json.dumps({k: d[k] for k in READOUT_FIELDS if k in d}, sort_keys=True)


def features(trace) -> np.ndarray:
    """(L * E,) the mean routing weight of every (layer, expert) over the user's own tokens (every prompt token
    when the user's text was not located), mean over modules."""
    pos = trace.positions("user") or trace.positions("prompt")
    return trace.module_weights()[:, pos].mean(axis=1).ravel().astype(np.float64)  # (L, P, E) -> (L * E,)


@dataclass
class Readout:
    experts: list[str]  # the evidence's experts, in the order of its feature columns
    layers: list[int]
    classes: list[str]  # the experts it can pick
    coef: np.ndarray  # (C, L * E)
    intercept: np.ndarray  # (C,)
    meta: dict = field(default_factory=dict)  # how it was fitted: prompts per task, training accuracy, command

    @property
    def uncertain_below(self) -> float:
        """A pick under this probability is flagged uncertain: the threshold chosen on training prompts the readout
        was not fitted on (meta "uncertain_below", bench/pick_confidence.py --record), else `UNCERTAIN_BELOW`."""
        try:
            t = float(self.meta.get("uncertain_below", UNCERTAIN_BELOW))
        except (TypeError, ValueError):
            return UNCERTAIN_BELOW
        return t if 0 < t < 1 else UNCERTAIN_BELOW  # a stored value that is no probability: the default

    @property
    def uncertain_lead(self) -> float:
        """A pick by mean weight (and a per-token run's lean) under the same router settings is flagged when it leads
        its runner-up by less than this: the lead chosen on the same training prompts (meta "uncertain_lead",
        bench/pick_confidence.py --record), else `UNCERTAIN_LEAD`."""
        try:
            t = float(self.meta.get("uncertain_lead", UNCERTAIN_LEAD))
        except (TypeError, ValueError):
            return UNCERTAIN_LEAD
        return t if 0 < t < 1 else UNCERTAIN_LEAD  # a stored value that is no weight lead: the default

    @property
    def weak_below(self) -> float | None:
        """A pick whose evidence's routing strength (`prompt_level.strength`) is under this is flagged uncertain: the
        strength 95 % of the training prompts reach (meta "weak_below", bench/pick_confidence.py --record); None
        when none was recorded, or the stored value is no positive number."""
        try:
            t = float(self.meta["weak_below"])
        except (KeyError, TypeError, ValueError):
            return None
        return t if t > 0 and np.isfinite(t) else None

    def probabilities(self, trace) -> np.ndarray:
        """(C,) softmax over `classes` for one evidence trace routed over the same experts and layers."""
        if list(trace.experts) != self.experts or list(trace.layers) != self.layers:
            raise ValueError("This readout was fitted for other experts or layers; fit it again for this library "
                             "(bench/eval_routing.py --sweep-granularity --record).")
        z = self.coef @ features(trace) + self.intercept  # (C,)
        z = np.exp(z - z.max())
        return z / z.sum()

    def layer_margins(self, trace, a: str, b: str) -> tuple[np.ndarray, float]:
        """Why class `a` beat class `b` on this evidence trace, layer by layer: (L,) each layer's share of the logit
        margin z_a - z_b, and the intercepts' share; they sum to the margin exactly (the readout is linear)."""
        ia, ib = self.classes.index(a), self.classes.index(b)
        diff = (self.coef[ia] - self.coef[ib]) * features(trace)  # (L * E,)
        return diff.reshape(len(self.layers), -1).sum(axis=1), float(self.intercept[ia] - self.intercept[ib])

    def to_tensors(self) -> tuple[dict[str, np.ndarray], dict]:
        meta = {"experts": self.experts, "layers": [int(x) for x in self.layers], "classes": self.classes,
                **self.meta}
        return {"coef": np.asarray(self.coef, np.float32), "intercept": np.asarray(self.intercept, np.float32)}, meta

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> "Readout":
        rest = {k: v for k, v in meta.items() if k not in ("experts", "layers", "classes")}
        return cls(list(meta["experts"]), [int(x) for x in meta["layers"]], list(meta["classes"]),
                   np.asarray(tensors["coef"], np.float64), np.asarray(tensors["intercept"], np.float64), rest)


def fit_readout(traces: list, labels: list[str], c: float = 1.0) -> Readout:
    """Fit on per-token evidence traces (same experts and layers) and the expert each should pick. With a
    single class the readout always picks it."""
    from sklearn.linear_model import LogisticRegression

    if not traces or len(traces) != len(labels):
        raise ValueError(f"fit_readout needs one label per trace, got {len(traces)} traces, {len(labels)} labels")
    X = np.stack([features(tr) for tr in traces])  # (N, L * E)
    classes = sorted(set(labels))
    if len(classes) == 1:
        coef, intercept = np.zeros((1, X.shape[1])), np.zeros(1)
    else:
        clf = LogisticRegression(max_iter=5000, C=c).fit(X, labels)
        classes = list(clf.classes_)
        coef, intercept = clf.coef_, clf.intercept_
        if len(classes) == 2:  # sklearn's binary form: one row for the second class
            coef, intercept = np.vstack([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    chosen = np.asarray(classes)[np.argmax(X @ np.asarray(coef).T + intercept, axis=1)]  # (N,) on its own data
    return Readout(list(traces[0].experts), list(traces[0].layers), classes, coef, intercept,
                   {"n": len(labels), "train_accuracy": float(np.mean(chosen == np.asarray(labels))), "c": c})


class MissingReadout(ValueError):
    """No readout is fitted for this library and router (the page falls back to the mean weight)."""


def find_readout(readouts: dict, store, router) -> Readout:
    """The readout fitted for `router`: in `readouts` (readout_key -> Readout, filled as found), else stored in the
    library `store` (library_store.store.reports); MissingReadout naming what to do when there is none."""
    key = readout_key(router)
    if key not in readouts and store is not None:
        from library_store.store.reports import read_readout

        hit = read_readout(store, key)
        if hit is not None:
            readouts[key] = Readout.from_tensors({k: v.numpy() for k, v in hit[0].items()}, hit[1])
    if key not in readouts:
        raise MissingReadout("No pick readout is fitted for this library and router (top-k, temperature, centring): "
                         "pick 'mean', or fit one with bench/eval_routing.py --sweep-granularity --record.")
    return readouts[key]


def _recorded(readouts: dict, store, router, field: str, default):
    """`field` of the readout fitted for `router`'s evidence settings (`readout_key`: granularity and pick aside), or
    `default`. A fixed-weight router (base, uniform, one expert) decides nothing, so the store is not read for it."""
    if router.kind != "arrow":
        return default
    try:
        return getattr(find_readout(readouts, store, router), field)
    except (ValueError, OSError, KeyError):  # none fitted (MissingReadout), or a stored one unreadable: the default
        return default


def recorded_weak(readouts: dict, store, router) -> float | None:
    """The routing strength under which `router`'s picks and leans are flagged (`Readout.weak_below`), recorded with
    the readout fitted for the same evidence settings; None when there is none (nothing is flagged for it)."""
    return _recorded(readouts, store, router, "weak_below", None)


def recorded_lead(readouts: dict, store, router) -> float:
    """The mean-weight lead under which `router`'s picks and leans are flagged: the one recorded with the readout
    fitted for the same evidence settings, else `UNCERTAIN_LEAD`."""
    return _recorded(readouts, store, router, "uncertain_lead", UNCERTAIN_LEAD)
