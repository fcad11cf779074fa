"""The fused one-token step (explorer/routing/fused.py) routes decoding exactly as the torch ops do, and is used."""
import shutil

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


def test_a_trace_or_a_counterfactual_keeps_the_torch_ops(counted):
    rm = RoutedModel(fresh(TWINS[0]), experts(fresh(TWINS[0]), 6), RouterConfig(top_k=2))
    rm.trace("route me", max_new_tokens=3)  # the trace records the slots: the torch path
    with rm.overriding("e2", layers=[0]):
        decode_logits(rm, 2)
    assert counted == []


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
