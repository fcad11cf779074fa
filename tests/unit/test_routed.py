"""RoutedModel invariants on both tiny twins: routing weights, modes, baselines, libraries, bad input."""
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh, reference_logits, save_peft_dir

from explorer.routing.config import RouterConfig
from explorer.routing.layer import RoutedLinear
from explorer.routing.model import RoutedModel
from library_store.store.library import ExpertLibrary, LibraryMismatch
from library_store.testing import random_expert


@torch.no_grad()
def plain_logits(base):
    return base.model(input_ids=IDS).logits


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_weights_sum_to_one_with_exactly_k_experts(twin, top_k):
    base = fresh(twin)
    rm = RoutedModel(base, experts(base, 4), RouterConfig(top_k=top_k))
    with rm.capturing() as records:
        rm.logits(IDS)
    weights = rm.routing_weights(records)
    assert len(weights) == 2 * len(base.targets)
    for w in weights.values():  # (tokens, E)
        assert w.shape == (IDS.shape[1], 4)
        torch.testing.assert_close(w.sum(-1), torch.ones(IDS.shape[1]))
        assert ((w > 0).sum(-1) == top_k).all()


@pytest.mark.parametrize("twin", TWINS)
def test_equals_plain_reference_with_mixed_ranks(twin):
    base = fresh(twin)
    exps = experts(base, 4, rank=[2, 4, 1, 3])  # PEFT refuses mixed ranks; we pad to r_max
    want = reference_logits(fresh(twin), exps, top_k=2, temperature=0.8)
    got = RoutedModel(base, exps, RouterConfig(top_k=2, temperature=0.8)).logits(IDS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("twin", TWINS)
def test_adding_an_expert_changes_logits(twin):
    base = fresh(twin)
    exps = experts(base, 4)
    three = RoutedModel(base, exps[:3], RouterConfig(top_k=3)).logits(IDS)
    four = RoutedModel(base, exps, RouterConfig(top_k=3)).logits(IDS)  # re-attaching replaces the first
    assert (three - four).abs().max() > 1e-3
    assert sum(isinstance(m, RoutedLinear) for m in base.model.modules()) == 2 * len(base.targets)


@pytest.mark.parametrize("twin", TWINS)
def test_base_mode_and_detach_give_the_base_model(twin):
    base = fresh(twin)
    want = plain_logits(base)
    rm = RoutedModel(base, experts(base, 3), RouterConfig(mode="base"))
    torch.testing.assert_close(rm.logits(IDS), want, atol=0, rtol=0)
    rm.set_router(RouterConfig(top_k=2))
    assert (rm.logits(IDS) - want).abs().max() > 1e-3
    rm.detach()
    assert not any(isinstance(m, RoutedLinear) for m in base.model.modules())
    torch.testing.assert_close(plain_logits(base), want, atol=0, rtol=0)


@pytest.mark.parametrize("twin", TWINS)
def test_expert_mode_equals_that_expert_merged_with_peft(twin, tmp_path):
    from peft import PeftModel

    base = fresh(twin)
    exps = experts(base, 3)
    peft = PeftModel.from_pretrained(fresh(twin).model, save_peft_dir(exps[1], tmp_path / "e1"))
    want = peft.merge_and_unload()(input_ids=IDS).logits.detach()
    rm = RoutedModel(base, exps, RouterConfig(mode="expert:e1"))
    torch.testing.assert_close(rm.logits(IDS), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("twin", TWINS)
def test_uniform_mode_equals_the_mean_delta(twin):
    base, ref = fresh(twin), fresh(twin)
    exps = experts(base, 4, rank=[4, 2, 4, 3])
    with torch.no_grad():
        for site, (A, B) in exps[0].factors().items():
            mean = sum(e.scaling * e.factors()[site][1] @ e.factors()[site][0] for e in exps[:3]) / 3
            ref.model.get_submodule(site).weight += mean
    rm = RoutedModel(base, exps, RouterConfig(mode="uniform", disabled=("e3",)))
    torch.testing.assert_close(rm.logits(IDS), plain_logits(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("twin", TWINS)
def test_disabled_experts_get_no_weight_and_equal_a_smaller_library(twin):
    base = fresh(twin)
    exps = experts(base, 5)
    rm = RoutedModel(base, exps, RouterConfig(top_k=2, disabled=("e1", "e3")))
    with rm.capturing() as records:
        got = rm.logits(IDS)
    for w in rm.routing_weights(records).values():
        assert (w[:, [1, 3]] == 0).all()
    smaller = RoutedModel(fresh(twin), [exps[0], exps[2], exps[4]], RouterConfig(top_k=2)).logits(IDS)
    torch.testing.assert_close(got, smaller, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def rm3():
    base = fresh("tiny-random-llama")
    return RoutedModel(base, experts(base, 3), RouterConfig(top_k=2))


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_k=0), r"top_k must be an integer >= 1"),
    (dict(top_k=-2), r"top_k must be an integer >= 1"),
    (dict(temperature=0), r"temperature must be in \(0, inf\), got 0"),
    (dict(temperature=-1.5), r"temperature must be in \(0, inf\)"),
    (dict(temperature=float("nan")), r"temperature must be in \(0, inf\)"),
    (dict(mode="routed"), r"Unknown router mode 'routed': use arrow, base, uniform or expert:<name>"),
    (dict(mode="expert:"), r"Unknown router mode"),
])
def test_bad_router_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kwargs)


