"""The app's configuration: one typed object, read from the `args` of a Serve config YAML.

A wrong key or value fails at start with the file, the field and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster.autoscaling import ScalingPolicy

DEFAULT_MODEL_DIR = Path(os.environ.get("TANDEM_HOME", "~/.cache/tandem")).expanduser() / \
    "models" / "tandem-tiny"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    path: str = Field(str(DEFAULT_MODEL_DIR), description="Hugging Face checkpoint folder; "
                      "default: the built-in model of `tandem model init` (`$TANDEM_HOME` "
                      "unset: `~/.cache/tandem`)")
    name: str = Field("tandem-tiny", description="the model id clients send")
    tool_parser: Literal["hermes", "llama3_json", "deepseek_v3"] | None = Field(
        "hermes", description="the model's own tool-call format, read back from its output "
        "for `tool_choice: auto` (hermes: Qwen/Hermes `<tool_call>` tags; llama3_json: "
        "Llama 3.x JSON; deepseek_v3: DeepSeek's markers); null: requests with tools are "
        "refused")
    reasoning_parser: Literal["deepseek_r1"] | None = Field(
        None, description="deepseek_r1: the output's `<think>...</think>` goes to "
        "`reasoning_content` (chat); null: left in the content")
    reasoning_starts_open: bool = Field(False, description="the chat template opens "
                                        "`<think>` in the prompt: output starts in reasoning")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return str(Path(os.path.expandvars(v)).expanduser())


class EngineConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: `cuda` when "
                                                   "the replica has a GPU, else `cpu` (logged)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto`: bfloat16 on a GPU, float32 on the CPU")
    max_model_len: int | None = Field(None, ge=16, description="context length (prompt + "
                                      "output); null: the model's")
    max_num_seqs: int = Field(64, ge=1, description="sequences in a batch")
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget per step "
                                        "(chunked prefill)")
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV block")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV blocks; null: sized from "
                                      "`gpu_memory_utilization` or `cpu_kv_cache_gib`")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="share of GPU "
                                          "memory the replica may use")
    cpu_kv_cache_gib: float = Field(0.25, gt=0.0, description="KV cache size (GiB) "
                                    "of the CPU engine")
    enable_prefix_caching: bool = Field(True, description="share KV blocks of equal prompt "
                                        "prefixes")
    cuda_graphs: bool = Field(True, description="capture decode and mixed steps in CUDA graphs")
    deepseek_kernels: bool = Field(True, description="DeepSeek models on a GPU: the routed "
                                   "experts in one fused Triton MoE kernel pair and MLA decode "
                                   "in a Triton kernel over the latent cache; false: the "
                                   "PyTorch paths (the reference)")
    overlap_steps: bool | None = Field(
        None, description="schedule and launch each plain step before the previous one's "
        "tokens are read (the host works while the GPU runs); null: on a GPU only (on the CPU "
        "a step computes as it is launched, so running one ahead only holds every token back "
        "a step); true: on the CPU too (tests of the GPU's logic)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (ranks) of one replica")
    stall_timeout_s: float = Field(120.0, gt=0, description="a replica whose engine finishes "
                                   "no step for this long while work waits fails its health "
                                   "check, and Serve replaces it")
    fault_injection: bool = Field(False, description="tests only: replicas accept "
                                  "inject_fault() calls that break their engine loop")
    fault_error_share: float = Field(0.0, ge=0, le=1, description="tests only (with "
                                     "`fault_injection`): this share of the requests an "
                                     "engine core gets fails at once with a server error "
                                     "(a bad version for rollout tests)")
    slow_replica_ranks: list[int] = Field(default_factory=list, description="benchmarks of "
                                          "uneven replicas: model replicas of these ranks "
                                          "sleep `slow_step_delay_s` after every step")
    slow_step_delay_s: float = Field(0.0, ge=0, description="the sleep of "
                                     "`slow_replica_ranks` after every step")
    cpu_attention_kernel: bool = Field(True, description="the CPU engine's decode "
                                       "attention, and its rotary, add + RMS norm and SiLU "
                                       "x up ops, in C++ kernels built on first use (g++, "
                                       "ninja); false, or where they cannot be built: "
                                       "batched PyTorch SDPA and PyTorch ops")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads of the CPU "
                                      "engine; null: torch's default")
    cpu_attention_threads: int | None = Field(None, ge=1, description="threads of the C++ "
                                              "decode attention for steps of 16 or more "
                                              "decode rows, where the projections keep "
                                              "`torch_threads`: it streams the KV cache from "
                                              "memory, which more cores read faster (on a "
                                              "host whose other cores are free); null: the "
                                              "engine's own threads")
    seed: int = Field(0, description="torch's seed in each replica (requests with a "
                      "`seed` of their own use that)")
    quantization: Literal["int8", "fp8"] | None = Field(
        None, description="weights quantized at load, per output channel: `int8` "
        "weight-only (CPU engine; those matmuls in bf16); `fp8` e4m3 weights and per-token "
        "activations through `torch._scaled_mm` (Hopper GPUs); null: as loaded, in `dtype`")
    quantize_lm_head: bool | None = Field(
        None, description="with `quantization`: the LM head too; null: for int8 yes (a small "
        "model's largest matmul: Qwen2.5-0.5B decodes 3x faster on a CPU, its logits ~0.2% "
        "further off), for fp8 no (e4m3 activations into the head took a confident test "
        "model's logit error from 1.4% to 4%, for ~6% of an 8B model's weights)")
    fp8_emulation: bool = Field(False, description="`fp8` where there are no FP8 matmuls "
                                "(CPU): emulated, for tests (slower than no quantization); "
                                "false: the engine refuses to start there")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="the KV cache's element type: `auto`, the model's `dtype`; `fp8`, "
        "e4m3 holding K and V over per-layer, per-KV-head scales (`kv_cache_scales`), half "
        "bf16's bytes per token: twice the tokens in the same memory (not for DeepSeek's "
        "latent cache)")
    kv_cache_scales: Literal["auto", "calibrate", "none"] = Field(
        "auto", description="an fp8 KV cache's scales (powers of two, one for K and one for "
        "V per layer and KV head): `auto` the checkpoint's (`self_attn.k_scale` / `v_scale`, "
        "as llm-compressor writes them) where it has them, else `calibrate`d at load from "
        "one forward pass (the largest |K| and |V| of each head, with 4x headroom); `none` "
        "1.0, K and V stored as they are (e4m3 saturates at +-448)")
    kv_host_tier_bytes: int = Field(0, ge=0, description="host memory (bytes) of the KV "
                                    "cache's tier 1: blocks the prefix cache evicts are "
                                    "kept there (LRU, at most this much) and copied back on "
                                    "a prefix miss instead of recomputed (see KV cache "
                                    "tiers); 0: off")

    @model_validator(mode="after")
    def _check_faults(self):
        if self.fault_error_share and not self.fault_injection:
            raise ValueError("fault_error_share needs fault_injection: true")
        return self


class KVPoolConfig(Strict):
    """Tier 2 of the KV cache: store actors in the CPU nodes' memory (cluster/kv_store.py)."""

    label_selector: dict[str, str] = Field(default_factory=lambda: {"cpu-arch": "kunpeng"},
                                           description="one store actor on each live node "
                                           "carrying these Ray node labels")
    capacity_bytes: int = Field(4 << 30, ge=1 << 20, description="KV block bytes each "
                                "store holds at most (least recently used out first)")
    max_fetch_wait_s: float = Field(1.0, gt=0, description="longest a request waits at "
                                    "admission for its blocks from the pool (it waits less "
                                    "when computing them is faster: see KV cache tiers)")
    index_blocks: int = Field(16384, ge=0, le=1 << 20, description="newest blocks of each "
                              "store the routers' cluster index reads (once per "
                              "`router.stats_period_s`, 8 bytes a block, only when the "
                              "store changed); 0: no index (routers see local caches only)")
    transport: Literal["auto", "tcp", "ray"] = Field(
        "auto", description="how engines fetch blocks: auto, Mooncake's transfer engine "
        "(the stores writing into the engines' memory; over RDMA where it finds an RDMA "
        "device, TCP otherwise) where both ends load it, else Ray's object transfer; tcp: "
        "the same, TCP even where RDMA devices are; ray: always Ray's (spills go by Ray "
        "either way)")
    write_through_hits: int | None = Field(
        None, ge=0, le=1 << 20, description="null: blocks reach the pool when a device "
        "cache evicts them (write-back); N: a block is also written through to the pool once "
        "N later prompts reused it from a device cache (0: every block as soon as it is "
        "full), so a hot prefix sits in the pool while its holder still caches it and any "
        "replica can fetch it (see KV cache tiers)")


