"""MBC clustering on synthetic experts whose weights come in known groups."""
import numpy as np
import pytest
import torch

from library_store.training.mbc import (UMAP_MIN_EXPERTS, MBCConfig, MBCData, adjusted_rand, flatten, map_coords,
                                        mbc_cluster, read_mbc, sparsify)
from library_store.expert import ExpertInfo, LoraExpert

KEYS = [f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(2) for m in ("q_proj", "v_proj") for ab in ("A", "B")]


def _shape(key):
    return (4, 16) if "lora_A" in key else (16, 4)


def _init(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(_shape(k), generator=g) if "lora_A" in k else torch.zeros(_shape(k))) for k in KEYS}


def _experts(groups=(0, 0, 0, 1, 1, 1, 2, 2), shared_init=True, noise=0.1, scale=0.05):
    """Experts = a shared random init plus a small change along their group's direction plus noise: the raw
    weights are dominated by the init (as warm-up experts are), the change carries the group."""
    g = torch.Generator().manual_seed(1)
    directions = {grp: {k: torch.randn(_shape(k), generator=g) for k in KEYS} for grp in set(groups)}
    init = _init()
    experts = []
    for i, grp in enumerate(groups):
        weights = {k: (init[k] if shared_init else 0) + scale * (directions[grp][k]
                   + noise * torch.randn(_shape(k), generator=g)) for k in KEYS}
        experts.append(LoraExpert(ExpertInfo(name=f"e{i}", kind="warmup", tasks=[f"t{i}"]), weights))
    return experts, init, list(groups)


def test_recovers_groups_from_what_training_changed():
    experts, init, groups = _experts()
    result = mbc_cluster(experts, 3, init=init, config=MBCConfig(k=3, map_method="pca"))
    assert adjusted_rand(result.labels, groups) == pytest.approx(1.0)
    assert result.labels[0] == 0  # numbered by first appearance
    assert result.clusters() == {0: ["e0", "e1", "e2"], 1: ["e3", "e4", "e5"], 2: ["e6", "e7"]}
    assert result.clusters({e.name: e.info.tasks for e in experts})[2] == ["t6", "t7"]


def test_raw_weights_are_dominated_by_the_shared_init():
    """The measured pitfall of docs/design.md, reproduced: without subtracting W_init every pair looks alike."""
    experts, init, groups = _experts()
    raw = mbc_cluster(experts, 3, config=MBCConfig(k=3, delta=False, map_method="pca"))
    delta = mbc_cluster(experts, 3, init=init, config=MBCConfig(k=3, map_method="pca"))
    off = ~np.eye(len(groups), dtype=bool)
    assert raw.raw_similarity[off].min() > 0.9
    across = np.array(groups)[:, None] != np.array(groups)[None, :]
    assert delta.raw_similarity[across].max() < 0.5


def test_similarity_is_a_cosine_matrix():
    experts, init, _ = _experts()
    result = mbc_cluster(experts, 2, init=init, config=MBCConfig(k=2, map_method="pca"))
    s = result.similarity
    assert s.shape == (8, 8)
    np.testing.assert_allclose(s, s.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-5)
    assert result.coords.shape == (8, 2) and result.map_method == "pca"


def test_seeded_and_deterministic():
    experts, init, _ = _experts()
    a = mbc_cluster(experts, 3, init=init, config=MBCConfig(k=3, map_method="pca", seed=4))
    b = mbc_cluster(experts, 3, init=init, config=MBCConfig(k=3, map_method="pca", seed=4))
    assert (a.labels == b.labels).all() and np.array_equal(a.similarity, b.similarity)


def test_sparsify_keeps_the_largest_entries_per_row():
    x = torch.tensor([[1.0, -2.0, 3.0, -4.0], [10.0, 0.5, -0.1, 20.0]])
    out = sparsify(x, 0.5)
    assert out.tolist() == [[0.0, 0.0, 3.0, -4.0], [10.0, 0.0, 0.0, 20.0]]
    assert torch.equal(sparsify(x, 0.0), x)


def test_flatten_subtracts_init():
    experts, init, _ = _experts()
    assert flatten(experts[0]).shape == (sum(int(np.prod(_shape(k))) for k in KEYS),)
    assert flatten(experts[0], init).abs().max() < 1.0 < flatten(experts[0]).abs().max()
    with pytest.raises(ValueError, match="missing from W_init"):
        flatten(experts[0], {})


