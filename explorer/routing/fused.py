"""Arrow's routing as two C++ functions: the hot paths without a dozen small torch ops per routed group.

Usage::

    step = fused.kernel()          # compiled once per machine with the system C++ compiler; None if it cannot be
    if step is not None:           # (or LORA_EXPLORER_FUSED=0): the torch-op path in layer.py runs instead
        d = step(h, protos, shift, a_rows, up, mask, G, E, r, k, T, outs)   # (G, out_max), as RoutedGroup._one_token
    upd, *slots = fused.rows()(h, scores, protos, ..., T, n_keep, outs)     # many tokens: (t, G, out_max) [+ slots]

Both do, per token and member g: the scores |h · p_e - shift_e| of its E experts (disabled ones -inf, chosen
last), the top-k by selection (ties to the lower index), softmax(top / T), and the update
Σ_k w_k Σ_q (A_kq · h) up_kq, reading only the k chosen experts' A and B rows. Plain loops, float32 on the
CPU; the compiler may reorder sums (-fassociative-math), so results differ from the torch ops by float rounding
(tests/unit/test_fused.py).

- `route_one` (decoding, one token): a decoding step routes 60 groups, and each group's ~12 torch ops cost
  40-55 µs of dispatch against ~8 µs here (bench/fused_route_probe.py; docs/engine.md, "A fused one-token
  kernel").
- `route_rows` (a prefill, a 64-token forward, or a traced step): torch's matmul gives the scores of every token
  (`scores`, (t, G E); empty: computed here). Tokens are split across torch's intra-op threads (OpenMP); each
  thread takes its tokens' top-k first, then goes expert by expert, reading a chosen expert's A and B rows once for
  every two of its tokens that chose it (1.3-1.4x faster than token by token on a lone group, docs/engine.md).
  The torch path instead multiplies every token by all G E r A rows and all B's, zero weights included: at E 64
  that doubles the q/k/v arithmetic. With n_keep > 0 it also returns the slots a trace records: ids, weights, |s|
  of the slots then the best left out, and the chosen experts' weighted projections w_e A_e h.
"""
from __future__ import annotations

import os
import threading
import warnings

ENV = "LORA_EXPLORER_FUSED"  # "0": never build or use it
_NAME = "lora_explorer_route_v6"  # bump when _SRC changes meaning
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
          "-fopenmp"]  # OpenMP: at::parallel_for splits a many-token call across torch's intra-op threads
_SRC = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <vector>

// A routed group's buffers as plain pointers: protos (G E, d), shift (G E,) or null, a_rows (G E, r d),
// up (G E, r out_max), mask (E,) bool or null (true: disabled).
struct Group {
  const float *P, *S, *A, *U;
  const bool *M;
  const int64_t *O;  // (G,) each member's own output width (up is zero-padded to out_max)
  int64_t G, E, r, k, d, outm;
  float t_f;
};

// n dot products with h: rows (n, d) contiguous -> out (n,); four rows per pass, so four independent sums
// run side by side (one sum at a time is bound by the add's latency, not by memory).
static inline void dots(const float *rows, const float *h, int64_t n, int64_t d, float *out) {
  int64_t q = 0;
  for (; q + 4 <= n; q += 4) {
    const float *a0 = rows + q * d, *a1 = a0 + d, *a2 = a1 + d, *a3 = a2 + d;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (int64_t i = 0; i < d; ++i) {
      const float x = h[i];
      s0 += a0[i] * x; s1 += a1[i] * x; s2 += a2[i] * x; s3 += a3[i] * x;
    }
    out[q] = s0; out[q + 1] = s1; out[q + 2] = s2; out[q + 3] = s3;
  }
  for (; q < n; ++q) {
    const float *a = rows + q * d;
    float s0 = 0.f;
    for (int64_t i = 0; i < d; ++i) s0 += a[i] * h[i];
    out[q] = s0;
  }
}

// o (m,) += sum_q c_q u_q for n rows u_q of `up` (row stride `stride`), four rows per pass over o.
static inline void axpys(const float *c, const float *up, int64_t n, int64_t stride, int64_t m,
                         float *__restrict__ o) {
  int64_t q = 0;
  for (; q + 4 <= n; q += 4) {
    const float *u0 = up + q * stride, *u1 = u0 + stride, *u2 = u1 + stride, *u3 = u2 + stride;
    const float c0 = c[q], c1 = c[q + 1], c2 = c[q + 2], c3 = c[q + 3];
    for (int64_t i = 0; i < m; ++i) o[i] += c0 * u0[i] + c1 * u1[i] + c2 * u2[i] + c3 * u3[i];
  }
  for (; q < n; ++q) {
    const float *u = up + q * stride;
    const float cq = c[q];
    for (int64_t i = 0; i < m; ++i) o[i] += cq * u[i];
  }
}

