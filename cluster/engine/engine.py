"""The engine loop: admit requests, schedule a step, run it, hand out new tokens."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from cluster.arch import context_length
from cluster.config import EngineConfig
from cluster.engine import kv_scales, kv_tier, quant
from cluster.engine.block_manager import BlockManager
from cluster.engine.deepseek import DEEPSEEK_TP_REFUSED
from cluster.engine.model import ModelArch
from cluster.engine.model_runner import DTYPES, Launched, ModelRunner
from cluster.engine.sampler import NAN_TOKEN
from cluster.engine.scheduler import ScheduledBatch, Scheduler
from cluster.engine.sequence import PENDING, SamplingParams, Sequence
from cluster.engine.step_pace import StepPace
from cluster.load import PREFIX_SUMMARY_BLOCKS

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # stop | length | abort | error | moved | dead
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    queue_s: float | None = None  # with a request's first token: time waiting to be scheduled
    prefill_s: float | None = None  # and from then to its first token
    logprobs: list | None = None  # per new token, where asked for (sampler.Logprobs)
    prompt_logprobs: list | None = None  # with the first token: per prompt token (first None)


@dataclass
class Flight:
    """A step on the GPU whose tokens were not read yet."""

    batch: ScheduledBatch
    launched: Launched
    at: list[int | None]  # per sequence: the place of its token (None: a prefill chunk)
    written: list[int]  # per sequence: tokens whose KV the cache holds once the step is done
    launch_s: float = 0.0  # time spent launching it: on the CPU, its whole computation

    def tokens(self) -> tuple[list[int | None], list]:
        """Waits for the step; its token per sequence (plain greedy steps: no logprobs)."""
        out: list[int | None] = [None] * len(self.batch.seqs)
        for i, tok in zip(self.launched.inp.rows, self.launched.result(), strict=True):
            out[i] = tok
        return out, [None] * len(out)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    waiting_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_queries: int
    prefix_hits: int
    preemptions: int
    generated_tokens: int
    steps: int
    step_s: float  # recent wall time of one step (moving average)
    # a decode step's time at batch n ~ step_a_s + step_b_s n (cluster/engine/step_pace.py;
    # 0, 0: no decode step yet): what routers compare replicas' paces by
    step_a_s: float = 0.0
    step_b_s: float = 0.0
    pace_age_s: float = 0.0  # since the line last saw a decode step
    at: float = 0.0  # time.monotonic() of this reading

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / max(1, self.kv_blocks_total)


def pick_device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(cfg: EngineConfig, device: torch.device) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def build_runner(model_dir: str, cfg: EngineConfig, weights, init_group=None) -> ModelRunner:
    """The model runner of one rank; init_group(device) -> TP joins the rank's TP group."""
    arch = ModelArch.from_hf(model_dir)
    device = pick_device(cfg)
    if device.type == "cpu" and cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    tp = init_group(device) if init_group else None
    fp8_native = quant.check_supported(cfg, device, arch)  # before loading any weight
    from_files = weights is None  # the checkpoint in model_dir (not synthetic or given)
    fp8_weights = quant.fp8_checkpoint(model_dir) if from_files else None
    if fp8_weights:  # read dequantized: the loader knows no scales
        weights = quant.dequantized_checkpoint(model_dir, fp8_weights)
    torch.manual_seed(cfg.seed)
    if cfg.kv_cache_dtype == "fp8" and arch.deepseek is not None:
        raise ValueError("kv_cache_dtype fp8 is not supported for DeepSeek's latent cache")
    runner = ModelRunner(model_dir, arch, device, DTYPES[resolve_dtype(cfg, device)],
                         resolve_max_model_len(arch, cfg), cfg.block_size, weights, tp,
                         cfg.cpu_attention_kernel,
                         torch.float8_e4m3fn if cfg.kv_cache_dtype == "fp8" else None,
                         cfg.deepseek_kernels, cfg.cpu_attention_threads)
    if cfg.quantization:
        quant.quantize_model(runner.model, cfg, fp8_native)
    runner.pack_linears()
    if cfg.kv_cache_dtype == "fp8" and cfg.kv_cache_scales != "none":
        set_kv_scales(runner, model_dir, cfg.kv_cache_scales, from_files)
    return runner


