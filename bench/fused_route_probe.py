"""Would a fused C++ kernel make Arrow's one-token routing cheaper? A probe, not part of the engine.

Usage::

    .venv/bin/python bench/fused_route_probe.py      # compiles once with the system g++ (about 25 s), 1 thread

One routed group of a decoding step (q/k/v of SmolLM2: G 3, E 16, r 4, d 576, top-4), written once as the
engine's torch ops (scores, |.|, top-k, softmax, gather the chosen A rows, A h, weight, gather B, one bmm) and
once as a single C++ function with plain loops (`-O3 -march=native -ffast-math`), both on the same inputs:
prints the largest difference and microseconds per call of each. docs/engine.md, "A fused one-token kernel",
has the figures and why it was not adopted.
"""
import time, torch, os
from torch.utils.cpp_extension import load_inline
src = r"""
#include <torch/extension.h>
#include <vector>
#include <cmath>
#include <limits>
torch::Tensor route_one(torch::Tensor h, torch::Tensor protos, torch::Tensor shift, torch::Tensor a_rows,
                        torch::Tensor up, torch::Tensor mask, int64_t G, int64_t E, int64_t r, int64_t k, double T) {
  const int64_t d = h.size(0);
  const int64_t outm = up.size(1) / r;
  auto out = torch::zeros({G, outm}, h.options());
  const float* hp = h.data_ptr<float>();
  const float* P = protos.data_ptr<float>();
  const float* A = a_rows.data_ptr<float>();
  const float* U = up.data_ptr<float>();
  const float* S = shift.numel() ? shift.data_ptr<float>() : nullptr;
  const bool* M = mask.numel() ? mask.data_ptr<bool>() : nullptr;
  float* o = out.data_ptr<float>();
  std::vector<float> s(E); std::vector<int64_t> idx(k); std::vector<float> w(k); std::vector<float> a(r);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t e = 0; e < E; ++e) {
      const float* p = P + (g * E + e) * d;
      float acc = 0.f;
      for (int64_t i = 0; i < d; ++i) acc += p[i] * hp[i];
      if (S) acc -= S[g * E + e];
      s[e] = (M && M[e]) ? -std::numeric_limits<float>::infinity() : std::fabs(acc);
    }
    for (int64_t j = 0; j < k; ++j) {  // selection: largest first, first index on ties
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e) {
        bool used = false;
        for (int64_t q = 0; q < j; ++q) used |= idx[q] == e;
        if (!used && (best < 0 || s[e] > s[best])) best = e;
      }
      idx[j] = best;
    }
    float mx = s[idx[0]] / T, tot = 0.f;
    for (int64_t j = 0; j < k; ++j) { w[j] = std::exp(s[idx[j]] / T - mx); tot += w[j]; }
    float* og = o + g * outm;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = g * E + idx[j];
      const float wj = w[j] / tot;
      for (int64_t q = 0; q < r; ++q) {
        const float* ar = A + (row * r + q) * d;
        float acc = 0.f;
        for (int64_t i = 0; i < d; ++i) acc += ar[i] * hp[i];
        const float c = acc * wj;
        const float* ur = U + row * r * outm + q * outm;
        for (int64_t i = 0; i < outm; ++i) og[i] += c * ur[i];
      }
    }
  }
  return out;
}
"""
t0 = time.time()
mod = load_inline("lora_explorer_route_probe", cpp_sources=src, functions=["route_one"], extra_cflags=["-O3", "-march=native", "-ffast-math"], verbose=False)
print("compile", time.time() - t0)
torch.set_num_threads(1)
G, E, r, d, outm, k = 3, 16, 4, 576, 576, 4
protos = torch.randn(G * E, d); protos /= protos.norm(dim=1, keepdim=True)
a_rows = torch.randn(G * E, r * d) / 24; up = torch.randn(G * E, r * outm) * 0.05
h = torch.randn(d); shift = torch.empty(0); mask = torch.empty(0, dtype=torch.bool)
offsets = (torch.arange(G) * E).view(G, 1)
def py():
    scores = torch.mv(protos, h)
    s = scores.view(G, -1).abs()
    top, idx = s.topk(k, dim=-1)
    w = top.softmax(-1)
    flat = (idx + offsets).view(-1)
    z = torch.mv(a_rows.index_select(0, flat).view(G * k * r, -1), h)
    a = z.view(G, k, r) * w.unsqueeze(-1)
    return torch.bmm(a.view(G, 1, k * r), up.index_select(0, flat).view(G, k * r, -1)).view(G, -1)
ref = py(); got = mod.route_one(h, protos, shift, a_rows, up, mask, G, E, r, k, 1.0)
print("maxdiff", (ref - got).abs().max().item())
for name, fn in (("py", py), ("cpp", lambda: mod.route_one(h, protos, shift, a_rows, up, mask, G, E, r, k, 1.0))):
    for _ in range(100): fn()
    t = time.perf_counter()
    for _ in range(2000): fn()
    print(name, (time.perf_counter() - t) / 2000 * 1e6, "us")
