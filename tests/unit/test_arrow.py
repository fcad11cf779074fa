"""Prototypes (exact low-rank SVD) and the fused routed layer, on bare tensors."""
import pytest
import torch
from arrow_helpers import dense_prototype
from torch import nn

from explorer.routing.capture import dense_by_key
from explorer.routing.layer import RoutedLinear
from explorer.routing.state import RouterState, SiteStack
from explorer.routing.prototypes import compute_prototypes


def factors(E, r, d, out, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, r, d, generator=g), torch.randn(E, out, r, generator=g)


@pytest.mark.parametrize("E,r,d,out", [(1, 1, 8, 5), (6, 4, 64, 32), (3, 8, 40, 96), (5, 4, 12, 3)])
def test_prototypes_equal_dense_svd(E, r, d, out):
    A, B = factors(E, r, d, out, seed=E)
    protos = compute_prototypes(A, B)
    assert protos.shape == (E, d) and protos.dtype == torch.float32
    for e in range(E):
        cos = torch.dot(protos[e].double(), dense_prototype(A[e], B[e]))
        assert abs(cos.item()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(E))


def test_prototypes_exact_where_top_singular_values_are_close():
    # σ1 ≈ σ2: the case where PEFT's 15-step power iteration drifts; the exact form does not care.
    d, out = 50, 40
    q_in = torch.linalg.qr(torch.randn(d, 2)).Q  # (d, 2)
    q_out = torch.linalg.qr(torch.randn(out, 2)).Q  # (out, 2)
    A = (torch.diag(torch.tensor([1.0, 0.999])) @ q_in.T)[None]  # (1, 2, d)
    B = q_out[None]  # (1, out, 2)
    cos = torch.dot(compute_prototypes(A, B)[0].double(), dense_prototype(A[0], B[0]))
    assert abs(cos.item()) == pytest.approx(1.0, abs=1e-4)


def test_prototype_sign_is_deterministic_and_largest_component_positive():
    A, B = factors(4, 4, 30, 20)
    p1, p2 = compute_prototypes(A, B), compute_prototypes(-A, B)  # same ΔW up to sign
    torch.testing.assert_close(p1, p2)
    assert (p1.gather(1, p1.abs().argmax(1, keepdim=True)) > 0).all()


def test_zero_padding_to_a_larger_rank_does_not_change_the_prototype():
    A, B = factors(3, 2, 24, 16)
    A_pad = torch.cat([A, torch.zeros(3, 3, 24)], dim=1)  # rank 2 -> 5
    B_pad = torch.cat([B, torch.zeros(3, 16, 3)], dim=2)
    torch.testing.assert_close(compute_prototypes(A_pad, B_pad), compute_prototypes(A, B), atol=1e-6, rtol=0)


def test_near_singular_a_forms_q_and_stays_exact(monkeypatch):
    """Aᵀ R_a⁻¹ v cannot be solved where R_a has a zero on its diagonal (a zero-padded rank) and is not trusted where
    it nearly has (dependent rows): those experts form Q_a instead, in the same batch as experts that take the
    triangular solve, and all stay exact (solving them all gives NaN)."""
    from explorer.routing import prototypes as P

    A, B = factors(4, 4, 40, 24, seed=3)
    A[1, 3] = A[1, 2]  # rows 2 and 3 equal: R_a singular up to rounding
    A[2, 3] = 0  # a zero-padded rank
    solved, real = [], P._solved
    monkeypatch.setattr(P, "_solved", lambda a_t, *rest: solved.append(a_t.shape[0]) or real(a_t, *rest))
    protos = compute_prototypes(A, B)
    for e in range(4):
        cos = torch.dot(protos[e].double(), dense_prototype(A[e], B[e]))
        assert abs(cos.item()) == pytest.approx(1.0, abs=1e-5), e
    assert solved == [2]  # experts 0 and 3 by the solve


def test_rows_of_different_sizes_take_the_cholesky_solve_and_match_float64(monkeypatch):
    """R_a comes from the Cholesky factor of A Aᵀ: mean-centred rows of very different sizes, or nearly dependent
    (both short of SOLVE_BELOW), take the triangular solve and agree with a float64 dense SVD as plain rows do."""
    from explorer.routing import prototypes as P

    A, B = factors(6, 4, 256, 96, seed=5)
    A = A - A.mean(0)  # (E, r, d) centred
    A[:5] *= torch.tensor([1.0, 0.3, 0.1, 0.03])[None, :, None]  # rows of different sizes
    A[5, 3] = A[5, 2] + 0.1 * A[5, 3]  # one expert's last row nearly its third
    solved, real = [], P._solved
    monkeypatch.setattr(P, "_solved", lambda a, *rest: solved.append(a.shape[0]) or real(a, *rest))
    protos = compute_prototypes(A, B)
    assert solved == [6]
    for e in range(6):
        assert 1 - abs(torch.dot(protos[e].double(), dense_prototype(A[e], B[e])).item()) < 1e-6, e


