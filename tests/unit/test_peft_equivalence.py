"""Our fused Arrow router against PEFT's `create_arrow_model` on the same adapters: equal logits and weights,
plain and with GenKnowSub (`use_gks=True`) against our centring with scope "weights".

PEFT's prototypes come from 15 power-iteration steps (not exact), so after a first forward each PEFT Arrow
layer's `prototypes` buffer is overwritten with exact ones (docs/design.md, "Arrow prototypes"). With GenKnowSub
that first forward has already subtracted the general adapters' mean from PEFT's task adapters in place, so the
exact prototypes are taken from the centred factors, as PEFT's own are (docs/design.md, "Centring").
"""
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh, save_peft_dir, thorough

from library_store.testing import random_expert

from explorer.routing.config import RouterConfig
from explorer.routing.prototypes import compute_prototypes
from explorer.routing.model import RoutedModel


def peft_arrow(twin, exps, top_k, temperature, tmp_path, general=None):
    """PEFT's Arrow model over `exps`; with `general` (a list of experts), GenKnowSub subtracts their mean."""
    from peft import ArrowConfig, create_arrow_model
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    paths = [save_peft_dir(e, tmp_path / e.name) for e in exps]
    general_paths = [save_peft_dir(g, tmp_path / g.name) for g in general] if general else None
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=bool(general))
    model = create_arrow_model(fresh(twin).model, paths, config, general_adapter_paths=general_paths)
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)  # GenKnowSub (if any), then PEFT's (approximate) prototypes, lazily
    layers = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_arrow") and "arrow_router" in mod.lora_arrow:
            arrow: ArrowLoraLinearLayer = mod.lora_arrow["arrow_router"]
            A = torch.stack([mod.lora_A[n].weight for n in arrow.task_adapter_names])  # (E, r, d)
            B = torch.stack([mod.lora_B[n].weight for n in arrow.task_adapter_names])  # (E, out, r)
            arrow.prototypes.copy_(compute_prototypes(A, B))
            layers[name.removeprefix("base_model.model.")] = (mod, arrow)
    return model, layers


@torch.no_grad()
def peft_weights(model, layers, ids):
    """PEFT keeps its routing weights in a local variable: recompute them from each layer's input."""
    seen, handles = {}, []
    for site, (mod, arrow) in layers.items():
        def hook(m, inp, out, site=site, arrow=arrow):
            tok = inp[0].reshape(-1, inp[0].shape[-1])  # (t, d)
            sim = (tok @ arrow.prototypes.T).abs()  # (t, E)
            top_v, idx = sim.topk(arrow.top_k, dim=1)
            full = tok.new_full(sim.shape, float("-inf")).scatter_(1, idx, top_v)
            seen[site] = torch.softmax(full / arrow.temperature, dim=1)
        handles.append(mod.register_forward_hook(hook))
    try:
        logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("n_experts,top_k,temperature", [(5, 2, 1.0), *thorough((2, 1, 1.0), (5, 5, 0.5), (8, 3, 2.0))])
def test_same_logits_and_weights_as_peft(twin, n_experts, top_k, temperature, tmp_path):
    base = fresh(twin)
    exps = experts(base, n_experts, seed=n_experts)
    peft_model, layers = peft_arrow(twin, exps, top_k, temperature, tmp_path)
    assert len(layers) == 2 * len(base.targets)
    ref_logits, ref_w = peft_weights(peft_model, layers, IDS)

    rm = RoutedModel(base, exps, RouterConfig(top_k=top_k, temperature=temperature))
    with rm.capturing() as records:
        logits = rm.logits(IDS)
    ours = rm.routing_weights(records)

    assert (logits - base_logits(twin)).abs().max() > 1e-2  # the experts do change the output
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert set(ours) == set(ref_w)
    for site, w in ours.items():
        torch.testing.assert_close(w, ref_w[site], atol=1e-4, rtol=0, msg=lambda m: f"{site}: {m}")
        assert ((w > 0).sum(-1) == top_k).all()


@torch.no_grad()
def base_logits(twin):
    return fresh(twin).model(input_ids=IDS).logits


def assert_same_as_peft(rm, peft_model, layers, top_k):
    ref_logits, ref_w = peft_weights(peft_model, layers, IDS)
    with rm.capturing() as records:
        logits = rm.logits(IDS)
    ours = rm.routing_weights(records)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert set(ours) == set(ref_w)
    for site, w in ours.items():
        torch.testing.assert_close(w, ref_w[site], atol=1e-4, rtol=0, msg=lambda m: f"{site}: {m}")
        assert ((w > 0).sum(-1) == top_k).all()
    return logits


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("n_experts,top_k,temperature", [(5, 2, 0.5), *thorough((3, 1, 1.0), (8, 3, 1.0))])
def test_mean_centring_equals_peft_genknowsub_over_every_task_adapter(twin, n_experts, top_k, temperature,
                                                                        tmp_path):
    base = fresh(twin)
    exps = experts(base, n_experts, seed=10 + n_experts)
    peft_model, layers = peft_arrow(twin, exps, top_k, temperature, tmp_path, general=exps)
    router = RouterConfig(top_k=top_k, temperature=temperature, centre="mean", centre_scope="weights")
    logits = assert_same_as_peft(RoutedModel(base, exps, router), peft_model, layers, top_k)
    plain = RoutedModel(fresh(twin), exps, RouterConfig(top_k=top_k, temperature=temperature)).logits(IDS)
    assert (logits - plain).abs().max() > 1e-2  # centring does change the output


@pytest.mark.parametrize("twin", TWINS)
def test_general_expert_centring_equals_peft_with_that_general_adapter(twin, tmp_path):
    base = fresh(twin)
    exps = experts(base, 4, seed=20)
    general = random_expert(base, "general-knowledge", seed=21, kind="general")
    peft_model, layers = peft_arrow(twin, exps, 2, 1.0, tmp_path, general=[general])
    router = RouterConfig(top_k=2, centre="general:general-knowledge", centre_scope="weights")
    assert_same_as_peft(RoutedModel(base, exps, router, general=[general]), peft_model, layers, 2)