def test_router_config_round_trip():
    router = RouterConfig(mode="expert:e1", top_k=2, temperature=0.5, disabled=["e0"])
    assert router.disabled == ("e0",) and router.kind == "expert"
    data = router.to_dict()  # centring fields are the centring tests' (test_centring.py)
    assert {k: data[k] for k in ("mode", "top_k", "temperature", "disabled")} == {
        "mode": "expert:e1", "top_k": 2, "temperature": 0.5, "disabled": ["e0"]}
    assert RouterConfig.from_dict(router.to_dict()) == router
    with pytest.raises(ValueError, match=r"Unknown RouterConfig fields \['topk'\]"):
        RouterConfig.from_dict({"topk": 2})
    with pytest.raises(ValueError, match="disabled must be a list of expert names, got the string 'e0'"):
        RouterConfig(disabled="e0")


@pytest.mark.parametrize("router,message", [
    (RouterConfig(top_k=4), r"top_k must be between 1 and 3 \(the number of enabled experts\), got 4"),
    (RouterConfig(top_k=3, disabled=("e0",)), r"top_k must be between 1 and 2 .*got 3"),
    (RouterConfig(disabled=("nope",)), r"Cannot disable unknown experts \['nope'\]"),
    (RouterConfig(mode="expert:nope"), r"Unknown expert 'nope'"),
    (RouterConfig(mode="expert:e0", disabled=("e0",)), r"Expert 'e0' is disabled"),
    (RouterConfig(mode="uniform", disabled=("e0", "e1", "e2")), r"Every expert is disabled.*use mode='base'"),
])
def test_bad_router_for_this_library(rm3, router, message):
    before = rm3.router
    with pytest.raises(ValueError, match=message):
        rm3.set_router(router)
    assert rm3.router == before  # a refused setting leaves the router as it was


def test_empty_library_refuses_routing_but_base_works():
    base = fresh("tiny-random-phi")
    with pytest.raises(ValueError, match=r"The library holds no experts: mode 'arrow' needs at least one"):
        RoutedModel(base, [])
    rm = RoutedModel(base, [], RouterConfig(mode="base"))
    torch.testing.assert_close(rm.logits(IDS), plain_logits(fresh("tiny-random-phi")))
    assert rm.trace("hi", max_new_tokens=2).weights.shape[3] == 0


# ---------------------------------------------------------------- libraries


def make_library(path, base, exps):
    lib = ExpertLibrary.create(path, base)
    for e in exps:
        lib.add(e)
    return lib


def test_from_library_caches_prototypes_and_equals_in_memory(tmp_path, monkeypatch):
    base = fresh("tiny-random-llama")
    exps = experts(base, 3)
    lib = make_library(tmp_path / "lib", base, exps)
    want = RoutedModel(fresh("tiny-random-llama"), exps, RouterConfig(top_k=2)).logits(IDS)
    rm = RoutedModel.from_library(base, lib, RouterConfig(top_k=2))
    assert rm.experts == ["e0", "e1", "e2"] and rm.unavailable == {}
    torch.testing.assert_close(rm.logits(IDS), want, atol=1e-5, rtol=0)
    cached = [d for d in lib.list_derived() if d["kind"] == "arrow-prototypes"]
    assert len(cached) == 1  # one entry for the attached set

    def no_compute(*a, **k):
        raise AssertionError("prototypes recomputed despite the cache")

    monkeypatch.setattr("explorer.routing.inject.compute_prototypes", no_compute)
    again = RoutedModel.from_library(base, ExpertLibrary.open(tmp_path / "lib", readonly=True), RouterConfig(top_k=2))
    torch.testing.assert_close(again.logits(IDS), want, atol=1e-5, rtol=0)


