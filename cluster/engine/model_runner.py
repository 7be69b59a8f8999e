"""Turns a scheduled batch into tensors, runs the model and samples the next tokens."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cluster.engine import cpu_linear
from cluster.engine.attention import AttentionMetadata, UncachedBackend
from cluster.engine.cuda_graphs import (
    DecodeGraph,
    DecodeGraphs,
    MixedGraphs,
    leading_ones,
    padded_tables,
)
from cluster.engine.deepseek import DeepseekForCausalLM, MLAttention
from cluster.engine.deepseek_loader import synthetic_deepseek_weights
from cluster.engine.gpu_backends import GatherBackend, TritonBackend
from cluster.engine.host_tensor import from_list
from cluster.engine.loader import iter_checkpoint, load_weights
from cluster.engine.model import (
    AttentionBackend,
    CausalLM,
    Linear,
    ModelArch,
    Ops,
    can_pack_linears,
)
from cluster.engine.moe import Experts
from cluster.engine.parallel import TP
from cluster.engine.sampler import Picks, prompt_logprobs, sample, sample_on_device
from cluster.engine.scheduler import ScheduledBatch
from cluster.engine.sequence import PENDING, Sequence
from cluster.engine.step_clock import StepClock
from cluster.engine.synthetic import synthetic_weights

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# CPU steps of fewer tokens run on one thread (see ModelRunner.execute)
PARALLEL_MIN_TOKENS = 32

@dataclass
class StepInputs:
    """Host-side inputs of one step; picklable, sent as-is to tensor-parallel peers."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    tables: list[list[int]]
    cu_q: list[int]
    ctx: list[int]
    rows: list[int]  # sequences that emit a token (their prefill or decode is complete)
    graph_bs: int | None = None  # the decode CUDA graph to replay
    mixed_tokens: int | None = None  # or the mixed-step graph of this many tokens
    # prompt scoring (echo): (sequence, first prompt token scored, count); their logits are
    # those of the positions just before those tokens, taken after the emitting rows'
    scored: list[tuple[int, int, int]] = field(default_factory=list)
    # `tables` padded into one array, gathered from the block manager's rows (None: built
    # from the lists, for inputs made without one)
    table_array: np.ndarray | None = None

    def padded_tables(self) -> np.ndarray:
        return self.table_array if self.table_array is not None else padded_tables(self.tables)


def _emitting(out: torch.Tensor, inp: StepInputs) -> torch.Tensor:
    """A decode graph's per-row output, for the rows that emit a token."""
    n = len(inp.tables)
    return out[:n] if len(inp.rows) == n else out[:n][inp.rows]


@dataclass
class Launched:
    """A step on its way: the GPU may still be running it."""

    inp: StepInputs
    seqs: list[Sequence]
    tokens: torch.Tensor  # next token per emitting row, on the device (NAN_TOKEN: not finite)
    host: torch.Tensor | None = None  # pinned copy, filled when `event` fires
    event: torch.cuda.Event | None = None

    def result(self) -> list[int]:
        """Waits for the step; its tokens."""
        if self.event is None:
            return self.tokens.tolist()
        self.event.synchronize()
        return self.host[: len(self.tokens)].tolist()


