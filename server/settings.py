"""The one settings object. Every knob is read here, from `LORAPLEX_*` variables, and passed down.

Bounds that depend on each other are checked at start (like vLLM's LoRAConfig), not at the
first request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapters.errors import InvalidInput
from adapters.s3.uris import parse_s3_uri
from adapters.validation import VLLM_LORA_RANKS

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    home: Path = Field(default=Path.home() / ".loraplex")
    """Data folder: SQLite registry, local adapter store, built base model, server secret."""
    host: str = "127.0.0.1"
    """Interface the gateway binds to."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Gateway port."""
    unit_name: str = Field(default="", pattern=r"^[A-Za-z0-9._:\[\]-]{0,255}$")
    """This unit's name, sent in the `X-Loraplex-Unit` header of every answer, so that behind
    Envoy a client (or a test) sees which unit served it. Unset: `host:port` of the gateway.
    On Kubernetes `$(POD_IP):8000`; in compose the service name and port."""
    admin_token: str | None = None
    """Bearer token of the admin API; generated and stored in the data folder when unset. On a
    fleet, set it from a Kubernetes Secret: every unit must accept the same token."""
    url: str | None = None
    """The running server the `loraplex` admin commands talk to (tenants, keys, adapters, jobs,
    engine); unset: http://127.0.0.1:<port>."""
    cache_salt_secret: str | None = None
    """Secret the per-tenant prefix-cache salt is derived from (HMAC). On a fleet, set it from a
    Kubernetes Secret: every unit must give a tenant the same salt. Unset: created once in the
    data folder, which the units of one box (`loraplex up --units N`) share."""
    unit_dir: Path | None = None
    """This unit's own folder: engine log, engine pid file, disk cache. Unset: the data folder.
    `loraplex up --units N` gives unit i `<home>/units/<i>`; everything else stays shared."""
    gateway_processes: int = Field(default=1, ge=1, le=64)
    """Gateway processes per unit, all on the unit's port (the kernel spreads connections).
    One process forwards about 10k-20k streamed tokens/s; more processes use more cores. The
    first owns the engine's adapter slots, the others use them through it. More than one
    needs `redis_url` (the rate-limit counters must be shared)."""
    gateway_process_index: int = Field(default=0, ge=0)
    """Which of the unit's gateway processes this is (set by the unit for its processes)."""
    database_url: str | None = None
    """SQLAlchemy async URL of the registry; a SQLite file in the data folder when unset."""

    model_name: str = DEFAULT_MODEL_NAME
    """Name the base model is served under; adapters resolve against it."""
    model_path: Path | None = None
    """Folder of the base model (HF layout). Unset: the default model is built into the data folder."""

    engine_url: str | None = None
    """URL of an already running vLLM OpenAI server; unset: loraplex spawns and supervises one."""
    engine_port: int = Field(default=0, ge=0, le=65535)
    """Loopback port of the spawned engine; 0 picks a free one."""
    engine_start_timeout_s: float = Field(default=600.0, gt=0)
    """How long the spawned engine may take to become healthy."""
    engine_request_timeout_s: float = Field(default=600.0, gt=0)
    """Upper bound on one forwarded request (non-streaming) or the gap between stream chunks."""
    engine_extra_args: str = ""
    """Extra command-line arguments for the spawned vLLM server, split like a shell would."""
    engine_memory_fraction: float = Field(default=0.3, gt=0, le=1)
    """--gpu-memory-utilization (on the CPU build: the share of host memory vLLM may reserve)."""
    engine_cpu_kvcache_gib: int = Field(default=2, ge=1)
    """VLLM_CPU_KVCACHE_SPACE for the CPU build."""
    max_model_len: int = Field(default=2048, ge=64)
    """Context length the engine serves."""

    max_loras: int = Field(default=4, ge=1)
    """Adapters one engine batch can mix (vLLM --max-loras). On the CPU engine 1 and 4
    measured the same tokens/s, 8 up to 17% less (within noise) and +0.1 GiB; with many
    different adapters in use at once, more lets more of them run together."""
    max_resident_adapters: int = Field(default=32, ge=1)
    """Adapters registered in the engine at once (vLLM --max-cpu-loras); LRU beyond that. A
    rank-8 q/v adapter of the default model is 3.7 MB of host memory; 8 and 32 measured the
    same engine memory and speed."""
    max_lora_rank: int = 16
    """Largest adapter rank the engine accepts (vLLM --max-lora-rank). Every request pays for
    it, base-model requests too: on the CPU engine rank 64 streamed about 0.6x the base
    tokens/s and 0.3x the adapter tokens/s of rank 16 (BENCHMARKS.md, engine sweep).
    16 is the fine-tuning default rank; raise it to serve larger adapters."""
    adapter_slot_wait_s: float = Field(default=30.0, ge=0)
    """How long a request waits for a residency slot when every slot is in use."""

    max_in_flight: int = Field(default=256, ge=1)
    """Requests forwarded to the engine at once; more wait, let in round-robin by tenant."""
    tenant_max_in_flight: int = Field(default=64, ge=1)
    """Requests of one tenant forwarded at once."""
    tenant_max_queue: int = Field(default=256, ge=0)
    """Requests of one tenant that may wait for admission (429 beyond)."""
    admission_wait_s: float = Field(default=60.0, gt=0)
    """Longest wait for admission before 429."""
    admission_policy: Literal["token_fair", "round_robin", "fifo"] = "token_fair"
    """Who gets freed engine capacity first when requests wait. `token_fair`: the tenant
    served the fewest weighted tokens (Virtual Token Counter); `round_robin`: tenants in turn,
    a request each; `fifo`: arrival order, ignoring tenants (for comparison only)."""
    fair_output_token_weight: float = Field(default=2.0, ge=0, le=100)
    """Cost of a generated token relative to a prompt token in token-fair admission (VTC's
    w_p/w_q; decoding a token costs the engine more than prefilling one)."""

    redis_url: str | None = None
    """Redis (or Valkey) holding the rate-limit counters every unit shares, e.g.
    `redis://redis:6379/0`. Unset: counters in this process, right for a single gateway."""
    ratelimit_failure_mode: Literal["open", "closed"] = "open"
    """When Redis cannot be reached: `open` serves without limits (counted in
    loraplex_ratelimit_backend_errors, logged once per outage), `closed` answers 503."""
    redis_timeout_s: float = Field(default=0.25, gt=0, le=30)
    """Timeout of one Redis call of the rate limiter (it is on every request's path)."""
    usage_flush_s: float = Field(default=5.0, gt=0, le=3600)
    """How often metered usage is added to the registry. A crash loses at most this much."""

    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest body accepted on the tenant API (413 above it)."""
    max_upload_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
    """Largest adapter upload accepted on the admin API (413 above it)."""
    max_adapter_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
    """Largest adapter weights file accepted at registration."""
    local_source_allowlist: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Comma-separated folders the admin API may register adapters from by path (empty: none)."""

    workers: int = Field(default=1, ge=0, le=8)
    """Training workers `loraplex up` starts beside the gateway (0: none; run `loraplex worker`)."""
    worker_lease_s: float = Field(default=30.0, ge=3)
    """A job whose worker has not renewed its lease for this long is taken over by another."""
    gateway_url: str | None = None
    """Where a training worker reaches a gateway for its end-of-job evaluation through the
    serving engine (the admin API). Unset: this host and port (what `loraplex up` serves)."""
    evaluation_concurrency: int = Field(default=8, ge=1, le=256)
    """Requests one evaluation keeps in flight to the engine at once."""
    evaluation_timeout_s: float = Field(default=3600.0, gt=0)
    """How long a training worker waits for the gateway's evaluation of a job."""

    engine_health_poll_s: float = Field(default=2.0, gt=0)
    """How often the engine's health is checked (an engine restart is noticed within this)."""
    registry_poll_s: float = Field(default=1.0, gt=0)
    """How often the registry generation is read: revocations, alias moves and new versions
    made by another gateway or a training worker reach this one within this time."""
    training_metrics_poll_s: float = Field(default=10.0, gt=0)
    """How often the training-job gauges are refreshed from the registry."""

    store: str | None = None
    """Where adapter versions live: `s3://bucket/prefix`, or a local folder (default: home/store)."""
    s3_endpoint_url: str | None = None
    """S3 endpoint for MinIO or a local S3; unset: AWS. Credentials: the standard AWS chain."""
    s3_region: str | None = None
    """S3 region; unset: the standard AWS configuration (AWS_DEFAULT_REGION, ...)."""
    s3_source_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated `s3://bucket/prefix` that registration may copy adapters from."""
    s3_connect_timeout_s: float = Field(default=3.0, gt=0)
    """Connect timeout of one S3 call."""
    s3_read_timeout_s: float = Field(default=20.0, gt=0)
    """Read timeout of one S3 call."""
    s3_max_attempts: int = Field(default=3, ge=1, le=10)
    """Attempts per S3 call (botocore standard retries)."""
    cache_max_bytes: int = Field(default=10 * 1024**3, ge=1024 * 1024)
    """Bound of the local disk cache of adapters fetched from S3 (LRU beyond it)."""

    @field_validator("s3_source_allowlist", "local_source_allowlist", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """`a,b` (documented), or a JSON array (what the local allow-list once required)."""
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                try:
                    return json.loads(value)
                except ValueError as exc:
                    raise ValueError(f"not a JSON array nor a comma-separated list: {value!r}") from exc
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _default_unit_name(self) -> Settings:
        if not self.unit_name:
            host = f"[{self.host}]" if ":" in self.host else self.host
            self.unit_name = f"{host}:{self.port}"
        return self

    @model_validator(mode="after")
    def _check_bounds(self) -> Settings:
        if self.max_resident_adapters < self.max_loras:
            raise ValueError(
                f"max_resident_adapters ({self.max_resident_adapters}) must be >= max_loras "
                f"({self.max_loras}): vLLM requires max_cpu_loras >= max_loras"
            )
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}")
        if self.gateway_processes > 1 and not self.redis_url:
            raise ValueError(
                f"gateway_processes={self.gateway_processes} needs redis_url: the processes "
                "must share the rate-limit counters (set LORAPLEX_REDIS_URL)")
        store = [self.store] if self.store is not None and self.uses_s3 else []
        for uri in [*self.s3_source_allowlist, *store]:
            try:
                parse_s3_uri(uri)
            except InvalidInput as exc:
                raise ValueError(exc.message) from exc
        return self

    @property
    def registry_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.home / 'registry.db'}"

    @property
    def store_dir(self) -> Path:
        """The local store folder (when the store is not S3)."""
        if self.store and not self.store.startswith("s3://"):
            return Path(self.store)
        return self.home / "store"

    @property
    def gateway_base_url(self) -> str:
        """`gateway_url`, or this host and port (a wildcard bind reached on loopback)."""
        if self.gateway_url:
            return self.gateway_url.rstrip("/")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def uses_s3(self) -> bool:
        return bool(self.store and self.store.startswith("s3://"))

    @property
    def cache_dir(self) -> Path:
        return self.unit_home / "cache"

    @property
    def unit_home(self) -> Path:
        """This unit's own folder (see `unit_dir`)."""
        return self.unit_dir or self.home

    @property
    def slots_socket_path(self) -> Path:
        """Where the unit's first gateway process serves the engine's adapter slots to the
        others (`gateway_processes` > 1)."""
        return self.unit_home / "slots.sock"

    @property
    def engine_log_path(self) -> Path:
        return self.unit_home / "logs" / "engine.log"

    @property
    def engine_pid_path(self) -> Path:
        return self.unit_home / "engine.pid"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