class Pool(Strict):
    num_replicas: int = Field(1, ge=1, description="fixed size; ignored under autoscaling")
    autoscaling: ScalingPolicy | None = Field(None, description="our autoscaling policy "
                                              "(its fields: see Autoscaling); null: a "
                                              "fixed `num_replicas`")
    num_cpus: float = Field(0.5, ge=0, description="CPUs each replica reserves")
    max_ongoing_requests: int = Field(64, ge=1, description="requests Serve sends one "
                                      "replica at a time")
    label_selector: dict[str, str] = Field(default_factory=dict, description="Ray node "
                                           "labels the node of a replica must carry")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="spread replicas over hosts, so that losing one host loses "
        "at most this many")


class PoolConfig(Pool):
    num_gpus: float = Field(0, ge=0, description="GPUs each replica reserves")


class CpuPoolConfig(Pool):
    """Model replicas that run the engine on the CPU of a Kunpeng host."""

    num_cpus: float = Field(4.0, ge=1, description="CPUs each replica reserves; its engine "
                            "runs that many threads (whole cores, at most the host's)")
    label_selector: dict[str, str] = Field(default_factory=lambda: {"cpu-arch": "kunpeng"},
                                           description="Ray node labels the node of a "
                                           "replica must carry")
    pin_threads: bool = Field(True, description="pin each replica's engine to its own "
                              "physical cores (one NUMA node where they fit), one thread "
                              "per core")
    engine: dict[str, Any] = Field(default_factory=dict, description="engine settings of "
                                   "these replicas that differ from the model's `engine` "
                                   "(`device` is `cpu`, `torch_threads` its cores)")