class ModelRunner:
    def __init__(self, model_dir: str, arch: ModelArch, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, block_size: int, weights=None, tp: TP | None = None,
                 cpu_kernel: bool = True, kv_dtype: torch.dtype | None = None,
                 deepseek_kernels: bool = True, cpu_attention_threads: int | None = None):
        self.arch, self.device, self.dtype = arch, device, dtype
        self.threads = torch.get_num_threads() if device.type == "cpu" else 1  # the engine's
        self.kv_dtype = kv_dtype or dtype  # fp8 (e4m3): attention converts after reading
        self.kv_scales: list[torch.Tensor] | None = None  # an fp8 cache's (kv_scales.py)
        self.tp = tp or TP()
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.graph_pool = None  # the memory pool every graph of this runner shares
        self.clock = StepClock(device.type == "cuda")
        # DeepSeek: multi-head latent attention over a compressed cache, mixture of experts
        self.mla = arch.deepseek is not None
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = (DeepseekForCausalLM if self.mla else CausalLM)(
                    arch, max_model_len, self.tp)
        finally:
            torch.set_default_dtype(torch.float32)
        if isinstance(weights, str) and weights.startswith("synthetic"):
            # benchmarks of a model shape need no checkpoint; seeded per tensor name so that
            # every rank (and a TP=1 run) derives the same full tensors, then keeps its slice
            seed = int(weights.partition(":")[2] or 0)
            synthetic = synthetic_deepseek_weights if self.mla else synthetic_weights
            load_weights(self.model, synthetic(self.model, seed), weights)
        else:
            load_weights(self.model, weights or iter_checkpoint(model_dir), model_dir)
        self.model.eval()
        # MLA attends over its latent cache (mla_attention.py), not through these backends:
        # the C++ decode kernel and the dense Triton kernels read per-head K/V caches
        if not self.mla and device.type == "cpu" and self.kv_dtype == torch.float32 and \
                cpu_kernel:  # the C++ kernel reads fp32 caches
            from cluster.engine import cpu_kernels

            if arch.head_dim in cpu_kernels.HEAD_DIMS and cpu_kernels.load() is not None:
                self.model.backend = AttentionBackend(
                    functools.partial(cpu_kernels.paged_decode, threads=cpu_attention_threads))
                cpu_kernels.use_fused_ops()
        if device.type == "cuda" and not self.mla:
            try:
                self.model.backend = TritonBackend()
                Ops.use_triton()
            except ImportError as err:
                log.warning("Triton unavailable (%s): gather attention, eager ops", err)
                self.model.backend = GatherBackend()
        # DeepSeek on a GPU: the routed experts and MLA decode in Triton, so that a decode
        # step reads nothing on the host (its CUDA graph can be captured)
        self.deepseek_on_device = False
        if self.mla and device.type == "cuda" and deepseek_kernels:
            self._use_deepseek_kernels()
        self.h_tokens = torch.zeros(2, 0, dtype=torch.int64)  # pinned when first needed
        self.flip = 0
        # when each pinned buffer's copy is done
        self.ready = [torch.cuda.Event() for _ in range(2)] if device.type == "cuda" else []
        self.peers = None  # tensor-parallel ranks 1..N-1 (cluster.engine.tp_workers)
        self.table_rows = None  # the block manager's TableRows, set by the engine
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        self.kv_tensors: list[torch.Tensor] = []

    def pack_linears(self) -> None:
        """fp32 on the CPU: projections multiply by their weights in one of two layouts
        (model.Linear, cpu_linear.py), whichever makes this model's forward pass at decode
        row counts faster, timed here on one thread (as decode steps of fewer than
        PARALLEL_MIN_TOKENS rows run). A TP rank takes sgemm untimed: its peers must run the
        same passes (their all-reduces meet), and a process may have decided already. After
        quantization, which replaces the layers it quantizes."""
        if self.mla or not can_pack_linears(self.device, self.dtype):
            return
        linears = [m for m in self.model.modules() if isinstance(m, Linear)]
        if self.tp.size > 1 or not linears:
            for m in linears:
                m.pack("sgemm")
            return
        key = (self.arch.vocab_size, *((m.in_features, m.out_features) for m in linears))
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            layout = cpu_linear.decide(key, lambda name: self._pass_seconds(linears, name))
        finally:
            torch.set_num_threads(before)
        for m in linears:
            m.pack(layout)
        log.info("CPU projections: %s layout", layout)

    @torch.inference_mode()
    def _pass_seconds(self, linears: list[Linear], layout: str) -> float:
        """Seconds of this model's forward pass and logits at cpu_linear.TUNE_ROWS rows (no
        KV cache: attention over the pass's own tokens), its projections in `layout`."""
        for m in linears:
            m.pack(layout)
        g = torch.Generator().manual_seed(0)
        backend, self.model.backend = self.model.backend, UncachedBackend()
        total = 0.0
        try:
            for rows in cpu_linear.TUNE_ROWS:
                ids = torch.randint(0, self.arch.vocab_size, (rows,), generator=g)
                positions = torch.arange(rows)
                self.model.compute_logits(self.model(ids, positions, None))  # warm
                start = time.perf_counter()
                for _ in range(2):
                    self.model.compute_logits(self.model(ids, positions, None))
                total += (time.perf_counter() - start) / 2
        finally:
            self.model.backend = backend
        return total

    def kv_bytes_per_block(self) -> int:
        a = self.arch
        if self.mla:  # one [latent, k_pe] entry per token and layer, shared by all heads
            return a.num_layers * self.block_size * a.deepseek.cache_dim * \
                torch.tensor([], dtype=self.dtype).element_size()
        return 2 * a.num_layers * self.block_size * self.model.layout.kv_heads * a.head_dim * \
            torch.tensor([], dtype=self.kv_dtype).element_size()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        a = self.arch
        # one extra block that no sequence owns: padded rows of a CUDA graph write there
        self.pad_slot = num_blocks * self.block_size
        if self.mla:
            cache = torch.zeros((a.num_layers, num_blocks + 1, self.block_size,
                                 a.deepseek.cache_dim), dtype=self.dtype, device=self.device)
            for i, layer in enumerate(self.model.layers):
                layer.self_attn.kv_cache = cache[i]
            self.k_caches, self.v_caches = list(cache), []
            self.kv_tensors = [cache]
            return
        shape = (a.num_layers, num_blocks + 1, self.block_size, self.model.layout.kv_heads,
                 a.head_dim)
        k = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k[i], v[i]
        self.k_caches, self.v_caches = list(k), list(v)
        # the whole caches, [layer, block, ...]: the KV tiers copy one block of all layers
        self.kv_tensors = [k, v]

    def make_inputs(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        inp = StepInputs([], [], [], [], [0], [], [])
        rows, width = [], 1
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            table = seq.block_table
            rows.append(seq.table_row)
            width = max(width, len(table))
            if n == 1:  # a decode row (most rows of a big batch): no slices, no generator
                inp.input_ids.append(seq.token_ids[start])
                inp.positions.append(start)
                inp.slots.append(table[start // bs] * bs + start % bs)
            else:
                inp.input_ids.extend(seq.token_ids[start : start + n])
                inp.positions.extend(range(start, start + n))
                inp.slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            inp.tables.append(table)
            inp.cu_q.append(inp.cu_q[-1] + n)
            inp.ctx.append(start + n)
            if start + n == seq.num_tokens:
                inp.rows.append(i)
            if seq.prompt_logprobs is not None:
                # token j is scored by position j-1's logits: this chunk scores tokens
                # start+1 .. start+n within the prompt, less those scored before a preemption
                first = max(len(seq.prompt_logprobs), start + 1)
                last = min(start + n, seq.num_prompt_tokens - 1)
                if last >= first:
                    inp.scored.append((i, first, last - first + 1))
        if self.table_rows is not None and rows and min(rows) >= 0:
            inp.table_array = self.table_rows.gather(rows, width)
        if inp.scored:  # prompt scoring takes logits of rows a graph does not return
            return inp
        if batch.is_decode and self.decode_graphs is not None:
            inp.graph_bs = self.decode_graphs.bucket(len(batch.seqs))
        if inp.graph_bs is None and self.mixed_graphs is not None:
            inp.mixed_tokens = self.mixed_graphs.bucket(inp)
        return inp

    @property
    def graphs(self) -> dict[int, DecodeGraph]:
        """The decode graphs by batch size (none captured: empty)."""
        return self.decode_graphs.graphs if self.decode_graphs is not None else {}

    def _to_device(self, x, dtype) -> torch.Tensor:
        # not a blocking copy: that would wait for the step still running on the GPU
        return from_list(x, dtype).to(self.device, non_blocking=True)

    def _tensors(self, inp: StepInputs):
        t = self._to_device

        tables = inp.padded_tables()
        q_lens = [b - a for a, b in zip(inp.cu_q, inp.cu_q[1:], strict=False)]
        meta = AttentionMetadata(
            slot_mapping=t(inp.slots, torch.int64),
            block_tables=torch.from_numpy(tables).to(self.device, non_blocking=True),
            context_lens=t(inp.ctx, torch.int32), cu_seqlens_q=t(inp.cu_q, torch.int32),
            context_lens_host=inp.ctx, cu_seqlens_q_host=inp.cu_q,
            max_query_len=max(q_lens), max_context_len=max(inp.ctx),
            is_decode=max(q_lens) == 1, num_decodes=leading_ones(q_lens))
        # the rows whose logits are taken, made here with the other inputs: an index list
        # given to the hidden states later would be copied with a wait for the whole step
        scored = [inp.cu_q[i] + (j - 1 - (inp.positions[inp.cu_q[i]])) + m
                  for i, j, count in inp.scored for m in range(count)]
        rows = t([inp.cu_q[i + 1] - 1 for i in inp.rows] + scored, torch.int64)
        return t(inp.input_ids, torch.int64), t(inp.positions, torch.int64), meta, rows

    @torch.inference_mode()
    def execute(self, inp: StepInputs, fill=None) -> torch.Tensor | None:
        """One forward pass on this rank; logits of the rows that emit a token."""
        if inp.graph_bs is not None:  # a one-token prefill chunk may emit nothing
            return _emitting(self._replay(inp, fill).logits, inp)
        if inp.mixed_tokens is not None:
            hidden = self.mixed_graphs.replay(inp, inp.mixed_tokens, self._filler(fill))
            if not inp.rows:
                return None
            rows = self._to_device([inp.cu_q[i + 1] - 1 for i in inp.rows], torch.int64)
            return self.model.compute_logits(hidden.index_select(0, rows))
        input_ids, positions, meta, rows = self._tensors(inp)
        if fill is not None:
            self._fill(input_ids, fill)
        if self.threads > 1:
            # OpenMP threads that wait passively (core_process.py) are woken for every
            # parallel region: a step of few tokens runs faster on one thread (2 cores,
            # default model: batch 1 3.4 ms on one thread, 6.4 on two; batch 64 15.7 / 12.8)
            torch.set_num_threads(self.threads if len(inp.input_ids) >= PARALLEL_MIN_TOKENS
                                  else 1)
        hidden = self.model(input_ids, positions, meta)
        if not inp.rows and not inp.scored:
            return None
        return self.model.compute_logits(hidden.index_select(0, rows))

    def run(self, batch: ScheduledBatch, eos: frozenset[int] = frozenset()
            ) -> tuple[list[int | None], list]:
        """The sampled token per sequence (None where a prefill chunk is unfinished) and
        its logprobs (None where not asked for). Prompt logprobs go onto the sequences."""
        inp = self.make_inputs(batch)
        if self.peers is not None:
            self.peers.submit("execute", inp)
        self.clock.begin()  # the device idled from the last step's end to here
        logits = self.execute(inp)
        out: list[int | None] = [None] * len(batch.seqs)
        lps: list = [None] * len(batch.seqs)
        if inp.rows:
            seqs = [batch.seqs[i] for i in inp.rows]
            # the grammar masks are filled on the host while the device runs the forward
            mask = self.grammar_mask(seqs) if any(s.grammar for s in seqs) else None
            picks: Picks = sample(logits[: len(inp.rows)], seqs, eos, mask)
            for k, i in enumerate(inp.rows):
                out[i] = picks.tokens[k]
                if picks.logprobs is not None:
                    lps[i] = picks.logprobs[k]
        if inp.scored:
            self._score_prompts(batch, inp, logits[len(inp.rows):])
        self.clock.end()
        return out, lps

    def _score_prompts(self, batch: ScheduledBatch, inp: StepInputs, logits) -> None:
        at = 0
        for i, first, count in inp.scored:
            seq = batch.seqs[i]
            entries = prompt_logprobs(logits[at : at + count],
                                      seq.token_ids[first : first + count],
                                      seq.params.prompt_logprobs or 0)
            seq.prompt_logprobs.extend(entries)
            at += count

    def grammar_mask(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """The constrained rows' packed bitmasks of the tokens their grammars allow next,
        and those rows' indices (sampler.sample applies them on the device)."""
        from cluster import structured

        rows = [i for i, s in enumerate(seqs) if s.grammar]
        bitmask = structured.allocate_bitmask(len(rows), self.arch.vocab_size)
        structured.fill_masks([(seqs[i].grammar, k) for k, i in enumerate(rows)], bitmask)
        return (torch.from_numpy(bitmask).to(self.device, non_blocking=True),
                torch.tensor(rows, device=self.device))

    # One step ahead: a plain step (greedy or sampled) is launched with some of its input
    # tokens still on the GPU (the previous step's picks, not read yet), so the host
    # schedules and launches step N+1 while the GPU runs step N, and only then waits for
    # N's tokens. The GPU no longer idles through the host's work between steps.

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: Launched | None = None) -> Launched:
        """A step of plain requests (greedy, or sampled on the device), not waited for.
        Input tokens that are PENDING (the last token of a sequence that emitted in `prev`)
        are prev's picks, taken on the device."""
        inp = self.make_inputs(batch)
        fill = self._pending_inputs(inp, batch, prev)
        self.clock.begin()
        rows = [batch.seqs[i] for i in inp.rows]
        greedy = all(s.params.greedy for s in rows)
        if inp.graph_bs is not None:
            draw = None if greedy else self._graph_draw(inp, rows)
            graph = self._replay(inp, fill, draw)
            picks = _emitting(graph.tokens if draw is None else graph.drawn, inp)
            tokens = picks if greedy or draw is not None else sample_on_device(
                _emitting(graph.logits, inp), rows, picks)
        else:
            logits = self.execute(inp, fill)
            tokens = (sample_on_device(logits, rows) if logits is not None else
                      torch.empty(0, dtype=torch.int64, device=self.device))
        if self.device.type != "cuda":
            self.clock.end()
            return Launched(inp, batch.seqs, tokens)
        host = self._host_tokens(len(tokens))
        host.copy_(tokens, non_blocking=True)
        event = self.ready[self.flip]  # reused in turn with its host buffer
        event.record()
        self.clock.end()
        return Launched(inp, batch.seqs, tokens, host, event)

    def _pending_inputs(self, inp: StepInputs, batch: ScheduledBatch, prev: Launched | None):
        """(prev's picks, input positions, prev's rows) for the input tokens not known yet;
        None when all are known."""
        dst, src = [], []
        row_of = None
        for i, seq in enumerate(batch.seqs):
            last = inp.cu_q[i + 1] - 1
            if inp.input_ids[last] != PENDING:
                continue
            if row_of is None:
                row_of = {id(prev.seqs[r]): k for k, r in enumerate(prev.inp.rows)}
            dst.append(last)
            src.append(row_of[id(seq)])
            inp.input_ids[last] = 0
        return (prev.tokens, dst, src) if dst else None

    def _host_tokens(self, n: int) -> torch.Tensor:
        """A pinned buffer for n picks; two in turn, since step N's is read only after step
        N+1 was launched."""
        if self.h_tokens.shape[1] < n:
            self.h_tokens = torch.zeros(2, max(n, 2 * self.h_tokens.shape[1]),
                                        dtype=torch.int64, pin_memory=True)
        self.flip ^= 1
        return self.h_tokens[self.flip, :n]

    def _fill(self, ids: torch.Tensor, fill) -> None:
        """Writes prev's picks into this step's input ids on the device."""
        picks, dst, src = fill
        if dst == src == list(range(len(dst))):  # the same rows one token later
            torch.clamp(picks[: len(dst)], min=0, out=ids[: len(dst)])
            return
        # a failed row's NAN_TOKEN is no token id: clamped, its output is dropped anyway
        taken = picks.index_select(0, self._to_device(src, torch.int64)).clamp_(min=0)
        ids.index_copy_(0, self._to_device(dst, torch.int64), taken)

    # CUDA graphs (cuda_graphs.py): decode steps per batch size, mixed steps per token count

    def _filler(self, fill):
        return None if fill is None else (lambda ids: self._fill(ids, fill))

    def _graph_room(self) -> tuple[int, int]:
        return self.pad_slot, -(-self.max_model_len // self.block_size)

    @torch.inference_mode()
    def capture_decode_graphs(self, max_num_seqs: int) -> None:
        if self.mla and not self.deepseek_on_device:
            # the PyTorch MoE reads its expert counts on the host, latent_decode its
            # context lengths: neither can be captured
            log.info("no decode CUDA graphs for DeepSeek without its kernels: eager decode")
            return
        self.decode_graphs = DecodeGraphs(self.model, self.device, *self._graph_room(),
                                          max_num_seqs)
        self._host_tokens(self.decode_graphs.sizes[-1])  # sized now rather than on first use
        self.graph_pool = self.decode_graphs.capture(self.graph_pool)

    def _use_deepseek_kernels(self) -> None:
        try:
            from cluster.engine import triton_mla, triton_moe
        except ImportError as err:
            log.warning("Triton unavailable (%s): DeepSeek in plain PyTorch", err)
            return
        d = self.arch.deepseek
        if not triton_mla.supports(d.kv_lora_rank, d.qk_rope_head_dim):
            log.warning("MLA widths %d + %d outside the Triton kernel's: DeepSeek in plain "
                        "PyTorch", d.kv_lora_rank, d.qk_rope_head_dim)
            return
        for m in self.model.modules():
            if isinstance(m, Experts):
                m.fused = triton_moe.fused_experts
            elif isinstance(m, MLAttention):
                m.kernel = triton_mla
        self.deepseek_on_device = True

    @torch.inference_mode()
    def capture_mixed_graphs(self, max_num_seqs: int, max_tokens: int) -> None:
        if self.mla or self.tp.size > 1 or not isinstance(self.model.backend, TritonBackend):
            # MLA/MoE: as above; tensor parallel: its peers replay what rank 0 does, and
            # mixed graphs have not run over NCCL yet; the gather backend is not graph-safe
            log.info("no mixed-step CUDA graphs here: eager mixed steps")
            return
        self.mixed_graphs = MixedGraphs(self.model, self.device, *self._graph_room(),
                                        max_num_seqs, max_tokens)
        self.graph_pool = self.mixed_graphs.capture(self.graph_pool)

    def _replay(self, inp: StepInputs, fill=None, draw=None) -> DecodeGraph:
        return self.decode_graphs.replay(inp, self._filler(fill), draw)

    @staticmethod
    def _graph_draw(inp: StepInputs, rows: list[Sequence]
                    ) -> tuple[list[float], list[bool]] | None:
        """Per decode-graph row, (temperature, sampled) for the graph's own draw; None when
        a row needs top-k, top-p or its seeded generator (drawn eagerly after the graph)."""
        if not all(s.params.graph_drawn or s.params.greedy for s in rows):
            return None
        n = len(inp.tables)
        temps, sampled = [1.0] * n, [False] * n
        for i, s in zip(inp.rows, rows, strict=True):
            if not s.params.greedy:
                temps[i], sampled[i] = s.params.temperature, True
        return temps, sampled
