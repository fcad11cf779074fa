"""Arrow's routing as two C++ functions: the hot paths without a dozen small torch ops per routed group.

Usage::

    step = fused.kernel()          # compiled once per machine with the system C++ compiler; None if it cannot be
    if step is not None:           # (or LORA_EXPLORER_FUSED=0): the torch-op path in layer.py runs instead
        d = step(h, protos, shift, a_rows, up, mask, G, E, r, k, T)   # (G, out_max), as RoutedGroup._one_token
    d, idx, w, ranked, a = fused.kept()(h, ..., T, n_keep)            # the same, with the slots a trace records
    a, *kept = fused.many()(z, shift, mask, G, E, r, k, T, n_keep)    # (t, G, E r), as RoutedGroup.compute

What it does is `RoutedGroup._one_token` exactly: per member g, the scores |h · p_e - shift_e| of its E experts
(disabled ones skipped), the top-k (ties to the lower index), softmax(top / T), and Σ_k w_k Σ_j (A_kj · h) up_kj.
Plain loops, one thread, float32 on the CPU; the compiler may reorder sums (-fassociative-math), so results
differ from the torch ops by float rounding (tests/unit/test_fused.py holds them within 1e-5). Why: a decoding
step routes 60 groups, and each group's ~12 torch ops cost 40-55 µs of dispatch against ~8 µs here
(bench/fused_route_probe.py; docs/engine.md, "A fused one-token kernel").

`route_many` is the many-token half (a prefill or a 64-token forward): torch's one matmul gives every token's
scores and A-projections, z = h · [protos; A rows]ᵀ, and the C++ loop does the rest of `RoutedGroup.compute`'s
Arrow branch per (token, member): |s - shift|, disabled experts at -inf, top-k, softmax(top / T), and the weighted
projections, zero outside the top-k; with n_keep > 0 also the slots the trace records (ids, weights, |s| of the
slots and the best left out). It replaces abs, topk, softmax, zeros_like, scatter, mul and their views: about
7 of the 19 ms routing adds to a 64-token forward at E 16 (bench/engine_profile.py; docs/engine.md).
"""
from __future__ import annotations

import os
import threading
import warnings

ENV = "LORA_EXPLORER_FUSED"  # "0": never build or use it
_NAME = "lora_explorer_route_v3"  # bump when _SRC changes meaning
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
_SRC = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <vector>

// h (d,), protos (G E, d), shift (G E,) or empty, a_rows (G E, r d), up (G E, r out), mask (E,) bool or empty.
// Fills out (G, out_max); when n_keep > 0 (a trace), also I (G, k) ids, W (G, k) weights, R (G, n_keep) |s| of the
// slots then the best left out, and Ak (G, k, r) the chosen experts' weighted projections w_e A_e h.
static void route_one_into(torch::Tensor h, torch::Tensor protos, torch::Tensor shift, torch::Tensor a_rows,
                           torch::Tensor up, torch::Tensor mask, int64_t G, int64_t E, int64_t r, int64_t k,
                           double T, float *o, int64_t n_keep, int64_t *I, float *W, float *R, float *Ak) {
  for (const auto &t : {h, protos, shift, a_rows, up})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == torch::kFloat32 && t.device().is_cpu(),
                "route_one: float32 contiguous CPU tensors only");
  TORCH_CHECK(k <= E && n_keep <= E, "route_one: k and n_keep must be at most E");
  const int64_t d = h.size(0), outm = up.size(1) / r, n = std::max(k, n_keep);
  const float *hp = h.data_ptr<float>(), *P = protos.data_ptr<float>(), *A = a_rows.data_ptr<float>();
  const float *U = up.data_ptr<float>(), *S = shift.numel() ? shift.data_ptr<float>() : nullptr;
  const bool *M = mask.numel() ? mask.data_ptr<bool>() : nullptr;
  std::vector<float> s(E), w(k);
  std::vector<int64_t> idx(n);
  std::vector<char> used(E);
  const float t_f = static_cast<float>(T);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t e = 0; e < E; ++e) {
      float acc = 0.f;
      if (!(M && M[e])) {
        const float *p = P + (g * E + e) * d;
        for (int64_t i = 0; i < d; ++i) acc += p[i] * hp[i];
      }
      s[e] = (M && M[e]) ? -INFINITY : std::fabs(S ? acc - S[g * E + e] : acc);  // disabled: -inf, chosen last
      used[e] = 0;
    }
    for (int64_t j = 0; j < n; ++j) {  // top-n by selection (E is small), largest first, lower index on ties
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!used[e] && (best < 0 || s[e] > s[best])) best = e;
      idx[j] = best;
      used[best] = 1;
    }
    float total = 0.f;  // softmax(top / T) as torch computes it: divide first, then subtract the largest
    for (int64_t j = 0; j < k; ++j) { w[j] = std::exp(s[idx[j]] / t_f - s[idx[0]] / t_f); total += w[j]; }
    float *og = o + g * outm;
    for (int64_t j = 0; j < k; ++j) {
      w[j] /= total;
      const int64_t row = g * E + idx[j];
      for (int64_t q = 0; q < r; ++q) {
        const float *ar = A + (row * r + q) * d;
        float acc = 0.f;
        for (int64_t i = 0; i < d; ++i) acc += ar[i] * hp[i];
        const float c = acc * w[j];
        if (n_keep > 0) Ak[(g * k + j) * r + q] = c;
        const float *ur = U + (row * r + q) * outm;
        for (int64_t i = 0; i < outm; ++i) og[i] += c * ur[i];
      }
    }
    if (n_keep > 0) {
      for (int64_t j = 0; j < k; ++j) { I[g * k + j] = idx[j]; W[g * k + j] = w[j]; }
      for (int64_t j = 0; j < n_keep; ++j) R[g * n_keep + j] = s[idx[j]];
    }
  }
}

