"""A C++ kernel for the CPU engine's decode attention, built on first use.

Batched SDPA over gathered blocks (attention.py) copies every sequence's K/V out of the
paged cache once per layer before attending: at batch 64 the copy and the attention were
half of a step. This kernel reads K/V in place through the block table, parallel over sequences (all
heads of one, walking its blocks in memory order) where the batch keeps every thread busy,
else over sequences x KV heads (all query heads of a group together, so each K/V row is
read once), with ATen's thread pool.

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

// Scores to unnormalized probabilities in place; 1 / their sum.
static inline float softmax(float* s, int64_t L) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < L; ++t) mx = std::max(mx, s[t]);
  float sum = 0.f;
  #pragma omp simd reduction(+:sum)
  for (int64_t t = 0; t < L; ++t) { s[t] = exp_nonpos(s[t] - mx); sum += s[t]; }
  return sum > 0.f ? 1.f / sum : 0.f;
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
    const float inv = softmax(s, L);
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

// One sequence, all heads: its keys walked block by block in memory order (a block of every
// KV head is one contiguous run of BS x KVH x D floats), the next block prefetched while
// this one is read. A step's attention streams a cache far larger than the CPU's caches
// from memory; `attend` per head reads 128-byte pieces 512 bytes apart (default model).
// Batch 64, contexts 192-320, caches evicted between calls, one thread of this machine:
// 3.4 -> 2.6 ms a call (streaming reads here: ~10 GB/s, a floor of ~1.6 ms).
template <int D>
static void attend_seq(const float* q, const float* kp, const float* vp, const int* table,
                       int64_t L, int64_t BS, int64_t KVH, int64_t G, float sc,
                       float* scores, float* acc, float* out) {
  const int64_t H = KVH * G, row = KVH * D, nb = (L + BS - 1) / BS;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t t0 = b * BS, n = std::min(BS, L - t0);
    const float* kb = kp + table[b] * BS * row;
    if (b + 1 < nb) {  // the next K block, and this V block for the second pass
      const char* nk = reinterpret_cast<const char*>(kp + table[b + 1] * BS * row);
      const char* nv = reinterpret_cast<const char*>(vp + table[b] * BS * row);
      for (int64_t o = 0; o < BS * row * 4; o += 64) {
        __builtin_prefetch(nk + o);
        __builtin_prefetch(nv + o);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* kj = kb + j * row;
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = q + h * D;
        const float* k = kj + (h / G) * D;
        float dot = 0.f;
        #pragma omp simd reduction(+:dot)
        for (int d = 0; d < D; ++d) dot += qh[d] * k[d];
        scores[h * L + t0 + j] = dot * sc;
      }
    }
  }
  float* inv = acc + H * D;  // the caller's buffer holds H more
  for (int64_t h = 0; h < H; ++h) inv[h] = softmax(scores + h * L, L);
  std::fill(acc, acc + H * D, 0.f);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t t0 = b * BS, n = std::min(BS, L - t0);
    const float* vb = vp + table[b] * BS * row;
    if (b + 1 < nb) {
      const char* nv = reinterpret_cast<const char*>(vp + table[b + 1] * BS * row);
      for (int64_t o = 0; o < BS * row * 4; o += 64) __builtin_prefetch(nv + o);
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = vb + j * row;
      for (int64_t h = 0; h < H; ++h) {
        const float p = scores[h * L + t0 + j];
        const float* v = vj + (h / G) * D;
        float* a = acc + h * D;
        #pragma omp simd
        for (int d = 0; d < D; ++d) a[d] += p * v[d];
      }
    }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int d = 0; d < D; ++d) out[h * D + d] = acc[h * D + d] * inv[h];
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
  if (B >= 2 * at::get_num_threads()) {  // sequences enough to keep every thread busy
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, acc(H * D + H);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t L = cp[b];
        scores.resize(H * L);
        const float* qb = qp + b * H * D;
        float* ob = op + b * H * D;
        const int* table = tp + b * max_blocks;
        float* sp = scores.data();
        float* ap = acc.data();
        switch (D) {
          case 32: attend_seq<32>(qb, kp, vp, table, L, BS, KVH, G, sc, sp, ap, ob); break;
          case 64: attend_seq<64>(qb, kp, vp, table, L, BS, KVH, G, sc, sp, ap, ob); break;
          case 128: attend_seq<128>(qb, kp, vp, table, L, BS, KVH, G, sc, sp, ap, ob); break;
          default: attend_seq<256>(qb, kp, vp, table, L, BS, KVH, G, sc, sp, ap, ob);
        }
      }
    });
    return out;
  }
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

// The small ops around the projections, one pass each: eager they are several PyTorch ops
// of a few us apiece (rotary 78 us, add + RMS norm 28, SiLU x up 17 at 16 rows of the
// default model), ~0.6 ms of a 9 ms batch-16 step on one thread. fp32, rows contiguous.

// x + residual, and that sum's RMS norm times w: [T, N] each; returns {normed, sum}.
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor residual,
                                        torch::Tensor w, double eps) {
  x = x.contiguous();
  residual = residual.contiguous();
  auto sum = torch::empty_like(x), out = torch::empty_like(x);
  const int64_t T = x.size(0), N = x.size(1);
  const float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>(),
              *wp = w.data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *a = xp + t * N, *b = rp + t * N;
      float* s = sp + t * N;
      float ss = 0.f;
      #pragma omp simd reduction(+:ss)
      for (int64_t i = 0; i < N; ++i) { s[i] = a[i] + b[i]; ss += s[i] * s[i]; }
      const float inv = 1.f / std::sqrt(ss / N + e);
      float* o = op + t * N;
      #pragma omp simd
      for (int64_t i = 0; i < N; ++i) o[i] = s[i] * inv * wp[i];
    }
  });
  return {out, sum};
}

// silu(gate) * up for x = [gate | up]: [T, 2F] -> [T, F]. sigmoid through exp of -|x|.
torch::Tensor silu_and_mul(torch::Tensor x) {
  x = x.contiguous();
  const int64_t T = x.size(0), F = x.size(1) / 2;
  auto out = torch::empty({T, F}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *g = xp + t * 2 * F, *u = g + F;
      float* o = op + t * F;
      #pragma omp simd
      for (int64_t i = 0; i < F; ++i) {
        const float e = exp_nonpos(-std::fabs(g[i]));
        const float sig = (g[i] >= 0.f ? 1.f : e) / (1.f + e);
        o[i] = g[i] * sig * u[i];
      }
    }
  });
  return out;
}

// Rotary embedding, halves rotated (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), of q
// [T, H, D] and k [T, KVH, D] (views of the qkv projection: rows strided, the last dim
// contiguous) at positions [T]; cos/sin: [max_positions, D/2]. Returns new contiguous q, k.
static void rotate_rows(const torch::Tensor& x, torch::Tensor& y, const float* cp,
                        const float* snp, const int64_t* pos) {
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  const int64_t st = x.stride(0), sh = x.stride(1);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *c = cp + pos[t] * half, *sn = snp + pos[t] * half;
      for (int64_t h = 0; h < H; ++h) {
        const float* a = xp + t * st + h * sh;
        float* o = yp + (t * H + h) * D;
        #pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = a[i], x2 = a[i + half];
          o[i] = x1 * c[i] - x2 * sn[i];
          o[i + half] = x2 * c[i] + x1 * sn[i];
        }
      }
    }
  });
}

std::vector<torch::Tensor> rope(torch::Tensor q, torch::Tensor k, torch::Tensor cos,
                                torch::Tensor sin, torch::Tensor positions) {
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "rope: the last dim must be contiguous");
  cos = cos.contiguous();
  sin = sin.contiguous();
  positions = positions.to(torch::kLong).contiguous();
  auto qo = torch::empty(q.sizes(), q.options()), ko = torch::empty(k.sizes(), k.options());
  const int64_t* pos = positions.data_ptr<int64_t>();
  rotate_rows(q, qo, cos.data_ptr<float>(), sin.data_ptr<float>(), pos);
  rotate_rows(k, ko, cos.data_ptr<float>(), sin.data_ptr<float>(), pos);
  return {qo, ko};
}
"""

