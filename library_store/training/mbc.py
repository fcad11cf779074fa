"""MBC, model-based clustering of experts by the similarity of their (warm-up) LoRA weights.

Usage::

    result = mbc_cluster(warmup_experts, k=4, init=w_init)     # init: the shared LoRA init (W_init) or None
    result.labels          # (N,) cluster of each expert, numbered by first appearance
    result.similarity      # (N, N) cosine matrix of the embedded weights
    result.coords          # (N, 2) map coordinates (UMAP; PCA below UMAP_MIN_EXPERTS)

As mttl's `MBCWithCosSimTransform` does it: flatten every A and B of an expert into one vector, zero the
entries at or below that expert's own |w| quantile, TruncatedSVD (randomized, seeded) to at most 64
components, L2-normalise, cosine matrix, then k-means (k-means++, n_init 10, seeded) on the *rows of the
similarity matrix*. One change, measured on SmolLM2 (docs/design.md): with `delta=True` the shared random
init is subtracted first, so the clustering sees what training changed rather than the init all warm-up
experts share.

What a build stores is one schema, `MBCData`, written and read only here::

    MBCData(tasks, experts, labels, similarity, coords, method="pca").write(lib, key)
    data = read_mbc(lib)    # the newest stored MBC data, or None
    data.clusters           # {"cluster-0": [tasks...], ...}
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from library_store.expert import LoraExpert

if TYPE_CHECKING:
    from library_store.store.library import ExpertLibrary

# Derived-data kinds an MBC build stores (all under one config key per clustering, except the init).
INIT_KIND = "mbc-init"  # the shared LoRA init W_init of the warm-up experts
SIMILARITY_KIND = "mbc-similarity"  # tensors: similarity (N, N), raw_similarity (N, N), labels (N,)
MAP_KIND = "mbc-map"  # tensors: coords (N, 2)
WARMUP_PREFIX, CLUSTER_PREFIX = "warmup-", "cluster-"

DEFAULT_SPARSITY = 0.5  # the quantile mttl's MBC script passes (its library default is 0.8)
MAX_COMPONENTS = 64


@dataclass
class MBCConfig:
    k: int
    sparsity: float = DEFAULT_SPARSITY  # per-expert |w| quantile zeroed before the SVD
    components: int = MAX_COMPONENTS  # TruncatedSVD size, capped at N - 1
    delta: bool = True  # cluster W - W_init (what training changed), not the raw weights
    seed: int = 0  # SVD, k-means and UMAP
    n_init: int = 50  # k-means restarts: 10 missed the best split of demo-mbc's 16 warm-ups (ARI 0.51 vs 0.82)
    map_method: str = "auto"  # "umap" from UMAP_MIN_EXPERTS up, else "pca"; "pca" forces PCA (no JIT)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MBCResult:
    names: list[str]  # expert names, the row order of everything below
    labels: np.ndarray  # (N,) int cluster index
    similarity: np.ndarray  # (N, N) cosine similarity of the embedded weights
    raw_similarity: np.ndarray  # (N, N) cosine of the flattened (delta) weights before sparsify + SVD
    embedding: np.ndarray  # (N, c) L2-normalised SVD embedding
    coords: np.ndarray  # (N, 2) 2-D map
    map_method: str  # "umap" or "pca"
    config: MBCConfig = field(default=None)

    def clusters(self, tasks_of: dict[str, list[str]] | None = None) -> dict[int, list[str]]:
        """cluster index -> the experts in it (or their tasks, given expert -> tasks)."""
        out: dict[int, list[str]] = {}
        for name, label in zip(self.names, self.labels):
            out.setdefault(int(label), []).extend(tasks_of[name] if tasks_of else [name])
        return out


def flatten(expert: LoraExpert, init: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """All A and B entries of an expert in one float32 vector, in a fixed key order; minus `init` if given."""
    parts = []
    for key in sorted(expert.weights):
        w = expert.weights[key].float()
        if init is not None:
            if key not in init:
                raise ValueError(f"Expert {expert.name!r}: {key} is missing from W_init.")
            w = w - init[key].float()
        parts.append(w.reshape(-1))
    return torch.cat(parts)  # (P,)


def sparsify(vectors: torch.Tensor, quantile: float) -> torch.Tensor:
    """Zero each row's entries with |w| at or below that row's own |w| quantile."""
    if quantile <= 0:
        return vectors
    mags = vectors.abs()  # (N, P)
    # torch.quantile refuses inputs above 16M entries; kthvalue gives the same order statistic
    k = max(1, int(np.floor(quantile * (mags.shape[1] - 1))) + 1)
    thresh = mags.kthvalue(k, dim=1, keepdim=True).values  # (N, 1)
    return torch.where(mags > thresh, vectors, torch.zeros_like(vectors))


def _cosine(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.clip(norm, 1e-12, None)
    return x @ x.T  # (N, N)


# Below this many experts "auto" maps with PCA of the exact embedding. A handful of points gains nothing from
# UMAP's nonlinear layout (its neighbourhood graph, n_neighbors = N - 1, links every expert to every other), while
# PCA is deterministic and keeps the embedding's distances as far as two axes can; and a first UMAP fit spends
# ~10 s compiling numba functions in a fresh process (the Library tab's first map of a small library, every
# test-fast run). The demo libraries (16 experts) keep UMAP.
UMAP_MIN_EXPERTS = 10
_WARM_LOCK = threading.Lock()
_WARMED = threading.Event()  # set once a UMAP fit has run in this process (its numba code is compiled)


def umap_warmed() -> bool:
    """True once a UMAP fit has run in this process (`warm_umap` would have nothing to do)."""
    return _WARMED.is_set()


def warm_umap() -> bool:
    """Run one small UMAP fit now, unless one has run in this process: the first fit compiles UMAP's numba code
    (13-15 s here), later ones of any size take well under a second. Thread-safe; True when this call compiled."""
    with _WARM_LOCK:
        if _WARMED.is_set():
            return False
        map_coords(np.random.default_rng(0).normal(size=(UMAP_MIN_EXPERTS, 8)), method="umap")
        _WARMED.set()
        return True


def map_coords(embedding: np.ndarray, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """2-D coordinates: UMAP (cosine, n_neighbors below N) from UMAP_MIN_EXPERTS up, PCA below that (or if
    asked; "umap" asks for UMAP from 4 experts up)."""
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"map method must be auto, umap or pca (got {method!r}).")
    n = embedding.shape[0]
    if n < 4 or method == "pca" or (method == "auto" and n < UMAP_MIN_EXPERTS):
        from sklearn.decomposition import PCA

        if n == 1:
            return np.zeros((1, 2)), "pca"
        coords = PCA(n_components=min(2, n), random_state=seed).fit_transform(embedding)
        if coords.shape[1] < 2:
            coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        return coords, "pca"
    import umap

    reducer = umap.UMAP(n_neighbors=min(15, n - 1), n_components=2, metric="cosine", random_state=seed,
                        init="random" if n < 6 else "spectral", min_dist=0.3)
    coords = np.asarray(reducer.fit_transform(embedding))
    _WARMED.set()
    return coords, "umap"


@torch.no_grad()
def mbc_cluster(experts: list[LoraExpert], k: int, init: dict[str, torch.Tensor] | None = None,
                config: MBCConfig | None = None, with_map: bool = True) -> MBCResult:
    """Cluster experts into k groups by their weights (see the module docstring)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD

    config = config or MBCConfig(k=k)
    config.k = k
    n = len(experts)
    if k < 2:
        raise ValueError(f"MBC needs at least 2 clusters (got k={k}).")
    if k > n:
        raise ValueError(f"MBC cannot make {k} clusters from {n} experts; use k <= {n}.")
    if config.delta and init is None:
        raise ValueError("delta=True needs W_init (the shared LoRA init the warm-up experts started from).")
    vectors = torch.stack([flatten(e, init if config.delta else None) for e in experts])  # (N, P)
    raw_similarity = _cosine(vectors.numpy())  # (N, N)
    sparse = sparsify(vectors, config.sparsity).numpy()  # (N, P)
    comps = max(1, min(config.components, n - 1, sparse.shape[1] - 1))
    svd = TruncatedSVD(n_components=comps, algorithm="randomized", random_state=config.seed)
    emb = svd.fit_transform(sparse)  # (N, c)
    emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    similarity = emb @ emb.T  # (N, N) cosine, rows are unit vectors
    km = KMeans(n_clusters=k, init="k-means++", n_init=config.n_init, random_state=config.seed)
    raw_labels = km.fit_predict(similarity)  # k-means on the rows of the similarity matrix, as mttl does
    order = {lab: i for i, lab in enumerate(dict.fromkeys(raw_labels.tolist()))}  # number by first appearance
    labels = np.array([order[lab] for lab in raw_labels.tolist()])
    coords, method = map_coords(emb, config.seed, config.map_method) if with_map else (np.zeros((n, 2)), "none")
    return MBCResult([e.name for e in experts], labels, similarity, raw_similarity, emb, coords, method, config)


