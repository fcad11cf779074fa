"""The fused kernels (explorer/routing/fused.py) route decoding and many-token forwards exactly as the torch ops do,
and are used."""
import shutil

import numpy as np
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh
from torch.utils.cpp_extension import is_ninja_available

from explorer.routing import fused
from explorer.routing.config import RouterConfig
from explorer.routing.layer import RoutedLinear
from explorer.routing.model import RoutedModel

COMPILER = (shutil.which("c++") or shutil.which("g++")) and is_ninja_available()  # what load_inline needs
pytestmark = pytest.mark.skipif(not COMPILER, reason="no C++ compiler or ninja: decoding uses the torch ops")


@torch.no_grad()
def decode_logits(rm, n: int = 5) -> torch.Tensor:
    """Logits of n one-token steps after a prefill of IDS (the steps go through the one-token path)."""
    model = rm.base.model
    out = model(input_ids=IDS, use_cache=True)
    cache, nxt, rows = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(n):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        rows.append(out.logits[:, -1])
    return torch.cat(rows)  # (n, vocab)


@torch.no_grad()
def assert_same(fast: torch.Tensor, slow: torch.Tensor, rm) -> None:
    """The kernels' logits equal the torch ops' within 1e-3 of what routing moves them by (routed minus base on
    IDS, max |.|; at least 1e-5). The kernels sum in another order and take the scores from a matmul of the
    prototypes alone; at T 0.1 the softmax multiplies that last-bit difference by ten, and these twins' experts
    move the logits by more than the logits' own size (≈ 1.2 against ≈ 0.8). A wrong expert, weight or row moves
    them by about the whole effect."""
    router = rm.router
    routed = rm.base.model(input_ids=IDS).logits
    rm.set_router(RouterConfig(mode="base"))
    effect = (routed - rm.base.model(input_ids=IDS).logits).abs().max().item()
    rm.set_router(router)
    diff = (fast - slow).abs().max().item()
    assert effect > 0.1 and diff <= max(1e-5, 1e-3 * effect), f"differ by {diff:.2e}; routing moves logits {effect:.2f}"


def counting(monkeypatch, name: str, note) -> list:
    """fused.<name> replaced by a wrapper that appends note(args) for every call it serves; the calls list."""
    kernel = getattr(fused, name)()
    assert kernel is not None, "the fused kernels did not build although a C++ compiler is present"
    calls = []

    def wrapper(*args):
        calls.append(note(args))
        return kernel(*args)
    monkeypatch.setattr(fused, name, lambda: wrapper)
    return calls


@pytest.fixture
def counted(monkeypatch):
    """fused.kernel, counting the one-token steps it served (their G)."""
    return counting(monkeypatch, "kernel", lambda args: args[6])


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("router", [
    RouterConfig(top_k=2),
    RouterConfig(top_k=3, temperature=0.1, disabled=("e1", "e4")),
    RouterConfig(top_k=2, temperature=0.3, input_centre="base"),
])
def test_decoding_equals_the_torch_ops(twin, router, counted, monkeypatch):
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 8, rank=[4, 2, 4, 3, 4, 4, 1, 4]), router)
    fast = decode_logits(rm)
    assert counted, "decoding did not go through the fused step"
    torch_ops_only(monkeypatch)
    assert_same(fast, decode_logits(rm), rm)
    monkeypatch.undo()
    assert rm.generate("hello there", max_new_tokens=6) == rm.generate("hello there", max_new_tokens=6)


@pytest.fixture
def counted_rows(monkeypatch):
    """fused.rows, counting the tokens of every many-token (or traced one-token) group call it served."""
    return counting(monkeypatch, "rows", lambda args: args[0].shape[0])


def torch_ops_only(monkeypatch):
    """No kernel at all from here on (the counting wrappers above would ignore fused.set_enabled)."""
    for name in ("kernel", "rows"):
        monkeypatch.setattr(fused, name, lambda: None)


MANY = [
    RouterConfig(top_k=2),
    RouterConfig(top_k=3, temperature=0.1, disabled=("e1", "e4")),
    RouterConfig(top_k=7, disabled=("e0",)),  # every enabled expert chosen: no runner-up left
    RouterConfig(top_k=2, temperature=0.3, input_centre="base"),
    RouterConfig(top_k=4, centre="mean", centre_scope="weights"),
]


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("router", MANY)
def test_forward_equals_the_torch_ops(twin, router, counted_rows, monkeypatch):
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 8, rank=[4, 2, 4, 3, 4, 4, 1, 4]), router)
    with torch.no_grad():
        fast = rm.base.model(input_ids=IDS).logits
    assert counted_rows and set(counted_rows) == {IDS.shape[1]}, "the forward did not go through route_rows"
    torch_ops_only(monkeypatch)
    with torch.no_grad():
        slow = rm.base.model(input_ids=IDS).logits
    assert_same(fast, slow, rm)


