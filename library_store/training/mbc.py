"""MBC, model-based clustering of experts by the similarity of their (warm-up) LoRA weights.

Usage::

    result = mbc_cluster(warmup_experts, k=4, init=w_init)     # init: the shared LoRA init (W_init) or None
    result.labels          # (N,) cluster of each expert, numbered by first appearance
    result.similarity      # (N, N) cosine matrix of the embedded weights
    result.coords          # (N, 2) map coordinates (UMAP; PCA below 4 experts)

As mttl's `MBCWithCosSimTransform` does it: flatten every A and B of an expert into one vector, zero the
entries at or below that expert's own |w| quantile, TruncatedSVD (randomized, seeded) to at most 64
components, L2-normalise, cosine matrix, then k-means (k-means++, n_init 10, seeded) on the *rows of the
similarity matrix*. One change, measured on SmolLM2 (ALGORITHMS.md): with `delta=True` the shared random
init is subtracted first, so the clustering sees what training changed rather than the init all warm-up
experts share.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from library_store.expert import LoraExpert

DEFAULT_SPARSITY = 0.5  # the quantile mttl's MBC script passes (its library default is 0.8)
MAX_COMPONENTS = 64


@dataclass
class MBCConfig:
    k: int
    sparsity: float = DEFAULT_SPARSITY  # per-expert |w| quantile zeroed before the SVD
    components: int = MAX_COMPONENTS  # TruncatedSVD size, capped at N - 1
    delta: bool = True  # cluster W - W_init (what training changed), not the raw weights
    seed: int = 0  # SVD, k-means and UMAP
    n_init: int = 10
    map_method: str = "auto"  # "umap" from 4 experts up, else "pca"; "pca" forces PCA (UMAP's JIT takes minutes)

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


def map_coords(embedding: np.ndarray, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """2-D coordinates: UMAP (cosine, n_neighbors below N) from 4 experts up, PCA below that (or if asked)."""
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"map method must be auto, umap or pca (got {method!r}).")
    n = embedding.shape[0]
    if n < 4 or method == "pca":
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
    return np.asarray(reducer.fit_transform(embedding)), "umap"


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
