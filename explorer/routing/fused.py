"""Arrow's one-token step as one C++ function: the decoding hot path without a dozen small torch ops per group.

Usage::

    step = fused.kernel()          # compiled once per machine with the system C++ compiler; None if it cannot be
    if step is not None:           # (or LORA_EXPLORER_FUSED=0): the torch-op path in layer.py runs instead
        d = step(h, protos, shift, a_rows, up, mask, G, E, r, k, T)   # (G, out_max), as RoutedGroup._one_token

What it does is `RoutedGroup._one_token` exactly: per member g, the scores |h · p_e - shift_e| of its E experts
(disabled ones skipped), the top-k (ties to the lower index), softmax(top / T), and Σ_k w_k Σ_j (A_kj · h) up_kj.
Plain loops, one thread, float32 on the CPU; the compiler may reorder sums (-fassociative-math), so results
differ from the torch ops by float rounding (tests/unit/test_fused.py holds them within 1e-5). Why: a decoding
step routes 60 groups, and each group's ~12 torch ops cost 40-55 µs of dispatch against ~8 µs here
(bench/fused_route_probe.py; docs/engine.md, "A fused one-token kernel").
"""
from __future__ import annotations

import os
import threading
import warnings

ENV = "LORA_EXPLORER_FUSED"  # "0": never build or use it
_NAME = "lora_explorer_route_v1"  # bump when _SRC changes meaning
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
_SRC = r"""
#include <torch/extension.h>
#include <cmath>
#include <vector>

// h (d,), protos (G E, d), shift (G E,) or empty, a_rows (G E, r d), up (G E, r out), mask (E,) bool or empty
torch::Tensor route_one(torch::Tensor h, torch::Tensor protos, torch::Tensor shift, torch::Tensor a_rows,
                        torch::Tensor up, torch::Tensor mask, int64_t G, int64_t E, int64_t r, int64_t k, double T) {
  for (const auto &t : {h, protos, shift, a_rows, up})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == torch::kFloat32 && t.device().is_cpu(),
                "route_one: float32 contiguous CPU tensors only");
  const int64_t d = h.size(0), outm = up.size(1) / r;
  auto out = torch::zeros({G, outm}, h.options());
  const float *hp = h.data_ptr<float>(), *P = protos.data_ptr<float>(), *A = a_rows.data_ptr<float>();
  const float *U = up.data_ptr<float>(), *S = shift.numel() ? shift.data_ptr<float>() : nullptr;
  const bool *M = mask.numel() ? mask.data_ptr<bool>() : nullptr;
  float *o = out.data_ptr<float>();
  std::vector<float> s(E), w(k);
  std::vector<int64_t> idx(k);
  std::vector<char> used(E);
  const float inv_t = static_cast<float>(1.0 / T);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t e = 0; e < E; ++e) {
      const float *p = P + (g * E + e) * d;
      float acc = 0.f;
      for (int64_t i = 0; i < d; ++i) acc += p[i] * hp[i];
      s[e] = std::fabs(S ? acc - S[g * E + e] : acc);
      used[e] = M && M[e];  // a disabled expert is never chosen
    }
    for (int64_t j = 0; j < k; ++j) {  // top-k by selection (E is small), largest first, lower index on ties
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!used[e] && (best < 0 || s[e] > s[best])) best = e;
      idx[j] = best;
      used[best] = 1;
    }
    float total = 0.f;
    for (int64_t j = 0; j < k; ++j) { w[j] = std::exp((s[idx[j]] - s[idx[0]]) * inv_t); total += w[j]; }
    float *og = o + g * outm;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = g * E + idx[j];
      for (int64_t q = 0; q < r; ++q) {
        const float *ar = A + (row * r + q) * d;
        float acc = 0.f;
        for (int64_t i = 0; i < d; ++i) acc += ar[i] * hp[i];
        const float c = acc * w[j] / total;
        const float *ur = U + (row * r + q) * outm;
        for (int64_t i = 0; i < outm; ++i) og[i] += c * ur[i];
      }
    }
  }
  return out;
}
"""

_lock = threading.Lock()
_built: dict = {}  # "step": the compiled function or None, once tried
_enabled = [True]


def kernel():
    """The compiled one-token step, or None: disabled ($LORA_EXPLORER_FUSED=0 or `set_enabled(False)`), or no
    compiler / the build failed (warned once). The first call compiles (about 25 s; cached per machine after)."""
    if not _enabled[0]:
        return None
    if "step" not in _built:
        with _lock:
            if "step" not in _built:
                _built["step"] = _build() if os.environ.get(ENV, "1") != "0" else None
    return _built["step"]


def set_enabled(on: bool) -> None:
    """Use the kernel (where it builds) or the torch ops; for benches and tests comparing the two."""
    _enabled[0] = bool(on)


def _build():
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(name=_NAME, cpp_sources=_SRC, functions=["route_one"], extra_cflags=_FLAGS,
                           verbose=False).route_one
    except Exception as exc:  # no compiler, no headers, a sandbox without a writable cache: torch ops instead
        warnings.warn(f"The fused one-token routing kernel could not be built ({type(exc).__name__}: {exc}); "
                      f"decoding uses torch ops (same routing, slower). Set {ENV}=0 to skip the attempt.",
                      stacklevel=2)
        return None