HEAD_DIMS = (32, 64, 128, 256)  # the kernel's compiled head sizes
FUNCTIONS = ["paged_decode", "add_rms_norm", "silu_and_mul", "rope"]

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
                    "tandem_cpu_kernels", cpp_sources=SOURCE, functions=FUNCTIONS,
                    extra_cflags=["-O3", arch, "-fopenmp", "-fno-math-errno"], verbose=False)
            except Exception as err:  # noqa: BLE001 - no compiler, no ninja: the torch path
                _failed = f"{type(err).__name__}: {err}"
                log.warning("CPU attention kernel unavailable (%s): batched SDPA instead",
                            _failed.splitlines()[0][:300])
        return _module


def failure() -> str | None:
    return _failed


def _fp32_cpu(x: torch.Tensor) -> bool:
    # a model's tensors share one dtype and device: the first input stands for them all
    # (a generator over every input was 0.14 ms of a 8 ms step: 56 calls a step)
    return x.dtype is torch.float32 and x.is_cpu


def use_fused_ops() -> None:
    """The CPU model's small ops (model.Ops) through this module's kernels where the
    tensors are fp32 on the CPU (the PyTorch ops otherwise). Call after `load` succeeded.
    Process-wide, as `Ops.use_triton` is on a GPU: they equal the PyTorch ops to fp32
    rounding, and an engine core process runs one model."""
    from cluster.engine import model

    def add_rms_norm(x, residual, weight, eps):
        if _fp32_cpu(x) and x.dim() == 2:
            return tuple(_module.add_rms_norm(x, residual, weight, eps))
        return model._add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(x):
        if _fp32_cpu(x) and x.dim() == 2:
            return _module.silu_and_mul(x)
        return model._silu_and_mul(x)

    def rope(q, k, cos_table, sin_table, positions):
        if _fp32_cpu(q) and q.dim() == 3 and q.stride(2) == 1 and k.stride(2) == 1:
            return tuple(_module.rope(q, k, cos_table, sin_table, positions))
        return model._rope(q, k, cos_table, sin_table, positions)

    for fn in (add_rms_norm, silu_and_mul, rope):
        setattr(model.Ops, fn.__name__, staticmethod(fn))


# Decode rows from which the attention runs on its own thread count: below, waking passive
# OpenMP threads costs more than the kernel saves.
ATTENTION_PARALLEL_MIN_ROWS = 16


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, threads: int | None = None) -> torch.Tensor:
    """threads (engine.cpu_attention_threads; None: the engine's own): the kernel is bound
    by memory bandwidth, which grows with the cores reading. Batch 64, contexts 192-320,
    caches evicted between calls: 2.64 ms a call on one thread, 1.38 on two; the engine
    alone at c=64 (projections on one thread) 3,028-3,105 -> 3,621-3,676 tok/s with two.
    Served on this 2-core machine, where the HTTP side needs the second core, it lost 7-13%."""
    before = torch.get_num_threads() if threads else 0
    if not threads or threads == before or q.shape[0] < ATTENTION_PARALLEL_MIN_ROWS:
        return _module.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    torch.set_num_threads(threads)
    try:
        return _module.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    finally:
        torch.set_num_threads(before)


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
