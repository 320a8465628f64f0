"""Registry tables: tenants, their API keys, adapters, immutable adapter versions and aliases."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from adapters.spec import AdapterSpec


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, always timezone-aware UTC in Python, on every database.

    PostgreSQL: `timestamp with time zone` (asyncpg refuses aware datetimes in a `timestamp
    without time zone` column). SQLite has no time zone type: the UTC wall time is stored and
    UTC is attached again on read, so values compare and convert the same on both. A naive
    datetime written here is taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    # Every datetime column is UTCDateTime.
    type_annotation_map = {datetime: UTCDateTime}


class RegistryState(Base):
    """One row: a counter bumped by every change that can alter what a key or a model name
    resolves to. Gateways poll it to drop their lookup caches (see `Registry.generation`)."""

    __tablename__ = "registry_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(default=0)


class LimitColumns:
    """A customer's limits (server/quotas): None is unlimited. On a tenant, and on a key
    inside its tenant's limits (both apply)."""

    requests_per_minute: Mapped[int | None] = mapped_column(default=None)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger, default=None)
    max_in_flight: Mapped[int | None] = mapped_column(default=None)
    max_tokens: Mapped[int | None] = mapped_column(default=None)


class Tenant(LimitColumns, Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Share of a saturated engine relative to other tenants (token-fair admission); None is 1.
    weight: Mapped[float | None] = mapped_column(Float, default=None)

    keys: Mapped[list[ApiKey]] = relationship(
        back_populates="tenant", cascade="all, delete-orphan", passive_deletes=True)
    adapters: Mapped[list[Adapter]] = relationship(
        back_populates="tenant", cascade="all, delete-orphan", passive_deletes=True)


class ApiKey(LimitColumns, Base):
    """A tenant API key. Only its SHA-256 is kept; the key itself is shown once at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(128), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship(back_populates="keys")


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    # Version numbers are never reused, even after a version is deleted.
    next_version: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    tenant: Mapped[Tenant] = relationship(back_populates="adapters")
    versions: Mapped[list[AdapterVersion]] = relationship(
        back_populates="adapter", cascade="all, delete-orphan", passive_deletes=True,
        order_by="AdapterVersion.version")
    aliases: Mapped[list[Alias]] = relationship(
        back_populates="adapter", cascade="all, delete-orphan", passive_deletes=True)


class AdapterVersion(Base):
    """One immutable version of an adapter: its stored files and what validation found."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column()
    # Immutable name the engine knows this version by; never reused (vLLM #30931).
    engine_name: Mapped[str] = mapped_column(String(200), unique=True)
    store_key: Mapped[str] = mapped_column(String(512))
    rank: Mapped[int] = mapped_column()
    alpha: Mapped[float] = mapped_column()
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    base_model: Mapped[str | None] = mapped_column(String(512), default=None)
    size_bytes: Mapped[int] = mapped_column()
    sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(1024))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Operational flag, not content: preload at engine start and keep resident.
    pinned: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    adapter: Mapped[Adapter] = relationship(back_populates="versions")

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(rank=self.rank, alpha=self.alpha, target_modules=self.target_modules,
                           base_model=self.base_model, size_bytes=self.size_bytes,
                           sha256=self.sha256)


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column()

    adapter: Mapped[Adapter] = relationship(back_populates="aliases")


class TrainingFile(Base):
    """An uploaded dataset (OpenAI `file` object, purpose fine-tune), kept in the data folder."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(256))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column()
    path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FineTuneJob(Base):
    """A fine-tuning job. Workers claim it with a lease they must keep renewing."""

    __tablename__ = "fine_tuning_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), default=None)
    adapter_name: Mapped[str] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    # The recipe (adapters.training.recipe): ResolvedHyperparameters and LoraRecipe, dumped.
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    lora: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seed: Mapped[int] = mapped_column(default=42)
    status: Mapped[str] = mapped_column(String(32), index=True)  # a JobStatus value
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200), default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)  # code, param, message
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    trained_tokens: Mapped[int | None] = mapped_column(default=None)
    # Recipe warnings found at creation ([{"code", "message", "param"}]), never refusals.
    warnings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    # How the end-of-job evaluation runs (adapters.training.evaluation.EvaluationSettings)
    # and its report (adapters.training.evaluation.EvaluationReport), dumped.
    evaluation_settings: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # "fine_tune", or a job of the same queue that trains nothing: "merge" (skill merging),
    # "export" (a merged model); what it does is in `params`.
    kind: Mapped[str] = mapped_column(String(16), default="fine_tune",
                                      server_default="fine_tune")
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    worker_id: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(default=0)


class JobEvent(Base):
    __tablename__ = "fine_tuning_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(String(2000))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobCheckpoint(Base):
    __tablename__ = "fine_tuning_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column()
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsageDay(Base):
    """Usage per tenant, adapter, key and UTC day, added to by every gateway's meter flush.

    `adapter` is the adapter name ("" for the base model), `key_id` the API key's id. No
    foreign keys: the bill of a deleted tenant, adapter or key stays.
    """

    __tablename__ = "usage_daily"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
