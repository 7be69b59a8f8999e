"""Paged attention kernels in Triton (GPU). Layout and semantics: cluster/engine/attention.py,
whose PyTorch functions are the reference these are tested against (tests/gpu).

- decode: one query per sequence, flash-decoding style. The KV range of a sequence is cut
  into `num_splits` pieces handled by separate programs (so a small batch with long contexts
  still fills the GPU); all query heads that share a KV head are one program (GQA packing),
  so each K/V tile is read once. A second kernel merges the pieces by their log-sum-exp
  (with one piece the first kernel writes the output itself).
  Grid and split count depend only on tensor shapes, never on context lengths, so the kernel
  is captured in CUDA graphs.
- prefill: flash-attention forward over query tiles of varlen sequences, reading K/V through
  the block table, causal with the queries at the end of each context: this covers fresh
  prompts, chunked prefill and prefix-cache hits alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cluster.engine.attention import PREFILL_BLOCK_M, prefill_tile_lists


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, mid_o_ptr, mid_lse_ptr, out_ptr, scale,
    stride_qb, stride_qh, stride_kslot, stride_kh, stride_tb,
    stride_mb, stride_mh, stride_ms, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    ell = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        block = tl.load(tables_ptr + b * stride_tb + n // PAGE, mask=valid, other=0)
        slot = block.to(tl.int64) * PAGE + n % PAGE
        kv_off = slot[:, None] * stride_kslot + kvh * stride_kh + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0).to(q.dtype)  # fp8 KV
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        ell = ell * alpha + tl.sum(p, 1)
        m = m_new
    has = ell > 0
    out = acc / tl.where(has, ell, 1.0)[:, None]
    live = g < GROUP
    out_at = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=live[:, None])
    else:
        lse = tl.where(has, m + tl.log(tl.where(has, ell, 1.0)), float("-inf"))
        mid = b * stride_mb + heads * stride_mh
        tl.store(mid_o_ptr + (mid + split * stride_ms)[:, None] + d[None, :], out,
                 mask=live[:, None])
        # mid_lse is [batch, heads, splits]: mid_o's strides without the head_dim factor
        mid_lse = mid_lse_ptr + mid // HEAD_DIM
        tl.store(mid_lse + split, lse, mask=live)


@triton.jit
def _decode_merge_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, stride_mb, stride_mh, stride_ms,
                         stride_ob, stride_oh, HEAD_DIM: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    base = b * stride_mb + h * stride_mh
    lse = tl.load(mid_lse_ptr + base // HEAD_DIM + s, mask=s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    o = tl.load(mid_o_ptr + base + s[:, None] * stride_ms + d[None, :],
                mask=(s < NUM_SPLITS)[:, None], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, res.to(out_ptr.dtype.element_ty))


def _precision(q: torch.Tensor) -> str:
    # tl.dot rounds fp32 inputs to tf32 by default: an fp32 model must stay fp32
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _num_splits(batch: int, kv_heads: int, max_context: int) -> int:
    """Enough programs to cover the SMs twice, no split shorter than 256 tokens."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    want = max(1, (2 * sms) // max(1, batch * kv_heads))
    cap = max(1, max_context // 256)
    return int(min(want, cap, 32))


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, out=None,
                           num_splits=None, block_n=None, num_warps=4, num_stages=2):
    batch, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    splits = num_splits or _num_splits(batch, kv_heads, block_tables.shape[1] * page)
    out = torch.empty_like(q) if out is None else out
    mid_o = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    assert mid_o.stride(1) == splits * dim and mid_lse.stride(1) == splits
    k_flat = k_cache.view(-1, kv_heads, dim)
    v_flat = v_cache.view(-1, kv_heads, dim)
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_flat, v_flat, block_tables, context_lens, mid_o, mid_lse, out, scale,
        q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1), block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
        PAGE=page, BLOCK_N=block_n or (64 if dim <= 64 else 32), NUM_SPLITS=splits,
        PRECISION=_precision(q), num_warps=num_warps, num_stages=num_stages)
    if splits > 1:  # one split wrote `out` itself
        _decode_merge_kernel[(batch, heads)](
            mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            out.stride(0), out.stride(1), HEAD_DIM=dim, NUM_SPLITS=splits,
            SPLITS_PAD=max(2, triton.next_power_of_2(splits)), num_warps=1)
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, ctx_ptr, cu_q_ptr, tile_seq_ptr, tile_start_ptr,
    scale, stride_qt, stride_qh, stride_kslot, stride_kh, stride_tb, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    b = tl.load(tile_seq_ptr + tile)
    i0 = tl.load(tile_start_ptr + tile)
    q_first = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_first
    ctx = tl.load(ctx_ptr + b)
    i = i0 + tl.arange(0, BLOCK_M)
    rows = i < q_len
    pos = ctx - q_len + i
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_first + i)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rows[:, None], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    ell = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    last = tl.minimum(ctx, ctx - q_len + i0 + BLOCK_M)  # causal: nothing past the last row
    for n0 in range(0, last, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < last
        block = tl.load(tables_ptr + b * stride_tb + n // PAGE, mask=valid, other=0)
        slot = block.to(tl.int64) * PAGE + n % PAGE
        kv_off = slot[:, None] * stride_kslot + kvh * stride_kh + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0).to(q.dtype)  # fp8 KV
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        ell = ell * alpha + tl.sum(p, 1)
        m = m_new
    out = acc / tl.where(ell > 0, ell, 1.0)[:, None]
    tl.store(out_ptr + (q_first + i)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rows[:, None])


def prefill_tiles(cu_seqlens_q_host: list[int], device, first_seq: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first query row) of every BLOCK_M query tile of sequences >= first_seq,
    built on the host."""
    seqs, starts = prefill_tile_lists(cu_seqlens_q_host, first_seq)
    t = torch.tensor([seqs, starts], dtype=torch.int32).to(device, non_blocking=True)
    return t[0], t[1]


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                            scale, max_query_len=None, cu_seqlens_q_host=None, first_seq=0,
                            out=None, tiles=None):
    """Sequences before `first_seq` are left out (their rows of `out` are not written).
    tiles: prefill_tiles(...) of this step, built once for all layers."""
    tokens, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    if tiles is None:
        host = cu_seqlens_q_host if cu_seqlens_q_host is not None else cu_seqlens_q.tolist()
        tiles = prefill_tiles(host, q.device, first_seq)
    tile_seq, tile_start = tiles
    out = torch.empty_like(q) if out is None else out
    if tile_seq.numel() == 0:
        return out
    k_flat = k_cache.view(-1, kv_heads, dim)
    v_flat = v_cache.view(-1, kv_heads, dim)
    _prefill_kernel[(tile_seq.numel(), heads)](
        q, k_flat, v_flat, out, block_tables, context_lens, cu_seqlens_q, tile_seq, tile_start,
        scale, q.stride(0), q.stride(1), k_flat.stride(0), k_flat.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, HEAD_DIM=dim, PAGE=page, BLOCK_M=PREFILL_BLOCK_M,
        BLOCK_N=64 if dim <= 64 else 32, PRECISION=_precision(q), num_warps=4, num_stages=2)
    return out


@triton.jit
def _to_cache(x, cache_ptr):
    """fp32 values as the cache holds them: rounded to its dtype; an fp8 (e4m3) cache holds
    them unscaled and saturating (casts past +-448 would be NaN)."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = tl.clamp(x, -448.0, 448.0)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, stride_kt, stride_vt, stride_ct,
                     WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        x = tl.arange(0, WIDTH_PAD)
        mask = x < WIDTH
        k = _to_cache(tl.load(k_ptr + t * stride_kt + x, mask=mask).to(tl.float32), kc_ptr)
        v = _to_cache(tl.load(v_ptr + t * stride_vt + x, mask=mask).to(tl.float32), vc_ptr)
        tl.store(kc_ptr + slot * stride_ct + x, k, mask=mask)
        tl.store(vc_ptr + slot * stride_ct + x, v, mask=mask)


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """One kernel writes K and V ([tokens, kv_heads, dim]) to their slots; slots < 0 skip."""
    tokens, kv_heads, dim = k.shape
    if tokens == 0:
        return
    k2, v2 = k.reshape(tokens, -1), v.reshape(tokens, -1)
    assert k2.stride(1) == 1 and v2.stride(1) == 1
    width = kv_heads * dim
    _store_kv_kernel[(tokens,)](k2, v2, k_cache, v_cache, slot_mapping, k2.stride(0),
                                v2.stride(0), width,
                                WIDTH=width, WIDTH_PAD=triton.next_power_of_2(width))


@triton.jit
def _rope_store_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
                          slots_ptr, stride_qt, stride_kt, stride_vt, stride_ct, stride_cos,
                          HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                          HEADS_PAD: tl.constexpr, KV_PAD: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    j = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + pos * stride_cos + j)
    sin = tl.load(sin_ptr + pos * stride_cos + j)
    h = tl.arange(0, HEADS_PAD)[:, None]
    qm = h < HEADS
    qa = q_ptr + t * stride_qt + h * (2 * HALF) + j
    x1 = tl.load(qa, mask=qm).to(tl.float32)
    x2 = tl.load(qa + HALF, mask=qm).to(tl.float32)
    tl.store(qa, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=qm)
    tl.store(qa + HALF, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=qm)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        kh = tl.arange(0, KV_PAD)[:, None]
        km = kh < KV_HEADS
        ka = k_ptr + t * stride_kt + kh * (2 * HALF) + j
        y1 = tl.load(ka, mask=km).to(tl.float32)
        y2 = tl.load(ka + HALF, mask=km).to(tl.float32)
        ca = kc_ptr + slot * stride_ct + kh * (2 * HALF) + j
        tl.store(ca, _to_cache(y1 * cos - y2 * sin, kc_ptr), mask=km)
        tl.store(ca + HALF, _to_cache(y2 * cos + y1 * sin, kc_ptr), mask=km)
        jj = tl.arange(0, 2 * HALF)[None, :]
        vals = tl.load(v_ptr + t * stride_vt + kh * (2 * HALF) + jj, mask=km).to(tl.float32)
        tl.store(vc_ptr + slot * stride_ct + kh * (2 * HALF) + jj, _to_cache(vals, vc_ptr),
                 mask=km)