def test_a_cold_attach_reads_each_experts_factors_a_few_times_not_once_per_site(tmp_path, monkeypatch):
    """Caching each expert's own prototypes scanned every weight name once per site (64 experts: about 1.3 s of a
    3.2 s cold attach); it reads an expert's sites once, and each expert's entry is one flat tensor of exactly its
    sites, listed with their sizes in the meta."""
    from explorer.routing.prototype_cache import _expert_config
    from library_store.expert import LoraExpert

    base = fresh("tiny-random-llama")
    exps = experts(base, 3)
    lib = make_library(tmp_path / "lib", base, exps)
    sites = len(exps[0].factors())
    calls = []
    plain = LoraExpert.factors
    monkeypatch.setattr(LoraExpert, "factors", lambda self: calls.append(self.name) or plain(self))
    RoutedModel.from_library(base, lib, RouterConfig(top_k=2))
    assert sites == 8 and max(calls.count(e.name) for e in exps) < sites  # 4 each now; 12 when once per site
    assert len([d for d in lib.list_derived() if d["kind"] == "arrow-prototype"]) == 3
    for e in exps:
        tensors, meta = lib.get_derived("arrow-prototype", _expert_config(lib[e.name]))
        own = plain(e)  # {site: (A (r, d), B)}
        assert sorted(s for s, _ in meta["sites"]) == sorted(own)
        assert tensors["prototypes"].shape == (sum(a.shape[1] for a, _ in own.values()),)  # every site's (d,)


def test_from_library_skips_and_reports_a_broken_expert(tmp_path):
    base = fresh("tiny-random-llama")
    lib = make_library(tmp_path / "lib", base, experts(base, 3))
    path = lib.expert_dir("e1") / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00" * 8
    path.write_bytes(bytes(data))
    rm = RoutedModel.from_library(base, lib, RouterConfig(top_k=2))
    assert rm.experts == ["e0", "e2"]
    assert "e1" in rm.unavailable and "checksum" in rm.unavailable["e1"]


def test_from_library_routes_over_cluster_experts_not_mbc_warmups(tmp_path):
    base = fresh("tiny-random-llama")
    exps = experts(base, 3)
    exps[0].info.kind = exps[1].info.kind = "warmup"  # an MBC library keeps its warm-ups for the map
    exps[2].info.kind = "cluster"
    lib = make_library(tmp_path / "lib", base, exps)
    assert lib.routable_names() == ["e2"]
    assert RoutedModel.from_library(base, lib, RouterConfig(top_k=1)).experts == ["e2"]
    every = RoutedModel.from_library(base, lib, RouterConfig(top_k=1), names=lib.names())
    assert every.experts == ["e0", "e1", "e2"]


def test_from_library_refuses_another_base_model(tmp_path):
    llama = fresh("tiny-random-llama")
    lib = make_library(tmp_path / "lib", llama, experts(llama, 2))
    with pytest.raises(LibraryMismatch, match="built for another base model"):
        RoutedModel.from_library(fresh("tiny-random-phi"), lib)


@pytest.mark.parametrize("twin", TWINS)
def test_shared_qkv_matmul_changes_no_result(twin):
    base = fresh(twin)
    exps = experts(base, 4)
    shared = RoutedModel(base, exps, RouterConfig(top_k=2))
    alone = RoutedModel(fresh(twin), exps, RouterConfig(top_k=2), share_inputs=False)
    torch.testing.assert_close(shared.logits(IDS), alone.logits(IDS), atol=1e-5, rtol=0)
    attn = base.model.get_submodule("model.layers.1.self_attn")
    out_proj = getattr(attn, base.targets[3])  # o_proj or dense
    assert attn.q_proj.group is attn.v_proj.group and attn.q_proj.group is not out_proj.group
    x1, x2 = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    with torch.no_grad():
        attn.q_proj(x2)
        want = attn.k_proj(x2)
        attn.q_proj(x1)
        torch.testing.assert_close(attn.k_proj(x2), want)  # k fed another tensor than q: recomputed
        shared.set_router(RouterConfig(top_k=1))
        assert (attn.k_proj(x2) - want).abs().max() > 0  # a router change is never served from the cache


def test_experts_on_mlp_layers_too():
    base = fresh("tiny-random-llama")
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    exps = [random_expert(base, f"m{i}", rank=2, seed=i, targets=targets) for i in range(3)]
    want = reference_logits(fresh("tiny-random-llama"), exps, top_k=2)
    rm = RoutedModel(base, exps, RouterConfig(top_k=2))
    torch.testing.assert_close(rm.logits(IDS), want, atol=1e-4, rtol=0)
    assert rm.modules == targets and rm.trace("hi").weights.shape[:2] == (2, 4)