// One token, routed (the decoding hot path): every member's update (G, out_max).
torch::Tensor route_one(torch::Tensor h, torch::Tensor protos, torch::Tensor shift, torch::Tensor a_rows,
                        torch::Tensor up, torch::Tensor mask, int64_t G, int64_t E, int64_t r, int64_t k, double T) {
  auto out = torch::zeros({G, up.size(1) / r}, h.options());
  route_one_into(h, protos, shift, a_rows, up, mask, G, E, r, k, T, out.data_ptr<float>(), 0, nullptr, nullptr,
                 nullptr, nullptr);
  return out;
}

// The same while a trace is captured: [update (G, out_max), ids (G, k), weights (G, k), |s| (G, n_keep),
// weighted projections (G, k, r)].
std::vector<torch::Tensor> route_one_kept(torch::Tensor h, torch::Tensor protos, torch::Tensor shift,
                                          torch::Tensor a_rows, torch::Tensor up, torch::Tensor mask, int64_t G,
                                          int64_t E, int64_t r, int64_t k, double T, int64_t n_keep) {
  TORCH_CHECK(n_keep > 0, "route_one_kept: n_keep must be positive");
  auto f = h.options();
  std::vector<torch::Tensor> res{torch::zeros({G, up.size(1) / r}, f), torch::empty({G, k}, f.dtype(torch::kLong)),
                                 torch::empty({G, k}, f), torch::empty({G, n_keep}, f), torch::empty({G, k, r}, f)};
  route_one_into(h, protos, shift, a_rows, up, mask, G, E, r, k, T, res[0].data_ptr<float>(), n_keep,
                 res[1].data_ptr<int64_t>(), res[2].data_ptr<float>(), res[3].data_ptr<float>(),
                 res[4].data_ptr<float>());
  return res;
}

