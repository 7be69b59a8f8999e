"""Choosing a batch's next tokens on the device: logit processors, sampling, logprobs.

Order (vLLM's): logit_bias, min_tokens and the grammar's mask; repetition, frequency and
presence penalties; temperature. Logprobs are the log-softmax of those processed logits
(before top-k / top-p / min-p cut the tail), so a greedy request with no penalties gets
the model's own log-probabilities. Then min-p, top-k, top-p, and the draw. Every processor
is one batched tensor op over the rows that use it; a batch of plain requests skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.engine.host_tensor import from_list
from cluster.engine.sequence import Sequence
from cluster.engine.structured_mask import apply_bitmask

NAN_TOKEN = -1  # not a token: the model's logits for this row were not finite

# one row's logprobs: [the chosen token's logprob, top ids, their logprobs]
Logprobs = list


@dataclass
class Picks:
    tokens: list[int]
    logprobs: list[Logprobs | None] | None = None  # per row, where asked for


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax, on the logits' device; NAN_TOKEN where the row is not finite."""
    top, argmax = logits.max(dim=-1)  # a NaN anywhere in a row makes its max NaN
    return torch.where(torch.isfinite(top), argmax, NAN_TOKEN)


def sample(logits: torch.Tensor, seqs: list[Sequence], eos: frozenset[int] = frozenset(),
           mask: tuple[torch.Tensor, torch.Tensor] | None = None) -> Picks:
    """logits: [batch, vocab] float32 for the sequences that produce a token this step;
    mask: the structured-output rows' packed bitmasks ([rows, words] int32) and those rows'
    indices in the batch, or None.
    A row with NaN/inf logits gets NAN_TOKEN: that request fails, the batch goes on."""
    params = [s.params for s in seqs]
    if mask is None and all(p.plain and p.greedy for p in params):
        return Picks(greedy_tokens(logits).tolist())
    logits = process(logits, seqs, eos, mask)
    greedy = greedy_tokens(logits)
    lps = None
    if any(p.logprobs is not None for p in params):
        lps = logits.log_softmax(-1)
    if all(p.greedy for p in params):
        out = greedy.tolist()
    else:
        out = _draw(logits, seqs, greedy)
    return Picks(out, None if lps is None else _logprobs(lps, out, params))


def process(logits: torch.Tensor, seqs: list[Sequence], eos: frozenset[int],
            mask: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The logits sampling and logprobs see (a new tensor; the input is left as it was)."""
    params = [s.params for s in seqs]
    dev, vocab = logits.device, logits.shape[-1]
    logits = logits.clone()
    biased = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
    if biased:
        rows, toks, bias = zip(*biased, strict=True)
        logits.index_put_((_t(rows, dev), _t(toks, dev)), _t(bias, dev, torch.float32),
                          accumulate=True)
    early = [(i, t) for i, (s, p) in enumerate(zip(seqs, params, strict=True))
             if s.num_output_tokens + p.resumed < p.min_tokens
             for t in {*p.stop_token_ids, *(() if p.ignore_eos else eos)} if t < vocab]
    if early:
        rows, toks = zip(*early, strict=True)
        logits[_t(rows, dev), _t(toks, dev)] = float("-inf")
    if mask is not None:  # only the constrained rows: the rest of the batch is untouched
        apply_bitmask(logits, *mask)
    pen = [i for i, p in enumerate(params) if p.penalized]
    if pen:
        logits[pen] = _penalize(logits[pen], [seqs[i] for i in pen])
    if any(not p.greedy and p.temperature != 1.0 for p in params):
        temps = _t([p.temperature or 1.0 for p in params], dev, torch.float32)
        logits /= temps[:, None]
    return logits


def _t(xs, dev, dtype=torch.int64) -> torch.Tensor:
    return from_list(xs, dtype).to(dev)


def _penalize(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty (HF: a seen token's logit is divided by it when positive,
    multiplied when negative; prompt and output tokens), then frequency and presence
    (OpenAI: logit - frequency x count - presence x [count > 0]; output tokens only)."""
    dev, vocab = logits.device, logits.shape[-1]
    for s in seqs:
        _count(s, vocab, dev)
    counts = torch.stack([s.pen_counts for s in seqs])
    rep = _t([s.params.repetition_penalty for s in seqs], dev, torch.float32)[:, None]
    if (rep != 1.0).any():
        seen = (counts > 0) | torch.stack([s.pen_seen for s in seqs])
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    freq = _t([s.params.frequency_penalty for s in seqs], dev, torch.float32)[:, None]
    pres = _t([s.params.presence_penalty for s in seqs], dev, torch.float32)[:, None]
    if (freq != 0).any() or (pres != 0).any():
        logits = logits - freq * counts - pres * (counts > 0).float()
    return logits


def _count(s: Sequence, vocab: int, dev) -> None:
    """A penalized sequence's token counts, kept up to date a step at a time (recounting
    its whole history every step cost more than the rest of the sampling)."""
    if s.pen_counts is None:
        split = s.num_prompt_tokens - s.params.resumed  # where its output starts
        s.pen_seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
        if split:
            s.pen_seen[_t(s.token_ids[:split], dev)] = True
        s.pen_counts = torch.zeros(vocab, device=dev)
        s.pen_upto = split
    new = s.token_ids[s.pen_upto:]
    if new:
        ids = _t(new, dev)
        s.pen_counts.index_put_((ids,), torch.ones(len(new), device=dev), accumulate=True)
        s.pen_upto = len(s.token_ids)


def _draw(logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor) -> list[int]:
    """Samples the non-greedy rows (greedy rows keep their argmax)."""
    params = [s.params for s in seqs]
    if any(p.min_p > 0 for p in params):
        probs = logits.softmax(-1)
        floor = _t([p.min_p for p in params], logits.device, torch.float32)[:, None] * \
            probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return _pick(logits, seqs, greedy).tolist()


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence],
                     greedy: torch.Tensor | None = None) -> torch.Tensor:
    """The tokens of a batch of plain requests (temperature, top-k, top-p, seed: nothing
    that needs the host) as a device tensor, without waiting for the device: a step
    launched ahead samples this way, and its tokens are read a step later. The same draw
    as `sample`'s for the same generator state, so a seeded request's text does not depend
    on which path its steps took. greedy: the rows' argmax when already taken (inside a
    decode graph)."""
    greedy = greedy_tokens(logits) if greedy is None else greedy
    params = [s.params for s in seqs]
    if all(p.greedy for p in params):
        return greedy
    if any(not p.greedy and p.temperature != 1.0 for p in params):
        logits = logits / _pinned([p.temperature or 1.0 for p in params], logits.device,
                                  torch.float32)[:, None]
    return _pick(logits, seqs, greedy)


