"""CUDA graphs of steps: a small model's eager step is bound by kernel launches (~10 us of
host time each, hundreds per step), so step shapes are captured once at start and replayed
with their inputs copied into static buffers.

- Decode graphs, one per batch-size bucket: the whole step, logits and greedy picks too.
- Mixed graphs, one per token-count bucket: the model body of a step that mixes prefill
  chunks with decode rows, or decodes more rows than the largest decode graph. Under a
  steady arrival rate nearly every step is mixed: in the 1,000-stream run on an H200, 57% of
  the engine core's time was the eager forward of such steps (Triton's Python launcher
  alone 20%) while the GPU was 17% busy. The bucket fixes every shape: the decode kernel
  runs over `cap` rows whose context lengths past the step's decode count are 0 (no work),
  the prefill kernel over a fixed number of query tiles, the unused ones pointing at an
  empty sequence (no rows). Logits are taken after the replay, of the emitting rows only.
  Steps with more prefill sequences than the tile grid holds, prompt scoring, tensor
  parallelism and MLA models run eagerly.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cluster.engine.attention import PREFILL_BLOCK_M, AttentionMetadata, prefill_tile_lists
from cluster.engine.host_tensor import from_list
from cluster.engine.sampler import draw_plain, greedy_tokens
from cluster.engine.staging import Staged, StagingBuffer

log = logging.getLogger(__name__)

# prefill sequences a mixed graph's tile grid holds beyond one tile per PREFILL_BLOCK_M of
# its tokens (each sequence's last tile may be partial)
MIXED_TILE_ROOM = 16

Fill = Callable[[torch.Tensor], None]  # writes the previous step's picks into the input ids


def padded_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one int32 array, rows padded with 0. Runs every step: one pass of
    numpy over all the tables (a row-by-row fill took 0.57 ms at 1,000 rows, this 0.40)."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    out = np.zeros((len(tables), int(lens.max())), dtype=np.int32)
    out[np.arange(out.shape[1]) < lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
    return out


def leading_ones(xs: list[int]) -> int:
    n = 0
    while n < len(xs) and xs[n] == 1:
        n += 1
    return n


@dataclass
class DecodeGraph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor
    tokens: torch.Tensor  # greedy picks, taken inside the graph (no eager kernels after it)
    # replayed after `graph` when temperature-sampled rows are in the step: their draw
    # (sampler.draw_plain), greedy rows keep `tokens`
    draw: torch.cuda.CUDAGraph | None = None
    drawn: torch.Tensor | None = None


def decode_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 513, 16))
    return sorted({b for b in sizes if b < max_num_seqs} | {min(max_num_seqs, 512)})


class DecodeGraphs:
    def __init__(self, model, device, pad_slot: int, max_blocks: int, max_num_seqs: int):
        self.model = model
        self.sizes = decode_sizes(max_num_seqs)
        self.pad_slot = pad_slot
        bs = self.sizes[-1]
        # tables last: a step copies the prefix up to its bucket's last table row
        self.buf = StagingBuffer({
            "ids": ((bs,), torch.int64, 0), "pos": ((bs,), torch.int64, 0),
            "slots": ((bs,), torch.int64, pad_slot), "ctx": ((bs,), torch.int32, 0),
            "temps": ((bs,), torch.float32, 1.0), "sampled": ((bs,), torch.bool, False),
            "tables": ((bs, max_blocks), torch.int32, 0)}, device)
        self.cu = torch.arange(bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, DecodeGraph] = {}
        self.flip = 0
        self.draws = 0  # replays that drew sampled rows inside the graph

    def capture(self, pool=None):
        dev = self.buf.dev
        for bs in reversed(self.sizes):
            meta = AttentionMetadata(
                slot_mapping=dev["slots"][:bs], block_tables=dev["tables"][:bs],
                context_lens=dev["ctx"][:bs], cu_seqlens_q=self.cu[: bs + 1],
                context_lens_host=[], cu_seqlens_q_host=[], is_decode=True)

            def step(bs=bs, meta=meta):
                hidden = self.model(dev["ids"][:bs], dev["pos"][:bs], meta)
                logits = self.model.compute_logits(hidden)
                return logits, greedy_tokens(logits)

            graph, (logits, tokens), pool = _capture(step, pool)
            draw, drawn, pool = _capture(
                lambda bs=bs, logits=logits, tokens=tokens: draw_plain(
                    logits, tokens, dev["temps"][:bs], dev["sampled"][:bs]), pool)
            self.graphs[bs] = DecodeGraph(graph, logits, tokens, draw, drawn)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)
        return pool

    def bucket(self, n: int) -> int | None:
        if not self.graphs or n > self.sizes[-1]:
            return None
        return min(b for b in self.sizes if b >= n)

    def replay(self, inp, fill: Fill | None,
               draw: tuple[list[float], list[bool]] | None = None) -> DecodeGraph:
        """Replays the step's graph, and its draw when `draw` gives each row's temperature
        and whether it is sampled; the outputs are valid until the next replay."""
        n, bs = len(inp.tables), inp.graph_bs
        self.flip ^= 1
        h = self.buf.host[self.flip]
        # numpy stores into the pinned buffer, then one copy: this runs every decode step
        h["ids"][:n] = inp.input_ids
        h["pos"][:n] = inp.positions
        h["slots"][:n] = inp.slots
        h["slots"][n:bs] = self.pad_slot
        h["ctx"][:n] = inp.ctx
        h["ctx"][n:bs] = 0
        if draw is not None:
            h["temps"][:n], h["sampled"][:n] = draw
            h["sampled"][n:bs] = False
        tables = inp.padded_tables()
        h["tables"][:n, : tables.shape[1]] = tables
        self.buf.send(self.flip, self.buf.end("tables", bs))
        if fill is not None:
            fill(self.buf.dev["ids"])
        g = self.graphs[bs]
        g.graph.replay()
        if draw is not None:
            g.draw.replay()
            self.draws += 1
        return g


def mixed_sizes(max_tokens: int) -> list[int]:
    """Token-count buckets: a step pads up to the next (at most 1.5x its tokens past 64)."""
    sizes, b = [], 64
    while b < max_tokens:
        sizes += [b, b * 3 // 2] if b >= 256 else [b]
        b *= 2
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


def tiles_of(tokens: int) -> int:
    return tokens // PREFILL_BLOCK_M + MIXED_TILE_ROOM


@dataclass
class MixedGraph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [tokens, hidden]: the final norm's output of every row


class MixedGraphs:
    def __init__(self, model, device, pad_slot: int, max_blocks: int, max_num_seqs: int,
                 max_tokens: int):
        self.model = model
        self.sizes = mixed_sizes(max_tokens)
        self.pad_slot = pad_slot
        t = self.sizes[-1]
        self.seqs = max_num_seqs + 1  # the last one stays empty: unused tiles point there
        self.ids = Staged((t,), torch.int64, device)
        self.pos = Staged((t,), torch.int64, device)
        self.slots = Staged((t,), torch.int64, device, pad_slot)
        self.tables = Staged((self.seqs, max_blocks), torch.int32, device)
        self.ctx = Staged((self.seqs,), torch.int32, device)
        self.decode_ctx = Staged((self.seqs,), torch.int32, device)  # 0 past the decodes
        self.cu = Staged((self.seqs + 1,), torch.int32, device)
        self.tiles = Staged((2, tiles_of(t)), torch.int32, device)  # (sequence, first row)
        self.graphs: dict[int, MixedGraph] = {}
        self.flip = 0
        self.replays = 0

    def cap(self, tokens: int) -> int:
        """Decode rows a graph of `tokens` covers."""
        return min(tokens, self.seqs - 1)

    def capture(self, pool=None):
        for t in reversed(self.sizes):
            nt = tiles_of(t)
            meta = AttentionMetadata(
                slot_mapping=self.slots.dev[:t], block_tables=self.tables.dev,
                context_lens=self.ctx.dev, cu_seqlens_q=self.cu.dev,
                context_lens_host=[], cu_seqlens_q_host=[],
                decode_context_lens=self.decode_ctx.dev[: self.cap(t)],
                prefill_tiles=(self.tiles.dev[0, :nt], self.tiles.dev[1, :nt]))

            def body(t=t, meta=meta):
                return self.model(self.ids.dev[:t], self.pos.dev[:t], meta)

            graph, hidden, pool = _capture(body, pool)
            self.graphs[t] = MixedGraph(graph, hidden)
        log.info("captured mixed-step CUDA graphs for token counts %s", self.sizes)
        return pool

    def bucket(self, inp) -> int | None:
        """The graph a step replays (None: it runs eagerly)."""
        nt, n = len(inp.input_ids), len(inp.tables)
        if not self.graphs or nt > self.sizes[-1] or n >= self.seqs:
            return None
        t = min(b for b in self.sizes if b >= nt)
        cu = inp.cu_q
        nd = leading_ones([b - a for a, b in zip(cu, cu[1:], strict=False)])
        tiles = sum(-(-(cu[i + 1] - cu[i]) // PREFILL_BLOCK_M) for i in range(nd, n))
        return t if tiles <= tiles_of(t) else None

    def replay(self, inp, tokens: int, fill: Fill | None) -> torch.Tensor:
        """Replays the step's graph; the hidden states of its rows, valid until the next
        replay."""
        nt, n, t = len(inp.input_ids), len(inp.tables), tokens
        cu = inp.cu_q
        nd = leading_ones([b - a for a, b in zip(cu, cu[1:], strict=False)])
        cap, ntiles = self.cap(t), tiles_of(t)
        self.flip ^= 1
        f = self.flip
        self.ids.host[f, :nt] = from_list(inp.input_ids)
        self.ids.host[f, nt:t] = 0
        self.pos.host[f, :nt] = from_list(inp.positions)
        self.pos.host[f, nt:t] = 0
        self.slots.host[f, :nt] = from_list(inp.slots)
        self.slots.host[f, nt:t] = self.pad_slot
        tables = inp.padded_tables()
        self.tables.host[f, :n, : tables.shape[1]] = torch.from_numpy(tables)
        ctx = from_list(inp.ctx, torch.int32)
        self.ctx.host[f, :n] = ctx
        self.ctx.host[f, n] = 0  # the empty sequence
        self.decode_ctx.host[f, :nd] = ctx[:nd]
        self.decode_ctx.host[f, nd:cap] = 0
        self.cu.host[f, : n + 1] = from_list(cu, torch.int32)
        self.cu.host[f, n + 1] = cu[-1]
        seqs, starts = prefill_tile_lists(cu, nd)
        pad = ntiles - len(seqs)
        self.tiles.host[f, :, :ntiles] = from_list([seqs + [n] * pad, starts + [0] * pad],
                                                     torch.int32)
        for s, rows in ((self.ids, t), (self.pos, t), (self.slots, t), (self.tables, n),
                        (self.ctx, n + 1), (self.decode_ctx, cap), (self.cu, n + 2)):
            s.send(f, rows)
        self.tiles.dev[:, :ntiles].copy_(self.tiles.host[f, :, :ntiles], non_blocking=True)
        if fill is not None:
            fill(self.ids.dev)
        g = self.graphs[t]
        g.graph.replay()
        self.replays += 1
        return g.hidden[:nt]


def _capture(fn, pool):
    """fn captured in a graph (after one warm-up run outside: Triton compiles, the allocator
    settles); the graph, fn's outputs and the memory pool the graphs share."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    torch.cuda.synchronize()
    return graph, out, graph.pool() if pool is None else pool
