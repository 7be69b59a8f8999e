"""The app's configuration: one typed object, read from the `args` of a Serve config YAML.

A wrong key or value fails at start with the file, the field and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.autoscaling import ScalingPolicy

DEFAULT_MODEL_DIR = Path(os.environ.get("TANDEM_HOME", "~/.cache/tandem")).expanduser() / \
    "models" / "tandem-tiny"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    path: str = Field(str(DEFAULT_MODEL_DIR), description="Hugging Face checkpoint folder")
    name: str = Field("tandem-tiny", description="model id clients send")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return str(Path(os.path.expandvars(v)).expanduser())


class EngineConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=16, description="default: the model's")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget per step")
    block_size: int = Field(16, ge=1, le=256)
    num_kv_blocks: int | None = Field(None, ge=1, description="default: sized from memory")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    cpu_kv_cache_gib: float = Field(0.25, gt=0.0, description="KV cache size on the CPU")
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True
    overlap_steps: bool = Field(True, description="schedule and launch each greedy step "
                                "before the previous one's tokens are read (the host works "
                                "while the GPU runs)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (ranks) of one replica")
    stream_interval_s: float = Field(0.0, ge=0, le=1, description="after its first token a "
                                     "stream sends at most one message per interval, tokens "
                                     "merged: fewer messages through Serve with many streams")
    # benchmarks of uneven replicas: these replica ranks sleep this long after every step
    slow_replica_ranks: list[int] = Field(default_factory=list)
    slow_step_delay_s: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    seed: int = 0


class PoolConfig(Strict):
    num_replicas: int = Field(1, ge=1, description="fixed size; ignored under autoscaling")
    autoscaling: ScalingPolicy | None = None
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    label_selector: dict[str, str] = Field(default_factory=dict)
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="spread replicas over hosts, so that losing one host loses "
        "at most this many")


def _tokenizer_pool() -> PoolConfig:
    return PoolConfig(label_selector={"cpu-arch": "kunpeng"}, max_ongoing_requests=256)


def _model_pool() -> PoolConfig:
    return PoolConfig(label_selector={"node-role": "model"}, num_cpus=1)


class RouterConfig(Strict):
    policy: Literal["prefix_aware", "least_load", "power_of_two", "round_robin",
                    "serve_default"] = "prefix_aware"  # serve_default: Serve's own router
    stats_period_s: float = Field(1.0, gt=0)
    prefix_margin: float = Field(1.0, ge=0, description="load-score lead the prefix holder "
                                 "may have over the least loaded replica")
    kv_hot: float = Field(0.95, gt=0, le=1, description="KV use above which a replica gets "
                          "no new work while a cooler one exists")
    score_hot: float = Field(4.0, gt=0, description="load score above which likewise")
    stale_after_s: float = Field(5.0, gt=0, description="a replica silent this long ranks "
                                 "last")
    move_after_s: float | None = Field(1.0, gt=0, description="a hot replica hands requests "
                                       "queued this long (not started) back to be routed "
                                       "again, once each; null: never")


class IngressConfig(Strict):
    num_replicas: int = Field(1, ge=1, description="HTTP handlers behind Serve's proxy: one "
                              "Python process each, which many streams can saturate")
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(512, ge=1)
    max_in_flight: int = Field(256, ge=1, description="generation requests per ingress "
                               "replica; beyond: HTTP 429 with Retry-After")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="beyond: HTTP 413")
    request_timeout_s: float = Field(600.0, gt=0, description="deadline of a request; a "
                                     "client may ask for less with X-Request-Timeout")
    api_keys_file: str | None = Field(None, description="one key per line, re-read on change")
    api_keys_env: str | None = Field("TANDEM_API_KEYS", description="comma-separated keys")
    protect_health_and_metrics: bool = False


class AppConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    tokenizer_pool: PoolConfig = Field(default_factory=_tokenizer_pool)
    model_pool: PoolConfig = Field(default_factory=_model_pool)
    router: RouterConfig = Field(default_factory=RouterConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)


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
