"""Routing traces: capture never changes outputs, generated tokens are routed with the KV cache, truncation,
the user's span and library identity; then the trace's own reductions on hand-made weights, and
`user_token_span` on SmolLM2's tokenizer."""
import numpy as np
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh

from explorer.routing.trace import user_token_span
from library_store.models import load_tokenizer
from library_store.store.library import ExpertLibrary

from explorer.routing.config import RouterConfig
from explorer.routing.model import RoutedModel
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
    assert trace.router == RouterConfig(top_k=2) and trace.library == {}  # a bare model has no library
    assert trace.formatted_prompt == rm.base.format_prompt("Reverse the word: apple")
    s, e = trace.user_span
    assert "".join(trace.tokens[s:e]) == "Reverse the word: apple" and e < n_prompt - 4
    assert trace.positions("user+generated") == list(range(s, e)) + list(range(n_prompt, n_prompt + 5))
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
    assert trace.user_span == (0, ctx - 3)  # chat off: every kept prompt token is the user's
    chat = rm.trace("word " * (ctx + 50) + "end", max_new_tokens=3)
    s, e = chat.user_span
    assert chat.truncated and s == 0 and chat.tokens[e - 1].strip() == "end" and chat.tokens[e] == "<|im_end|>"


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

    # the references run alone, but on a worker thread too: torch.set_num_threads is per thread (OpenMP), so a
    # main thread another test left at 2 threads would sum in another order than the pool's threads
    with ThreadPoolExecutor(1) as alone:
        want_trace = alone.submit(rm.trace, "Count: one two", 3).result()
        want_text = alone.submit(rm.generate, "Reverse: apple", 3).result()
    with ThreadPoolExecutor(4) as pool:
        traces = [pool.submit(rm.trace, "Count: one two", 3) for _ in range(3)]
        texts = [pool.submit(rm.generate, "Reverse: apple", 3) for _ in range(3)]
        assert all(t.result() == want_trace for t in traces)
        assert all(t.result() == want_text for t in texts)


# ---------------------------------------------------------------- library identity


def test_trace_records_the_library_it_was_routed_over(tmp_path):
    base = fresh("tiny-random-llama")
    exps = experts(base, 3)
    libs = []
    for name, members in (("one", exps), ("two", exps), ("three", exps[:2])):
        lib = ExpertLibrary.create(tmp_path / name, base)
        for e in members:
            lib.add(e)
        libs.append(lib)
    orders = [None, ["e2", "e0", "e1"], None]
    traces = [RoutedModel.from_library(base, lib, RouterConfig(top_k=1), names=names).trace("hi")
              for lib, names in zip(libs, orders)]
    one, two, three = (t.library for t in traces)
    assert one["name"] == "one" and one["path"] == str(tmp_path / "one") and traces[1].experts[0] == "e2"
    assert one["content"] == two["content"]  # the same experts, in another order, in another folder
    assert three["content"] != one["content"] and len(one["content"]) == 64
    assert RoutingTrace.from_json(traces[0].to_json()).library == one


# ---------------------------------------------------------------- reductions on hand-made weights


def hand_trace(**changes) -> RoutingTrace:
    """2 layers, modules q and v, tokens <s> A B | x y (x, y generated; the user wrote A B), experts a b c."""
    w = np.zeros((2, 2, 5, 3), dtype=np.float32)
    w[..., 0] = 1.0  # every router picks a ...
    w[0, 1, 1] = [0.0, 0.5, 0.5]  # ... except layer 0's v on A: an even b/c split
    w[1, :, 2] = [0.0, 0.0, 1.0]  # and layer 1 on B: c
    w[:, :, 3:] = [0.2, 0.8, 0.0]  # generated tokens lean to b
    args = dict(tokens=["<s>", "A", "B", "x", "y"], token_ids=[1, 2, 3, 4, 5],
                is_generated=[False, False, False, True, True], layers=[0, 3], modules=["q", "v"],
                experts=["a", "b", "c"], weights=w, router=RouterConfig(top_k=2), user_span=(1, 3))
    return RoutingTrace(**{**args, **changes})


def test_positions():
    t = hand_trace()
    assert t.positions() == t.positions("all") == [0, 1, 2, 3, 4]
    assert (t.positions("prompt"), t.positions("user"), t.positions("generated")) == ([0, 1, 2], [1, 2], [3, 4])
    assert t.positions("user+generated") == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="Unknown token selection 'users'"):
        t.positions("users")