@pytest.mark.parametrize("twin", TWINS)
def test_odd_shapes_equal_the_torch_ops(twin, counted, counted_rows, monkeypatch):
    """Rank 3 and 7 experts: the kernels' loops that take four rows at a time leave remainders."""
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 7, rank=[3, 1, 2, 3, 3, 2, 1]), RouterConfig(top_k=3))
    with torch.no_grad():
        fast = rm.base.model(input_ids=IDS).logits
    fast_steps = decode_logits(rm)
    assert counted and counted_rows, "the kernels were not used"
    torch_ops_only(monkeypatch)
    with torch.no_grad():
        assert_same(fast, rm.base.model(input_ids=IDS).logits, rm)
    assert_same(fast_steps, decode_logits(rm), rm)


@pytest.mark.parametrize("router", MANY[:4])
def test_a_trace_equals_the_torch_ops(router, counted_rows, monkeypatch):
    twin = TWINS[0]
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 8, rank=[4, 2, 4, 3, 4, 4, 1, 4]), router)
    fast = rm.trace("route me, please", max_new_tokens=4)
    assert counted_rows and counted_rows[0] > 1, "the traced prefill did not go through route_rows"
    groups = {id(m.group) for m in rm.base.model.modules() if isinstance(m, RoutedLinear)}
    steps = counted_rows.count(1)
    assert steps == 4 * len(groups), "nor did the traced steps (one-token calls, sparse or not)"
    torch_ops_only(monkeypatch)
    slow = rm.trace("route me, please", max_new_tokens=4)
    assert fast.tokens == slow.tokens
    fast, slow = fast.routes, slow.routes
    ranked = np.concatenate([slow.scores, slow.runner_up[..., None]], axis=-1)  # (L, M, T, k+1)
    tied = (np.abs(np.diff(np.sort(np.nan_to_num(ranked, nan=-1.0), -1), axis=-1)) < 1e-6).any(-1)  # (L, M, T)
    assert tied.mean() < 0.1  # (zero states score every expert 0: topk's order among ties is unspecified)
    np.testing.assert_array_equal(fast.experts[~tied], slow.experts[~tied])
    np.testing.assert_allclose(fast.weights, slow.weights, atol=1e-4, rtol=0)  # (layer 1 reads layer 0's rounding)
    for name in ("scores", "runner_up", "contribution", "base_norm"):  # kept as float16: one unit in the last place
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), atol=1e-4, rtol=1e-3, err_msg=name)


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("force", [False, True])
def test_a_counterfactual_equals_the_torch_ops(twin, force, counted, counted_rows, monkeypatch):
    """An expert switched off in one layer is scored -inf by the kernels too; a forced expert runs the torch ops
    in that layer (the kernels serve the others)."""
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 8, rank=[4, 2, 4, 3, 4, 4, 1, 4]), RouterConfig(top_k=2))
    with torch.no_grad():
        plain = rm.base.model(input_ids=IDS).logits

    def run():
        with rm.overriding("e2", force=force, layers=[0]), torch.no_grad():
            return rm.base.model(input_ids=IDS).logits, decode_logits(rm, 3)
    fast, fast_steps = run()
    assert counted and counted_rows, "the kernels were not used under a counterfactual"
    assert (fast - plain).abs().max() > 1e-3, "the counterfactual changed nothing: pick another expert"
    torch_ops_only(monkeypatch)
    slow, slow_steps = run()
    assert_same(fast, slow, rm)
    assert_same(fast_steps, slow_steps, rm)


def test_the_uniform_mode_keeps_the_torch_ops(counted, counted_rows):
    rm = RoutedModel(fresh(TWINS[0]), experts(fresh(TWINS[0]), 6), RouterConfig(mode="uniform"))
    with torch.no_grad():
        rm.base.model(input_ids=IDS)
    decode_logits(rm, 2)
    assert counted == counted_rows == []


def test_a_failed_build_warns_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(**kwargs):  # what load_inline raises when the compiler fails (without spending 15 s compiling)
        raise RuntimeError(f"Error building extension '{kwargs['name']}'")
    monkeypatch.setattr(ext, "load_inline", broken)
    with pytest.warns(UserWarning, match="could not be built.*Error building extension"):
        assert fused._build() is None
    fused.set_enabled(False)
    try:
        assert fused.kernel() is None
    finally:
        fused.set_enabled(True)
