"""DeepSeek mixture-of-experts: the router (V2 softmax / V3 sigmoid with grouped top-k), the
routed experts as stacked weights, the shared experts.

The experts run grouped: the (token, expert) assignments are sorted by expert, each active
expert runs one matmul pair over its tokens, and the weighted outputs are summed back per token
with one index_add. The Python loop is over experts, never tokens. The expert counts read here
sync the host; on the GPU, where the model runner set `Experts.fused`, the fused kernels of
`triton_moe` replace this path (no host sync, so a step can be captured in a CUDA graph).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cluster.deepseek_arch import DeepseekDims
from cluster.engine.model import Ops
from cluster.engine.parallel import TP


class GatedMLP(nn.Module):
    """SiLU-gated MLP with gate and up fused into one matmul; the caller all-reduces."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(Ops.silu_and_mul(self.gate_up_proj(x)))


class Router(nn.Module):
    """Top-k experts per token and their weights. Kept in float32 whatever the model's dtype
    (as the checkpoints and transformers keep it): bf16 scores would flip near-tied choices."""

    def __init__(self, hidden: int, dims: DeepseekDims):
        super().__init__()
        self.dims = dims
        e = dims.n_routed_experts
        self.weight = nn.Parameter(torch.empty(e, hidden, dtype=torch.float32))
        # V3 only: added to the scores for the choice of experts, not for their weights
        self.e_score_correction_bias = nn.Parameter(torch.zeros(e, dtype=torch.float32)) \
            if dims.topk_method == "noaux_tc" else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([tokens, k] float32 weights, [tokens, k] int64 expert ids)."""
        d = self.dims
        logits = F.linear(x.float(), self.weight)
        if d.topk_method == "noaux_tc":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
            group_scores = choice.view(len(x), d.n_group, -1).topk(2, dim=-1)[0].sum(-1)
            choice = _keep_groups(choice, group_scores, d.topk_group, float("-inf"))
            ids = choice.topk(d.num_experts_per_tok, dim=-1)[1]
            weights = scores.gather(1, ids)
        else:
            scores = logits.softmax(-1)
            if d.topk_method == "group_limited_greedy":
                group_scores = scores.view(len(x), d.n_group, -1).amax(-1)
                scores = _keep_groups(scores, group_scores, d.topk_group, 0.0)
            weights, ids = scores.topk(d.num_experts_per_tok, dim=-1)
        # renormalized where the config says so, then scaled. (transformers' V2 port ignores
        # norm_topk_prob; every released V2 checkpoint has it false, where the two agree.)
        if d.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * d.routed_scaling_factor, ids


def _keep_groups(scores: torch.Tensor, group_scores: torch.Tensor, keep: int,
                 fill: float) -> torch.Tensor:
    """scores with the experts outside each token's `keep` best groups set to `fill`."""
    tokens, groups = group_scores.shape
    best = group_scores.topk(keep, dim=-1)[1]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    mask = mask[:, :, None].expand(tokens, groups, scores.shape[1] // groups).reshape(tokens, -1)
    return scores.masked_fill(~mask, fill)


class Experts(nn.Module):
    """The routed experts' weights stacked as transformers holds them:
    gate_up_proj [experts, 2 * intermediate, hidden] (gate rows first), down_proj
    [experts, hidden, intermediate]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        # triton_moe.fused_experts where the model runner chose the kernels (this model's,
        # not the process's: another engine in the process may run the reference); CUDA
        # inputs then take it, CPU inputs still take the torch path
        self.fused: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.fused is not None:
            return self.fused(x, self.gate_up_proj, self.down_proj, weights, ids)
        return self.torch_forward(x, weights, ids)

    def torch_forward(self, x: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
        """The reference: one matmul pair per active expert (the counts sync the host)."""
        k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        token = order // k  # the token of each assignment, in expert order
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        xs = x.index_select(0, token)
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                h = Ops.silu_and_mul(F.linear(xs[start : start + n], self.gate_up_proj[e]))
                ys[start : start + n] = F.linear(h, self.down_proj[e])
            start += n
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)


class MoE(nn.Module):
    def __init__(self, hidden: int, dims: DeepseekDims, tp: TP):
        super().__init__()
        self.tp = tp
        self.gate = Router(hidden, dims)
        # each rank holds a slice of every expert's intermediate width (not whole experts:
        # the load stays even however the router picks)
        self.experts = Experts(dims.n_routed_experts, hidden,
                               tp.split(dims.moe_intermediate_size, "moe_intermediate_size"))
        self.shared_experts = GatedMLP(hidden, tp.split(
            dims.moe_intermediate_size * dims.n_shared_experts, "shared experts' width")) \
            if dims.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.tp.all_reduce(out)
