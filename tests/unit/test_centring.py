"""Centring (GenKnowSub as a router option): the maths against plain references, both scopes, switching,
the general expert, the prototype cache, and bad input. PEFT equivalence is in test_peft_equivalence.py."""
import copy
import time

import pytest
import torch
from arrow_helpers import IDS, TWINS, centred, dense_prototype, experts, fresh, reference_logits

from explorer.routing.centring import centre_site, centred_prototypes, factor_means
from explorer.routing.config import RouterConfig
from explorer.routing.state import SiteStack
from explorer.routing.model import RoutedModel
from library_store.expert import PEFT_PREFIX, LoraExpert
from library_store.store.library import ExpertLibrary
from library_store.testing import random_expert

MEAN_W = RouterConfig(top_k=2, centre="mean", centre_scope="weights")
MEAN_P = RouterConfig(top_k=2, centre="mean", centre_scope="prototypes")


def padded(ranks, d=6, out=5, seed=0):
    """Random factors zero-padded to max(ranks): A (E, r, d), B (E, out, r)."""
    gen = torch.Generator().manual_seed(seed)
    r = max(ranks)
    A, B = torch.zeros(len(ranks), r, d), torch.zeros(len(ranks), out, r)
    for e, k in enumerate(ranks):
        A[e, :k] = torch.randn(k, d, generator=gen)
        B[e, :, :k] = torch.randn(out, k, generator=gen)
    return A, B


# ---------------------------------------------------------------- the maths


def test_equal_ranks_subtract_the_plain_factor_mean():
    A, B = padded([3, 3, 3, 3])
    mean = factor_means(A, B, torch.tensor([3, 3, 3, 3]))
    a, b = centre_site(A, B, torch.tensor([3, 3, 3, 3]), mean)
    torch.testing.assert_close(a, A - A.mean(0))
    torch.testing.assert_close(b, B - B.mean(0))
    assert (a.sum(0).abs() < 1e-5).all()  # centred factors sum to zero


def test_mixed_ranks_zero_padding_enters_no_mean():
    ranks = torch.tensor([2, 4, 4])
    A, B = padded(ranks.tolist())
    mean = factor_means(A, B, ranks)
    torch.testing.assert_close(mean.A[:2], A[:, :2].mean(0))  # rows every expert has: over all 3
    torch.testing.assert_close(mean.A[2:], A[1:, 2:].mean(0))  # rows only e1, e2 have: over those 2 only
    torch.testing.assert_close(mean.B[:, 2:], B[1:, :, 2:].mean(0))
    a, b = centre_site(A, B, ranks, mean)
    assert (a[0, 2:] == 0).all() and (b[0, :, 2:] == 0).all()  # e0 stays rank 2: its padding is not "− mean"
    torch.testing.assert_close(a[1:], A[1:] - mean.A)
    torch.testing.assert_close(b[0, :, :2], B[0, :, :2] - mean.B[:, :2])


def test_a_general_expert_of_another_rank_subtracts_only_the_rows_it_has():
    ranks = torch.tensor([4, 4])
    A, B = padded([4, 4])
    gA, gB = padded([2], seed=1)
    mean = factor_means(gA, gB, torch.tensor([2]))
    assert mean.rows.tolist() == [True, True]
    a, b = centre_site(A, B, ranks, mean)
    torch.testing.assert_close(a[:, :2], A[:, :2] - gA[0])
    torch.testing.assert_close(a[:, 2:], A[:, 2:])  # no general row there: nothing subtracted


