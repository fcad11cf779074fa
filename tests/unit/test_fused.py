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


@pytest.fixture
def counted(monkeypatch):
    """fused.kernel, counting the one-token steps it served."""
    step = fused.kernel()
    assert step is not None, "the fused kernel did not build although a C++ compiler is present"
    calls = []

    def counting(*args):
        calls.append(args[6])  # G
        return step(*args)
    monkeypatch.setattr(fused, "kernel", lambda: counting)
    return calls


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
    monkeypatch.setattr(fused, "kernel", lambda: None)
    torch.testing.assert_close(fast, decode_logits(rm), atol=1e-5, rtol=0)
    monkeypatch.undo()
    assert rm.generate("hello there", max_new_tokens=6) == rm.generate("hello there", max_new_tokens=6)


def test_a_counterfactual_keeps_the_torch_ops(counted):
    rm = RoutedModel(fresh(TWINS[0]), experts(fresh(TWINS[0]), 6), RouterConfig(top_k=2))
    with rm.overriding("e2", layers=[0]):
        decode_logits(rm, 2)
    assert counted == []


@pytest.fixture
def counted_many(monkeypatch):
    """fused.many, counting the many-token group calls it served (their token counts)."""
    many = fused.many()
    assert many is not None, "the fused kernels did not build although a C++ compiler is present"
    calls = []

    def counting(z, *args):
        calls.append(z.shape[0])
        return many(z, *args)
    monkeypatch.setattr(fused, "many", lambda: counting)
    return calls


MANY = [
    RouterConfig(top_k=2),
    RouterConfig(top_k=3, temperature=0.1, disabled=("e1", "e4")),
    RouterConfig(top_k=7, disabled=("e0",)),  # every enabled expert chosen: no runner-up left
    RouterConfig(top_k=2, temperature=0.3, input_centre="base"),
    RouterConfig(top_k=4, centre="mean", centre_scope="weights"),
]


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("router", MANY)
def test_forward_equals_the_torch_ops(twin, router, counted_many, monkeypatch):
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 8, rank=[4, 2, 4, 3, 4, 4, 1, 4]), router)
    with torch.no_grad():
        fast = rm.base.model(input_ids=IDS).logits
    assert counted_many and set(counted_many) == {IDS.shape[1]}, "the forward did not go through route_many"
    monkeypatch.setattr(fused, "many", lambda: None)
    with torch.no_grad():
        slow = rm.base.model(input_ids=IDS).logits
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    rm.set_router(RouterConfig(mode="base"))
    with torch.no_grad():
        assert (fast - rm.base.model(input_ids=IDS).logits).abs().max() > 1e-3  # the experts matter here


@pytest.fixture
def counted_kept(monkeypatch):
    """fused.kept, counting the traced one-token group calls it served."""
    kept = fused.kept()
    assert kept is not None, "the fused kernels did not build although a C++ compiler is present"
    calls = []

    def counting(*args):
        calls.append(args[6])  # G
        return kept(*args)
    monkeypatch.setattr(fused, "kept", lambda: counting)
    return calls


@pytest.mark.parametrize("router", MANY[:4])
def test_a_trace_equals_the_torch_ops(router, counted_many, counted_kept, monkeypatch):
    twin = TWINS[0]
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 8, rank=[4, 2, 4, 3, 4, 4, 1, 4]), router)
    fast = rm.trace("route me, please", max_new_tokens=4)
    assert counted_many, "the traced prefill did not go through route_many"
    assert bool(counted_kept) == (router.top_k * 2 <= 8), "traced decoding steps did not go through route_one_kept"
    for name in ("kernel", "kept", "many"):  # (the counting wrappers above would ignore fused.set_enabled)
        monkeypatch.setattr(fused, name, lambda: None)
    slow = rm.trace("route me, please", max_new_tokens=4)
    assert fast.tokens == slow.tokens
    fast, slow = fast.routes, slow.routes
    ranked = np.concatenate([slow.scores, slow.runner_up[..., None]], axis=-1)  # (L, M, T, k+1)
    tied = (np.abs(np.diff(np.sort(np.nan_to_num(ranked, nan=-1.0), -1), axis=-1)) < 1e-6).any(-1)  # (L, M, T)
    assert tied.mean() < 0.1  # (zero states score every expert 0: topk's order among ties is unspecified)
    np.testing.assert_array_equal(fast.experts[~tied], slow.experts[~tied])
    np.testing.assert_allclose(fast.weights, slow.weights, atol=1e-5, rtol=0)
    for name in ("scores", "runner_up", "contribution", "base_norm"):  # kept as float16: one unit in the last place
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), atol=1e-4, rtol=1e-3, err_msg=name)


def test_a_counterfactual_or_uniform_keeps_the_torch_ops(counted_many):
    rm = RoutedModel(fresh(TWINS[0]), experts(fresh(TWINS[0]), 6), RouterConfig(top_k=2))
    with torch.no_grad(), rm.overriding("e2", layers=[0]):
        rm.base.model(input_ids=IDS)
    rm.set_router(RouterConfig(mode="uniform"))
    with torch.no_grad():
        rm.base.model(input_ids=IDS)
    assert counted_many == []


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