// Two tokens against the same n rows (n <= 8): out1 = rows · h1, out2 = rows · h2; each row is loaded once.
static inline void dots2(const float *rows, const float *h1, const float *h2, int64_t n, int64_t d, float *o1,
                         float *o2) {
  int64_t q = 0;
  for (; q + 4 <= n; q += 4) {
    const float *a0 = rows + q * d, *a1 = a0 + d, *a2 = a1 + d, *a3 = a2 + d;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
    for (int64_t i = 0; i < d; ++i) {
      const float x = h1[i], y = h2[i];
      s0 += a0[i] * x; s1 += a1[i] * x; s2 += a2[i] * x; s3 += a3[i] * x;
      t0 += a0[i] * y; t1 += a1[i] * y; t2 += a2[i] * y; t3 += a3[i] * y;
    }
    o1[q] = s0; o1[q + 1] = s1; o1[q + 2] = s2; o1[q + 3] = s3;
    o2[q] = t0; o2[q + 1] = t1; o2[q + 2] = t2; o2[q + 3] = t3;
  }
  if (q < n) { dots(rows + q * d, h1, n - q, d, o1 + q); dots(rows + q * d, h2, n - q, d, o2 + q); }
}

// Two tokens' updates from the same n rows of up: o1 += sum_q c1_q u_q, o2 += sum_q c2_q u_q.
static inline void axpys2(const float *c1, const float *c2, const float *up, int64_t n, int64_t stride, int64_t m,
                          float *__restrict__ o1, float *__restrict__ o2) {
  int64_t q = 0;
  for (; q + 4 <= n; q += 4) {
    const float *u0 = up + q * stride, *u1 = u0 + stride, *u2 = u1 + stride, *u3 = u2 + stride;
    const float a0 = c1[q], a1 = c1[q + 1], a2 = c1[q + 2], a3 = c1[q + 3];
    const float b0 = c2[q], b1 = c2[q + 1], b2 = c2[q + 2], b3 = c2[q + 3];
    for (int64_t i = 0; i < m; ++i) {
      const float v0 = u0[i], v1 = u1[i], v2 = u2[i], v3 = u3[i];
      o1[i] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3;
      o2[i] += b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3;
    }
  }
  if (q < n) {
    axpys(c1 + q, up + q * stride, n - q, stride, m, o1);
    axpys(c2 + q, up + q * stride, n - q, stride, m, o2);
  }
}

static Group group_of(torch::Tensor protos, torch::Tensor shift, torch::Tensor a_rows, torch::Tensor up,
                      torch::Tensor mask, int64_t G, int64_t E, int64_t r, int64_t k, double T, int64_t n_keep,
                      torch::Tensor outs) {
  for (const auto &t : {protos, shift, a_rows, up})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == torch::kFloat32 && t.device().is_cpu(),
                "fused routing: float32 contiguous CPU tensors only");
  TORCH_CHECK(k <= E && n_keep <= E && protos.size(0) == G * E, "fused routing: shapes do not fit G, E, k");
  TORCH_CHECK(outs.is_contiguous() && outs.scalar_type() == torch::kLong && outs.numel() == G,
              "fused routing: outs is (G,) int64");
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(outs.data_ptr<int64_t>()[g] <= up.size(1) / r, "fused routing: a member is wider than up");
  return Group{protos.data_ptr<float>(), shift.numel() ? shift.data_ptr<float>() : nullptr, a_rows.data_ptr<float>(),
               up.data_ptr<float>(), mask.numel() ? mask.data_ptr<bool>() : nullptr, outs.data_ptr<int64_t>(), G, E,
               r, k, protos.size(1), up.size(1) / r, static_cast<float>(T)};
}

// Member g's routing from its raw scores s (E,) h · p_e, in place: |s - shift| (disabled: -inf, chosen last),
// top-n by selection (largest first, lower index on ties) into idx (n,), softmax(top / T) over the first k into
// w (k,); s keeps the |s| the trace reads.
static inline void select_member(const Group &c, int64_t g, float *s, int64_t *idx, float *w, int64_t n) {
  const int64_t E = c.E, k = c.k;
  char used[E];
  for (int64_t e = 0; e < E; ++e) {
    used[e] = 0;
    s[e] = (c.M && c.M[e]) ? -INFINITY : std::fabs(c.S ? s[e] - c.S[g * E + e] : s[e]);
  }
  for (int64_t j = 0; j < n; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (!used[e] && (best < 0 || s[e] > s[best])) best = e;
    idx[j] = best;
    used[best] = 1;
  }
  float total = 0.f;  // softmax(top / T) as torch computes it: divide first, then subtract the largest
  for (int64_t j = 0; j < k; ++j) { w[j] = std::exp(s[idx[j]] / c.t_f - s[idx[0]] / c.t_f); total += w[j]; }
  for (int64_t j = 0; j < k; ++j) w[j] /= total;
}

