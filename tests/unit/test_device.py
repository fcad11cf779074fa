"""Devices: `resolve_device` / `resolve_dtype`, and a routed model moved after attach (or attached on the
device) routing exactly as on the CPU, traces included. Runs on $LORA_EXPLORER_TEST_DEVICE (bench/gpu_check.sh
sets it to cuda); on the CPU it checks the same moves on the CPU."""
import numpy as np
import pytest
import torch
from arrow_helpers import IDS, TWINS, experts, fresh

from explorer.routing.config import RouterConfig
from explorer.routing.device import default_dtype, device_for_tests, resolve_device, resolve_dtype
from explorer.routing.layer import RoutedLinear
from explorer.routing.model import RoutedModel

DEVICE = device_for_tests()


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu") and resolve_device(None) == auto
    for bad in ("tpu", "gpu", "cuda:x", ""):
        if bad:
            with pytest.raises(ValueError, match="device"):
                resolve_device(bad)
    with pytest.raises(ValueError, match=r"'cuda:99' asked for, but"):
        resolve_device("cuda:99")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32 == default_dtype(torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(torch.float16, auto) == torch.float16
    with pytest.raises(ValueError, match="Unknown dtype 'half-ish'"):
        resolve_dtype("half-ish", auto)


def routed_tensors(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": t for n, m in model.named_modules() if isinstance(m, RoutedLinear)
            for k, t in [*m.named_buffers(), *m.named_parameters()]}


@pytest.mark.parametrize("twin", TWINS)
def test_moved_after_attach_routes_as_on_the_cpu(twin):
    exps = experts(fresh(twin), 5)
    router = RouterConfig(top_k=2, disabled=("e1",))
    cpu = RoutedModel(fresh(twin), exps, router)
    moved = RoutedModel(fresh(twin), exps, router)
    moved.base.model.to(DEVICE)  # attach first, then move
    built = fresh(twin)
    built.model.to(DEVICE)
    there = RoutedModel(built, exps, router)  # move first, then attach
    for rm in (moved, there):
        assert rm.device.type == DEVICE.type
        wrong = [k for k, t in routed_tensors(rm.base.model).items() if t.device.type != DEVICE.type]
        assert not wrong, wrong
        group = rm.base.model.get_submodule(rm.sites[0]).group
        assert group.protos.device.type == group.a_rows.device.type == DEVICE.type  # hot-path views moved too
    want = cpu.logits(IDS)
    for rm in (moved, there):
        torch.testing.assert_close(rm.logits(IDS).cpu(), want, atol=1e-4, rtol=0)
    a, b = cpu.trace("Count: one two", max_new_tokens=4), moved.trace("Count: one two", max_new_tokens=4)
    assert a.token_ids == b.token_ids and a.text == b.text
    np.testing.assert_allclose(b.weights, a.weights, atol=1e-5)
    np.testing.assert_allclose(b.routes.contribution.astype(np.float32), a.routes.contribution.astype(np.float32),
                               rtol=2e-3, atol=1e-4)
    assert (b.weights[..., 1] == 0).all()  # the disabled expert's mask reached the device


def test_fixed_modes_on_the_device():
    twin = "tiny-random-llama"
    exps = experts(fresh(twin), 4)
    cpu, dev = RoutedModel(fresh(twin), exps), RoutedModel(fresh(twin), exps)
    dev.base.model.to(DEVICE)
    for router in (RouterConfig(mode="uniform", disabled=("e0",)), RouterConfig(mode="expert:e2")):
        cpu.set_router(router)
        dev.set_router(router)
        torch.testing.assert_close(dev.logits(IDS).cpu(), cpu.logits(IDS), atol=1e-4, rtol=0)
        a, b = cpu.trace("hi", max_new_tokens=2), dev.trace("hi", max_new_tokens=2)
        assert a.token_ids == b.token_ids
        np.testing.assert_array_equal(a.weights, b.weights)  # fixed weights: exactly the same


def test_default_dtype_on_the_device_routes_close_to_float32():
    twin = "tiny-random-phi"
    exps = experts(fresh(twin), 3)
    want = RoutedModel(fresh(twin), exps, RouterConfig(top_k=2)).logits(IDS)
    base = fresh(twin)
    base.model.to(DEVICE, default_dtype(DEVICE))
    got = RoutedModel(base, exps, RouterConfig(top_k=2)).logits(IDS)
    assert got.dtype == default_dtype(DEVICE) and got.device.type == DEVICE.type
    cos = torch.nn.functional.cosine_similarity(got.float().cpu().flatten(), want.flatten(), dim=0)
    assert cos > 0.99
