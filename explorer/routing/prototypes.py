"""Arrow prototypes: the top right singular vector of every expert's ΔW = B A, exactly. Pure tensor code.

Usage::

    protos = compute_prototypes(A, B)            # A (E, r, d), B (E, out, r) -> (E, d) unit vectors
"""
from __future__ import annotations

import torch

PROTOTYPE_METHOD = "qr-svd-v1"  # part of the cache key of stored prototypes: bump when the maths changes


@torch.no_grad()
def compute_prototypes(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of every ΔW_e = B_e @ A_e, exactly, without forming ΔW.

    Usage: ``protos = compute_prototypes(A, B)`` with A (E, r, d), B (E, out, r) -> (E, d), float32, unit norm.

    With Aᵀ = Q_a R_a and B = Q_b R_b, ΔW = Q_b M Q_aᵀ with the r × r core M = R_b R_aᵀ, so ΔW's right singular
    vectors are Q_a V for M's right singular vectors V. Those are the eigenvectors of MᵀM = R_a (BᵀB) R_aᵀ, so B
    only enters through its r × r Gram matrix (no second QR), and the eigenproblem is r × r, solved in float64.
    Cost O((d + out) r²) per expert instead of a dense d × out SVD. PEFT's 15-step power iteration is not exact
    when the top two singular values are close; this is.
    Sign: the largest-magnitude component is made positive (routing uses |h · p|, so it only matters for
    reproducibility). An expert whose ΔW is zero (e.g. B freshly initialised) gets a zero prototype, as in PEFT.
    Zero-padded rank rows/columns (mixed ranks) do not change the result.
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"expected A (E, r, d) and B (E, out, r), got A {tuple(A.shape)} and B {tuple(B.shape)}")
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    q_a, r_a = torch.linalg.qr(A.to(dtype).transpose(1, 2))  # (E, d, r), (E, r, r)
    B = B.to(dtype)
    gram_b = B.transpose(1, 2) @ B  # (E, r, r) = R_bᵀ R_b
    core = (r_a @ gram_b @ r_a.transpose(1, 2)).double()  # (E, r, r) = MᵀM
    evals, evecs = torch.linalg.eigh(core)  # ascending eigenvalues
    v = evecs[:, :, -1].to(dtype)  # (E, r): top right singular vector of M
    protos = torch.einsum("edr,er->ed", q_a, v)  # (E, d)
    pivot = protos.abs().argmax(dim=1, keepdim=True)  # (E, 1)
    protos = protos * torch.where(protos.gather(1, pivot) < 0, -1.0, 1.0).to(dtype)  # (E, d)
    protos[evals[:, -1] <= torch.finfo(torch.float64).tiny] = 0.0  # ΔW = 0 has no direction
    return protos.to(torch.float32)
