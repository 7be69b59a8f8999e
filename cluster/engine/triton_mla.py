"""MLA decode in Triton (GPU): the absorbed-query attention of mla_attention.latent_decode
over the compressed paged cache, without gathering every row's blocks into a dense tensor
(that copy is as large as the cache it reads, and its length comes from the host).

Every head of a row attends over the same cache entries (one [latent, k_pe] vector per
token), so one program takes a block of BLOCK_H heads of one row and reads each entry once
for all of them: scores = q_latent . latent + q_pe . k_pe (two dots, rank and rope wide), and
the latent tile just read is the value too (acc += p @ latent), so the cache is read once.
As in triton_attention's decode kernel, a row's context is cut into `num_splits` pieces
(flash decoding: a small batch with long contexts still fills the GPU), merged by a second
kernel through their log-sum-exp; the grid and the split count come from tensor shapes only,
never from context lengths, so the kernel can be captured in a CUDA graph. Rows of context 0
come out as zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores are kept in base 2: exp2 is the cheap exponential


@triton.jit
def _mla_split_kernel(
    q_ptr, kv_ptr, tables_ptr, ctx_ptr, mid_o_ptr, mid_lse_ptr, out_ptr, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_tb,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
    HEADS: tl.constexpr, BLOCK_H: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr,
    RANK_P: tl.constexpr, ROPE_P: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    live = h < HEADS  # padding heads: zero queries, never stored
    # widths padded to powers of two (tl.arange) of at least 16 (tl.dot), masked past them
    lat = tl.arange(0, RANK_P)
    lat_ok = lat < RANK
    pe_at = tl.arange(0, ROPE_P)
    pe_ok = pe_at < ROPE
    pe = RANK + pe_at
    q_row = q_ptr + b * stride_qb + h[:, None] * stride_qh
    kv_dtype = kv_ptr.dtype.element_ty
    q_lat = tl.load(q_row + lat[None, :], mask=live[:, None] & lat_ok[None, :],
                    other=0.0).to(kv_dtype)
    q_pe = tl.load(q_row + pe[None, :], mask=live[:, None] & pe_ok[None, :],
                   other=0.0).to(kv_dtype)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    ell = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, RANK_P], tl.float32)
    for n0 in range(start, end, BLOCK_N):  # every tile holds at least one live token
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        block = tl.load(tables_ptr + b * stride_tb + n // PAGE, mask=valid, other=0)
        entry = kv_ptr + block.to(tl.int64) * stride_kb + (n % PAGE) * stride_ks
        k_lat = tl.load(entry[:, None] + lat[None, :], mask=valid[:, None] & lat_ok[None, :],
                        other=0.0)
        k_pe = tl.load(entry[:, None] + pe[None, :], mask=valid[:, None] & pe_ok[None, :],
                       other=0.0)
        s = tl.dot(q_lat, tl.trans(k_lat), input_precision=PRECISION)
        s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=PRECISION)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)  # 0 on the first tile (m = -inf)
        acc = tl.dot(p.to(kv_dtype), k_lat, acc=acc * alpha[:, None], input_precision=PRECISION)
        ell = ell * alpha + tl.sum(p, 1)
        m = m_new
    has = ell > 0  # false for an empty split: its output is 0, its weight exp2(-inf) = 0
    o = acc / tl.where(has, ell, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * stride_ob + h[:, None] * stride_oh + lat[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=live[:, None] & lat_ok[None, :])
    else:
        lse = tl.where(has, m + tl.log2(tl.where(has, ell, 1.0)), float("-inf"))
        mid = b * stride_mb + h * stride_mh + split * stride_ms
        tl.store(mid_o_ptr + mid[:, None] + lat[None, :], o,
                 mask=live[:, None] & lat_ok[None, :])
        tl.store(mid_lse_ptr + b * stride_lb + h * stride_lh + split, lse, mask=live)


@triton.jit
def _mla_merge_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, stride_mb, stride_mh, stride_ms,
                      stride_lb, stride_lh, stride_ob, stride_oh, RANK: tl.constexpr,
                      RANK_P: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      SPLITS_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    lse_at = mid_lse_ptr + b * stride_lb + h * stride_lh
    lse = tl.load(lse_at + s, mask=s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row of context 0: every weight is 0
    total = tl.sum(tl.exp2(lse - m), 0)
    lat = tl.arange(0, RANK_P)
    lat_ok = lat < RANK
    o_at = mid_o_ptr + b * stride_mb + h * stride_mh + lat
    acc = tl.zeros([RANK_P], tl.float32)
    for i in range(NUM_SPLITS):  # one split's [RANK] at a time, not all of them at once
        w = tl.exp2(tl.load(lse_at + i) - m)
        acc += w * tl.load(o_at + i * stride_ms, mask=lat_ok, other=0.0)
    res = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + lat, res.to(out_ptr.dtype.element_ty),
             mask=lat_ok)


def supports(rank: int, rope: int) -> bool:
    """Widths the kernel takes: any, padded (and masked) to powers of two of at least 16;
    a [BLOCK_H, rank] accumulator must fit a program's registers."""
    return 1 <= rank <= 1024 and 1 <= rope <= 256


