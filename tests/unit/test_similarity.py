"""ΔW similarity (`store.similarity`): equal to the dense computation, blind to how ΔW is factored (so to the
init), cached as derived data, and updated incrementally (only new rows computed, same result as from scratch)."""
import copy

import numpy as np
import pytest
import torch
from store_helpers.experts import LLAMA, LLAMA_FP, LLAMA_SHAPES, random_expert, sites

from library_store.store import similarity
from library_store.store.library import ExpertLibrary
from library_store.store.similarity import DELTA_KIND, cosine_from_gram, delta_gram, delta_similarity, embed


@pytest.fixture
def lib(tmp_path):
    return ExpertLibrary.create(tmp_path / "lib", LLAMA_FP, module_shapes=LLAMA_SHAPES)


def mixed_experts():
    """Different ranks, alphas and coverage: one expert only on layer 1, one only on q_proj and v_proj."""
    return [random_expert(LLAMA, "e0", seed=0, rank=4, alpha=16.0),
            random_expert(LLAMA, "e1", seed=1, rank=8, alpha=4.0),
            random_expert(sites(layers=(1,)), "e2", seed=2, rank=2, alpha=8.0),
            random_expert(sites({"q_proj": (64, 64), "v_proj": (64, 32)}), "e3", seed=3, rank=4, alpha=3.0),
            random_expert(LLAMA, "e4", seed=4, rank=4, alpha=16.0, scale=0.05)]


def dense_vectors(experts) -> torch.Tensor:
    """Every expert's s·B@A at every site any expert covers, flattened into one float64 vector (the slow way)."""
    all_sites = sorted({s for e in experts for s in e.factors()})
    shapes = {s: (b.shape[0], a.shape[1]) for e in experts for s, (a, b) in e.factors().items()}
    rows = []
    for e in experts:
        f = e.factors()
        parts = [(e.scaling * f[s][1].double() @ f[s][0].double()) if s in f else torch.zeros(shapes[s],
                 dtype=torch.float64) for s in all_sites]  # (out, d) each
        rows.append(torch.cat([p.reshape(-1) for p in parts]))
    return torch.stack(rows)  # (N, sum of out * d)


