"""The engine loop: admit requests, schedule a step, run it, hand out new tokens."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from cluster.config import EngineConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.model import ModelArch
from cluster.engine.model_runner import DTYPES, ModelRunner
from cluster.engine.sampler import NAN_TOKEN
from cluster.engine.scheduler import ScheduledBatch, Scheduler
from cluster.engine.sequence import SamplingParams, Sequence

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # stop | length | abort | error | moved
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    queue_s: float | None = None  # with a request's first token: time waiting to be scheduled
    prefill_s: float | None = None  # and from then to its first token


@dataclass
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
    torch.manual_seed(cfg.seed)
    return ModelRunner(model_dir, arch, device, DTYPES[resolve_dtype(cfg, device)],
                       resolve_max_model_len(arch, cfg), cfg.block_size, weights, tp)


def resolve_max_model_len(arch: ModelArch, cfg: EngineConfig) -> int:
    return min(cfg.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)


class LLMEngine:
    def __init__(self, model_dir: str, cfg: EngineConfig, weights=None):
        """weights: None (the checkpoint in model_dir), "random", or (name, tensor) pairs."""
        self.cfg = cfg
        self.arch = ModelArch.from_hf(model_dir)
        self.device = pick_device(cfg)
        if self.device.type == "cpu":
            log.warning("no GPU in this process: the engine runs on the CPU")
        dtype = resolve_dtype(cfg, self.device)
        self.max_model_len = resolve_max_model_len(self.arch, cfg)
        peers, init_group = None, None
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
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.eos = set(self.arch.eos_token_ids)
        self.generated_tokens = 0
        self.steps = 0
        # host time between steps while requests wait: the GPU idles through it
        self.idle_gaps: deque[float] = deque(maxlen=4096)
        self._prev_end: float | None = None
        self.step_delay_s = 0.0  # set only to emulate a slower replica in benchmarks
        self.step_s = 0.0
        self._ahead = None  # (batch, Launched): the next decode step, already on the GPU
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
                    params: SamplingParams, queued_s: float = 0.0, movable: bool = False) -> None:
        """queued_s: how long the request already waited in another replica's queue."""
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
        seq = Sequence(request_id, list(prompt_token_ids), params, movable=movable)
        seq.arrival -= max(0.0, queued_s)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def release_waiting(self, min_wait_s: float) -> list[RequestOutput]:
        """Hands back queued requests that waited at least min_wait_s and have not started:
        each ends here with finish_reason "moved" and no tokens, for another replica."""
        seqs = self.scheduler.release_waiting(time.monotonic() - min_wait_s)
        for seq in seqs:
            del self.seqs[seq.request_id]
        return [RequestOutput(s.request_id, [], "moved", s.num_prompt_tokens) for s in seqs]

    def step(self) -> list[RequestOutput]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:  # launched during the previous call: its tokens are due now
            batch, launched = ahead
        else:
            batch, launched = self.scheduler.schedule(), None
            if not batch.seqs:
                return []
        t0 = time.perf_counter()
        try:
            if launched is None and self._overlaps(batch):
                launched = self.runner.launch(batch)
            if launched is not None:
                self._ahead = self._launch_next(batch, launched)
                tokens = launched.result()
            else:
                tokens = self.runner.run(batch)
            end = time.perf_counter()
            if self._prev_end is not None:
                # a step launched ahead was queued on the GPU: no gap for it to idle through
                gap = 0.0 if ahead is not None else self.runner.last_launch - self._prev_end
                self.idle_gaps.append(gap)
            self._prev_end = end
        except Exception as err:  # e.g. CUDA out of memory: fail this step's requests only
            self._ahead = None
            if self.runner.peers is not None:
                raise  # ranks of a tensor-parallel group are out of step now: restart them all
            log.exception("engine step failed; failing its %d requests", len(batch.seqs))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return [self._fail(seq, f"engine error: {type(err).__name__}: {err}")
                    for seq in batch.seqs if not seq.is_finished]
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.steps += 1
        dt = time.perf_counter() - t0
        self.step_s = dt if not self.step_s else 0.9 * self.step_s + 0.1 * dt
        outputs = []
        for seq, n, tok in zip(batch.seqs, batch.num_new_tokens, tokens, strict=True):
            if seq.is_finished:  # ended (stop token, abort) while this step ran ahead
                continue
            seq.num_computed_tokens += n
            self.blocks.register_full_blocks(seq)
            if tok is None:
                continue
            if tok == NAN_TOKEN:
                outputs.append(self._fail(seq, "numerical error: the model's logits for this "
                                               "request were not finite (NaN/inf)"))
                continue
            seq.token_ids.append(tok)
            self.generated_tokens += 1
            reason = self._finish_reason(seq, tok)
            if reason:
                self.scheduler.finish(seq, reason)
                del self.seqs[seq.request_id]
            out = RequestOutput(seq.request_id, [tok], reason, seq.num_prompt_tokens,
                                seq.num_cached_prompt_tokens)
            if seq.num_output_tokens == 1:
                now = time.monotonic()
                out.queue_s = seq.first_scheduled - seq.arrival
                out.prefill_s = now - seq.first_scheduled
            outputs.append(out)
        if not self.has_work():
            self._prev_end = None  # an empty queue is not a gap between steps
        return outputs

    def _overlaps(self, batch) -> bool:
        """Steps run one ahead for greedy decode batches on one rank (sampled tokens would
        need the sampler on the device; TP peers run steps in lockstep)."""
        return (self.cfg.overlap_steps and self.runner.peers is None and all(
            seq.params.greedy and seq.num_computed_tokens + 1 == seq.num_tokens
            for seq in batch.seqs))

    def _launch_next(self, batch, launched):
        """Launches the same sequences' next decode step before this one's tokens are read,
        when no waiting request could be admitted (none waits, or the batch is full) and no
        sequence ends by length with this token. A sequence that stops on this token wastes
        one row of the next step, dropped, and a request waiting for its place is admitted
        one step later."""
        s = self.scheduler
        if s.waiting and len(s.running) < s.max_num_seqs:
            return None
        for seq in batch.seqs:
            if seq.is_finished or seq.num_output_tokens + 1 >= seq.params.max_tokens or \
                    seq.num_tokens + 1 >= self.max_model_len:
                return None
        for seq in batch.seqs:
            if not self.blocks.allocate(seq, seq.num_computed_tokens + 2):
                return None
        nxt = ScheduledBatch(list(batch.seqs), [1] * len(batch.seqs))
        return nxt, self.runner.launch(nxt, prev=launched)

    def _fail(self, seq: Sequence, why: str) -> RequestOutput:
        self.scheduler.finish(seq, "error")
        self.seqs.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, [], "error", seq.num_prompt_tokens,
                             seq.num_cached_prompt_tokens, error=why)

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            running=len(s.running), waiting=len(s.waiting), waiting_tokens=s.num_waiting_tokens,
            kv_blocks_used=self.blocks.num_used, kv_blocks_total=self.blocks.num_blocks,
            prefix_queries=self.blocks.prefix_queries, prefix_hits=self.blocks.prefix_hits,
            preemptions=s.num_preemptions, generated_tokens=self.generated_tokens,
            steps=self.steps, step_s=self.step_s)

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
