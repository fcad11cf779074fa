"""The one loader, `RoutedModel.from_library`: one bad expert never takes the library down, and an expert added
to a library is the only one whose prototypes are computed when it is attached again."""
import torch

import explorer.routing.inject as inject
from explorer.routing.config import RouterConfig
from explorer.routing.model import RoutedModel
from library_store.store.library import ExpertLibrary
from library_store.testing import random_expert

TOP2 = RouterConfig(top_k=2)


def _library(path, base, n=3):
    lib = ExpertLibrary.open_or_create(path, base)
    for i in range(n):
        lib.add(random_expert(base, f"e{i}", tasks=[f"t{i}"], seed=i))
    return lib


def _count_computed(monkeypatch):
    seen = []
    real = inject.compute_prototypes

    def counting(A, B):
        seen.append(A.shape[0])  # (E·sites, r, d): how many prototypes this call computed
        return real(A, B)

    monkeypatch.setattr(inject, "compute_prototypes", counting)
    return seen


def test_an_expert_whose_prototypes_fail_is_skipped_and_named(tmp_path, fresh_tiny):
    base = fresh_tiny("tiny-random-llama")
    lib = _library(tmp_path / "lib", base)
    bad = random_expert(base, "huge", tasks=["t9"], seed=9)
    bad.weights = {k: v * 1e30 if "lora_B" in k else v for k, v in bad.weights.items()}  # finite, but BᵀB = inf
    lib.add(bad)
    rm = RoutedModel.from_library(base, lib, TOP2)
    try:
        assert rm.experts == ["e0", "e1", "e2"]
        assert "prototypes cannot be computed" in rm.unavailable["huge"]
        trace = rm.trace("hello there", max_new_tokens=2)
        assert trace.experts == ["e0", "e1", "e2"] and torch.isfinite(torch.tensor(trace.weights)).all()
    finally:
        rm.detach()


def test_an_expert_with_nan_weights_is_skipped_and_named(tmp_path, fresh_tiny, monkeypatch):
    base = fresh_tiny("tiny-random-llama")
    lib = _library(tmp_path / "lib", base)
    real = ExpertLibrary.__getitem__

    def poisoned(self, name):  # the store refuses NaN on the way in; a file changed behind its back is not
        expert = real(self, name)
        if name == "e1":
            expert.weights = {k: torch.full_like(v, float("nan")) for k, v in expert.weights.items()}
        return expert

    monkeypatch.setattr(ExpertLibrary, "__getitem__", poisoned)
    rm = RoutedModel.from_library(base, lib, TOP2)
    try:
        assert rm.experts == ["e0", "e2"] and "non-finite" in rm.unavailable["e1"]
    finally:
        rm.detach()


def test_adding_an_expert_computes_only_its_prototypes(tmp_path, fresh_tiny, monkeypatch):
    base = fresh_tiny("tiny-random-llama")
    lib = _library(tmp_path / "lib", base)
    seen = _count_computed(monkeypatch)
    RoutedModel.from_library(base, lib, TOP2).detach()
    first = sum(seen)  # rows computed: 3 experts x every site (batched over sites of one shape)
    assert first > 0 and first % 3 == 0
    lib.add(random_expert(base, "new", tasks=["t_new"], seed=7))
    seen.clear()
    rm = RoutedModel.from_library(base, lib, TOP2)
    try:
        assert rm.experts == ["e0", "e1", "e2", "new"]
        assert sum(seen) == first // 3  # only the new expert, at every site
        stacks = inject.build_stacks([lib[n] for n in rm.experts])  # the same as computing all afresh
        for site, st in stacks.items():
            assert torch.allclose(rm._stacks[site].prototypes, st.prototypes, atol=1e-6), site
    finally:
        rm.detach()


def test_an_expert_entry_without_its_sites_is_a_miss(tmp_path, fresh_tiny, monkeypatch):
    """A cached entry of one expert that lacks its layout (e.g. written by hand) is computed again, not trusted."""
    from explorer.routing.prototype_cache import EXPERT_PROTOTYPE_KIND, _expert_config

    base = fresh_tiny("tiny-random-llama")
    lib = _library(tmp_path / "lib", base)
    RoutedModel.from_library(base, lib, TOP2).detach()
    lib.put_derived(EXPERT_PROTOTYPE_KIND, _expert_config(lib["e0"]), {"prototypes": torch.zeros(3)},
                    {"expert": "e0"})
    lib.add(random_expert(base, "new", tasks=["t_new"], seed=7))  # the set's entry misses: each expert's is read
    seen = _count_computed(monkeypatch)
    rm = RoutedModel.from_library(base, lib, TOP2)
    try:
        computed = sum(seen)
        stacks = inject.build_stacks([lib[n] for n in rm.experts])  # the same as computing all afresh
        assert computed == 2 * len(stacks)  # e0 and the new one, at every site
        for site, st in stacks.items():
            assert torch.allclose(rm._stacks[site].prototypes, st.prototypes, atol=1e-6), site
    finally:
        rm.detach()