// One token (decoding): hp (d,) -> o[g] += sum_k w_k sum_q (A_kq · h) up_kq for every member g, o (G, out_max).
static void route_token(const Group &c, const float *hp, float *o) {
  const int64_t E = c.E, k = c.k, r = c.r, d = c.d;
  float s[E], w[k], z[r];
  int64_t idx[k];
  for (int64_t g = 0; g < c.G; ++g) {
    dots(c.P + g * E * d, hp, E, d, s);  // raw scores h · p_e
    select_member(c, g, s, idx, w, k);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = g * E + idx[j];
      dots(c.A + row * r * d, hp, r, d, z);  // A_e h, (r,)
      for (int64_t q = 0; q < r; ++q) z[q] *= w[j];
      axpys(z, c.U + row * r * c.outm, r, c.outm, c.O[g], o + g * c.outm);  // only the member's own columns
    }
  }
}

// One token (the decoding hot path): h (d,) -> every member's update (G, out_max).
torch::Tensor route_one(torch::Tensor h, torch::Tensor protos, torch::Tensor shift, torch::Tensor a_rows,
                        torch::Tensor up, torch::Tensor mask, int64_t G, int64_t E, int64_t r, int64_t k, double T,
                        torch::Tensor outs) {
  const Group c = group_of(protos, shift, a_rows, up, mask, G, E, r, k, T, 0, outs);
  TORCH_CHECK(h.is_contiguous() && h.scalar_type() == torch::kFloat32 && h.numel() == c.d, "route_one: h is (d,)");
  auto out = torch::zeros({G, c.outm}, h.options());
  route_token(c, h.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// Many tokens: h (t, d) and, when given (else empty), their raw scores (t, G E) from one matmul -> [updates
// (t, G, out_max)] and, when n_keep > 0 (a trace), [.., ids (t, G, k), weights (t, G, k), |s| (t, G, n_keep),
// weighted projections (t, G, k, r)]. Tokens are independent: split across torch's intra-op threads; within a
// thread's tokens, the updates are made expert by expert (each expert's rows read once per pair of its tokens).
std::vector<torch::Tensor> route_rows(torch::Tensor h, torch::Tensor scores, torch::Tensor protos,
                                      torch::Tensor shift, torch::Tensor a_rows, torch::Tensor up,
                                      torch::Tensor mask, int64_t G, int64_t E, int64_t r, int64_t k, double T,
                                      int64_t n_keep, torch::Tensor outs) {
  const Group c = group_of(protos, shift, a_rows, up, mask, G, E, r, k, T, n_keep, outs);
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == torch::kFloat32 && h.size(1) == c.d,
              "route_rows: h is (t, d) float32 contiguous");
  const int64_t t = h.size(0);
  const bool pre = scores.numel() > 0;
  TORCH_CHECK(!pre || (scores.is_contiguous() && scores.scalar_type() == torch::kFloat32 &&
                       scores.numel() == t * G * E), "route_rows: scores are (t, G E) float32 contiguous");
  auto f = h.options();
  std::vector<torch::Tensor> res{torch::zeros({t, G, c.outm}, f)};
  if (n_keep > 0)
    res.insert(res.end(), {torch::empty({t, G, k}, f.dtype(torch::kLong)), torch::empty({t, G, k}, f),
                           torch::empty({t, G, n_keep}, f), torch::empty({t, G, k, r}, f)});
  const float *H = h.data_ptr<float>(), *Z = pre ? scores.data_ptr<float>() : nullptr;
  float *O = res[0].data_ptr<float>();
  int64_t *I = n_keep > 0 ? res[1].data_ptr<int64_t>() : nullptr;
  float *W = n_keep > 0 ? res[2].data_ptr<float>() : nullptr, *R = n_keep > 0 ? res[3].data_ptr<float>() : nullptr;
  float *Ak = n_keep > 0 ? res[4].data_ptr<float>() : nullptr;
  const int64_t n = std::max(k, n_keep), d = c.d, GE = G * E, Gk = G * k;
  at::parallel_for(0, t, 8, [&](int64_t b, int64_t end) {
    // 1. every token's slots, member by member: ids, weights (and the trace's |s|)
    const int64_t nt = end - b;
    std::vector<int64_t> idx(nt * G * n);
    std::vector<float> w(nt * Gk), s(E);
    std::vector<int32_t> start(GE + 1, 0), slot(nt * Gk);
    for (int64_t i = 0; i < nt; ++i)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t ti = (b + i) * G + g;  // (token, member) in the outputs
        int64_t *ix = &idx[(i * G + g) * n];
        if (Z) std::copy(Z + ti * E, Z + (ti + 1) * E, s.data());
        else dots(c.P + g * E * d, H + (b + i) * d, E, d, s.data());
        select_member(c, g, s.data(), ix, &w[(i * G + g) * k], n);
        for (int64_t j = 0; j < k; ++j) {
          start[g * E + ix[j] + 1]++;
          if (I) { I[ti * k + j] = ix[j]; W[ti * k + j] = w[(i * G + g) * k + j]; }
        }
        if (R) for (int64_t j = 0; j < n_keep; ++j) R[ti * n_keep + j] = s[ix[j]];
      }
    // 2. the slots bucketed by (member, expert): slot = (token, member, j) of this chunk
    for (int64_t q = 0; q < GE; ++q) start[q + 1] += start[q];
    std::vector<int32_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < nt; ++i)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < k; ++j) slot[fill[g * E + idx[(i * G + g) * n + j]]++] = (i * G + g) * k + j;
    // 3. each chosen expert's rows read once per pair of tokens that chose it
    float z[r], z2[r];
    auto weigh = [&](float *zz, int64_t code) {  // w_e A_e h of slot `code`, kept for the trace when it is taken
      for (int64_t q = 0; q < r; ++q) zz[q] *= w[code];
      if (Ak) std::copy(zz, zz + r, Ak + ((b + code / Gk) * Gk + code % Gk) * r);
    };
    for (int64_t row = 0; row < GE; ++row) {
      const int64_t g = row / E, m = c.O[g];
      const float *Ar = c.A + row * r * d, *Ur = c.U + row * r * c.outm;
      int32_t p = start[row];
      for (; p + 2 <= start[row + 1]; p += 2) {
        const int64_t c1 = slot[p], c2 = slot[p + 1], i1 = b + c1 / Gk, i2 = b + c2 / Gk;
        dots2(Ar, H + i1 * d, H + i2 * d, r, d, z, z2);
        weigh(z, c1);
        weigh(z2, c2);
        axpys2(z, z2, Ur, r, c.outm, m, O + (i1 * G + g) * c.outm, O + (i2 * G + g) * c.outm);
      }
      if (p < start[row + 1]) {  // an odd one out
        const int64_t c1 = slot[p], i1 = b + c1 / Gk;
        dots(Ar, H + i1 * d, r, d, z);
        weigh(z, c1);
        axpys(z, Ur, r, c.outm, m, O + (i1 * G + g) * c.outm);
      }
    }
  });
  return res;
}
"""

_lock = threading.Lock()
_built: dict = {}  # "module": the compiled extension or None, once tried
_enabled = [True]


def _module():
    if not _enabled[0]:
        return None
    if "module" not in _built:
        with _lock:
            if "module" not in _built:
                _built["module"] = _build() if os.environ.get(ENV, "1") != "0" else None
    return _built["module"]


def kernel():
    """The compiled one-token step, or None: disabled ($LORA_EXPLORER_FUSED=0 or `set_enabled(False)`), or no
    compiler / the build failed (warned once). The first call compiles (about 25 s; cached per machine after)."""
    mod = _module()
    return None if mod is None else mod.route_one


def rows():
    """The compiled many-token routing (top-k rows only, tokens split across torch's threads), or None, as
    `kernel()`."""
    mod = _module()
    return None if mod is None else mod.route_rows


def set_enabled(on: bool) -> None:
    """Use the kernels (where they build) or the torch ops; for benches and tests comparing the two."""
    _enabled[0] = bool(on)


def _build():
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(name=_NAME, cpp_sources=_SRC, functions=["route_one", "route_rows"], extra_cflags=_FLAGS,
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no headers, a sandbox without a writable cache: torch ops instead
        warnings.warn(f"The fused routing kernels could not be built ({type(exc).__name__}: {exc}); "
                      f"routing uses torch ops (same routing, slower). Set {ENV}=0 to skip the attempt.",
                      stacklevel=2)
        return None