def _padded(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def _num_splits(device: torch.device, batch: int, head_blocks: int, max_context: int) -> int:
    if device.type != "cuda":  # Triton's interpreter (CPU tensors): any count is correct
        return max(1, min(4, max_context // 256))
    from cluster.engine.triton_attention import _num_splits as splits_for

    return splits_for(batch, head_blocks, max_context)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, scale: float, rank: int,
               out: torch.Tensor | None = None, num_splits: int | None = None,
               block_h: int = 16, block_n: int | None = None, num_warps: int = 4,
               num_stages: int = 2) -> torch.Tensor:
    """q [batch, heads, cache_dim] (latent query, then q_pe); kv_cache [num_blocks,
    block_size, cache_dim]; block_tables [batch, max_blocks] int32; context_lens [batch]
    int32 on the device. Returns the attended latents [batch, heads, rank] (in `out` if
    given; q's dtype otherwise), zeros for rows of context 0."""
    batch, heads, dim = q.shape
    _, page, cache_dim = kv_cache.shape
    rope = cache_dim - rank
    assert dim == cache_dim and supports(rank, rope), (dim, cache_dim, rank)
    assert q.stride(2) == 1 and kv_cache.stride(2) == 1
    assert block_h >= 16 and block_h & (block_h - 1) == 0
    out = q.new_empty(batch, heads, rank) if out is None else out
    assert out.shape == (batch, heads, rank) and out.stride(2) == 1
    if batch == 0:
        return out
    head_blocks = triton.cdiv(heads, block_h)
    # a power of two: the count is a compile-time constant, and eager steps' table widths
    # (their longest context) would otherwise compile a variant for every count
    splits = num_splits or 1 << (_num_splits(q.device, batch, head_blocks,
                                             block_tables.shape[1] * page) - 1).bit_length()
    mid_o = torch.empty(batch, heads, splits, rank, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    wide = kv_cache.element_size() > 2
    _mla_split_kernel[(batch, head_blocks, splits)](
        q, kv_cache, block_tables, context_lens, mid_o, mid_lse, out, scale * LOG2E,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        block_tables.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        HEADS=heads, BLOCK_H=block_h, RANK=rank, ROPE=rope, RANK_P=_padded(rank),
        ROPE_P=_padded(rope), PAGE=page,
        BLOCK_N=block_n or (16 if wide else 32), NUM_SPLITS=splits,
        # tl.dot rounds fp32 inputs to tf32 by default: an fp32 cache stays fp32
        PRECISION="ieee" if wide else "tf32", num_warps=num_warps, num_stages=num_stages)
    if splits > 1:  # one split wrote `out` itself
        _mla_merge_kernel[(batch, heads)](
            mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
            mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1), RANK=rank,
            RANK_P=_padded(rank), NUM_SPLITS=splits,
            SPLITS_PAD=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out