def adjusted_rand(labels, reference) -> float:
    """Agreement of a clustering with reference groups (e.g. the task families): 1 = identical, ~0 = chance."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(list(reference), list(labels)))


# ---------------------------------------------------------------- the stored schema


def cluster_name(label: int) -> str:
    """The name of cluster `label` everywhere (cluster table, cluster experts, the page): `cluster-<i>`."""
    return f"{CLUSTER_PREFIX}{int(label)}"


def warmup_name(task: str) -> str:
    return f"{WARMUP_PREFIX}{task}"


@dataclass
class MBCData:
    """What an MBC build stores about its clustering: row i describes warm-up expert `experts[i]` of task
    `tasks[i]`. Written by `build mbc` (and the test fixtures), read by the Library tab and the evaluations."""

    tasks: list[str]
    experts: list[str]  # the warm-up experts, same order as tasks
    labels: list[int]  # cluster index of each row
    similarity: np.ndarray  # (N, N) cosine of the embedded warm-up weights
    coords: np.ndarray  # (N, 2) 2-D map
    method: str = ""  # how the map was made: "umap" or "pca"
    raw_similarity: np.ndarray | None = None  # (N, N) cosine before sparsify + SVD
    families: list[str] | None = None  # task family of each row, when known
    ari_vs_families: float | None = None
    settings: dict = field(default_factory=dict)  # {"mbc": MBCConfig dict, "warmup": TrainConfig dict[, "warmup_from"]}

    def __post_init__(self) -> None:
        n = len(self.tasks)
        self.labels = [int(x) for x in self.labels]
        self.similarity = np.asarray(self.similarity, dtype=np.float32)
        self.coords = np.asarray(self.coords, dtype=np.float32)
        shapes_ok = (len(self.experts) == n and len(self.labels) == n and self.similarity.shape == (n, n)
                     and self.coords.shape == (n, 2) and (self.families is None or len(self.families) == n))
        if not shapes_ok:
            raise ValueError(f"MBC data is inconsistent: {n} tasks, {len(self.experts)} experts, "
                             f"{len(self.labels)} labels, similarity {self.similarity.shape}, "
                             f"coords {self.coords.shape}.")

    @property
    def clusters(self) -> dict[str, list[str]]:
        """cluster name -> its tasks, clusters in label order."""
        out: dict[str, list[str]] = {}
        for label in sorted(set(self.labels)):
            out[cluster_name(label)] = [t for t, lab in zip(self.tasks, self.labels) if lab == label]
        return out

    @property
    def cluster_of(self) -> dict[str, str]:
        """task -> cluster name."""
        return {t: cluster_name(lab) for t, lab in zip(self.tasks, self.labels)}

    def to_meta(self) -> dict:
        """The JSON metadata stored with both derived entries (the tensors hold the matrices)."""
        meta = {"tasks": list(self.tasks), "experts": list(self.experts), "labels": list(self.labels),
                "clusters": self.clusters, "method": self.method, **self.settings}
        if self.families is not None:
            meta["families"] = list(self.families)
        if self.ari_vs_families is not None:
            meta["ari_vs_families"] = float(self.ari_vs_families)
        return meta

    @classmethod
    def from_stored(cls, meta: dict, similarity: dict, coords: dict) -> "MBCData":
        """From the stored metadata and the tensors of the similarity and map entries."""
        raw = similarity.get("raw_similarity")
        return cls(tasks=list(meta["tasks"]), experts=list(meta["experts"]), labels=list(meta["labels"]),
                   similarity=similarity["similarity"].float().numpy(), coords=coords["coords"].float().numpy(),
                   method=str(meta.get("method", "")), raw_similarity=None if raw is None else raw.float().numpy(),
                   families=meta.get("families"), ari_vs_families=meta.get("ari_vs_families"),
                   settings={k: meta[k] for k in ("mbc", "warmup", "warmup_from") if k in meta})

    def write(self, lib: "ExpertLibrary", key: dict) -> None:
        """Store both entries under `key` (what the clustering was computed from: warm-up checksums, settings)."""
        sim = {"similarity": torch.tensor(self.similarity, dtype=torch.float32),  # (N, N)
               "labels": torch.tensor(self.labels, dtype=torch.int64)}  # (N,)
        if self.raw_similarity is not None:
            sim["raw_similarity"] = torch.tensor(self.raw_similarity, dtype=torch.float32)  # (N, N)
        lib.put_derived(SIMILARITY_KIND, key, sim, meta=self.to_meta())
        lib.put_derived(MAP_KIND, key, {"coords": torch.tensor(self.coords, dtype=torch.float32)},  # (N, 2)
                        meta=self.to_meta())


def read_mbc(lib: "ExpertLibrary", key: dict | None = None) -> MBCData | None:
    """The MBC data stored under `key`, or the newest a build stored; None when the library has none (or
    its files are damaged: `get_derived` warns). Raises ValueError if the stored data is inconsistent."""
    if key is None:
        entries = [d for d in lib.list_derived() if d["kind"] == MAP_KIND]
        if not entries:
            return None
        key = max(entries, key=lambda d: d["created"] or "")["config"]
    coords, sim = lib.get_derived(MAP_KIND, key), lib.get_derived(SIMILARITY_KIND, key)
    if coords is None or sim is None:
        return None
    return MBCData.from_stored(coords[1], sim[0], coords[0])  # the map entry's meta also names the method
