"""Grammar masks on the logits' device: unpacks the int32 bitmasks that cluster.structured
fills on the CPU (bit i of word i // 32 set = token i allowed).

Plain tensor ops, batched over rows: llguidance.torch's version is torch.compile'd, which
compiles on first use (seconds, and a C++ toolchain on CPU) and has no row selection.
"""

from __future__ import annotations

import torch


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """[rows, vocab_size] bool, True where the bitmask allows the token. Ids past the mask's
    width (embedding rows beyond the grammar's vocabulary) are never allowed."""
    # as bytes, little-endian (CPUs and GPUs both): token i is bit i % 8 of byte i // 8. A
    # [rows, bytes, 8] uint8 intermediate is a quarter of the int32 one a word-wise unpack makes
    data = bitmask.to(device or bitmask.device, non_blocking=True).contiguous()
    shifts = torch.arange(8, device=data.device, dtype=torch.uint8)
    bits = ((data.view(torch.uint8).unsqueeze(-1) >> shifts) & 1).flatten(1).bool()
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    pad = torch.zeros(bits.shape[0], vocab_size - bits.shape[1], dtype=torch.bool,
                      device=bits.device)
    return torch.cat([bits, pad], dim=1)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                  rows: torch.Tensor | None = None) -> None:
    """Sets disallowed tokens' logits to -inf, in place. logits: [batch, vocab]; bitmask:
    [n, words] int32 (CPU or the logits' device); rows: the n logits rows the bitmask rows
    belong to (the rest of the batch is left alone), or None when n == batch."""
    forbidden = ~allowed_tokens(bitmask, logits.shape[-1], logits.device)
    if rows is None:
        logits.masked_fill_(forbidden, float("-inf"))
    else:
        rows = rows.to(logits.device)
        logits[rows] = logits[rows].masked_fill(forbidden, float("-inf"))
