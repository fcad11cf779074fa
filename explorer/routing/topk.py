"""`TopKRoutes`: a routing trace stored sparsely, the top-k experts of every (layer, module, token) and what
they did, expanded to dense (layer, module, token, expert) weights only when asked.

Usage::

    routes = TopKRoutes.from_dense(weights)        # (L, M, T, E) float -> sparse (no drill-down detail)
    routes.dense()                                 # (L, M, T, E) float32, equal to the weights it came from
    routes.take([0, 2, 5])                         # the same routes restricted to some token positions
    routes.nbytes                                  # memory of the arrays
    TopKRoutes.from_dict(routes.to_dict()) == routes

Shapes: L layers, M routed modules, T tokens, k slots (the router's top-k; in uniform mode every enabled
expert, in expert mode 1), E experts. Slots are ordered by routing weight (then raw score), largest first;
an unused slot has expert -1 and weight 0. The drill-down detail (issue 11) is optional: a trace made from
dense weights has none. See docs/engine.md, "Sparse traces".
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

DETAIL = ("scores", "runner_up", "contribution", "base_norm")
_F16_MAX = float(np.finfo(np.float16).max)


def compact(x: np.ndarray | None) -> np.ndarray | None:
    """Float16 when every finite value fits (display precision, half the bytes), float32 otherwise."""
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float32)
    finite = x[np.isfinite(x)]
    return x.astype(np.float16) if finite.size == 0 or np.abs(finite).max() < _F16_MAX else x


def index_dtype(n_experts: int):
    return np.int16 if n_experts < np.iinfo(np.int16).max else np.int32


@dataclass(frozen=True)
class CellExpert:
    """One chosen expert in a drill-down cell (`RoutingTrace.cell`); None where the trace holds no detail."""

    expert: str
    weight: float  # routing weight w_e
    score: float | None = None  # raw |h · p_e|
    margin: float | None = None  # score minus the next chosen expert's (the last: minus the best left out)
    contribution: float | None = None  # ‖w_e · s_e · B_e A_e h‖
    relative: float | None = None  # contribution / ‖base layer output‖


@dataclass(eq=False)
class TopKRoutes:
    n_experts: int
    experts: np.ndarray  # (L, M, T, k) int16 (int32 past 32k experts): expert ids, -1 for an unused slot
    weights: np.ndarray  # (L, M, T, k) float32: routing weights, exactly as the router computed them
    scores: np.ndarray | None = None  # (L, M, T, k) raw |h · p_e| of each slot's expert
    runner_up: np.ndarray | None = None  # (L, M, T) best raw score outside the chosen slots; NaN when none
    contribution: np.ndarray | None = None  # (L, M, T, k) ‖w_e · s_e · B_e A_e h‖ of each slot's expert
    base_norm: np.ndarray | None = None  # (L, M, T) ‖base layer output‖ (W h + bias) at that token

    def __post_init__(self):
        self.experts = np.asarray(self.experts).astype(index_dtype(self.n_experts), copy=False)
        self.weights = np.asarray(self.weights, dtype=np.float32)
        if self.experts.ndim != 4 or self.experts.shape != self.weights.shape:
            raise ValueError(f"experts {self.experts.shape} and weights {self.weights.shape} must be the same "
                             "(layers, modules, tokens, k)")
        if self.experts.size and (self.experts.max() >= self.n_experts or self.experts.min() < -1):
            raise ValueError(f"expert ids must be in [-1, {self.n_experts}), got {self.experts.min()}.."
                             f"{self.experts.max()}")
        for name in DETAIL:
            value = getattr(self, name)
            if value is not None:
                want = self.shape[:3] + ((self.k,) if name in ("scores", "contribution") else ())
                value = compact(value)
                if value.shape != want:
                    raise ValueError(f"{name} shape {value.shape} != {want}")
                setattr(self, name, value)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(L, M, T, E): the dense shape."""
        L, M, T, _ = self.experts.shape
        return (L, M, T, self.n_experts)

    @property
    def k(self) -> int:
        return self.experts.shape[3]

    @property
    def has_detail(self) -> bool:
        return self.scores is not None and self.contribution is not None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.experts, self.weights, *(getattr(self, n) for n in DETAIL))
                   if a is not None)

    # ---------------------------------------------------------------- conversions

    @classmethod
    def from_dense(cls, weights: np.ndarray) -> "TopKRoutes":
        """(L, M, T, E) weights -> the non-zero ones, k = the most any router gave weight to."""
        w = np.asarray(weights, dtype=np.float32)
        if w.ndim != 4:
            raise ValueError(f"weights must be (layers, modules, tokens, experts), got shape {w.shape}")
        E = w.shape[3]
        k = int((w != 0).sum(-1).max()) if w.size else 0
        order = np.argsort(-w, axis=-1, kind="stable")[..., :k]  # (L, M, T, k) largest first
        top = np.take_along_axis(w, order, axis=-1)  # (L, M, T, k)
        ids = np.where(top != 0, order, -1)
        return cls(E, ids, np.where(top != 0, top, 0.0))

    def dense(self, which: str = "weights") -> np.ndarray:
        """(L, M, T, E) float32 of the weights (or "contribution" / "scores"), 0 where an expert was not chosen."""
        values = self.weights if which == "weights" else getattr(self, which)
        if values is None:
            raise ValueError(f"this trace has no {which} (it was made from dense weights, without drill-down data)")
        L, M, T, E = self.shape
        out = np.zeros((L, M, T, E + 1), dtype=np.float32)  # one spare column takes the unused slots
        slot = np.where(self.experts < 0, E, self.experts).astype(np.intp)
        np.put_along_axis(out, slot, values.astype(np.float32), axis=-1)
        return out[..., :E]

    def cell(self, li: int, mi: int, t: int, names: list[str]) -> list[CellExpert]:
        """The used slots of (layer index li, module index mi, token t), largest weight first."""
        ids = self.experts[li, mi, t]  # (k,)
        used = [j for j in range(self.k) if ids[j] >= 0]

        def val(a, *at):
            return None if a is None or not np.isfinite(a[at]) else float(a[at])

        out = []
        for n, j in enumerate(used):
            score = val(self.scores, li, mi, t, j)
            nxt = val(self.scores, li, mi, t, used[n + 1]) if n + 1 < len(used) else val(self.runner_up, li, mi, t)
            c, base = val(self.contribution, li, mi, t, j), val(self.base_norm, li, mi, t)
            out.append(CellExpert(names[int(ids[j])], float(self.weights[li, mi, t, j]), score,
                                  None if score is None or nxt is None else score - nxt, c,
                                  None if c is None or not base else c / base))
        return out

    def take(self, positions) -> "TopKRoutes":
        """The routes of some token positions (an index array along T)."""
        pos = np.asarray(positions, dtype=np.intp)
        parts = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in parts.items():
            if isinstance(value, np.ndarray):
                parts[name] = value[:, :, pos]
        return TopKRoutes(**parts)

    def to_dict(self) -> dict:
        """JSON-ready: nested lists of the shortest decimals that read back to the same float16/32 values
        (`json_floats`); NaN (no runner-up) as null."""
        out = {"n_experts": int(self.n_experts), "shape": list(self.experts.shape),
               "experts": self.experts.tolist(), "weights": json_floats(self.weights)}
        for name in DETAIL:
            value = getattr(self, name)
            if value is not None:
                out[name] = json_floats(value)
                out[name + "_dtype"] = value.dtype.name
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TopKRoutes":
        shape = tuple(data["shape"])  # nested lists lose trailing dimensions when some are 0

        def arr(name, dtype="float32"):
            if data.get(name) is None:
                return None
            size = shape if name in ("experts", "weights", "scores", "contribution") else shape[:3]
            a = np.array(data[name], dtype=np.float64 if dtype != "int" else np.int64)  # null -> NaN
            return a.reshape(size).astype(data.get(name + "_dtype", dtype) if dtype != "int" else np.int64)

        return cls(int(data["n_experts"]), arr("experts", "int"), arr("weights"),
                   **{name: arr(name) for name in DETAIL})

    def __eq__(self, other) -> bool:
        if not isinstance(other, TopKRoutes):
            return NotImplemented
        return self.n_experts == other.n_experts and all(
            _same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self) if f.name != "n_experts")