def _pick(logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor) -> torch.Tensor:
    """top-k / top-p, then one draw per sampled row by inverse transform: the first token
    whose cumulative probability passes a uniform draw. A few batched kernels with no host
    sync (torch.multinomial waits), and one random number per row: the exponential race
    (argmax of probs / Exp(1) noise) this replaced drew one per vocabulary entry, 4.3 ms of
    a 14 ms batch-64 step on this 2-core machine. Seeded rows draw from their own
    generators; greedy and failed rows keep `greedy`."""
    params = [s.params for s in seqs]
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _filter_top_k_top_p(logits, top_k, top_p)
    u = torch.rand(len(seqs), device=logits.device)
    for i, s in enumerate(seqs):
        if s.generator is not None and not s.params.greedy:
            u[i] = torch.rand(1, generator=s.generator, device=logits.device)[0]
    return _inverse_cdf(logits.softmax(dim=-1), u,
                        _pinned([not p.greedy for p in params], logits.device, torch.bool),
                        greedy)


def draw_plain(logits: torch.Tensor, greedy: torch.Tensor, temps: torch.Tensor,
               sampled: torch.Tensor) -> torch.Tensor:
    """`_pick` for rows with no top-k, top-p or seed, from device tensors of per-row
    temperatures and sampled flags: fixed-shape kernels with no host input, so a CUDA graph
    holds them (its replays advance the shared generator's offset: fresh draws each time).
    Dividing by a temperature of 1 is exact, so this is the eager path's draw."""
    probs = (logits / temps[:, None]).softmax(dim=-1)
    return _inverse_cdf(probs, torch.rand(len(probs), device=probs.device), sampled, greedy)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, sampled: torch.Tensor,
                 greedy: torch.Tensor) -> torch.Tensor:
    cdf = probs.cumsum_(dim=-1)
    # u scaled by the row's total (float sums miss 1 by rounding): the pick is the first
    # index whose cdf exceeds it, always a token of nonzero probability
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    drawn = drawn.clamp_(max=probs.shape[-1] - 1)
    # rows that failed keep NAN_TOKEN: their probabilities are NaN
    return torch.where(sampled & (greedy != NAN_TOKEN), drawn, greedy)


def _pinned(xs, dev, dtype) -> torch.Tensor:
    """A small host list on the device without a blocking copy (a pageable copy would
    wait for the step in flight)."""
    t = from_list(xs, dtype)
    if dev.type != "cuda":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def _logprobs(lps: torch.Tensor, tokens: list[int], params) -> list[Logprobs | None]:
    """The chosen token's logprob and the top k, for the rows that asked (one copy to the
    host for the batch)."""
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    k = max(params[i].logprobs for i in want)
    rows = _t(want, lps.device)
    picked = _t([max(0, tokens[i]) for i in want], lps.device)
    chosen = lps[rows, picked].tolist()
    if k:
        top = lps[rows].topk(k, -1)
        top_lp, top_id = top.values.tolist(), top.indices.tolist()
    else:
        top_lp = top_id = [[] for _ in want]
    out: list[Logprobs | None] = [None] * len(params)
    for j, i in enumerate(want):
        n = params[i].logprobs
        out[i] = [chosen[j], top_id[j][:n], top_lp[j][:n]]
    return out


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[Logprobs]:
    """Prompt scoring (echo): row r of logits predicts targets[r]; raw log-softmax."""
    lps = logits.float().log_softmax(-1)
    tgt = _t(targets, lps.device)
    chosen = lps.gather(1, tgt[:, None]).squeeze(1).tolist()
    if not k:
        return [[c, [], []] for c in chosen]
    top_lp, top_id = lps.topk(k, -1)
    return [[c, i, v] for c, i, v in zip(chosen, top_id.tolist(), top_lp.tolist(),
                                         strict=True)]


def _filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]):
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = _pinned([k if k > 0 else vocab for k in top_k], logits.device, torch.int64)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    p = _pinned(top_p, logits.device, torch.float32)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # keep the smallest set whose mass reaches p: a token goes when the mass before it >= p
    drop |= (probs.cumsum(-1) - probs) >= p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)
