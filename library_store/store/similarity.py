"""A similarity map for any library: the cosine of the experts' weight updates ΔW_e = s_e·B_e A_e, summed over
modules, independent of how each expert was initialised (docs/design.md, "MBC", last paragraph).

Usage::

    sim = delta_similarity(lib)            # cached as derived data "delta-similarity"; a new expert adds one row
    sim.names, sim.similarity              # (N,) expert names, (N, N) cosine of their ΔW
    sim.coords, sim.labels, sim.clusters   # (N, 2) map, (N,) k-means labels, {"cluster-0": [names...]}
    data = sim.as_mbc_data()               # the same record the MBC map uses (rows are experts)

Exact in low rank: ⟨B₁A₁, B₂A₂⟩_F = tr((B₁ᵀB₂)(A₂A₁ᵀ)) = Σ_rs (B₁ᵀB₂)_rs (A₁A₂ᵀ)_rs, an r × r computation per
module and pair, never the out × d matrix. Smaller ranks are zero-padded (zeros add nothing). The 2-D map embeds
the cosine matrix exactly (eigenvectors scaled by √eigenvalue, so the rows' inner products are the cosines) and
hands that embedding to `map_coords` (UMAP from 10 experts up, PCA below); clusters are k-means on the rows of the
similarity matrix, as MBC does. The stored entry keeps the raw Gram matrix, so after an expert is added (or
replaced) only the rows of new checksums are computed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from library_store.expert import LoraExpert
from library_store.store.errors import LibraryError

DELTA_KIND = "delta-similarity"
METHOD = "delta-cosine-v1"  # bump when the maths changes: old entries then miss
MAX_COMPONENTS = 64
_CHUNK_FLOATS = 1 << 24  # rows x cols x r x r per einsum: ~128 MB in float64


@dataclass
class DeltaSimilarity:
    names: list[str]  # row order of everything below
    checksums: list[str]
    gram: np.ndarray  # (N, N) ⟨ΔW_i, ΔW_j⟩_F summed over modules, float64
    similarity: np.ndarray  # (N, N) cosine; 1 on the diagonal
    coords: np.ndarray  # (N, 2)
    labels: list[int]  # (N,) cluster index, numbered by first appearance
    method: str = ""  # how the map was made: "umap" or "pca"
    skipped: dict[str, str] = field(default_factory=dict)  # expert -> why it is not on the map
    tasks: list[list[str]] = field(default_factory=list)  # each expert's tasks

    @property
    def clusters(self) -> dict[str, list[str]]:
        from library_store.training.mbc import cluster_name

        return {cluster_name(lab): [n for n, x in zip(self.names, self.labels) if x == lab]
                for lab in sorted(set(self.labels))}

    def as_mbc_data(self):
        """As `MBCData` (rows are experts, `tasks` holds their names), for views written for the MBC map."""
        from library_store.training.mbc import MBCData

        return MBCData(tasks=list(self.names), experts=list(self.names), labels=list(self.labels),
                       similarity=self.similarity, coords=self.coords, method=self.method)


# ---------------------------------------------------------------- the maths


def _stacked(facs: list, scales: list[float], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (n, r, d) and s·B (n, out, r) of each expert's (A, B) at one site (None: not covered), float64,
    zero-padded to rank r."""
    d, out = next((f[0].shape[1], f[1].shape[0]) for f in facs if f is not None)
    A = torch.zeros(len(facs), r, d, dtype=torch.float64)
    B = torch.zeros(len(facs), out, r, dtype=torch.float64)
    for i, (f, s) in enumerate(zip(facs, scales)):
        if f is not None:
            a, b = f  # (r_e, d), (out, r_e)
            A[i, : a.shape[0]] = a.double()
            B[i, :, : b.shape[1]] = b.double() * s
    return A, B