# significant digits tried, fewest first; the last always reads back exactly. Starting at 3 (6) instead of 1 saves
# passes and costs a digit at most, on the few values that fewer digits would do
_DIGITS = {np.dtype(np.float16): (3, 5), np.dtype(np.float32): (6, 9)}


def json_floats(x: np.ndarray) -> list:
    """x (any shape, float16 or float32) -> nested lists of Python floats, each the shortest decimal (at most 5 or 9
    significant digits; a value that 1-2 digits would do may get 3) that reads back to the same value in x's dtype,
    NaN as None (JSON has no NaN).

    A float16 value's float64 repr runs to 17 digits ("0.0123443603515625"); this writes "0.012344". For each
    number of digits in _DIGITS, fewest first, the values not yet done are rounded to it (m / 10^k, one correctly
    rounded division, so the float64's repr is that decimal) and kept where they read back exactly; what is left
    keeps its exact float64 value."""
    x = np.asarray(x)
    out = x.astype(np.float64)  # exact for float16/32
    todo = np.isfinite(out) & (out != 0)  # zero, NaN and inf print short as they are
    first, last = _DIGITS.get(x.dtype, (1, 0))
    for digits in range(first, last + 1):
        if not todo.any():
            break
        idx = np.flatnonzero(todo)
        v = out.flat[idx]  # (n,) float64
        k = digits - 1 - np.floor(np.log10(np.abs(v)))  # decimal places of `digits` significant digits
        with np.errstate(over="ignore", invalid="ignore"):
            m = np.round(v * 10.0 ** k)
            r = np.where(k >= 0, m / 10.0 ** np.maximum(k, 0), m * 10.0 ** np.maximum(-k, 0))  # (n,)
            ok = np.isfinite(r) & (r.astype(x.dtype) == x.flat[idx])
        out.flat[idx[ok]] = r[ok]
        todo.flat[idx[ok]] = False
    nan = np.isnan(out)
    if not nan.any():
        return out.tolist()
    boxed = out.astype(object)  # None in place of each NaN
    boxed[nan] = None
    return boxed.tolist()


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
