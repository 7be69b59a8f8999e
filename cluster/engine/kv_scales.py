"""Scales of an fp8 (e4m3) KV cache: one for K and one for V per layer and KV head.

The cache holds k / k_scale and v / v_scale. Unscaled (a scale of 1.0, vLLM's default
without calibrated scales), e4m3 saturates at +-448 and loses precision below 2^-6: a model
whose keys run into the hundreds (Qwen2's k_proj bias does) or whose values are small gets
a cache that is wrong, not just rounded. Attention needs no kernel of its own for the
scales: a per-head scalar comes out of both products, softmax(s * q.(k_scale * k')) =
softmax(s * (q * k_scale).k') and sum p (v_scale * v') = v_scale * sum p v', so
`model.Attention` multiplies q before and the output after whatever backend attends (the
C++ kernel, the Triton kernels, a CUDA graph's replay) and divides K and V before they are
stored. Rotary embedding is linear in q and k, so the order does not matter.

Scales are powers of two: dividing and multiplying by one is exact in every dtype, and
two replicas of one checkpoint that calibrate a hair apart still get the same scales (the
cluster KV pool shares blocks between them; kv_tier.model_key includes the scales too).

Where they come from (`engine.kv_cache_scales`): `auto` takes the checkpoint's
(compressed-tensors / llm-compressor `self_attn.k_scale` and `v_scale`, or the older
`k_proj.output_scale` / `v_proj.output_scale`: a scalar per layer, or one per KV head) and
otherwise calibrates; `calibrate` always does; `none` keeps 1.0.
Calibration runs the model once at load over CALIBRATION_TOKENS seeded token ids (at most
max_model_len), with no cache: a backend records each head's K / V amax after rotary and
attends with causal SDPA. It sets scale = 2^ceil(log2(amax * HEADROOM / 448)): values up to
HEADROOM times what calibration saw fit before saturating, and of e4m3's normal range
(2^-6..448, 14.8 binary orders) about 12.8 stay below the calibrated amax. On a
tensor-parallel group every rank runs the same forward (its all-reduces meet) and keeps its
own heads' scales.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cluster.engine.attention import UncachedBackend

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
HEADROOM = 4.0
CALIBRATION_TOKENS = 512
_CHECKPOINT_NAMES = (
    re.compile(r"layers\.(\d+)\.self_attn\.([kv])_scale$"),
    re.compile(r"layers\.(\d+)\.self_attn\.([kv])_proj\.output_scale$"),
)


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """The power of two that maps amax * HEADROOM to e4m3's largest finite value or under."""
    amax = amax.float().clamp_min(1e-30)
    return torch.exp2(torch.ceil(torch.log2(amax * HEADROOM / FP8_MAX)))


class AmaxBackend(UncachedBackend):
    """Records each KV head's |K| and |V| maxima (after rotary), per layer in call order."""

    def __init__(self):
        self.amax: list[torch.Tensor] = []

    def seen(self, k, v) -> None:
        self.amax.append(torch.stack([k.abs().amax(dim=(0, 2)), v.abs().amax(dim=(0, 2))])
                         .float())


@torch.inference_mode()
def calibrate(model, vocab_size: int, device: torch.device,
              tokens: int = CALIBRATION_TOKENS, seed: int = 0) -> list[torch.Tensor]:
    """Per layer, [2, kv_heads] scales (K, V) from one forward over seeded token ids
    (tokens: at most the model's rotary table, max_model_len)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (tokens,), generator=g).to(device)
    positions = torch.arange(tokens, device=device)
    backend, model.backend = model.backend, AmaxBackend()
    try:
        model(ids, positions, None)
        amax = model.backend.amax
    finally:
        model.backend = backend
    return [pow2_scale(a) for a in amax]


def from_checkpoint(model_dir: str, num_layers: int, kv_heads: int, head_offset: int,
                    total_kv_heads: int) -> list[torch.Tensor] | None:
    """The checkpoint's K/V scales as [2, kv_heads] per layer (this rank's heads from
    head_offset), rounded up to powers of two; None if it has none (or not for every layer)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    found: dict[tuple[int, str], torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                for pattern in _CHECKPOINT_NAMES:
                    m = pattern.search(name)
                    if m:
                        found[int(m.group(1)), m.group(2)] = st.get_tensor(name).float().flatten()
    if not found:
        return None
    out = []
    for layer in range(num_layers):
        pair = []
        for which in "kv":
            s = found.get((layer, which))
            if s is None:
                raise ValueError(f"{model_dir}: KV cache scales for some layers only "
                                 f"(layer {layer} has no {which}_scale)")
            if s.numel() == 1:
                s = s.expand(kv_heads)
            elif s.numel() == total_kv_heads:
                s = s[head_offset:head_offset + kv_heads]
            else:
                raise ValueError(f"{model_dir}: layer {layer}'s {which}_scale has {s.numel()} "
                                 f"values; expected 1 or {total_kv_heads} (one per KV head)")
            # up to a power of two: what was representable stays so, and scales stay exact
            pair.append(torch.exp2(torch.ceil(torch.log2(s.clamp_min(1e-30)))))
        out.append(torch.stack(pair))
    return out


def digest(scales: list[torch.Tensor] | None) -> bytes:
    """The scales as bytes (for the KV pool's model key): b"" when there are none."""
    if not scales:
        return b""
    return torch.cat([s.flatten() for s in scales]).float().cpu().numpy().tobytes()


def describe(scales: list[torch.Tensor]) -> str:
    exps = torch.cat([s.flatten() for s in scales]).log2()
    return (f"KV cache fp8 scales: 2^{int(exps.min())}..2^{int(exps.max())} over "
            f"{len(scales)} layers")