@torch.no_grad()
def delta_gram(rows: list[LoraExpert], cols: list[LoraExpert]) -> np.ndarray:
    """(len(rows), len(cols)) float64: ⟨ΔW_i, ΔW_j⟩_F summed over every module either expert covers."""
    gram = torch.zeros(len(rows), len(cols), dtype=torch.float64)
    row_f, col_f = [e.factors() for e in rows], [e.factors() for e in cols]
    row_s, col_s = [e.scaling for e in rows], [e.scaling for e in cols]
    for site in sorted({s for f in [*row_f, *col_f] for s in f}):
        ri = [i for i, f in enumerate(row_f) if site in f]
        cj = [j for j, f in enumerate(col_f) if site in f]
        if not ri or not cj:
            continue  # only one side changes this module: it adds nothing to the inner product
        r = max(f[site][0].shape[0] for f in [*row_f, *col_f] if site in f)
        A_c, B_c = _stacked([col_f[j][site] for j in cj], [col_s[j] for j in cj], r)  # (m, r, d), (m, out, r)
        step = max(1, _CHUNK_FLOATS // max(1, len(cj) * r * r))
        for start in range(0, len(ri), step):
            part = ri[start:start + step]
            A_r, B_r = _stacked([row_f[i][site] for i in part], [row_s[i] for i in part], r)  # (n, r, d), (n, out, r)
            btb = torch.einsum("nor,mos->nmrs", B_r, B_c)  # (n, m, r, r) B_iᵀ B_j
            aat = torch.einsum("nrd,msd->nmrs", A_r, A_c)  # (n, m, r, r) A_i A_jᵀ
            gram[torch.tensor(part)[:, None], torch.tensor(cj)[None, :]] += (btb * aat).sum((2, 3))
    return gram.numpy()


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """(N, N) cosine; an expert whose ΔW is zero is orthogonal to every other (and 1 with itself)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))  # (N,)
    denom = np.outer(norms, norms)
    cos = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
    cos = np.clip((cos + cos.T) / 2, -1.0, 1.0)
    np.fill_diagonal(cos, 1.0)
    return cos


def embed(similarity: np.ndarray) -> np.ndarray:
    """(N, c) rows whose inner products are `similarity` (its positive eigenpairs, at most 64)."""
    evals, evecs = np.linalg.eigh(similarity)  # ascending
    keep = np.argsort(evals)[::-1][:MAX_COMPONENTS]
    keep = keep[evals[keep] > 1e-9 * max(evals.max(), 1e-12)]
    return evecs[:, keep] * np.sqrt(evals[keep])  # (N, c)


def cluster_labels(similarity: np.ndarray, k: int, seed: int = 0) -> list[int]:
    n = similarity.shape[0]
    if k <= 1 or n < 2:
        return [0] * n
    from sklearn.cluster import KMeans

    raw = KMeans(n_clusters=min(k, n), init="k-means++", n_init=10, random_state=seed).fit_predict(similarity)
    order = {lab: i for i, lab in enumerate(dict.fromkeys(raw.tolist()))}
    return [order[lab] for lab in raw.tolist()]


def default_k(library, n: int) -> int:
    """The library's own cluster count when it has a cluster table that fits, else about √(N/2)."""
    k = len(library.clusters())
    return k if 2 <= k <= n else max(1, min(n, round((n / 2) ** 0.5)))


# ---------------------------------------------------------------- cached, incremental


def default_names(library) -> list[str]:
    """Every expert but `general` ones (only subtracted, never routed): an MBC library's warm-up and cluster
    experts share one map."""
    return [i.name for i in library.infos() if i.kind != "general"]


def _load(library, names: list[str]) -> tuple[list[LoraExpert], dict[str, str]]:
    experts, skipped = [], {}
    for name in names:
        try:
            expert = library[name]
        except Exception as exc:  # ExpertUnavailable, KeyError: on no map, but the others still are
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        if not all(bool(torch.isfinite(t).all()) for t in expert.weights.values()):
            skipped[name] = "non-finite weights"
            continue
        experts.append(expert)
    return experts, skipped


def _previous(library) -> tuple[list[list[str]], np.ndarray] | None:
    """The newest stored Gram matrix of this library (the library's own entries), to reuse its rows."""
    entries = sorted((d for d in library.list_derived() if d["kind"] == DELTA_KIND), key=lambda d: d["created"])
    for entry in reversed(entries):
        hit = library.get_derived(DELTA_KIND, entry["config"])
        if hit is not None and "gram" in hit[0]:
            return hit[1]["experts"], hit[0]["gram"].double().numpy()
    return None


def gram_reusing(experts: list[LoraExpert], previous=None) -> tuple[np.ndarray, int]:
    """The Gram matrix of `experts`, copying the entries of (name, checksum) pairs `previous` (pairs, gram)
    already has; returns it and how many rows were computed."""
    n = len(experts)
    gram = np.zeros((n, n))
    old = {tuple(p): i for i, p in enumerate(previous[0])} if previous else {}
    known = [i for i, e in enumerate(experts) if (e.name, e.info.checksum) in old]
    if known:
        src = np.array([old[(experts[i].name, experts[i].info.checksum)] for i in known])
        gram[np.ix_(known, known)] = previous[1][np.ix_(src, src)]
    new = [i for i in range(n) if i not in set(known)]
    if new:
        rows = delta_gram([experts[i] for i in new], experts)  # (n_new, N)
        gram[new, :] = rows
        gram[:, new] = rows.T
    return gram, len(new)


@torch.no_grad()
def delta_similarity(library, names: list[str] | None = None, k: int | None = None, map_method: str = "auto",
                     seed: int = 0, record: bool = False) -> DeltaSimilarity:
    """The ΔW similarity map of `names` (default `default_names`), from the cache when the experts are the same.
    Experts that cannot be read or hold non-finite weights are left out and listed in `.skipped`. `record`: the
    library (opened writable) stores the entry itself, even one found in the user cache, and a failed write
    raises instead of costing only a later recomputation."""
    from library_store.training.mbc import map_coords

    names = default_names(library) if names is None else list(names)
    checksums = library.checksums()
    config = {"method": METHOD, "experts": [[n, checksums.get(n)] for n in names], "k": k, "map": map_method,
              "seed": seed}
    hit = library.get_derived(DELTA_KIND, config)
    if hit is not None:
        if record:
            library.put_derived(DELTA_KIND, config, *hit)
        return _from_stored(*hit)
    experts, skipped = _load(library, names)
    gram, _ = gram_reusing(experts, _previous(library))
    n = len(experts)
    similarity = cosine_from_gram(gram) if n else np.zeros((0, 0))
    coords, method = map_coords(embed(similarity), seed, map_method) if n else (np.zeros((0, 2)), "pca")
    labels = cluster_labels(similarity, default_k(library, n) if k is None else k, seed) if n else []
    result = DeltaSimilarity([e.name for e in experts], [e.info.checksum for e in experts], gram, similarity,
                             np.asarray(coords, dtype=np.float64), labels, method, skipped,
                             [list(e.info.tasks) for e in experts])
    meta = {"experts": [[e.name, e.info.checksum] for e in experts], "labels": labels, "method": method,
            "skipped": skipped, "tasks": result.tasks}
    tensors = {"gram": torch.from_numpy(gram), "similarity": torch.from_numpy(similarity),  # (N, N) float64
               "coords": torch.from_numpy(result.coords)}  # (N, 2)
    try:
        library.put_derived(DELTA_KIND, config, tensors, meta)
    except (LibraryError, OSError):  # a cache that cannot be written only costs a recomputation
        if record:
            raise
    return result


def _from_stored(tensors: dict, meta: dict) -> DeltaSimilarity:
    pairs = meta["experts"]
    return DeltaSimilarity([p[0] for p in pairs], [p[1] for p in pairs], tensors["gram"].double().numpy(),
                           tensors["similarity"].double().numpy(), tensors["coords"].double().numpy(),
                           list(meta["labels"]), meta.get("method", ""), dict(meta.get("skipped", {})),
                           [list(t) for t in meta.get("tasks", [])])
