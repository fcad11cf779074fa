"""Our fused Arrow router against PEFT's `create_arrow_model` on the same adapters: equal logits and weights.

PEFT's prototypes come from 15 power-iteration steps (not exact), so after a first forward each PEFT Arrow
layer's `prototypes` buffer is overwritten with exact ones, as ALGORITHMS.md prescribes.
"""
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh, save_peft_dir

from explorer.routing.layer import compute_prototypes
from explorer.routing.model import RoutedModel, RouterConfig


def peft_arrow(twin, exps, top_k, temperature, tmp_path):
    from peft import ArrowConfig, create_arrow_model
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    paths = [save_peft_dir(e, tmp_path / e.name) for e in exps]
    model = create_arrow_model(fresh(twin).model, paths, ArrowConfig(top_k=top_k, router_temperature=temperature))
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)  # builds PEFT's (approximate) prototypes lazily
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
@pytest.mark.parametrize("n_experts,top_k,temperature", [(2, 1, 1.0), (5, 2, 1.0), (5, 5, 0.5), (8, 3, 2.0)])
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