// Many tokens (a prefill or a forward): the routing weights applied to the A-projections the group's one matmul
// gave. z (t, G E + G E r) = h · [protos; A rows]ᵀ, shift (G E,) or empty, mask (E,) bool or empty. Returns
// a (t, G, E r): expert e's r projections times its weight, zero outside the top-k; and, when n_keep > 0 (a trace
// is captured), idx (t, G, k) int64, w (t, G, k), ranked (t, G, n_keep): |s| of the slots then the best left out.
// Disabled experts score -inf (chosen last, weight 0), as the torch ops' masked_fill.
std::vector<torch::Tensor> route_many(torch::Tensor z, torch::Tensor shift, torch::Tensor mask, int64_t G,
                                      int64_t E, int64_t r, int64_t k, double T, int64_t n_keep) {
  for (const auto &x : {z, shift})
    TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
                "route_many: float32 contiguous CPU tensors only");
  const int64_t t = z.size(0), GE = G * E, width = z.size(1);
  TORCH_CHECK(width == GE + GE * r && k <= E && n_keep <= E, "route_many: shapes do not fit G, E, r, k");
  auto a = torch::zeros({t, G, E * r}, z.options());
  std::vector<torch::Tensor> res{a};
  int64_t *I = nullptr;
  float *W = nullptr, *R = nullptr;
  if (n_keep > 0) {
    res.push_back(torch::empty({t, G, k}, z.options().dtype(torch::kLong)));
    res.push_back(torch::empty({t, G, k}, z.options()));
    res.push_back(torch::empty({t, G, n_keep}, z.options()));
    I = res[1].data_ptr<int64_t>(); W = res[2].data_ptr<float>(); R = res[3].data_ptr<float>();
  }
  const float *Z = z.data_ptr<float>(), *S = shift.numel() ? shift.data_ptr<float>() : nullptr;
  const bool *M = mask.numel() ? mask.data_ptr<bool>() : nullptr;
  float *o = a.data_ptr<float>();
  const int64_t n = std::max(k, n_keep);
  std::vector<float> s(E), w(k);
  std::vector<int64_t> idx(n);
  std::vector<char> used(E);
  const float t_f = static_cast<float>(T);
  for (int64_t i = 0; i < t; ++i) {
    const float *zi = Z + i * width;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t e = 0; e < E; ++e) {
        s[e] = (M && M[e]) ? -INFINITY : std::fabs(S ? zi[g * E + e] - S[g * E + e] : zi[g * E + e]);
        used[e] = 0;
      }
      for (int64_t j = 0; j < n; ++j) {  // top-n by selection, largest first, lower index on ties
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (!used[e] && (best < 0 || s[e] > s[best])) best = e;
        idx[j] = best;
        used[best] = 1;
      }
      float total = 0.f;  // softmax(top / T) as torch computes it: divide first, then subtract the largest
      for (int64_t j = 0; j < k; ++j) { w[j] = std::exp(s[idx[j]] / t_f - s[idx[0]] / t_f); total += w[j]; }
      const int64_t tg = i * G + g;
      float *og = o + tg * E * r;
      for (int64_t j = 0; j < k; ++j) {
        w[j] /= total;
        const float *pa = zi + GE + (g * E + idx[j]) * r;
        for (int64_t q = 0; q < r; ++q) og[idx[j] * r + q] = w[j] * pa[q];
      }
      if (n_keep > 0) {
        for (int64_t j = 0; j < k; ++j) { I[tg * k + j] = idx[j]; W[tg * k + j] = w[j]; }
        for (int64_t j = 0; j < n_keep; ++j) R[tg * n_keep + j] = s[idx[j]];
      }
    }
  }
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


def kept():
    """The one-token step that also returns the trace's slots (for traced decoding), or None, as `kernel()`."""
    mod = _module()
    return None if mod is None else mod.route_one_kept


def many():
    """The compiled many-token routing (scores to weighted A-projections), or None, as `kernel()`."""
    mod = _module()
    return None if mod is None else mod.route_many


def set_enabled(on: bool) -> None:
    """Use the kernels (where they build) or the torch ops; for benches and tests comparing the two."""
    _enabled[0] = bool(on)


def _build():
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(name=_NAME, cpp_sources=_SRC, functions=["route_one", "route_one_kept", "route_many"], extra_cflags=_FLAGS,
                           verbose=False)
    except Exception as exc:  # no compiler, no headers, a sandbox without a writable cache: torch ops instead
        warnings.warn(f"The fused routing kernels could not be built ({type(exc).__name__}: {exc}); "
                      f"routing uses torch ops (same routing, slower). Set {ENV}=0 to skip the attempt.",
                      stacklevel=2)
        return None