def set_kv_scales(runner: ModelRunner, model_dir: str, how: str, from_files: bool) -> None:
    """An fp8 cache's per-head scales (kv_scales.py): the checkpoint's under `auto` where it
    has them, else calibrated; every rank of a TP group runs the same calibration."""
    model, arch = runner.model, runner.arch
    lay = model.layout
    scales = None
    if how == "auto" and from_files:
        scales = kv_scales.from_checkpoint(model_dir, arch.num_layers, lay.kv_heads,
                                           lay.kv_head_start, arch.num_kv_heads)
    if scales is None:
        scales = kv_scales.calibrate(model, arch.vocab_size, runner.device,
                                     min(kv_scales.CALIBRATION_TOKENS, runner.max_model_len))
    for layer, s in zip(model.layers, scales, strict=True):
        layer.self_attn.kv_scale = s.to(runner.device, runner.dtype)
    runner.kv_scales = scales
    log.info(kv_scales.describe(scales))


def resolve_max_model_len(arch: ModelArch, cfg: EngineConfig) -> int:
    return context_length(arch, cfg.max_model_len)


class LLMEngine:
    def __init__(self, model_dir: str, cfg: EngineConfig, weights=None, kv_pool=None,
                 max_fetch_wait_s: float = 1.0):
        """weights: None (the checkpoint in model_dir), "random", or (name, tensor) pairs;
        kv_pool: the cluster KV pool's client (cluster.kv_pool.PoolClient), tier 2."""
        self.cfg = cfg
        self.model_dir = model_dir
        self._grammar_vocab = None
        self.arch = ModelArch.from_hf(model_dir)
        self.device = pick_device(cfg)
        self.overlap = cfg.overlap_steps if cfg.overlap_steps is not None else \
            self.device.type == "cuda"
        if self.device.type == "cpu":
            log.warning("no GPU in this process: the engine runs on the CPU")
        dtype = resolve_dtype(cfg, self.device)
        self.max_model_len = resolve_max_model_len(self.arch, cfg)
        peers, init_group = None, None
        if (cfg.tensor_parallel_size > 1 and self.arch.deepseek is not None
                and self.arch.attention_bias):
            raise ValueError(DEEPSEEK_TP_REFUSED)  # before any peer is launched
        if cfg.tensor_parallel_size > 1:
            from cluster.engine.tp_workers import Peers
            from cluster.engine.tp_workers import init_group as join

            peers, method = Peers.launch(model_dir, cfg, weights, cfg.tensor_parallel_size,
                                         self.device.type == "cuda")

            def init_group(device):
                return join(method, 0, cfg.tensor_parallel_size, device)

        self.runner = build_runner(model_dir, cfg, weights, init_group)
        self.runner.peers = peers
        if peers:
            peers.start(self.runner.tp.control)
        num_blocks = cfg.num_kv_blocks or self._size_kv_cache()
        if num_blocks * cfg.block_size < self.max_model_len:
            raise ValueError(f"{num_blocks} KV blocks of {cfg.block_size} tokens cannot hold one "
                             f"sequence of max_model_len={self.max_model_len}")
        self._on_all_ranks("allocate_kv_cache", num_blocks)
        if self.device.type == "cuda" and cfg.cuda_graphs:
            # every rank captures together: the all-reduces are inside the graphs
            self._on_all_ranks("capture_decode_graphs", cfg.max_num_seqs)
            self._on_all_ranks("capture_mixed_graphs", cfg.max_num_seqs,
                               cfg.max_num_batched_tokens)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.runner.table_rows = self.blocks.rows
        self.blocks.tier = kv_tier.build(self.runner, cfg, model_dir, weights, kv_pool,
                                         max_fetch_wait_s)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.eos = frozenset(self.arch.eos_token_ids)
        self.generated_tokens = 0
        self.steps = 0
        # device time between steps while requests wait (the GPU idles through it)
        self.idle_gaps: deque[float] = self.runner.clock.gaps
        self.step_delay_s = 0.0  # set only to emulate a slower replica in benchmarks
        self.step_s = 0.0
        self._done_at = 0.0  # when the last step's tokens were read (perf_counter)
        self.pace = StepPace()
        self._next: ScheduledBatch | None = None  # scheduled during the last call
        self._flight: Flight | None = None  # _next, when it was launched too
        # what other threads read (replica stats, routing reports, metrics): published by
        # the engine's own thread, since the scheduler's queues change under a reader
        self.snapshot = self.stats()
        self.prefix_digests: tuple[int, ...] = ()
        self._digests_at = 0.0
        log.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
                 self.arch.architecture, self.device, dtype, num_blocks, cfg.block_size,
                 self.max_model_len)

    def _on_all_ranks(self, method: str, *args) -> None:
        if self.runner.peers:
            self.runner.peers.submit(method, *args)
        getattr(self.runner, method)(*args)

    def _size_kv_cache(self) -> int:
        per_block = self.runner.kv_bytes_per_block()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            a, c = self.arch, self.cfg
            # room for the largest step's activations and the decode graphs' logits
            act = c.max_num_batched_tokens * (a.hidden_size * 6 + a.intermediate_size * 3 +
                                             (a.num_heads + 2 * a.num_kv_heads) * a.head_dim)
            reserve = act * 4 + 3 * min(c.max_num_seqs, 512) * a.vocab_size * 4 + 2**30
            budget = free - total * (1 - c.gpu_memory_utilization) - reserve
        else:
            budget = self.cfg.cpu_kv_cache_gib * 2**30
        needed = self.cfg.max_num_seqs * self.max_model_len // self.cfg.block_size + 1
        return max(1, min(int(budget // per_block), needed))

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, queued_s: float = 0.0, movable: bool = False,
                    cache_salt: str = "", after: str | None = None) -> None:
        """queued_s: how long the request already waited in another replica's queue;
        cache_salt: its tenant's prefix-cache salt (different salts share no KV);
        after: a sibling choice of the same prompt (n > 1) whose prefill this one waits
        for, to take its prompt blocks from the prefix cache instead of computing them."""
        if request_id in self.seqs:
            raise ValueError(f"duplicate request id {request_id}")
        if not prompt_token_ids:
            raise ValueError("empty prompt")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens "
                             f"({params.max_tokens}) exceeds max_model_len {self.max_model_len}")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise ValueError(f"token ids out of vocabulary: {bad[:5]}")
        seq = Sequence(request_id, list(prompt_token_ids), params, movable=movable,
                       cache_salt=cache_salt)
        seq.arrival -= max(0.0, queued_s)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # the first token has no logprob
        if params.grammar is not None:
            from cluster.structured import GrammarSpec, GrammarState

            seq.grammar = GrammarState(GrammarSpec.from_wire(params.grammar),
                                       self.grammar_vocab())
            for tok in seq.output_ids:  # a resumed stream: what it already made
                if not seq.grammar.accept(tok):
                    raise ValueError("a resumed structured output does not fit its grammar")
        self.seqs[request_id] = seq
        parent = self.seqs.get(after) if after else None
        if parent is not None and self.cfg.enable_prefix_caching and \
                not parent.is_finished and parent.num_output_tokens == 0:
            seq.waiting_for = parent
            parent.held.append(seq)
            return
        if self.blocks.tier is not None:  # the pool's transfer overlaps its time in line
            self.blocks.tier.prefetch(seq, self.blocks)
        self.scheduler.add(seq)

    def grammar_vocab(self):
        """llguidance's view of this model's vocabulary (built when first needed: a replica
        that never sees a grammar never builds it)."""
        if self._grammar_vocab is None:
            from cluster.structured import tokenizer_info

            self._grammar_vocab = tokenizer_info(self.model_dir)
        return self._grammar_vocab

    def _release_held(self, seq: Sequence) -> None:
        """Sibling choices that waited for seq's prefill join the queue, ahead of others."""
        for child in seq.held:
            child.waiting_for = None
            if not child.is_finished:
                self.scheduler.add(child)
        seq.held = []

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq.waiting_for is not None:  # held for a sibling's prefill: in no queue yet
            seq.waiting_for.held.remove(seq)
            seq.waiting_for = None
            self.scheduler._close(seq, "abort")
            return True
        self.scheduler.finish(seq, "abort")
        self._release_held(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def release_waiting(self, min_wait_s: float) -> list[RequestOutput]:
        """Hands back queued requests that waited at least min_wait_s and have not started:
        each ends here with finish_reason "moved" and no tokens, for another replica."""
        seqs = self.scheduler.release_waiting(time.monotonic() - min_wait_s)
        for seq in seqs:
            del self.seqs[seq.request_id]
            self._release_held(seq)
        return [RequestOutput(s.request_id, [], "moved", s.num_prompt_tokens) for s in seqs]

    def step(self) -> list[RequestOutput]:
        """Runs one step and returns its tokens. Plain steps are launched one ahead: the
        next step is scheduled and sent to the GPU before this one's tokens are read, so the
        host's work between steps (reading tokens, bookkeeping, scheduling, building inputs)
        overlaps the GPU's."""
        batch, flight = self._next, self._flight
        ahead = flight is not None  # launched in the last call, right after it was scheduled
        self._next = self._flight = None
        if flight is None:  # a batch scheduled last call but not launched: drop what ended
            batch = batch.live() if batch is not None else None
            if batch is None or not batch.seqs:
                batch = self.scheduler.schedule()
                if not batch.seqs:
                    return []
        t0 = time.perf_counter()
        launch_s = None  # a CPU step computes while it is launched: its time
        try:
            if flight is None and self._overlaps(batch):
                flight = self._launch(batch, None)
            if flight is None and self._plain(batch):
                # not launched ahead (a CPU engine): the same path, read at once; its
                # sampler is the device one, cheaper than the host's general one
                now = self._launch(batch, None)
                (tokens, lps), at, written = now.tokens(), now.at, now.written
                launch_s = now.launch_s
            elif flight is None:
                tokens, lps = self.runner.run(batch, self.eos)
                at, written = self._advance(batch)
            else:
                self._schedule_next(flight)  # on the CPU this computes the next step
                (tokens, lps), at, written = flight.tokens(), flight.at, flight.written
                launch_s = flight.launch_s
            self.runner.clock.collect()
        except Exception as err:  # e.g. CUDA out of memory: fail this step's requests only
            dropped = [] if self._next is None else self._next.seqs
            self._next = self._flight = None
            self.runner.clock.reset()
            if self.runner.peers is not None:
                raise  # ranks of a tensor-parallel group are out of step now: restart them all
            log.exception("engine step failed; failing its %d requests", len(batch.seqs))
            if self.device.type == "cuda":
                try:  # a step launched ahead may still read pinned buffers the next one reuses
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - the device itself failed: nothing to wait for
                    log.exception("device synchronize after a failed step")
                torch.cuda.empty_cache()
            hit = {id(seq): seq for seq in batch.seqs + dropped}  # the step and the next one
            outputs = [self._fail(seq, f"engine error: {type(err).__name__}: {err}")
                       for seq in hit.values() if not seq.is_finished]
            self.publish()
            return outputs
        done = time.perf_counter()
        if self.blocks.tier is not None and not batch.is_decode:  # the prefill speed its
            # fetch-or-compute rule uses: a CPU step computes while it is launched; on the
            # GPU one launched ahead ran from the end of the step before it (it was queued
            # behind it), one launched here from now
            if launch_s is not None and self.device.type != "cuda":
                took = launch_s
            else:
                took = done - (self._done_at if ahead else t0)
            self.blocks.tier.observe_step(batch.num_tokens, took)
        self._done_at = done
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.steps += 1
        dt = time.perf_counter() - t0
        self.step_s = dt if not self.step_s else 0.9 * self.step_s + 0.1 * dt
        if batch.is_decode:
            self.pace.observe(len(batch.seqs), dt)
        outputs = self._emit(batch, tokens, lps, at, written)
        if not self.has_work():
            self.runner.clock.reset()  # an empty queue is not a gap between steps
        self.publish()
        return outputs

    def _overlaps(self, batch: ScheduledBatch) -> bool:
        """Steps of plain requests (greedy, or temperature / top-k / top-p sampled on the
        device) on one rank run one ahead; penalties, logprobs, grammars and the like read
        the step's tokens on the host first, and TP peers run steps in lockstep."""
        return self.overlap and self._plain(batch)

    def _plain(self, batch: ScheduledBatch) -> bool:
        return self.runner.peers is None and all(seq.params.plain for seq in batch.seqs)

    def _launch(self, batch: ScheduledBatch, prev: Flight | None) -> Flight:
        """Sends a step to the GPU without waiting, then counts its tokens as computed:
        the scheduler's next call sees the sequences as they will be after it."""
        t = time.perf_counter()
        launched = self.runner.launch(batch, None if prev is None else prev.launched)
        return Flight(batch, launched, *self._advance(batch), time.perf_counter() - t)

    def _schedule_next(self, flight: Flight) -> None:
        """Schedules the step after `flight` and, when greedy, launches it before flight's
        tokens are read; its decode rows take flight's tokens on the device."""
        nxt = self.scheduler.schedule()
        if nxt.seqs:
            self._next = nxt
            if self._overlaps(nxt):
                self._flight = self._launch(nxt, flight)

    def _advance(self, batch: ScheduledBatch) -> tuple[list[int | None], list[int]]:
        """Counts a step's tokens as computed; a sequence whose row emits a token gets a
        PENDING place for it. Returns that place per sequence (None for a prefill chunk)
        and how many of its tokens have KV in the cache once this step is done."""
        at: list[int | None] = []
        written: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            written.append(seq.num_computed_tokens)
            if seq.num_computed_tokens < seq.num_tokens:
                at.append(None)
                continue
            seq.token_ids.append(PENDING)
            at.append(seq.num_tokens - 1)
            if self._ends_by_length(seq.params, seq.num_output_tokens, seq.num_tokens):
                seq.closing = True  # this token ends it: it is not scheduled again
        return at, written

    def _emit(self, batch: ScheduledBatch, tokens: list[int | None], lps: list,
              at: list[int | None], written: list[int]) -> list[RequestOutput]:
        """Puts a step's tokens in their places, ends sequences, makes the outputs. A
        sequence that ended (stop token, abort) after a later step was launched for it has
        that step's row dropped here. Blocks this step completed join the prefix cache; a
        block whose last slot the step launched after it writes waits for that step."""
        outputs = []
        for seq, tok, lp, i, n_written in zip(batch.seqs, tokens, lps, at, written,
                                              strict=True):
            if seq.is_finished:
                continue
            if i is None:
                self.blocks.register_full_blocks(seq, n_written)
                continue
            if tok == NAN_TOKEN:
                outputs.append(self._fail(seq, "numerical error: the model's logits for this "
                                               "request were not finite (NaN/inf)"))
                continue
            if seq.grammar is not None and not seq.grammar.accept(tok):
                outputs.append(self._fail(seq, f"structured output: token {tok} is not "
                                               "allowed by the grammar"))
                continue
            seq.token_ids[i] = tok
            self.blocks.register_full_blocks(seq, n_written)
            self.generated_tokens += 1
            n_out = i + 1 - seq.num_prompt_tokens
            reason = self._finish_reason(seq.params, tok, n_out, i + 1)
            if reason is None and seq.grammar is not None and seq.grammar.is_finished():
                reason = "stop"  # the grammar is complete: nothing but EOS could follow
            if reason:
                self.scheduler.finish(seq, reason)
                del self.seqs[seq.request_id]
            out = RequestOutput(seq.request_id, [tok], reason, seq.num_prompt_tokens,
                                seq.num_cached_prompt_tokens,
                                logprobs=None if lp is None else [lp])
            if n_out == 1:
                now = time.monotonic()
                out.queue_s = seq.first_scheduled - seq.arrival
                out.prefill_s = now - seq.first_scheduled
                out.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
                self._release_held(seq)  # its prompt blocks are in the prefix cache now
            outputs.append(out)
        return outputs

    def _fail(self, seq: Sequence, why: str) -> RequestOutput:
        self.scheduler.finish(seq, "error")
        self.seqs.pop(seq.request_id, None)
        self._release_held(seq)
        return RequestOutput(seq.request_id, [], "error", seq.num_prompt_tokens,
                             seq.num_cached_prompt_tokens, error=why)

    def _finish_reason(self, p: SamplingParams, tok: int, n_out: int, n_tokens: int
                       ) -> str | None:
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        return "length" if self._ends_by_length(p, n_out, n_tokens) else None

    def _ends_by_length(self, p: SamplingParams, n_out: int, n_tokens: int) -> bool:
        """Known before the token's value: what `_advance` marks as closing."""
        return n_out >= p.max_tokens or n_tokens >= self.max_model_len

    def stats(self) -> EngineStats:
        """A reading now; only on the engine's own thread (other threads read `snapshot`)."""
        s = self.scheduler
        a, b = self.pace.line()
        now = time.monotonic()
        return EngineStats(
            running=len(s.running), waiting=len(s.waiting), waiting_tokens=s.num_waiting_tokens,
            kv_blocks_used=self.blocks.num_used, kv_blocks_total=self.blocks.num_blocks,
            prefix_queries=self.blocks.prefix_queries, prefix_hits=self.blocks.prefix_hits,
            preemptions=s.num_preemptions, generated_tokens=self.generated_tokens,
            steps=self.steps, step_s=self.step_s, step_a_s=a, step_b_s=b,
            pace_age_s=self.pace.age_s(now), at=now)

    PREFIX_DIGESTS_EVERY_S = 0.5  # routers read them once a second

    def publish(self) -> None:
        """Replaces `snapshot` (one attribute write: readers see the old or the new one) and,
        every half second, the prefix digests the routers match prompts against."""
        self.snapshot = self.stats()
        if self.snapshot.at - self._digests_at >= self.PREFIX_DIGESTS_EVERY_S:
            self._digests_at = self.snapshot.at
            digests = self.blocks.cached_digests(PREFIX_SUMMARY_BLOCKS)
            if self.blocks.tier is not None:
                # the host tier's blocks are this replica's too: a copy back, never a
                # recompute or a fetch over the network (the routers weigh those less)
                digests += self.blocks.tier.host_digests(PREFIX_SUMMARY_BLOCKS)
            self.prefix_digests = tuple(digests)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Offline helper: runs prompts to completion, returns the output token ids."""
        ids = [f"offline-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts, strict=True):
            self.add_request(rid, p, params)
        out: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_work():
            for o in self.step():
                out[o.request_id].extend(o.new_token_ids)
        return [out[rid] for rid in ids]
