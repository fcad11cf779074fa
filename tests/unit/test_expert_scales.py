"""Expert scales (`RouterConfig.scales`): Arrow's score of expert e times c_e, folded into the prototypes
(explorer/routing/scales.py). The maths against the plain reference on both twins (many tokens, and the one-token
decoding path with its fused kernel), with input centring, switching without compounding, the config, bad input."""
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh, reference_logits

from explorer.routing.config import RouterConfig
from explorer.routing.model import RoutedModel
from explorer.routing.readout import readout_key

FACTORS = [1.0, 2.5, 0.4, 1.7, 0.9]
SCALES = {f"e{i}": c for i, c in enumerate(FACTORS)}


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("ids", [IDS, IDS[:, :1]], ids=["many-tokens", "one-token"])
def test_scaled_scores_equal_a_plain_reference(twin, ids):
    exps = experts(fresh(twin), 5, seed=11)
    want = reference_logits(fresh(twin), exps, top_k=2, temperature=0.7, ids=ids, scales=FACTORS)
    got = RoutedModel(fresh(twin), exps, RouterConfig(top_k=2, temperature=0.7, scales=SCALES)).logits(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    plain = reference_logits(fresh(twin), exps, top_k=2, temperature=0.7, ids=ids)
    assert (got - plain).abs().max() > 1e-3  # the factors change the routing on these random experts


def test_scaled_and_input_centred_scores_equal_the_reference():
    from test_input_centring import site_means

    exps = experts(fresh("tiny-random-llama"), 5, seed=12)
    means = site_means("tiny-random-llama", exps)
    router = RouterConfig(top_k=2, temperature=0.7, input_centre="base", scales=SCALES)
    got = RoutedModel(fresh("tiny-random-llama"), exps, router).logits(IDS)
    want = reference_logits(fresh("tiny-random-llama"), exps, top_k=2, temperature=0.7, means=means, scales=FACTORS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_one_factor_for_all_is_a_temperature():
    exps = experts(fresh("tiny-random-phi"), 4, seed=13)
    same = {f"e{i}": 2.0 for i in range(4)}
    rm = RoutedModel(fresh("tiny-random-phi"), exps, RouterConfig(top_k=3, temperature=1.0, scales=same))
    want = RoutedModel(fresh("tiny-random-phi"), exps, RouterConfig(top_k=3, temperature=0.5))
    a, b = rm.trace("Add 2 and 3.", max_new_tokens=4), want.trace("Add 2 and 3.", max_new_tokens=4)
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(torch.as_tensor(a.weights), torch.as_tensor(b.weights), atol=1e-5, rtol=0)


def test_switching_scales_never_compounds_and_none_restores_arrow():
    base = fresh("tiny-random-llama")
    exps = experts(base, 5, seed=14)
    plain = RouterConfig(top_k=2, temperature=0.7, input_centre="base")
    rm = RoutedModel(base, exps, plain)
    before = rm.logits(IDS)
    rm.set_router(RouterConfig(top_k=2, temperature=0.7, input_centre="base", scales={"e1": 3.0}))
    rm.set_router(RouterConfig(top_k=2, temperature=0.7, input_centre="base", scales=SCALES))
    scaled = RoutedModel(fresh("tiny-random-llama"), exps, rm.router).logits(IDS)
    torch.testing.assert_close(rm.logits(IDS), scaled, atol=1e-6, rtol=0)
    rm.set_router(RouterConfig(top_k=2, temperature=0.7, input_centre="base", centre="mean", scales=SCALES))
    recentred = RoutedModel(fresh("tiny-random-llama"), exps, rm.router).logits(IDS)  # re-stacked, then scaled
    torch.testing.assert_close(rm.logits(IDS), recentred, atol=1e-6, rtol=0)
    rm.set_router(plain)
    torch.testing.assert_close(rm.logits(IDS), before, atol=1e-6, rtol=0)
    group = base.model.get_submodule(rm.sites[0]).group
    torch.testing.assert_close(group.protos.norm(dim=1)[group.protos.norm(dim=1) > 0],
                               torch.ones_like(group.protos.norm(dim=1)[group.protos.norm(dim=1) > 0]))


def test_the_trace_records_the_scaled_scores():
    exps = experts(fresh("tiny-random-llama"), 5, seed=15)
    plain = RoutedModel(fresh("tiny-random-llama"), exps, RouterConfig(mode="uniform")).trace("Hi there", 0)
    scaled = RoutedModel(fresh("tiny-random-llama"), exps, RouterConfig(mode="uniform", scales=SCALES))
    trace = scaled.trace("Hi there", 0)
    assert trace.router.to_dict()["scales"] == SCALES  # the trace says how it was scored
    a, b = plain.routes, trace.routes  # uniform: every expert in every slot, highest |score| first
    got = torch.as_tensor(b.scores).gather(-1, torch.as_tensor(b.experts.astype("int64")).argsort(-1))
    want = torch.as_tensor(a.scores).gather(-1, torch.as_tensor(a.experts.astype("int64")).argsort(-1))
    torch.testing.assert_close(got.float(), want.float() * torch.tensor(FACTORS), atol=1e-4, rtol=1e-3)


def test_config_round_trip_and_readout_key():
    r = RouterConfig(top_k=2, scales={"b": 2, "a": 0.5})
    assert r.scales == (("a", 0.5), ("b", 2.0)) and r.to_dict()["scales"] == {"a": 0.5, "b": 2.0}
    assert RouterConfig.from_dict(r.to_dict()) == r
    assert "scales" not in RouterConfig(top_k=2).to_dict()  # a router without them reads as before
    assert readout_key(r) != readout_key(RouterConfig(top_k=2))  # the evidence differs, so does the readout


@pytest.mark.parametrize("bad", [{"a": 0}, {"a": -1.0}, {"a": float("nan")}, {"a": float("inf")}, {"a": "2"},
                                 {"a": True}, "a=2", [("a", 1.0), ("a", 2.0)], {3: 1.0}])
def test_bad_scales_are_refused_with_a_reason(bad):
    with pytest.raises(ValueError, match="scale"):
        RouterConfig(scales=bad)


def test_an_unknown_expert_is_refused_and_changes_nothing():
    rm = RoutedModel(fresh("tiny-random-llama"), experts(fresh("tiny-random-llama"), 3, seed=16),
                     RouterConfig(top_k=2))
    before = rm.logits(IDS)
    with pytest.raises(ValueError, match=r"unknown experts \['nope'\].*e0"):
        rm.set_router(RouterConfig(top_k=2, scales={"nope": 2.0}))
    assert rm.router == RouterConfig(top_k=2)
    torch.testing.assert_close(rm.logits(IDS), before, atol=0, rtol=0)


def test_the_request_takes_the_library_scales_or_none_and_says_what_it_dropped():
    from explorer.page.request import RawRequest, normalise

    names, lib = ["a", "b", "c"], {"scales": {"a": 0.5, "b": 2.0}}
    assert normalise(RawRequest("hi"), names, defaults=lib).request.router.scales == (("a", 0.5), ("b", 2.0))
    assert normalise(RawRequest("hi", scales="default"), names, defaults=lib).request.router.scales == \
        (("a", 0.5), ("b", 2.0))
    assert normalise(RawRequest("hi", scales="none"), names, defaults=lib).request.router.scales == ()
    done = normalise(RawRequest("hi", scales={"a": 2.0, "zz": 3.0}), names)  # the page: kept what it could
    assert done.request.router.scales == (("a", 2.0),) and "unknown experts ['zz']" in done.notices[0]
    refused = normalise(RawRequest("hi", scales={"zz": 3.0}), names, strict=True)  # the CLI: refused
    assert refused.request is None and "Cannot scale unknown experts ['zz']" in refused.error
    for bad, said in (({"a": -1.0}, "must be a finite number > 0"), ("sideways", "Unknown expert scales")):
        done = normalise(RawRequest("hi", scales=bad), names, defaults=lib)
        assert done.request.router.scales == () and said in done.notices[0]


def test_the_fit_removes_a_standing_lead_and_keeps_the_temperature():
    from bench.routing_scores import fit_offset, top_weights

    g = torch.Generator().manual_seed(0)
    n, per = 40, 5  # prompts of experts 0 and 1 (half each), 5 user tokens each; expert 2 is a bystander
    y = torch.arange(n).div(n // 2, rounding_mode="floor").repeat_interleave(per)  # (N,) own expert per token
    prompt_of = torch.arange(n).repeat_interleave(per)  # (N,)
    s = 1.0 + 0.05 * torch.rand(n * per, 3, 3, generator=g)  # (N, G 3, E 3)
    s[..., 1] += 0.04  # expert 1 leads on every token...
    s[y == 0, :, 0] += 0.03  # ...and expert 0's own text moves 0.03 its way, not enough
    s[y == 1, :, 1] += 0.03

    def accuracy(c):
        w = top_weights(s * c, 2, 0.1).mean(1)  # (N, E)
        mean = torch.zeros(n, 3).index_add(0, prompt_of, w)
        return float((mean.argmax(1) == y.view(n, per)[:, 0]).float().mean())

    c = fit_offset([s], y, prompt_of, k=2, temperature=0.1, scale=True)
    assert accuracy(torch.ones(3)) == 0.5 and accuracy(c) == 1.0
    assert c[0] > c[1] and abs(float(c.log().sum())) < 1e-5  # geometric mean 1: T keeps its meaning