@pytest.mark.parametrize("max_floats", [1 << 25, 264, 1])  # one call / calls of 2 + 1 sites (2 = 264 floats) / 1
def test_centred_prototypes_are_exact_with_mixed_ranks(max_floats):
    ranks = {"s0": torch.tensor([2, 4, 3]), "s1": torch.tensor([4, 4, 4]), "s2": torch.tensor([0, 1, 4])}
    stacks, means = {}, {}
    for i, (site, rk) in enumerate(ranks.items()):
        A, B = padded(rk.tolist(), seed=i)
        stacks[site] = SiteStack(site, torch.zeros(3, 6), A, B, torch.ones(3))
        means[site] = factor_means(A, B, rk)
    protos = centred_prototypes(stacks, ranks, means, max_floats=max_floats)
    for site, st in stacks.items():
        a, b = centre_site(st.A, st.B, ranks[site], means[site])
        for e in range(3):
            want = dense_prototype(a[e], b[e]).float()
            if b[e].abs().sum() == 0:  # e0 covers no s2: no update, no prototype
                assert (protos[site][e] == 0).all()
            else:
                assert abs(float(protos[site][e] @ want)) > 1 - 1e-5, (site, e)


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("twin", TWINS)
def test_weights_scope_equals_routing_the_centred_experts(twin):
    base = fresh(twin)
    exps = experts(base, 4, seed=3)
    want = reference_logits(fresh(twin), centred(exps), top_k=2)
    got = RoutedModel(base, exps, MEAN_W).logits(IDS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_weights_scope_with_mixed_ranks_equals_a_plain_reference():
    base = fresh("tiny-random-llama")
    exps = experts(base, 4, rank=[2, 4, 1, 3], seed=4)
    by_hand = []
    for e in exps:  # row i of A (column i of B) minus the mean over the experts whose rank exceeds i
        w = dict(e.weights)
        for key, t in e.weights.items():
            if key.endswith("lora_A.weight"):
                rows = [torch.stack([x.weights[key][i] for x in exps if x.weights[key].shape[0] > i]).mean(0)
                        for i in range(t.shape[0])]
                w[key] = t - torch.stack(rows)
            else:
                cols = [torch.stack([x.weights[key][:, i] for x in exps if x.weights[key].shape[1] > i]).mean(0)
                        for i in range(t.shape[1])]
                w[key] = t - torch.stack(cols, dim=1)
        by_hand.append(LoraExpert(copy.deepcopy(e.info), w))
    want = reference_logits(fresh("tiny-random-llama"), by_hand, top_k=2)
    torch.testing.assert_close(RoutedModel(base, exps, MEAN_W).logits(IDS), want, atol=1e-4, rtol=0)


def weights_of(rm):
    with rm.capturing() as records:
        logits = rm.logits(IDS)
    return logits, rm.routing_weights(records)


def test_prototypes_scope_routes_like_weights_scope_but_applies_the_experts_as_trained():
    base = fresh("tiny-random-phi")
    exps = experts(base, 4, seed=5)
    rm = RoutedModel(base, exps, MEAN_W)
    logits_w, w_w = weights_of(rm)
    rm.set_router(MEAN_P)
    logits_p, w_p = weights_of(rm)
    first = [s for s in w_w if ".layers.0." in s and s.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj")]
    assert len(first) == 3
    for site in first:  # same input (the embeddings), same centred prototypes: the same routing
        torch.testing.assert_close(w_p[site], w_w[site], atol=0, rtol=0)
    rm.set_router(RouterConfig(top_k=2))
    _, w_none = weights_of(rm)
    assert any((w_none[s] - w_p[s]).abs().max() > 1e-3 for s in w_p)  # centring does change the routing
    assert (logits_p - logits_w).abs().max() > 1e-3
    one = RouterConfig(mode="expert:e1")  # a fixed mix shows what is applied
    rm.set_router(one)
    raw = rm.logits(IDS)
    rm.set_router(RouterConfig(mode="expert:e1", centre="mean", centre_scope="prototypes"))
    torch.testing.assert_close(rm.logits(IDS), raw, atol=0, rtol=0)
    rm.set_router(RouterConfig(mode="expert:e1", centre="mean", centre_scope="weights"))
    assert (rm.logits(IDS) - raw).abs().max() > 1e-3


def test_switching_centring_equals_a_fresh_model_and_is_quick():
    base = fresh("tiny-random-llama")
    exps = experts(base, 16, seed=6)
    general = random_expert(base, "g", seed=99)
    rm = RoutedModel(base, exps, RouterConfig(top_k=3), general=[general])
    routers = [RouterConfig(top_k=3, centre="mean", centre_scope="weights"),
               RouterConfig(top_k=3, centre="mean"), RouterConfig(top_k=3, centre="general:g"),
               RouterConfig(top_k=3, centre="general:g", centre_scope="weights"), RouterConfig(top_k=3)]
    seconds = []
    for router in routers:
        t0 = time.perf_counter()
        rm.set_router(router)
        seconds.append(time.perf_counter() - t0)
        want = RoutedModel(fresh("tiny-random-llama"), exps, router, general=[general]).logits(IDS)
        torch.testing.assert_close(rm.logits(IDS), want, atol=1e-5, rtol=0)
        assert rm.router == router
    assert max(seconds) < 2.0, seconds


def test_general_expert_subtracted_equals_routing_experts_minus_it():
    base = fresh("tiny-random-llama")
    exps, general = experts(base, 3, seed=7), random_expert(base, "g", seed=70)
    router = RouterConfig(top_k=2, centre="general:g", centre_scope="weights")
    got = RoutedModel(base, exps, router, general=[general]).logits(IDS)
    want = reference_logits(fresh("tiny-random-llama"), centred(exps, [general]), top_k=2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_trace_records_the_centring():
    base = fresh("tiny-random-llama")
    rm = RoutedModel(base, experts(base, 3), MEAN_W)
    trace = rm.trace("hi", max_new_tokens=2)
    assert trace.router.centre == "mean" and trace.router.centre_scope == "weights"
    assert type(trace).from_json(trace.to_json()).router == MEAN_W


# ---------------------------------------------------------------- libraries and the cache


def library_with_general(path, base, n=3):
    lib = ExpertLibrary.create(path, base)
    for e in experts(base, n, seed=8):
        lib.add(e)
    lib.add(random_expert(base, "general-knowledge", seed=80, kind="general"))
    return lib


def centred_entries(lib):
    return [d["config"].get("centre") for d in lib.list_derived() if d["kind"] == "arrow-prototypes"]


def test_from_library_caches_centred_prototypes_per_centring(tmp_path, monkeypatch):
    base = fresh("tiny-random-llama")
    lib = library_with_general(tmp_path / "lib", base)
    assert lib.routable_names() == ["e0", "e1", "e2"]  # a general expert is never routed
    rm = RoutedModel.from_library(base, lib, MEAN_P)
    assert rm.experts == ["e0", "e1", "e2"]
    want = rm.logits(IDS)
    rm.set_router(RouterConfig(top_k=2, centre="general:general-knowledge"))  # loaded from the library
    want_g = rm.logits(IDS)
    rm.set_router(MEAN_W)  # same prototypes as MEAN_P: no new entry
    assert sorted(centred_entries(lib), key=str) == [None, "general:general-knowledge", "mean"]

    def no_compute(*a, **k):
        raise AssertionError("centred prototypes recomputed despite the cache")

    monkeypatch.setattr("explorer.routing.centring.compute_prototypes", no_compute)
    monkeypatch.setattr("explorer.routing.inject.compute_prototypes", no_compute)
    again = RoutedModel.from_library(fresh("tiny-random-llama"), ExpertLibrary.open(tmp_path / "lib"), MEAN_P)
    torch.testing.assert_close(again.logits(IDS), want, atol=1e-6, rtol=0)
    again.set_router(RouterConfig(top_k=2, centre="general:general-knowledge"))
    torch.testing.assert_close(again.logits(IDS), want_g, atol=1e-6, rtol=0)


def test_a_changed_general_expert_is_a_new_cache_entry(tmp_path):
    base = fresh("tiny-random-llama")
    lib = library_with_general(tmp_path / "lib", base)
    router = RouterConfig(top_k=2, centre="general:general-knowledge")
    before = RoutedModel.from_library(base, lib, router).logits(IDS)
    lib.add(random_expert(fresh("tiny-random-llama"), "general-knowledge", seed=81, kind="general"), replace=True)
    after = RoutedModel.from_library(fresh("tiny-random-llama"), lib, router).logits(IDS)
    assert (after - before).abs().max() > 1e-4
    assert centred_entries(lib).count("general:general-knowledge") == 2


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,message", [
    (dict(centre="median"), r"Unknown centre 'median': use one of none, mean, general:<expert>"),
    (dict(centre="general:"), r"Unknown centre 'general:'"),
    (dict(centre=None), r"Unknown centre None"),
    (dict(centre_scope="all"), r"Unknown centre_scope 'all': use one of prototypes, weights"),
])
def test_unknown_centre_or_scope(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kwargs)


def test_router_config_round_trip_with_centring():
    router = RouterConfig(top_k=2, centre="general:g", centre_scope="weights")
    assert router.to_dict()["centre"] == "general:g" and router.general == "g"
    assert RouterConfig.from_dict(router.to_dict()) == router
    old = {"mode": "arrow", "top_k": 2, "temperature": 1.0, "disabled": []}  # saved before centring existed
    assert RouterConfig.from_dict(old).centre == "none"


def test_general_naming_no_expert_lists_the_library(tmp_path):
    base = fresh("tiny-random-llama")
    lib = library_with_general(tmp_path / "lib", base)
    with pytest.raises(ValueError, match=r"No expert 'nope' to centre on .*\['e0', 'e1', 'e2', 'general-knowledge'\]"):
        RoutedModel.from_library(base, lib, RouterConfig(top_k=2, centre="general:nope"))


@pytest.mark.parametrize("n", [1, 2])
def test_mean_over_too_few_experts_is_refused_with_a_reason(n):
    base = fresh("tiny-random-phi")
    rm = RoutedModel(base, experts(base, n), RouterConfig(top_k=1))
    before = rm.logits(IDS)
    reason = "its centred factors are zero" if n == 1 else "cannot tell them apart"
    with pytest.raises(ValueError, match=rf"needs at least 3 routed experts; this library routes {n}\..*{reason}"):
        rm.set_router(RouterConfig(top_k=1, centre="mean"))
    assert rm.router == RouterConfig(top_k=1)  # a refused setting changes nothing
    torch.testing.assert_close(rm.logits(IDS), before, atol=0, rtol=0)


def test_general_expert_of_another_shape_is_refused_naming_the_module():
    base = fresh("tiny-random-llama")
    exps = experts(base, 3)
    bad = random_expert(base, "g", seed=1)
    site = "model.layers.1.self_attn.v_proj"
    bad.weights[f"{PEFT_PREFIX}{site}.lora_B.weight"] = torch.randn(48, 4)  # (out 48, r) where v_proj has 32
    rm = RoutedModel(base, exps, RouterConfig(top_k=2), general=[bad])
    with pytest.raises(ValueError, match=rf"General expert 'g' has a 48 x 64 update at {site}; .*cannot be subtracted"):
        rm.set_router(RouterConfig(top_k=2, centre="general:g"))
    assert rm.router == RouterConfig(top_k=2)