def test_zero_update_gives_zero_prototype():
    A, B = factors(2, 4, 16, 8)
    B[1] = 0  # a freshly initialised LoRA: ΔW = 0
    protos = compute_prototypes(A, B)
    assert protos[1].abs().max() == 0 and protos[0].norm() == pytest.approx(1.0)


def test_prototypes_refuse_bad_shapes():
    with pytest.raises(ValueError, match=r"A \(E, r, d\) and B \(E, out, r\)"):
        compute_prototypes(torch.randn(2, 4, 8), torch.randn(2, 8, 3))


def make_layer(E=5, r=3, d=16, out=12, **state):
    A, B = factors(E, r, d, out, seed=1)
    stack = SiteStack("model.layers.0.self_attn.q_proj", compute_prototypes(A, B), A, B, torch.arange(1.0, E + 1))
    return RoutedLinear(nn.Linear(d, out), stack, RouterState(**state), key=(0, 0)), A, B


@torch.no_grad()
def test_routed_linear_matches_the_definition():
    layer, A, B = make_layer(top_k=2, temperature=0.7)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3))  # seeded: no near-tie in the top-k
    h = x.reshape(-1, 16)  # (t, d)
    s = (h @ compute_prototypes(A, B).T).abs() / 0.7  # (t, E)
    top, idx = s.topk(2, dim=-1)
    w = torch.zeros_like(s).scatter_(1, idx, top.softmax(-1))  # (t, E)
    delta = torch.einsum("te,e,eor,erd,td->to", w, torch.arange(1.0, 6), B, A, h)
    torch.testing.assert_close(layer(x), layer.base(x) + delta.view(2, 7, 12), atol=1e-5, rtol=1e-5)


class _Doubled(nn.Linear):
    """A Linear subclass with its own forward: routing must call it, not F.linear."""

    def forward(self, x):
        return 2 * super().forward(x)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["linear", "linear-no-bias", "subclass"])
def test_one_token_decoding_matches_the_definition(kind):
    """Decoding (one token, top_k <= E / 2, no trace) adds the update as the base layer's bias; a Linear
    subclass keeps its own forward."""
    E, r, d, out = 6, 3, 16, 12
    A, B = factors(E, r, d, out, seed=1)
    base = (_Doubled if kind == "subclass" else nn.Linear)(d, out, bias=kind != "linear-no-bias")
    stack = SiteStack("model.layers.0.self_attn.q_proj", compute_prototypes(A, B), A, B, torch.arange(1.0, E + 1))
    layer = RoutedLinear(base, stack, RouterState(top_k=2, temperature=0.7), key=(0, 0))
    for seed in range(4):
        x = torch.randn(1, 1, d, generator=torch.Generator().manual_seed(seed))
        h = x.reshape(1, d)
        s = (h @ compute_prototypes(A, B).T).abs() / 0.7  # (1, E)
        top, idx = s.topk(2, dim=-1)
        w = torch.zeros_like(s).scatter_(1, idx, top.softmax(-1))  # (1, E)
        delta = torch.einsum("te,e,eor,erd,td->to", w, torch.arange(1.0, E + 1), B, A, h)  # (1, out)
        torch.testing.assert_close(layer(x), base(x) + delta.view(1, 1, out), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_routed_linear_masked_experts_get_no_weight():
    layer, _, _ = make_layer(top_k=3)
    layer.state.mask = torch.tensor([True, False, True, False, False])
    layer.state.capture = []
    layer(torch.randn(9, 16))
    w = dense_by_key(layer.state.capture, 5)[(0, 0)]  # (t, E)
    assert (w[:, [0, 2]] == 0).all() and ((w > 0).sum(-1) == 3).all()


def test_routed_linear_refuses_other_layer_types():
    A, B = factors(2, 2, 4, 4)
    stack = SiteStack("model.layers.0.mlp.conv", compute_prototypes(A, B), A, B, torch.ones(2))
    with pytest.raises(TypeError, match="wraps nn.Linear only; model.layers.0.mlp.conv is a Conv1d"):
        RoutedLinear(nn.Conv1d(4, 4, 1), stack, RouterState(), key=(0, 0))


def test_routed_linear_refuses_mismatched_shapes():
    A, B = factors(2, 2, 8, 4)
    stack = SiteStack("model.layers.0.self_attn.q_proj", compute_prototypes(A, B), A, B, torch.ones(2))
    with pytest.raises(ValueError, match=r"experts are \(4 x 8\), the model's layer is \(4 x 6\)"):
        RoutedLinear(nn.Linear(6, 4), stack, RouterState(), key=(0, 0))
