"""A C++ kernel for the CPU engine's decode attention, built on first use.

Batched SDPA over gathered blocks (attention.py) copies every sequence's K/V out of the
paged cache once per layer before attending: at batch 64 the copy and the attention were
half of a step. This kernel reads K/V in place through the block table, one pass per
(sequence, KV head) with an online softmax, all query heads of a group together (so each
K/V row is read once), parallel over sequences x KV heads with ATen's thread pool.

Built with torch's cpp_extension (g++ and ninja) into torch's extension cache the first
time an engine needs it (~30 s), then loaded in well under a second. Where it cannot be
built the engine keeps the PyTorch path and says why, once.
"""

from __future__ import annotations

import logging
import platform
import threading

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// exp of x <= 0 (a score less the row's max): Cephes' expf polynomial, which the softmax
// loop vectorizes (glibc's expf is a scalar call per key there: it was a quarter of the
// kernel's time). Relative error ~2 ulp; underflows to 0 below -87.
static inline float exp_nonpos(float x) {
  x = std::max(x, -87.f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One (sequence, KV head): its G query heads against the sequence's keys, walked block by
// block (a division per key costs more than its dot product). D is a compile-time constant:
// the accumulators stay in registers and the loops over D vectorize fully.
template <int D>
static void attend(const float* q, const float* kp, const float* vp, const int* table,
                   int64_t L, int64_t BS, int64_t KVH, int64_t h, int64_t G, float sc,
                   float* scores, float* out) {
  for (int64_t t0 = 0; t0 < L; t0 += BS) {
    const int64_t base = (table[t0 / BS] * BS * KVH + h) * D;
    const int64_t n = std::min(BS, L - t0);
    for (int64_t j = 0; j < n; ++j) {
      const float* k = kp + base + j * KVH * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * D;
        float dot = 0.f;
        #pragma omp simd reduction(+:dot)
        for (int d = 0; d < D; ++d) dot += qg[d] * k[d];
        scores[g * L + t0 + j] = dot * sc;
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * L;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < L; ++t) mx = std::max(mx, s[t]);
    float sum = 0.f;
    #pragma omp simd reduction(+:sum)
    for (int64_t t = 0; t < L; ++t) { s[t] = exp_nonpos(s[t] - mx); sum += s[t]; }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    float acc[D] = {0.f};
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
      const int64_t base = (table[t0 / BS] * BS * KVH + h) * D;
      const int64_t n = std::min(BS, L - t0);
      for (int64_t j = 0; j < n; ++j) {
        const float* v = vp + base + j * KVH * D;
        const float p = s[t0 + j];
        #pragma omp simd
        for (int d = 0; d < D; ++d) acc[d] += p * v[d];
      }
    }
    for (int d = 0; d < D; ++d) out[g * D + d] = acc[d] * inv;
  }
}

// q: [B, H, D]; caches: [blocks, block_size, KVH, D]; tables: [B, max_blocks] int32;
// ctx: [B] int32 (keys per sequence, written already). fp32.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor ctx, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k_cache.scalar_type() == torch::kFloat,
              "paged_decode: float32 only");
  q = q.contiguous();
  auto out = torch::empty_like(q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH, max_blocks = tables.size(1);
  TORCH_CHECK(D == 32 || D == 64 || D == 128 || D == 256, "paged_decode: head_dim ", D);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int* tp = tables.data_ptr<int>();
  const int* cp = ctx.data_ptr<int>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, h = i % KVH;
      const int64_t L = cp[b];
      scores.resize(G * L);
      const float* qh = qp + (b * H + h * G) * D;
      float* oh = op + (b * H + h * G) * D;
      const int* table = tp + b * max_blocks;
      switch (D) {
        case 32: attend<32>(qh, kp, vp, table, L, BS, KVH, h, G, sc, scores.data(), oh); break;
        case 64: attend<64>(qh, kp, vp, table, L, BS, KVH, h, G, sc, scores.data(), oh); break;
        case 128: attend<128>(qh, kp, vp, table, L, BS, KVH, h, G, sc, scores.data(), oh); break;
        default: attend<256>(qh, kp, vp, table, L, BS, KVH, h, G, sc, scores.data(), oh);
      }
    }
  });
  return out;
}
"""

HEAD_DIMS = (32, 64, 128, 256)  # the kernel's compiled head sizes

_lock = threading.Lock()
_module = None
_failed: str | None = None


def load():
    """The built module, or None (with the reason logged once) where it cannot be built."""
    global _module, _failed
    with _lock:
        if _module is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load_inline

                arch = "-mcpu=native" if platform.machine() in ("aarch64", "arm64") \
                    else "-march=native"
                _module = load_inline(
                    "tandem_cpu_kernels", cpp_sources=SOURCE, functions=["paged_decode"],
                    extra_cflags=["-O3", arch, "-fopenmp", "-fno-math-errno"], verbose=False)
            except Exception as err:  # noqa: BLE001 - no compiler, no ninja: the torch path
                _failed = f"{type(err).__name__}: {err}"
                log.warning("CPU attention kernel unavailable (%s): batched SDPA instead",
                            _failed.splitlines()[0][:300])
        return _module


def failure() -> str | None:
    return _failed


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    return _module.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)


def main() -> int:
    """`python -m cluster.engine.cpu_kernels`: builds the kernel now (make does, so that the
    first engine does not pay for it), says where it is or why it could not be built."""
    logging.basicConfig(level=logging.WARNING)
    mod = load()
    print(f"CPU attention kernel: {mod.__file__}" if mod else
          f"CPU attention kernel unavailable: {failure()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
