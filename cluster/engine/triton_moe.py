"""DeepSeek's routed experts as two grouped GEMMs in Triton (GPU), the reference being the
PyTorch path in `cluster/engine/moe.py` (`Experts.torch_forward`).

The (token, pick) assignments are sorted by expert on the device and each expert's segment is
padded to a multiple of BLOCK_M, so every row block of the sorted order belongs to one expert:
- kernel 1 gathers its tokens' rows of x, multiplies them by that expert's gate and up
  projections and writes silu(gate) * up (the [rows, 2I] product never reaches memory);
- kernel 2 multiplies those rows by the expert's down projection, scales each by its routing
  weight and writes it at its assignment's index; the k picks of a token are then summed.
Nothing reads a count on the host and every size is a bound fixed by the shapes (T * k + E *
(BLOCK_M - 1) rows at most), so a step with these kernels can be captured in a CUDA graph;
blocks past the last expert's segment see expert -1 and return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, n_assign, K, N, topk,
                    stride_xt, stride_we, stride_wn, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    """out[r, n] = silu(x[t] @ gate[e, n]) * (x[t] @ up[e, n]) for the sorted rows r of one
    block (t = its token, e = its expert); the up rows follow the N gate rows in w."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ptr + rows)
    live = assign < n_assign  # padding rows hold the sentinel n_assign
    token = (assign // topk).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_at = x_ptr + token[:, None] * stride_xt + ks[None, :]
    # [BLOCK_K, BLOCK_N] tiles of w[e] transposed: K is the contiguous axis of the weights
    g_at = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    u_at = g_at + N * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_at, mask=live[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        g = tl.load(g_at, mask=w_mask, other=0.0)
        u = tl.load(u_at, mask=w_mask, other=0.0)
        gate = tl.dot(a, g, gate, input_precision=PRECISION)
        up = tl.dot(a, u, up, input_precision=PRECISION)
        a_at += BLOCK_K
        g_at += BLOCK_K
        u_at += BLOCK_K
    # rounded where the torch path rounds: the projection's output, silu's, the product
    dt = out_ptr.dtype.element_ty
    gate = gate.to(dt).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    h = act * up.to(dt).to(tl.float32)
    out_at = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_at, h.to(dt), mask=col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, route_ptr, n_assign, K, N,
                 stride_hm, stride_we, stride_wn, stride_ot,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """out[a, n] = route[a] * (h[r] @ down[e, n]) for the sorted rows r of one block, written at
    their assignment a (padding rows are dropped)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ptr + rows)
    live = assign < n_assign
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_at = h_ptr + rows[:, None].to(tl.int64) * stride_hm + ks[None, :]
    w_at = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_at, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_at, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_at += BLOCK_K
        w_at += BLOCK_K
    dt = out_ptr.dtype.element_ty
    route = tl.load(route_ptr + assign, mask=live, other=0.0).to(dt).to(tl.float32)
    y = acc.to(dt).to(tl.float32) * route[:, None]
    out_at = out_ptr + assign[:, None].to(tl.int64) * stride_ot + cols[None, :]
    tl.store(out_at, y.to(dt), mask=live[:, None] & col_ok[None, :])


def block_m_for(assignments: int, experts: int) -> int:
    """Rows per block from the mean rows per expert: a decode step gives most experts a token
    or two, where larger blocks would only multiply padding."""
    per_expert = assignments / experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def align(ids: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [max_padded] int32, block_expert [max_padded // block_m] int32): the
    assignment indices t * k + j sorted (stably) by expert, each expert's segment padded to a
    multiple of block_m with the sentinel T * k, and the expert of each row block (-1 past the
    last segment). All on the device, sizes fixed by the shapes: no host sync.
    (Counts come from searching the sorted ids, not bincount, which reads max() on the host.)"""
    flat = ids.reshape(-1)
    n = flat.numel()
    max_padded = triton.cdiv(n + experts * (block_m - 1), block_m) * block_m
    sorted_e, order = torch.sort(flat, stable=True)
    e_range = torch.arange(experts, device=ids.device, dtype=sorted_e.dtype)
    first = torch.searchsorted(sorted_e, e_range)  # each expert's start in the sorted order
    counts = torch.searchsorted(sorted_e, e_range, right=True) - first
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    rank = torch.arange(n, device=ids.device) - first[sorted_e]
    dest = padded_start[sorted_e] + rank
    sorted_ids = torch.full((max_padded,), n, dtype=torch.int32, device=ids.device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, max_padded, block_m, device=ids.device)
    # the first expert whose padded segment ends past the block's start holds it (empty
    # experts' segments end where the previous one's do and are passed over)
    block_expert = torch.searchsorted(padded_end, starts, right=True)
    block_expert = torch.where(block_expert < experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


def fused_experts(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * down_proj[e] @ silu_and_mul(gate_up_proj[e] @ x[t]), e = ids[t, j]:
    x [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I], weights [T, k] float32, ids [T, k].
    Returns [T, H] in x's dtype; products accumulate in fp32."""
    tokens, hidden = x.shape
    experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    topk = ids.shape[1]
    if tokens == 0:
        return x.new_zeros(tokens, hidden)
    if x.stride(-1) != 1:
        x = x.contiguous()
    gate_up_proj = gate_up_proj if gate_up_proj.stride(-1) == 1 else gate_up_proj.contiguous()
    down_proj = down_proj if down_proj.stride(-1) == 1 else down_proj.contiguous()
    route = weights.reshape(-1).contiguous()
    n = tokens * topk
    block_m = block_m_for(n, experts)
    sorted_ids, block_expert = align(ids, experts, block_m)
    blocks = block_expert.numel()
    # tl.dot rounds fp32 inputs to tf32 by default: an fp32 model must stay fp32
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    wide = x.element_size() >= 4  # fp32 tiles take twice the shared memory per stage
    block_k = 32 if wide else 64
    stages = 2 if wide else 3 if block_m == 64 else 4

    h = torch.empty(sorted_ids.numel(), inter, dtype=x.dtype, device=x.device)
    block_n1 = 64
    _gate_up_kernel[(blocks, triton.cdiv(inter, block_n1))](
        x, gate_up_proj, h, sorted_ids, block_expert, n, hidden, inter, topk,
        x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), h.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n1, BLOCK_K=block_k, PRECISION=precision,
        num_warps=4, num_stages=stages)

    out = torch.empty(n, hidden, dtype=x.dtype, device=x.device)
    block_n2 = 64 if block_m == 16 or wide else 128  # decode: more programs for bandwidth
    _down_kernel[(blocks, triton.cdiv(hidden, block_n2))](
        h, down_proj, out, sorted_ids, block_expert, route, n, inter, hidden,
        h.stride(0), down_proj.stride(0), down_proj.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n2, BLOCK_K=block_k, PRECISION=precision,
        num_warps=4, num_stages=stages)
    return out.view(tokens, topk, hidden).sum(1)
