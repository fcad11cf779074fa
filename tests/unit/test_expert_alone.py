"""One expert alone (mode "expert:<name>", and every per-prompt answer) reads only that expert's rows: prefill,
decoding steps and traces must equal the expert merged into the base weights, and the general (dense) path."""
import numpy as np
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh

from explorer.routing.config import RouterConfig
from explorer.routing.model import RoutedModel


def merged(twin: str, expert) -> object:
    """A fresh twin with `expert`'s scaled B A added to its weights (the plain reference of one expert alone)."""
    ref = fresh(twin)
    with torch.no_grad():
        for site, (A, B) in expert.factors().items():
            ref.model.get_submodule(site).weight += expert.scaling * B @ A
    return ref


@torch.no_grad()
def step_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The last token's logits computed as a decoding step: prefill all but it, then one token on the cache."""
    out = model(input_ids=ids[:, :-1], use_cache=True)
    return model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("twin", TWINS)
def test_prefill_and_decoding_equal_the_expert_merged(twin):
    exps = experts(fresh(twin), 4, rank=[2, 4, 3, 1])  # mixed ranks: the alone path slices the padded rows
    rm = RoutedModel(fresh(twin), exps, RouterConfig(mode="expert:e2"))
    ref = merged(twin, exps[2])
    torch.testing.assert_close(rm.logits(IDS), ref.model(input_ids=IDS).logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(step_logits(rm.base.model, IDS), step_logits(ref.model, IDS), atol=1e-4, rtol=0)
    ids = rm.encode("hello there")[0]
    want = ref.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=ref.tokenizer.pad_token_id)
    assert rm.generate("hello there", max_new_tokens=6) == ref.tokenizer.decode(want[0, ids.shape[1]:],
                                                                                 skip_special_tokens=True)
    rm.set_router(RouterConfig(mode="expert:e0"))  # the rows in use follow the router
    torch.testing.assert_close(step_logits(rm.base.model, IDS), step_logits(merged(twin, exps[0]).model, IDS),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("twin,input_centre", [(TWINS[0], "none"), (TWINS[1], "base")])
def test_trace_equals_the_dense_path(twin, input_centre):
    """A counterfactual that changes nothing (an expert off at no layer) is served by the general path: the
    trace of one expert alone must hold the same slots, scores, runner-up, contributions and norms."""
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 4), RouterConfig(mode="expert:e1", input_centre=input_centre))
    fast = rm.trace("route me please", max_new_tokens=3)
    with rm.overriding("e3", layers=[]):
        dense = rm.trace("route me please", max_new_tokens=3)
    assert fast.token_ids == dense.token_ids
    a, b = fast.routes, dense.routes
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.weights, b.weights)
    for name in ("scores", "runner_up", "contribution", "base_norm"):
        np.testing.assert_allclose(getattr(a, name).astype(np.float32), getattr(b, name).astype(np.float32),
                                   rtol=2e-3, atol=1e-5, err_msg=name)
    assert (a.experts[..., 0] == 1).all()


def test_moved_after_use_reads_the_moved_rows():
    """The rows of the expert in use are cached per router setting; a `.to()` afterwards must drop them."""
    twin = "tiny-random-llama"
    exps = experts(fresh(twin), 3)
    rm = RoutedModel(fresh(twin), exps, RouterConfig(mode="expert:e1"))
    rm.logits(IDS)  # caches the float32 rows
    rm.base.model.to(torch.float64)
    ref = merged(twin, exps[1]).model.to(torch.float64)
    torch.testing.assert_close(step_logits(rm.base.model, IDS), step_logits(ref, IDS), atol=1e-6, rtol=0)


@torch.no_grad()
def test_decoding_steps_are_traced_once_per_capture():
    """Decoding steps in mode "expert" defer their trace slots to the end of the capture: none is left deferred
    after it, each group gets one record for the prompt and one for all its steps, in order, and the slots equal
    the same tokens traced as one prefill."""
    twin = TWINS[0]
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 4), RouterConfig(mode="expert:e2"))
    model = rm.base.model
    with rm.capturing() as records:
        out = model(input_ids=IDS[:, :-2], use_cache=True)
        cache = out.past_key_values
        for i in (-2, -1):  # two decoding steps
            model(input_ids=IDS[:, i:][:, :1], past_key_values=cache, use_cache=True)
        assert any(rec[0] == "solo" for rec in records)  # deferred while capturing
    assert not any(rec[0] == "solo" for rec in records)
    groups = [rec[1] for rec in records if rec[0] == "route"]
    assert all(groups.count(g) == 2 for g in groups)  # the prompt's record, then one for both steps
    with rm.capturing() as whole:
        model(input_ids=IDS)
    stepwise, prefill = rm._assemble(records, IDS.shape[1]), rm._assemble(whole, IDS.shape[1])
    np.testing.assert_array_equal(stepwise.experts, prefill.experts)
    for name in ("scores", "runner_up", "contribution"):
        np.testing.assert_allclose(getattr(stepwise, name), getattr(prefill, name), rtol=1e-3, atol=1e-5,
                                   err_msg=name)


@torch.no_grad()
def test_a_router_change_during_a_deferred_capture_is_refused():
    twin = TWINS[0]
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 4), RouterConfig(mode="expert:e2"))
    with pytest.raises(RuntimeError, match="router changed"):
        with rm.capturing():
            out = rm.base.model(input_ids=IDS[:, :-1], use_cache=True)
            rm.base.model(input_ids=IDS[:, -1:], past_key_values=out.past_key_values, use_cache=True)
            rm.set_router(RouterConfig(mode="expert:e0"))


@torch.no_grad()
def test_a_long_generation_resolves_its_deferred_steps_in_batches(monkeypatch):
    """At most SOLO_BATCH decoding steps' inputs wait at any time, and batching them changes no slot."""
    from explorer.routing import capture

    twin = TWINS[0]
    rm = RoutedModel(fresh(twin), experts(fresh(twin), 4), RouterConfig(mode="expert:e2"))
    model = rm.base.model

    def steps(batch: int):
        monkeypatch.setattr(capture, "SOLO_BATCH", batch)
        waiting = []
        with rm.capturing() as records:
            cache = model(input_ids=IDS[:, :2], use_cache=True).past_key_values
            for i in range(2, IDS.shape[1]):  # every later token as a decoding step
                model(input_ids=IDS[:, i:i + 1], past_key_values=cache, use_cache=True)
                waiting.append(sum(rec[0] == "solo" for rec in records))
        return rm._assemble(records, IDS.shape[1]), max(waiting)

    once, most = steps(10 ** 9)
    groups = most // (IDS.shape[1] - 2)  # one deferred record per group and step
    batched, most = steps(groups + 1)  # a batch after every step or so
    assert most <= groups + 1
    np.testing.assert_array_equal(batched.experts, once.experts)
    for name in ("scores", "runner_up", "contribution"):
        np.testing.assert_allclose(getattr(batched, name), getattr(once, name), rtol=1e-5, atol=1e-6, err_msg=name)