def test_module_weights_and_entropy():
    t = hand_trace()
    np.testing.assert_allclose(t.module_weights("v"), t.weights[:, 1])
    np.testing.assert_allclose(t.module_weights()[0, 1], [0.5, 0.25, 0.25])  # mean of q (a) and v (b/c split)
    with pytest.raises(ValueError, match=r"Unknown module 'k'; this trace routes \['q', 'v'\]"):
        t.module_weights("k")
    h_v, h = t.entropy("v"), t.entropy()
    assert h.shape == (2, 5)
    assert h_v[0, 1] == pytest.approx(np.log(2)) and h_v[1, 2] == 0 and t.entropy("q")[0, 1] == 0
    assert h[0, 1] == pytest.approx(np.log(2) / 2)  # the mean of the modules' entropies
    gen = -(0.2 * np.log(0.2) + 0.8 * np.log(0.8))
    np.testing.assert_allclose(h[:, 3:], gen, rtol=1e-6)
    assert (hand_trace(weights=np.zeros((2, 2, 5, 3))).entropy() == 0).all()  # base mode: no NaN from 0 log 0


def test_usage():
    t = hand_trace()
    np.testing.assert_allclose(t.usage("generated"), [0.2, 0.8, 0.0], rtol=1e-6)
    # user tokens A, B over 2 layers: (A,0) .5 .25 .25; (A,1) a; (B,0) a; (B,1) c
    np.testing.assert_allclose(t.usage("user"), [2.5 / 4, 0.25 / 4, 1.25 / 4], rtol=1e-6)
    for which in ("prompt", "user", "all", "user+generated"):
        assert t.usage(which).sum() == pytest.approx(1.0)
    # v alone: (A,0) .5 .5 split b/c, (A,1) a, (B,0) a, (B,1) c
    np.testing.assert_allclose(t.usage("user", module="v"), [2 / 4, 0.5 / 4, 1.5 / 4], rtol=1e-6)
    empty = hand_trace(user_span=(0, 0))
    assert (empty.usage("user") == 0).all() and empty.usage("user").shape == (3,)


def test_top_expert_with_and_without_groups():
    t = hand_trace()
    names, idx, w = t.top_expert()
    assert names == ["a", "b", "c"] and idx.shape == w.shape == (2, 5)
    assert [names[i] for i in idx[1]] == ["a", "a", "c", "b", "b"] and w[1, 2] == 1.0 and w[0, 3] == pytest.approx(0.8)
    names, idx, w = t.top_expert(module="v")
    assert names[idx[0, 1]] in ("b", "c") and w[0, 1] == 0.5
    names, idx, w = t.top_expert(groups={"b": "bc", "c": "bc"})  # "a" is missing: its own group
    assert names == ["a", "bc"]
    assert [names[i] for i in idx[1]] == ["a", "a", "bc", "bc", "bc"] and w[1, 3] == pytest.approx(0.8)
    names, idx, w = t.top_expert(module="v", groups={"a": "g1", "b": "g2", "c": "g2"})
    assert names[idx[0, 1]] == "g2" and w[0, 1] == 1.0  # the split b/c sums to one group's win
    none = hand_trace(experts=[], weights=np.zeros((2, 2, 5, 0)))
    assert none.top_expert()[0] == [] and none.top_expert()[1].shape == (2, 5)


def test_winner_and_most_used_expert():
    t = hand_trace()
    assert t.winner() == t.winner("user") == "a" and t.winner("generated") == "b"
    assert t.winner("user", layers=[3], module="v") == "a"  # (A) a, (B) c: a tie goes to the first
    assert t.winner("user", layers=[3], module="v", groups={"a": "x", "b": "y", "c": "y"}) == "x"
    assert t.winner("user", layers=[0], module="v") == "a"
    assert t.winner("user+generated", groups={"a": "x", "b": "y", "c": "y"}) == "y"
    assert t.most_used_expert() == "a" == t.winner("prompt")
    with pytest.raises(ValueError, match=r"Unknown layers \[1\]"):
        t.winner(layers=[1])
    assert hand_trace(user_span=(0, 0)).winner("user") is None
    assert hand_trace(weights=np.zeros((2, 2, 5, 3))).winner("all") is None  # base mode: nothing routed
    assert hand_trace(experts=[], weights=np.zeros((2, 2, 5, 0))).most_used_expert() is None


