"""Greedy and sampled decoding (temperature, top-k, top-p, per-request seeds) for a batch."""

from __future__ import annotations

import torch

from cluster.engine.sequence import Sequence

NAN_TOKEN = -1  # not a token: the model's logits for this row were not finite


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax, on the logits' device; NAN_TOKEN where the row is not finite."""
    top, argmax = logits.max(dim=-1)  # a NaN anywhere in a row makes its max NaN
    return torch.where(torch.isfinite(top), argmax, NAN_TOKEN)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [batch, vocab] float32 for the sequences that produce a token this step.
    A row with NaN/inf logits gets NAN_TOKEN: that request fails, the batch goes on."""
    greedy = greedy_tokens(logits)
    if all(s.params.greedy for s in seqs):
        return greedy.tolist()
    temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=logits.device)
    scaled = logits / temps[:, None]
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        scaled = _filter_top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(dim=-1)
    out = greedy.tolist()
    # rows that failed keep NAN_TOKEN: their probabilities are NaN, never sampled from
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy and out[i] != NAN_TOKEN]
    unseeded = [i for i in sampled if seqs[i].generator is None]
    if unseeded:
        picks = torch.multinomial(probs[unseeded], 1).squeeze(1).tolist()
        for i, t in zip(unseeded, picks, strict=True):
            out[i] = t
    for i in sampled:
        if seqs[i].generator is not None:
            out[i] = int(torch.multinomial(probs[i], 1, generator=seqs[i].generator))
    return out


def _filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]):
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    p = torch.tensor(top_p, device=logits.device)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # keep the smallest set whose mass reaches p: a token goes when the mass before it >= p
    drop |= (probs.cumsum(-1) - probs) >= p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)
