"""Arrow prototypes: the top right singular vector of every expert's ΔW = B A, exactly. Pure tensor code.

Usage::

    protos = compute_prototypes(A, B)            # A (E, r, d), B (E, out, r) -> (E, d) unit vectors
"""
from __future__ import annotations

import torch

PROTOTYPE_METHOD = "chol-r-v3"  # part of the cache key of stored prototypes: bump when the maths changes
SOLVE_BELOW = 1e-2  # R's smallest |diagonal| over its largest under this (near-singular A): Q_a formed by a QR


@torch.no_grad()
def compute_prototypes(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of every ΔW_e = B_e @ A_e, exactly, without forming ΔW.

    Usage: ``protos = compute_prototypes(A, B)`` with A (E, r, d), B (E, out, r) -> (E, d), float32, unit norm.

    With Aᵀ = Q_a R_a and B = Q_b R_b, ΔW = Q_b M Q_aᵀ with the r × r core M = R_b R_aᵀ, so ΔW's right singular
    vectors are Q_a V for M's right singular vectors V. Those are the eigenvectors of MᵀM = R_a (BᵀB) R_aᵀ, so B
    only enters through its r × r Gram matrix (no second QR), and the eigenproblem is r × r, solved in float64.
    R_a is the Cholesky factor of A's r × r Gram matrix A Aᵀ = R_aᵀ R_a (one batched matmul in A's dtype, factored
    in float64). The Gram matrix squares A's condition number, but Cholesky is insensitive to the rows' sizes and
    the guard below sends nearly dependent rows to a QR; over the experts it solves for, it was as close to a
    float64 reference as the Householder QR used before 2026-12-02 (docs/engine.md). Q_a is not formed:
    Q_a v = Aᵀ R_a⁻¹ v, one r × r triangular solve. Where A Aᵀ is near-singular (a zero-padded rank, rows
    nearly dependent: R_a's smallest |diagonal| under SOLVE_BELOW of its largest, or no Cholesky factor at all)
    the expert takes a Householder QR of Aᵀ and forms Q_a.
    Cost O((d + out) r²) per expert instead of a dense d × out SVD. PEFT's 15-step power iteration is not exact
    when the top two singular values are close; this is.
    Sign: the largest-magnitude component is made positive (routing uses |h · p|, so it only matters for
    reproducibility). An expert whose ΔW is zero (e.g. B freshly initialised) gets a zero prototype, as in PEFT.
    Zero-padded rank rows/columns (mixed ranks) do not change the result.
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"expected A (E, r, d) and B (E, out, r), got A {tuple(A.shape)} and B {tuple(B.shape)}")
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    A = A.to(dtype)
    chol, info = torch.linalg.cholesky_ex((A @ A.transpose(1, 2)).double())  # (E, r, r) lower: A Aᵀ = L Lᵀ
    r_a = chol.transpose(1, 2)  # (E, r, r) upper triangular R_a = Lᵀ
    diag = chol.diagonal(dim1=1, dim2=2).abs()  # (E, r)
    solve = (info == 0) & (diag.amin(dim=1) > SOLVE_BELOW * diag.amax(dim=1))  # (E,) R_a well conditioned
    rest = ~solve
    q_rest = None
    if bool(rest.any()):
        q_rest, r_rest = torch.linalg.qr(A[rest].transpose(1, 2))  # (n, d, r), (n, r, r): Householder
        r_a[rest] = r_rest.double()  # (writes through to chol, which is not read again)
    b_t = B.to(dtype).transpose(1, 2)  # (E, r, out)
    core = r_a @ (b_t @ b_t.transpose(1, 2)).double() @ r_a.transpose(1, 2)  # (E, r, r) = MᵀM
    evals, evecs = torch.linalg.eigh(core)  # ascending eigenvalues
    v = evecs[:, :, -1]  # (E, r) float64: top right singular vector of M
    if q_rest is None:
        protos = _solved(A, r_a, v, dtype)
    else:
        protos = torch.empty(A.shape[0], A.shape[2], dtype=dtype, device=A.device)  # (E, d)
        protos[solve] = _solved(A[solve], r_a[solve], v[solve], dtype)  # possibly none
        protos[rest] = torch.einsum("edr,er->ed", q_rest, v[rest].to(dtype))  # Q_a v
    pivot = protos.abs().argmax(dim=1, keepdim=True)  # (E, 1)
    protos = protos * torch.where(protos.gather(1, pivot) < 0, -1.0, 1.0).to(dtype)  # (E, d)
    protos[evals[:, -1] <= torch.finfo(torch.float64).tiny] = 0.0  # ΔW = 0 has no direction
    return protos.to(torch.float32)


def _solved(A: torch.Tensor, r_a: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q_a v = Aᵀ (R_a⁻¹ v), normalised: A (E, r, d), r_a (E, r, r) well conditioned, v (E, r) float64 -> (E, d)."""
    y = torch.linalg.solve_triangular(r_a, v.unsqueeze(-1), upper=True)  # (E, r, 1)
    p = (y.to(dtype).transpose(1, 2) @ A).squeeze(1)  # (E, 1, r) @ (E, r, d) -> (E, d): reads A along d
    return p / p.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
