"""Loads Hugging Face safetensors checkpoints into CausalLM, fusing q/k/v and gate/up
(DeepSeek's checkpoints: deepseek_loader.py)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from cluster.engine.deepseek_loader import load_deepseek_weights
from cluster.engine.model import CausalLM

# checkpoint name piece -> (our fused parameter, shard index among its parts)
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, object]]:
    """Yields lazy slices: a rank reads only its shard of each tensor from disk."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_slice(name)


def load_weights(model: CausalLM, weights: Iterable[tuple[str, object]],
                 source: str = "checkpoint") -> None:
    """Copies Hugging Face-named tensors (from files or a live HF model) into our model."""
    if model.arch.deepseek is not None:
        return load_deepseek_weights(model, weights, source)
    params = dict(model.named_parameters(remove_duplicate=False))
    arch = model.arch
    lay, tp = model.layout, model.tp
    q, kv = lay.heads * arch.head_dim, lay.kv_heads * arch.head_dim
    offsets = {"qkv_proj": [0, q, q + kv], "gate_up_proj": [0, lay.intermediate]}
    loaded: set[str] = set()
    # progress on stderr when it is a terminal (a real checkpoint takes a while to read)
    for name, tensor in tqdm(weights, desc=f"loading {Path(str(source)).name}", unit=" tensors",
                             disable=None, leave=False):
        if "rotary_emb" in name:
            continue
        target = name.removeprefix("model.")
        shard = None
        for piece, (fused, idx) in _FUSED.items():
            if f".{piece}." in target:
                target, shard = target.replace(piece, fused), idx
                break
        if target not in params:
            continue
        param = params[target]
        cut = lay.shard(target, shard, arch, tp)
        if cut is None:
            tensor = tensor[:]
        elif cut[0] == 0:
            tensor = tensor[cut[1] : cut[1] + cut[2]]
        else:
            tensor = tensor[:, cut[1] : cut[1] + cut[2]]
        with torch.no_grad():
            if shard is None:  # vocab shards of the last rank may be shorter than the param
                param[: tensor.shape[0]].copy_(tensor)
            else:
                start = offsets[target.split(".")[-2]][shard]
                param[start : start + tensor.shape[0]].copy_(tensor)
        loaded.add(target if shard is None else f"{target}#{shard}")
    missing = [name for n in params for name in _unloaded(n, loaded)]
    if arch.tie_word_embeddings:
        missing = [n for n in missing if n != "lm_head.weight"]
    if missing:
        raise ValueError(f"{source}: lacks {len(missing)} tensors: {missing[:5]}")


def _unloaded(param: str, loaded: set[str]) -> list[str]:
    """The checkpoint names of what this parameter still lacks: every part of a fused
    parameter must have been loaded (a checkpoint without k_proj must not pass because
    q_proj and v_proj were there)."""
    parts = [(piece, fused, idx) for piece, (fused, idx) in _FUSED.items()
             if f".{fused}." in param]
    if not parts:
        return [] if param in loaded else [_hf_name(param)]
    return [_hf_name(param.replace(fused, piece)) for piece, fused, idx in parts
            if f"{param}#{idx}" not in loaded]


def _hf_name(param: str) -> str:
    return param if param.startswith("lm_head") else f"model.{param}"