def rope_store_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    """Rotate-half RoPE on q (in place, returned) and k, then k and v written to their cache
    slots (slots < 0 skip), in one kernel. q, k, v: [tokens, heads, dim], rows may be strided
    (views into the fused qkv output); cos, sin: [positions, dim / 2] float32 tables."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    half = dim // 2
    if tokens == 0:
        return q
    if half & (half - 1) or q.stride(2) != 1 or q.stride(1) != dim or k.stride(1) != dim \
            or v.stride(1) != dim or k.stride(2) != 1 or v.stride(2) != 1:
        from cluster.engine.model import _rope  # odd head sizes or layouts: the plain path

        q, k = _rope(q, k, cos, sin, positions)
        store_kv(k, v, k_cache, v_cache, slot_mapping)
        return q
    kc = k_cache.view(-1, kv_heads * dim)
    vc = v_cache.view(-1, kv_heads * dim)
    _rope_store_kv_kernel[(tokens,)](
        q, k, v, positions, cos, sin, kc, vc, slot_mapping, q.stride(0), k.stride(0),
        v.stride(0), kc.stride(0), cos.stride(0), HEADS=heads, KV_HEADS=kv_heads, HALF=half,
        HEADS_PAD=triton.next_power_of_2(heads), KV_PAD=triton.next_power_of_2(kv_heads),
        num_warps=4 if heads * dim <= 4096 else 8)
    return q
