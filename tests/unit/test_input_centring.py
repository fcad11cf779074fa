"""Input centring (`RouterConfig.input_centre="base"`): the score is |(h - mu) · p_e| with mu the base model's
mean input at that site over the calibration prompts. The maths against a plain reference on both twins (many
tokens and the one-token decoding path), the calibration itself, switching, `.to()`, the cache, bad input."""
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh, reference_logits

from explorer.routing.calibration import INPUT_MEAN_KIND, measure_input_means
from explorer.routing.config import RouterConfig
from explorer.routing.model import RoutedModel
from library_store.store.library import ExpertLibrary

SHIFT = RouterConfig(top_k=2, temperature=0.7, input_centre="base")


def site_means(twin, exps):
    """The calibration means measured on a fresh base model that never had an expert attached."""
    base = fresh(twin)
    sites = sorted({s for e in exps for s in e.factors()})
    return measure_input_means(base.model, base.tokenizer, sites)


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("ids", [IDS, IDS[:, :1]], ids=["many-tokens", "one-token"])
def test_centred_scores_equal_a_plain_reference(twin, ids):
    base = fresh(twin)
    exps = experts(base, 5, seed=4)
    means = site_means(twin, exps)
    want = reference_logits(fresh(twin), exps, top_k=2, temperature=0.7, ids=ids, means=means)
    got = RoutedModel(base, exps, SHIFT).logits(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    plain = reference_logits(fresh(twin), exps, top_k=2, temperature=0.7, ids=ids)
    assert (got - plain).abs().max() > 1e-3  # the shift changes the routing on these random experts


def test_calibration_applies_no_expert_and_measures_every_site():
    base = fresh("tiny-random-llama")
    exps = experts(base, 3, seed=5, scale=3.0)
    rm = RoutedModel(base, exps, SHIFT)  # measured inside, in mode "base", while the experts are attached
    want = site_means("tiny-random-llama", exps)
    assert set(rm._means) == set(want) == set(rm.sites)
    for site in want:
        torch.testing.assert_close(rm._means[site], want[site], atol=1e-5, rtol=0)
    assert rm.router.input_centre == "base" and rm._state.mode == "arrow"  # the mode was restored


def test_switching_input_centring_on_and_off_equals_fresh_models():
    base = fresh("tiny-random-phi")
    exps = experts(base, 4, seed=6)
    rm = RoutedModel(base, exps, RouterConfig(top_k=2, temperature=0.7))
    plain = rm.logits(IDS)
    rm.set_router(SHIFT)
    torch.testing.assert_close(rm.logits(IDS), RoutedModel(fresh("tiny-random-phi"), exps, SHIFT).logits(IDS),
                               atol=1e-6, rtol=0)
    rm.set_router(RouterConfig(top_k=2, temperature=0.7))
    torch.testing.assert_close(rm.logits(IDS), plain, atol=1e-6, rtol=0)


def test_with_factor_centring_the_shift_uses_the_centred_prototypes():
    base = fresh("tiny-random-llama")
    exps = experts(base, 4, seed=7)
    both = RouterConfig(top_k=2, temperature=0.7, centre="mean", centre_scope="weights", input_centre="base")
    rm = RoutedModel(base, exps, RouterConfig(top_k=2))
    rm.set_router(both)  # re-stacked with centred prototypes: the shift must be recomputed from them
    torch.testing.assert_close(rm.logits(IDS), RoutedModel(fresh("tiny-random-llama"), exps, both).logits(IDS),
                               atol=1e-6, rtol=0)
    group = base.model.get_submodule(rm.sites[0]).group
    G, E = group.n_members, group.n_experts
    mu = torch.stack([rm._means[s] for s in group.sites])  # (G, d)
    want = (group.protos.view(G, E, -1) @ mu.unsqueeze(-1)).view(-1)  # (G E,)
    torch.testing.assert_close(group.shift, want, atol=1e-6, rtol=0)


def test_moving_the_model_after_attach_moves_the_shift():
    base = fresh("tiny-random-llama")
    exps = experts(base, 4, seed=9)
    rm = RoutedModel(base, exps, SHIFT)
    want = rm.logits(IDS).double()
    base.model.to(torch.float64)
    group = base.model.get_submodule(rm.sites[0]).group
    assert group.shift.dtype == torch.float64
    torch.testing.assert_close(rm.logits(IDS), want, atol=1e-4, rtol=0)


def test_trace_records_input_centring():
    base = fresh("tiny-random-llama")
    rm = RoutedModel(base, experts(base, 3), SHIFT)
    trace = rm.trace("hi", max_new_tokens=2)
    assert trace.router.input_centre == "base"
    assert type(trace).from_json(trace.to_json()).router == SHIFT


def test_from_library_caches_the_means(tmp_path, monkeypatch):
    base = fresh("tiny-random-llama")
    lib = ExpertLibrary.create(tmp_path / "lib", base)
    for e in experts(base, 3, seed=11):
        lib.add(e)
    want = RoutedModel.from_library(base, lib, SHIFT).logits(IDS)
    assert [d["kind"] for d in lib.list_derived()].count(INPUT_MEAN_KIND) == 1

    def no_measure(*a, **k):
        raise AssertionError("input means measured again despite the cache")

    monkeypatch.setattr("explorer.routing.calibration.measure_input_means", no_measure)
    again = RoutedModel.from_library(fresh("tiny-random-llama"), ExpertLibrary.open(tmp_path / "lib"), SHIFT)
    torch.testing.assert_close(again.logits(IDS), want, atol=1e-6, rtol=0)


def test_unknown_input_centre_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="Unknown input_centre 'median': use one of none, base"):
        RouterConfig(input_centre="median")
    assert RouterConfig.from_dict(SHIFT.to_dict()) == SHIFT
    legacy = {k: v for k, v in SHIFT.to_dict().items() if k != "input_centre"}
    assert RouterConfig.from_dict(legacy).input_centre == "none"
