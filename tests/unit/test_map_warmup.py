"""The Library tab compiles UMAP ahead of an upload: `warm_umap` runs one small fit once per process (none after a
real UMAP map), and opening the tab starts it in the background only for a library whose ΔW map is, or after one
upload would be, a UMAP map. The real compile (13-15 s) is measured by bench/upload_latency.py, not here."""
import threading
from types import SimpleNamespace

import pytest

from library_store.training import mbc


@pytest.fixture
def fake_fits(monkeypatch):
    """UMAP fits recorded instead of run, and a process where none has run yet."""
    calls = []
    monkeypatch.setattr(mbc, "_WARMED", threading.Event())
    monkeypatch.setattr(mbc, "map_coords", lambda x, seed=0, method="auto": calls.append((x.shape, method)))
    return calls


def test_warm_umap_fits_once_per_process(fake_fits):
    assert mbc.warm_umap() is True and fake_fits == [((mbc.UMAP_MIN_EXPERTS, 8), "umap")]
    assert mbc.warm_umap() is False and len(fake_fits) == 1  # compiled: nothing more to do


@pytest.mark.parametrize("n_experts, warmed", [(mbc.UMAP_MIN_EXPERTS - 2, False), (mbc.UMAP_MIN_EXPERTS - 1, True),
                                               (16, True)])
def test_opening_the_library_tab_warms_umap_only_where_a_map_will_need_it(fake_fits, n_experts, warmed):
    from explorer.page.library_actions import warm_maps

    lib = SimpleNamespace(names=lambda: [f"e{i}" for i in range(n_experts)])
    session = SimpleNamespace(registry=SimpleNamespace(libs={"lib": lib}))
    assert warm_maps(session, "lib") == {}  # nothing shown
    for t in [t for t in threading.enumerate() if t.name == "umap-warm-up"]:
        t.join(timeout=10)
    assert (len(fake_fits) == 1) is warmed
    assert warm_maps(session, "not loaded") == {} and len(fake_fits) == (1 if warmed else 0)


def test_a_real_umap_map_counts_as_warm(monkeypatch):
    """After map_coords drew a UMAP map, warm_umap has nothing to compile (the flag is set by the map itself)."""
    import numpy as np

    monkeypatch.setattr(mbc, "_WARMED", threading.Event())
    fitted = []

    class FakeUMAP:
        def __init__(self, **kw):
            fitted.append(kw)

        def fit_transform(self, x):
            return np.zeros((len(x), 2))

    monkeypatch.setitem(__import__("sys").modules, "umap", SimpleNamespace(UMAP=FakeUMAP))
    coords, method = mbc.map_coords(np.random.default_rng(0).normal(size=(12, 5)))
    assert method == "umap" and coords.shape == (12, 2) and len(fitted) == 1
    assert mbc.warm_umap() is False and len(fitted) == 1