def cpu_engine(engine: EngineConfig, pool: CpuPoolConfig) -> EngineConfig:
    """The engine of a CPU pool's replicas: the model's, with the pool's own settings."""
    fixed = {"device", "torch_threads"} & pool.engine.keys()
    if fixed:
        raise ValueError(f"cpu_pool.engine: {', '.join(sorted(fixed))} is set by the pool")
    try:
        return EngineConfig.model_validate({**engine.model_dump(), **pool.engine,
                                            "device": "cpu"})
    except ValidationError as err:
        e = err.errors()[0]
        raise ValueError(f"cpu_pool.engine.{'.'.join(map(str, e['loc']))}: {e['msg']} "
                         f"(got {e.get('input')!r})") from None


def _frontend_pool() -> PoolConfig:
    return PoolConfig(label_selector={"cpu-arch": "kunpeng"}, max_ongoing_requests=512)


def _model_pool() -> PoolConfig:
    return PoolConfig(label_selector={"node-role": "model"}, num_cpus=1)


ReplicaPolicy = Literal["prefix_aware", "least_load", "power_of_two", "round_robin"]


class HybridConfig(Strict):
    """Between a model's GPU and CPU pools (router.policy hybrid; see Hybrid routing)."""

    cpu_cost_max: float = Field(0.0, ge=0, description="requests costing less (FLOPs: "
                                "(prompt + max_tokens) x 2 x the model's parameters) go to "
                                "the CPU pool; 0: none")
    gpu_busy_max: float = Field(0.8, gt=0, le=1, description="GPU pool utilization (its "
                                "coolest replica's KV use, batch fill with queue, NVML busy) "
                                "above which new work overflows to the CPU pool")
    slo_ttft_ms: float = Field(2000.0, gt=0, description="TTFT a request may get (header "
                               "`x-slo-ttft-ms` per request): never sent to a CPU pool "
                               "predicted to exceed it")
    replica_policy: ReplicaPolicy = Field("prefix_aware", description="replica choice "
                                          "inside each pool")