def test_bad_k_and_missing_init():
    experts, init, _ = _experts()
    with pytest.raises(ValueError, match="at least 2 clusters"):
        mbc_cluster(experts, 1, init=init)
    with pytest.raises(ValueError, match="cannot make 9 clusters from 8 experts"):
        mbc_cluster(experts, 9, init=init)
    with pytest.raises(ValueError, match="needs W_init"):
        mbc_cluster(experts, 2)


def test_pca_map_for_few_experts():
    coords, method = map_coords(np.random.RandomState(0).randn(3, 5))
    assert method == "pca" and coords.shape == (3, 2)
    coords, method = map_coords(np.random.RandomState(0).randn(2, 5))
    assert coords.shape == (2, 2)
    with pytest.raises(ValueError, match="map method"):
        map_coords(np.zeros((5, 2)), method="tsne")


def test_auto_maps_small_libraries_with_pca():
    coords, method = map_coords(np.random.RandomState(0).randn(UMAP_MIN_EXPERTS - 1, 6))
    assert method == "pca" and coords.shape == (UMAP_MIN_EXPERTS - 1, 2)


@pytest.mark.slow
def test_umap_map_from_ten_experts_or_when_asked():
    """UMAP's numba JIT takes minutes on a busy CPU: integration tier."""
    coords, method = map_coords(np.random.RandomState(0).randn(UMAP_MIN_EXPERTS, 6))
    assert method == "umap" and coords.shape == (UMAP_MIN_EXPERTS, 2) and np.isfinite(coords).all()
    coords, method = map_coords(np.random.RandomState(0).randn(5, 6), method="umap")
    assert method == "umap" and coords.shape == (5, 2) and np.isfinite(coords).all()


# ---------------------------------------------------------------- the stored schema (MBCData)


def test_mbc_data_round_trips_through_a_library(tiny_mbc_library, tiny_library):
    from library_store.store.library import ExpertLibrary
    from library_store.testing import TASKS

    lib = ExpertLibrary.open(tiny_mbc_library)
    data = read_mbc(lib)
    assert data.tasks == TASKS and data.experts == [f"warmup-{t}" for t in TASKS]
    assert data.clusters == lib.clusters() == {"cluster-0": TASKS[0::2], "cluster-1": TASKS[1::2]}
    assert data.cluster_of == lib.cluster_of() and data.method == "pca"
    assert data.similarity.shape == (6, 6) and data.coords.shape == (6, 2)
    np.testing.assert_allclose(np.diag(data.similarity), 1.0, atol=1e-5)
    assert {i.cluster for i in lib.infos()} == {"cluster-0", "cluster-1"}  # one cluster name everywhere
    plain = ExpertLibrary.open(tiny_library)
    assert read_mbc(plain).clusters == plain.clusters() and set(plain.clusters()) == {"cluster-0", "cluster-1"}


def test_mbc_data_refuses_inconsistent_rows_and_reads_none_without_data(tmp_path):
    from library_store.store.library import ExpertLibrary
    from store_helpers.experts import LLAMA_FP

    with pytest.raises(ValueError, match="inconsistent"):
        MBCData(["a", "b"], ["warmup-a"], [0, 1], np.eye(2), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="inconsistent"):
        MBCData(["a", "b"], ["warmup-a", "warmup-b"], [0, 1], np.eye(3), np.zeros((2, 2)))
    lib = ExpertLibrary.create(tmp_path / "lib", LLAMA_FP)
    assert read_mbc(lib) is None
    data = MBCData(["a", "b", "c"], ["w-a", "w-b", "w-c"], [1, 0, 1], np.eye(3), np.ones((3, 2)), method="umap",
                   families=["x", "y", "x"], ari_vs_families=1.0, settings={"mbc": {"k": 2}})
    data.write(lib, {"v": 1})
    again = read_mbc(lib)
    assert again.to_meta() == data.to_meta() and again.clusters == {"cluster-0": ["b"], "cluster-1": ["a", "c"]}
    assert again.raw_similarity is None and again.settings == {"mbc": {"k": 2}}