def test_bf16_base_model_routes_close_to_fp32():
    base32, base16 = fresh("tiny-random-phi"), fresh("tiny-random-phi")
    base16.model.to(torch.bfloat16)
    exps = experts(base32, 3)
    want = RoutedModel(base32, exps, RouterConfig(top_k=2)).logits(IDS)
    rm = RoutedModel(base16, exps, RouterConfig(top_k=2))
    got = rm.logits(IDS)
    assert got.dtype == torch.bfloat16
    # bf16 rounding can flip a near-tie in the top-k, so compare the whole output, not every entry
    assert torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0) > 0.99
    assert rm.trace("hi", max_new_tokens=2).weights.dtype.name == "float32"


def test_routed_layers_call_the_model_s_own_layers():
    # Attach wraps each target nn.Linear and calls it as is: its weights are never copied into a routing
    # buffer, so in-place edits and replaced parameters after attach are both followed, and detach gives the
    # very same layer objects back.
    base, ref = fresh("tiny-random-llama"), fresh("tiny-random-llama")
    sites = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    before = {s: base.model.get_submodule(s) for s in sites}
    pointers = {s: m.weight.data_ptr() for s, m in before.items()}
    exps = experts(base, 3)
    rm = RoutedModel(base, exps, RouterConfig(top_k=2))
    for s in sites:
        wrapped = base.model.get_submodule(s)
        assert isinstance(wrapped, RoutedLinear) and wrapped.base is before[s]
        assert wrapped.base.weight.data_ptr() == pointers[s]
    q, v = (before[s] for s in sites)
    with torch.no_grad():
        q.weight.mul_(2.0)
        v.weight = torch.nn.Parameter(v.weight.detach() * 0.5)
        ref.model.get_submodule(sites[0]).weight.mul_(2.0)
        ref.model.get_submodule(sites[1]).weight.mul_(0.5)
    want = RoutedModel(ref, exps, RouterConfig(top_k=2)).logits(IDS)
    torch.testing.assert_close(rm.logits(IDS), want, atol=1e-5, rtol=0)
    rm.detach()
    assert all(base.model.get_submodule(s) is before[s] for s in sites)


# ---------------------------------------------------------------- moving the model after attach


def routed_tensors(model) -> dict[str, torch.Tensor]:
    """Every buffer and parameter a routed layer reads (its base layer's, its own, its group's)."""
    return {f"{n}.{k}": t for n, m in model.named_modules() if isinstance(m, RoutedLinear)
            for k, t in [*m.named_buffers(), *m.named_parameters()]}


@pytest.mark.parametrize("twin", TWINS)
def test_model_to_after_attach_casts_every_routed_tensor(twin):
    base, ref = fresh(twin), fresh(twin)
    exps = experts(base, 4)
    rm = RoutedModel(base, exps, RouterConfig(top_k=2))
    base.model.to(torch.float64)
    tensors = routed_tensors(base.model)
    assert any(k.endswith("group.proj") for k in tensors) and any(k.endswith(".up") for k in tensors)
    wrong = [k for k, t in tensors.items() if t.is_floating_point() and t.dtype != torch.float64]
    assert not wrong, wrong
    for m in base.model.modules():
        if isinstance(m, RoutedLinear):  # the decoding path's views follow the moved matrix
            assert m.group.protos.dtype == m.group.a_rows.dtype == torch.float64
    ref.model.to(torch.float64)
    at64 = RoutedModel(ref, exps, RouterConfig(top_k=2))  # routing built at float64 from the start
    got = rm.logits(IDS)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, at64.logits(IDS), atol=1e-12, rtol=0)
    a, b = rm.trace("Count: one two", max_new_tokens=3), at64.trace("Count: one two", max_new_tokens=3)
    assert a.token_ids == b.token_ids
    assert abs(a.weights - b.weights).max() < 1e-6  # one-token (sparse) steps too


def test_model_to_another_dtype_or_meta_moves_proj():
    base = fresh("tiny-random-llama")
    rm = RoutedModel(base, experts(base, 3), RouterConfig(top_k=2))
    groups = {id(m.group): m.group for m in base.model.modules() if isinstance(m, RoutedLinear)}.values()
    base.model.to(torch.bfloat16)
    assert all(g.proj.dtype == torch.bfloat16 and g.offsets.dtype == torch.int64 for g in groups)
    assert rm.logits(IDS).dtype == torch.bfloat16
    base.model.to("meta")
    assert all(g.proj.is_meta and g.offsets.is_meta and g.protos.is_meta for g in groups)
    assert all(t.is_meta for t in routed_tensors(base.model).values())