class RouterConfig(Strict):
    policy: Literal["prefix_aware", "least_load", "power_of_two", "round_robin",
                    "serve_default", "hybrid"] = Field(
        "prefix_aware", description="replica choice (see The router); `serve_default`: "
        "Serve's own router; `hybrid`: a model's GPU or CPU pool first (`router.hybrid`), "
        "then `hybrid.replica_policy` in it")
    stats_period_s: float = Field(1.0, gt=0, description="how often replicas report their "
                                  "load (s)")
    prefix_margin: float = Field(1.0, ge=0, description="load-score lead the prefix holder "
                                 "may have over the least loaded replica (times the share "
                                 "of its cached prefix the least loaded one lacks)")
    pool_block_weight: float = Field(0.5, ge=0, le=1, description="with `kv_pool`: what a "
                                     "block the pool holds counts for `prefix_aware`, "
                                     "against 1 for a block in the replica's own cache (a "
                                     "pool block costs a fetch); 0: the pool is not counted")
    kv_hot: float = Field(0.95, gt=0, le=1, description="KV use above which a replica gets "
                          "no new work while a cooler one exists")
    score_hot: float = Field(4.0, gt=0, description="load score above which a replica gets "
                             "no new work while a cooler one exists")
    stale_after_s: float = Field(5.0, gt=0, description="a replica silent this long ranks "
                                 "last")
    move_after_s: float | None = Field(1.0, gt=0, description="a hot replica hands requests "
                                       "queued this long (not started) back to be routed "
                                       "again, once each; null: never")
    hybrid: HybridConfig = Field(default_factory=HybridConfig, description="the hybrid "
                                 "policy's thresholds")


class IngressConfig(Strict):
    max_in_flight: int = Field(256, ge=1, description="generation requests per frontend "
                               "replica; beyond: HTTP 429 with Retry-After")
    migration_limit: int = Field(3, ge=0, description="times a stream may move to another "
                                 "model replica when its replica's engine is lost mid-stream "
                                 "(it resumes from the tokens already sent)")
    stream_buffer_chars: int = Field(1 << 20, ge=1024, description="text a stream may hold "
                                     "for a client that stopped reading; beyond, its "
                                     "generation ends with an error (its KV is freed)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body; "
                                "beyond: HTTP 413")
    request_timeout_s: float = Field(600.0, gt=0, description="deadline of a request; a "
                                     "client may ask for less with X-Request-Timeout")
    api_keys_file: str | None = Field(None, description="API keys, one per line, re-read on "
                                      "change; no keys (file or variable): no "
                                      "authentication")
    api_keys_env: str | None = Field("TANDEM_API_KEYS", description="environment variable "
                                     "with comma-separated API keys")
    protect_health_and_metrics: bool = Field(False, description="require an API key on "
                                             "/health and /metrics too (default: open to "
                                             "probes and Prometheus)")


GPU, CPU = "gpu", "cpu"  # a model's two pools


class ModelEntry(Strict):
    """One model of several (`models:`): its checkpoint, engine and pools."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="as `model`")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="as `engine`")
    model_pool: PoolConfig | None = Field(default_factory=_model_pool, description="as "
                                          "`model_pool`; null: none")
    cpu_pool: CpuPoolConfig | None = Field(None, description="as `cpu_pool`")

    @model_validator(mode="after")
    def _check(self):
        self.check()
        return self

    def check(self) -> None:
        if self.model_pool is None and self.cpu_pool is None:
            raise ValueError("a model needs a model_pool, a cpu_pool or both")
        if self.cpu_pool is not None:
            cpu_engine(self.engine, self.cpu_pool)

    def pools(self) -> list[str]:
        return [p for p, pool in ((GPU, self.model_pool), (CPU, self.cpu_pool)) if pool]

    def engine_of(self, pool: str) -> EngineConfig:
        return self.engine if pool == GPU else cpu_engine(self.engine, self.cpu_pool)


class CanaryConfig(ModelEntry):
    """A new version of one served model (its `model.name`) beside the running one: its own
    replicas (deployments suffixed `-canary`), given `share` of that model's new requests."""

    share: float = Field(0.0, ge=0, le=1, description="the share of new requests it gets "
                         "(sticky per `user` or `x-tandem-session`, random without one)")


class AppConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig, description="the checkpoint served")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="the engine of "
                                 "each model replica")
    frontend_pool: PoolConfig = Field(default_factory=_frontend_pool, description="the HTTP "
                                      "frontends: OpenAI API, chat templates, tokens, stop "
                                      "strings, on the Kunpeng CPU nodes")
    model_pool: PoolConfig | None = Field(default_factory=_model_pool, description="the "
                                          "model replicas, on the GPU nodes; null: none "
                                          "(a CPU pool only)")
    cpu_pool: CpuPoolConfig | None = Field(None, description="model replicas running the "
                                           "engine on Kunpeng CPUs, beside or instead of "
                                           "`model_pool` (see Hybrid routing); null: none")
    models: list[ModelEntry] = Field(default_factory=list, description="several models, "
                                     "each with `model`, `engine`, `model_pool`, `cpu_pool` "
                                     "of its own (then those keys stay unset here); empty: "
                                     "the one model of those keys")
    router: RouterConfig = Field(default_factory=RouterConfig, description="how a "
                                 "frontend picks a model replica for a request")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="what the "
                                   "frontends admit: API keys, limits, deadlines, migration")
    canary: CanaryConfig | None = Field(None, description="a canary release of one model "
                                        "(see Canary releases); null: none")
    kv_pool: KVPoolConfig | None = Field(None, description="the cluster KV pool, tier 2 "
                                         "of the KV cache: each engine core starts or finds "
                                         "its store actors (see KV cache tiers); null: none")


    @model_validator(mode="after")
    def _check_models(self):
        if self.models:
            fields = type(self).model_fields
            # compared with the defaults, not the keys given: a dumped config has them all
            alone = [k for k in ("model", "engine", "model_pool", "cpu_pool")
                     if getattr(self, k) != fields[k].get_default(call_default_factory=True)]
            if alone:
                raise ValueError(f"with `models`, set {', '.join(sorted(alone))} per model")
        else:  # the one model of the top-level keys: what ModelEntry checks of each in models
            self.served()[0].check()
        entries = self.served()
        names = [e.model.name for e in entries]
        twice = {n for n in names if names.count(n) > 1}
        if twice:
            raise ValueError(f"model names must differ: {', '.join(sorted(twice))}")
        both = [e.model.name for e in entries if len(e.pools()) == 2]
        if both and self.router.policy != "hybrid":
            raise ValueError(f"{', '.join(both)}: a model with a model_pool and a cpu_pool "
                             "needs router.policy: hybrid (which pool takes a request)")
        return self

    def served(self) -> list[ModelEntry]:
        """The models served: `models`, or the one of the top-level keys."""
        # (checked by _check_models: the top-level keys are validated already)
        return self.models or [ModelEntry.model_construct(
            model=self.model, engine=self.engine, model_pool=self.model_pool,
            cpu_pool=self.cpu_pool)]

    def of_model(self, entry: ModelEntry) -> AppConfig:
        """This config as a one-model config of `entry` (what its replicas and its
        frontend generations read)."""
        return self.model_copy(update={"model": entry.model, "engine": entry.engine,
                                       "model_pool": entry.model_pool,
                                       "cpu_pool": entry.cpu_pool, "models": []})

    def deployment(self, entry: ModelEntry, pool: str) -> str:
        """The Serve deployment of a model's pool: `ModelReplica` and `ModelReplicaCPU` for
        the one-model config (as before), suffixed with the model's name under `models`."""
        base = "ModelReplica" if pool == GPU else "ModelReplicaCPU"
        return f"{base}-{entry.model.name}" if self.models else base


class ConfigError(ValueError):
    pass


def describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_app_config(args: dict, source: str = "app args") -> AppConfig:
    try:
        return AppConfig.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(describe(err, source)) from None


def load_serve_config(path: str | Path) -> tuple[dict, AppConfig]:
    """Reads a Serve config file and validates the tandem app's args in it."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err}") from None
    apps = [a for a in (doc or {}).get("applications", [])
            if a.get("import_path") == "deployments.app:app"]
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected one application with "
                          "import_path 'deployments.app:app' under 'applications'")
    return doc, parse_app_config(apps[0].get("args") or {}, f"{path}: applications[0].args")
