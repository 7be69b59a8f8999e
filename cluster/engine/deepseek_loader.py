"""Loads DeepSeek-V2/V3 checkpoints into DeepseekForCausalLM.

Checkpoint names differ from ours in three ways:
- routed experts come one tensor per expert and projection
  (`mlp.experts.{e}.{gate,up,down}_proj.weight`); they go into the stacked
  `mlp.experts.gate_up_proj` [experts, 2 * inter, hidden] and `mlp.experts.down_proj`
  [experts, hidden, inter] (a live transformers model's state dict has those stacked names
  already, and loads as is);
- gate_proj/up_proj of the dense and shared-expert MLPs go into one fused gate_up_proj;
- layers past num_hidden_layers are multi-token-prediction (MTP) modules, a draft head for
  speculative decoding: skipped, and said so in the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

_EXPERT = re.compile(r"(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_LAYER = re.compile(r"layers\.(\d+)\.")
WHOLE = "whole"


def load_deepseek_weights(model, weights: Iterable[tuple[str, object]],
                          source: str = "checkpoint") -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    todo = {name: _pieces(name, p) for name, p in params.items()}
    mtp = 0
    for name, tensor in tqdm(weights, desc=f"loading {Path(str(source)).name}", unit=" tensors",
                             disable=None, leave=False):
        target = name.removeprefix("model.")
        if target.endswith("_scale_inv"):
            raise ValueError(f"{source}: FP8 block-quantized weights ({name}) are not supported; "
                             "use a bf16 checkpoint")
        layer = _LAYER.match(target)
        if layer and int(layer[1]) >= model.arch.num_layers:
            mtp += 1
            continue
        placed = _place(target, params)
        if placed is None:
            continue
        param, index, piece = placed
        with torch.no_grad():
            dest = params[param][index]
            src = _rank_slice(param, tensor, dest.shape, model.tp)
            dest.narrow(0, 0, src.shape[0]).copy_(src)  # the last vocab shard may be short
        if piece == WHOLE:
            todo[param].clear()
        else:
            todo[param].discard(piece)
    if mtp:
        log.info("%s: skipped %d tensors of the multi-token-prediction layers (a draft head; "
                 "not used)", source, mtp)
    missing = [n for n, left in todo.items() if left]
    if model.arch.tie_word_embeddings:
        missing = [n for n in missing if n != "lm_head.weight"]
    if missing:
        raise ValueError(f"{source}: lacks tensors for {len(missing)} parameters: {missing[:5]}")


def _shape(tensor) -> tuple[int, ...]:
    return tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape)


def _rank_slice(param: str, tensor, dest: torch.Size, tp) -> torch.Tensor:
    """This rank's part of a checkpoint tensor for a place of `dest`'s shape (reading only
    that part of a lazy safetensors slice). Under tensor parallelism a sharded place is
    smaller than the tensor along exactly one dim, and the rank takes its block there:
    heads are contiguous row blocks of q_(b_)proj and kv_b_proj and column blocks of o_proj,
    an MLP's intermediate units rows of gate/up and columns of down, vocab rows of the
    embedding and the head. A live model's stacked experts.gate_up_proj holds gate rows
    then up rows: each half is cut on its own."""
    full = _shape(tensor)
    if tp.size == 1 or full == tuple(dest):
        return tensor[:]
    dims = [d for d, (a, b) in enumerate(zip(full, dest, strict=True)) if a != b]
    if len(dims) != 1:
        raise ValueError(f"{param}: checkpoint shape {full} does not shard into {tuple(dest)}")
    d, n = dims[0], dest[dims[0]]
    if param.endswith("experts.gate_up_proj") and d == 1:
        half, part = full[1] // 2, n // 2
        whole = tensor[:]
        return torch.cat([whole[:, h * half + tp.rank * part : h * half + (tp.rank + 1) * part]
                          for h in (0, 1)], dim=1)
    start = tp.rank * n
    return tensor[(slice(None),) * d + (slice(start, min(start + n, full[d])),)]


def _pieces(name: str, param: torch.Tensor) -> set:
    """What must be loaded into a parameter: itself whole, or every piece of it."""
    if name.endswith("experts.gate_up_proj"):
        return {(e, part) for e in range(param.shape[0]) for part in (0, 1)}
    if name.endswith("experts.down_proj"):
        return set(range(param.shape[0]))
    if name.endswith("gate_up_proj.weight"):
        return {0, 1}
    return {WHOLE}


def _place(target: str, params: dict) -> tuple[str, object, object] | None:
    """(our parameter, the index of the checkpoint tensor within it, the piece it fills);
    None for a tensor we do not use (e.g. rotary_emb.inv_freq)."""
    if target in params:
        return target, ..., WHOLE
    if m := _EXPERT.match(target):
        stacked, e, proj = m[1], int(m[2]), m[3]
        if proj == "down":
            return f"{stacked}.down_proj", e, e
        half = params[f"{stacked}.gate_up_proj"].shape[1] // 2
        part = 0 if proj == "gate" else 1
        return f"{stacked}.gate_up_proj", (e, slice(part * half, (part + 1) * half)), (e, part)
    for proj, part in ((".gate_proj.", 0), (".up_proj.", 1)):
        fused = target.replace(proj, ".gate_up_proj.")
        if proj in target and fused in params:
            half = params[fused].shape[0] // 2
            return fused, slice(part * half, (part + 1) * half), part
    return None


def synthetic_deepseek_weights(model, seed: int):
    """Checkpoint-named random tensors (std 0.02, norms 1, no correction bias) in our own
    layout (stacked experts, fused gate_up), which the loader takes whole; seeded per tensor
    so that a shape's runs agree."""
    for i, (name, p) in enumerate(model.named_parameters()):
        hf = name if name.startswith("lm_head") else f"model.{name}"
        if name.endswith("norm.weight"):
            yield hf, torch.ones_like(p)
        elif name.endswith("e_score_correction_bias"):
            yield hf, torch.zeros_like(p)
        else:
            g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
            yield hf, (torch.randn(p.shape, generator=g, device=p.device) * 0.02).to(p.dtype)