def test_low_rank_gram_and_cosine_equal_the_dense_computation(lib):
    experts = mixed_experts()
    for e in experts:
        lib.add(e)
    dense = dense_vectors(experts)
    gram = dense @ dense.T  # (N, N)
    cos = gram / torch.outer(gram.diag().sqrt(), gram.diag().sqrt())
    np.testing.assert_allclose(delta_gram(experts, experts), gram.numpy(), rtol=1e-5, atol=1e-8)
    sim = delta_similarity(lib, map_method="pca")
    assert sim.names == ["e0", "e1", "e2", "e3", "e4"] and sim.skipped == {}
    np.testing.assert_allclose(sim.similarity, cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(sim.gram, gram.numpy(), rtol=1e-5)
    assert sim.coords.shape == (5, 2) and len(sim.labels) == 5 and np.isfinite(sim.coords).all()
    assert abs(sim.similarity[0, 1]) < 0.5  # independent random experts are far from parallel


def test_the_cosine_sees_the_update_not_its_factors_or_scale(lib):
    a = random_expert(LLAMA, "a", seed=0)
    refactored = copy.deepcopy(a)  # same ΔW from another "init": A' = R A, B' = B R⁻¹ at every site
    refactored.info.name = "a-refactored"
    gen = torch.Generator().manual_seed(7)
    for key in [k for k in a.weights if k.endswith("lora_A.weight")]:
        r = torch.randn(4, 4, generator=gen, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
        refactored.weights[key] = (r @ a.weights[key].double()).float()
        bkey = key.replace("lora_A", "lora_B")
        refactored.weights[bkey] = (a.weights[bkey].double() @ torch.linalg.inv(r)).float()
    louder = copy.deepcopy(a)
    louder.info.name, louder.info.alpha = "a-louder", 64.0
    b = random_expert(LLAMA, "b", seed=1)
    for e in (a, refactored, louder, b):
        lib.add(e)
    sim = delta_similarity(lib, map_method="pca", k=2)
    assert sim.names == ["a", "a-louder", "a-refactored", "b"]
    np.testing.assert_allclose(sim.similarity[:3, :3], np.ones((3, 3)), atol=1e-5)
    assert sim.labels[:3] == [0, 0, 0] and sim.labels[3] == 1
    assert sim.clusters == {"cluster-0": ["a", "a-louder", "a-refactored"], "cluster-1": ["b"]}
    data = sim.as_mbc_data()
    assert data.experts == sim.names and data.coords.shape == (4, 2)


def test_the_embedding_reproduces_the_cosines():
    experts = mixed_experts()
    cos = cosine_from_gram(delta_gram(experts, experts))
    emb = embed(cos)
    np.testing.assert_allclose(emb @ emb.T, cos, atol=1e-8)


def test_cached_then_updated_incrementally_equal_to_a_full_computation(lib, monkeypatch):
    experts = mixed_experts()
    for e in experts[:4]:
        lib.add(e)
    computed = []
    real = similarity.delta_gram

    def spy(rows, cols):
        computed.append(([r.name for r in rows], len(cols)))
        return real(rows, cols)

    monkeypatch.setattr(similarity, "delta_gram", spy)
    first = delta_similarity(lib, map_method="pca")
    assert computed == [(["e0", "e1", "e2", "e3"], 4)]
    assert [d["kind"] for d in lib.list_derived()] == [DELTA_KIND]
    assert np.array_equal(delta_similarity(lib, map_method="pca").gram, first.gram) and len(computed) == 1  # hit

    lib.add(experts[4])  # one more expert: only its row is computed
    grown = delta_similarity(lib, map_method="pca")
    assert computed[1:] == [(["e4"], 5)]
    replaced = random_expert(LLAMA, "e1", seed=11, rank=2)
    lib.add(replaced, replace=True)  # a replaced expert has a new checksum: its row again, nothing else
    after = delta_similarity(lib, map_method="pca")
    assert computed[2:] == [(["e1"], 5)]
    lib.remove("e0")
    smaller = delta_similarity(lib, map_method="pca")
    assert len(computed) == 3 and smaller.names == ["e1", "e2", "e3", "e4"]

    monkeypatch.setattr(similarity, "delta_gram", real)
    now = [lib[n] for n in lib.names()]
    np.testing.assert_allclose(smaller.gram, real(now, now), rtol=1e-12)
    full = [*experts[:4], experts[4]]
    np.testing.assert_allclose(grown.gram, real(full, full), rtol=1e-12)
    with_new = [experts[0], replaced, *experts[2:]]
    np.testing.assert_allclose(after.gram, real(with_new, with_new), rtol=1e-12)
    np.testing.assert_allclose(after.similarity, cosine_from_gram(real(with_new, with_new)), atol=1e-12)


def test_a_read_only_library_gets_a_map_without_being_written(tiny_library):
    from pathlib import Path

    root = Path(tiny_library)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if "sqlite-" not in p.name}
    sim = delta_similarity(ExpertLibrary.open(root), map_method="pca")
    assert len(sim.names) == 5 and sim.similarity.shape == (5, 5)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if "sqlite-" not in p.name} == before
    again = delta_similarity(ExpertLibrary.open(root), map_method="pca")  # from the user cache
    np.testing.assert_array_equal(again.similarity, sim.similarity)


def test_a_broken_expert_is_left_off_the_map_and_named(lib):
    for e in mixed_experts()[:3]:
        lib.add(e)
    path = lib.root / "experts" / "e1" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:64])
    sim = delta_similarity(lib, map_method="pca")
    assert sim.names == ["e0", "e2"] and "e1" in sim.skipped and sim.similarity.shape == (2, 2)