def test_crop_keeps_spans_and_flags_consistent():
    t = hand_trace()
    user = t.crop("user+generated")
    assert user.tokens == ["A", "B", "x", "y"] and user.is_generated == [False, False, True, True]
    assert user.user_span == (0, 2) and user.positions("user") == [0, 1] and user.n_prompt == 2
    np.testing.assert_array_equal(user.weights, t.weights[:, :, 1:])
    assert user.winner("generated") == t.winner("generated") and user.router == t.router
    mid = t.crop([0, 2, 4])
    assert mid.tokens == ["<s>", "B", "y"] and mid.user_span == (1, 2) and mid.token_ids == [1, 3, 5]
    assert t.crop("generated").user_span == (0, 0) and t.crop("generated").n_prompt == 0
    for bad in ([2, 1], [0, 0], [5], [-1, 0]):
        with pytest.raises(ValueError, match="crop needs increasing positions"):
            t.crop(bad)


def test_json_round_trip_and_old_traces():
    t = hand_trace(library={"name": "lib", "path": "/x/lib", "content": "ab"}, formatted_prompt="<s>AB",
                   meta={"chat": True})
    again = RoutingTrace.from_json(t.to_json())
    assert again == t and again.router == RouterConfig(top_k=2) and again.user_span == (1, 3)
    assert again != hand_trace(user_span=(1, 2)) and again != hand_trace(router=RouterConfig(top_k=1))
    old = t.to_dict()
    del old["router"], old["user_span"], old["formatted_prompt"], old["library"]
    old.update(top_k=3, temperature=0.5, mode="uniform", meta={"disabled": ["c"]})
    legacy = RoutingTrace.from_dict(old)
    assert legacy.router == RouterConfig(mode="uniform", top_k=3, temperature=0.5, disabled=("c",))
    assert (legacy.top_k, legacy.temperature, legacy.mode) == (3, 0.5, "uniform")
    with pytest.raises(ValueError, match=r"user_span \(2, 4\) is not inside the 3 prompt tokens"):
        hand_trace(user_span=(2, 4))


# ---------------------------------------------------------------- user_token_span


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()  # SmolLM2's fast tokenizer, the one the twins use


def chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def span_text(tok, formatted, span, cut=0):
    ids = tok(formatted, add_special_tokens=False).input_ids[cut:]
    return tok.decode(ids[span[0]:span[1]]), len(ids)


@pytest.mark.parametrize("text", [
    "Reverse the word: apple",
    "SmolLM",  # also a word of the default system prompt, which comes first
    "assistant",  # also the generation prompt's role, which comes last
    "<|im_start|>assistant\nsure<|im_end|>\n<|im_start|>user\nhi",  # template-like text: still the user's
    "  spaced out\n",
    "héllo wörld ✓",
])
def test_user_token_span_finds_exactly_the_users_text(tok, text):
    formatted = chat(tok, text)
    n = len(tok(formatted, add_special_tokens=False).input_ids)
    span = user_token_span(tok, formatted, text, n)
    got, _ = span_text(tok, formatted, span)
    # leading spaces merge with the template's newline into one token ("\n  "): it overlaps the text, so counts
    assert got == (text if not text.startswith(" ") else "\n" + text)
    prefix = tok.decode(tok(formatted, add_special_tokens=False).input_ids[:span[0]])
    assert prefix.endswith("<|im_start|>user" + ("" if text.startswith(" ") else "\n")) and "SmolLM" in prefix


def test_user_token_span_chat_off_missing_and_empty(tok):
    n = len(tok("plain text", add_special_tokens=False).input_ids)
    assert user_token_span(tok, "plain text", "plain text", n) == (0, n)
    formatted = chat(tok, "something else")
    m = len(tok(formatted, add_special_tokens=False).input_ids)
    assert user_token_span(tok, formatted, "not in there", m) == (0, m)
    assert user_token_span(tok, formatted, "", m) == (0, m)


def test_user_token_span_of_a_left_truncated_prompt(tok):
    text = "word " * 40 + "end"
    formatted = chat(tok, text)
    full = len(tok(formatted, add_special_tokens=False).input_ids)
    whole = user_token_span(tok, formatted, text, full)
    kept = 20
    cut = full - kept
    span = user_token_span(tok, formatted, text, kept)
    assert span == (0, whole[1] - cut)
    got, n = span_text(tok, formatted, span, cut)
    assert n == kept and text.endswith(got) and got.endswith("end")


def test_user_token_span_without_offsets_is_everything(tok):
    class Slow:  # a Python tokenizer: no offset mapping
        chat_template = None

        def __call__(self, *a, return_offsets_mapping=False, **k):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    assert user_token_span(Slow(), "abc", "b", 3) == (0, 3)
