"""Routing traces: capture never changes outputs, generated tokens are routed with the KV cache, truncation."""
import numpy as np
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh

from explorer.routing.model import RoutedModel, RouterConfig
from explorer.routing.trace import RoutingTrace


@pytest.fixture(scope="module", params=TWINS)
def rm(request):
    base = fresh(request.param)
    return RoutedModel(base, experts(base, 4), RouterConfig(top_k=2))


def test_capture_changes_no_output(rm):
    plain = rm.logits(IDS)
    with rm.capturing() as records:
        captured = rm.logits(IDS)
    assert records
    torch.testing.assert_close(captured, plain, atol=0, rtol=0)
    trace = rm.trace("Reverse the word: apple", max_new_tokens=6)
    assert trace.text == rm.generate("Reverse the word: apple", max_new_tokens=6)


def test_trace_of_prompt_and_generated_tokens(rm):
    trace = rm.trace("Reverse the word: apple", max_new_tokens=5)
    n_prompt = rm.encode("Reverse the word: apple")[0].shape[1]
    assert trace.n_prompt == n_prompt and len(trace.tokens) == len(trace.token_ids) == n_prompt + 5
    assert trace.is_generated == [False] * n_prompt + [True] * 5
    assert trace.layers == [0, 1] and trace.modules == rm.base.targets and trace.experts == ["e0", "e1", "e2", "e3"]
    assert trace.weights.shape == (2, 4, n_prompt + 5, 4)
    np.testing.assert_allclose(trace.weights.sum(-1), 1.0, atol=1e-5)
    assert ((trace.weights > 0).sum(-1) == 2).all()
    assert (trace.top_k, trace.temperature, trace.mode, trace.truncated) == (2, 1.0, "arrow", False)
    assert trace.text == rm.base.tokenizer.decode(trace.token_ids[n_prompt:], skip_special_tokens=True)
    assert trace.tokens[n_prompt - 4:n_prompt] == ["<|im_start|>", "ass", "istant", "\n"]  # readable, not "Ċ"
    assert RoutingTrace.from_json(trace.to_json()) == trace


def test_generated_tokens_routed_as_without_cache(rm):
    # With the KV cache each new token is routed alone; a full forward over the same ids must agree.
    trace = rm.trace("Count: one two", max_new_tokens=4)
    with rm.capturing() as records:
        rm.logits(torch.tensor([trace.token_ids]))
    full = rm.routing_weights(records)
    for site, w in full.items():
        layer, mod = rm._keys[site]
        np.testing.assert_allclose(trace.weights[trace.layers.index(layer), mod], w.numpy(), atol=1e-5)


def test_modes_in_the_trace(rm):
    try:
        rm.set_router(RouterConfig(mode="uniform"))
        assert np.allclose(rm.trace("hi").weights, 0.25)
        rm.set_router(RouterConfig(mode="expert:e2"))
        w = rm.trace("hi", max_new_tokens=2).weights
        assert (w[..., 2] == 1).all() and w.sum() == w[..., 2].sum()
        rm.set_router(RouterConfig(mode="base"))
        assert (rm.trace("hi", max_new_tokens=2).weights == 0).all()
    finally:
        rm.set_router(RouterConfig(top_k=2))


def test_long_prompt_is_truncated_and_says_so(rm):
    ctx = rm.base.context_length  # 512 for the twins
    trace = rm.trace("word " * (ctx + 50), max_new_tokens=3, chat=False)
    assert trace.truncated and len(trace.tokens) == ctx
    assert trace.n_prompt == ctx - 3
    assert not rm.trace("short", max_new_tokens=3).truncated


def test_bad_max_new_tokens(rm):
    with pytest.raises(ValueError, match=r"max_new_tokens must be between 0 and 511"):
        rm.trace("hi", max_new_tokens=512)
    with pytest.raises(ValueError, match=r"max_new_tokens must be between 0 and 511"):
        rm.generate("hi", max_new_tokens=-1)


def test_no_capture_left_behind(rm):
    with pytest.raises(RuntimeError, match="boom"):
        with rm.capturing():
            raise RuntimeError("boom")
    assert rm._state.capture is None
    with rm.capturing():
        with pytest.raises(RuntimeError, match="already running"):
            with rm.capturing():
                pass


def test_one_token_steps_equal_a_full_forward(rm):
    # Decoding routes one token by reading only its top-k experts; it must agree with the dense path.
    ids = torch.tensor([[1, 523, 3784, 314, 260, 3600, 30, 2003]])
    with torch.no_grad():
        full = rm.logits(ids)
        out = rm.base.model(input_ids=ids[:, :5], use_cache=True)
        cache, steps = out.cache, []
        for i in range(5, 8):
            out = rm.base.model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 5:], atol=1e-4, rtol=0)


def test_concurrent_calls_do_not_mix(rm):
    # A page may serve two requests at once: traces and generations must come out as if run one by one.
    from concurrent.futures import ThreadPoolExecutor

    want_trace = rm.trace("Count: one two", max_new_tokens=3)
    want_text = rm.generate("Reverse: apple", max_new_tokens=3)
    with ThreadPoolExecutor(4) as pool:
        traces = [pool.submit(rm.trace, "Count: one two", 3) for _ in range(3)]
        texts = [pool.submit(rm.generate, "Reverse: apple", 3) for _ in range(3)]
        assert all(t.result() == want_trace for t in traces)
        assert all(t.result() == want_text for t in texts)
