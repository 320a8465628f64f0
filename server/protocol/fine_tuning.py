"""Wire format of the files and fine-tuning jobs API, shaped like OpenAI's so the official SDK
works unchanged.

LoRA settings beyond OpenAI's `hyperparameters` go in a top-level `lora` object (`LoraRecipe`,
from adapters.training.recipe); the base model must be the one this server serves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.training.evaluation import EvaluationReport, EvaluationSettings
from adapters.training.jobs import JobStatus
from adapters.training.recipe import Hyperparameters, LoraRecipe, ResolvedHyperparameters

# -- requests --------------------------------------------------------------------------------


class JobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs. Unknown fields are refused (400 naming the field)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    """The base model: the one this server serves."""
    training_file: str
    validation_file: str | None = None
    """Held-out data for the final evaluation; without it, 10% of the training file."""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str | None = Field(default=None, max_length=40)
    """The adapter's name (a new version of it); without it, `ft-<part of the job id>`."""
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    method: dict[str, Any] | None = None
    """Only `{"type": "supervised"}` (OpenAI's default)."""
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    lora: LoraRecipe = Field(default_factory=LoraRecipe)
    """loraplex's extension: the LoRA recipe."""
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    """loraplex's extension: the end-of-job evaluation (metric of require_improvement, the
    prompted baseline's system prompt and few-shot count, answer length)."""


class EvaluationCreate(EvaluationSettings):
    """POST /v1/fine_tuning/evaluations (and the admin one): the held-out examples (a file of
    the tenant's, or inline), the models side by side, and how to run it. Unknown fields are
    refused."""

    models: list[str] = Field(min_length=1, max_length=8)
    """Models of the tenant: the base model (its name, or "base") and adapters
    (`name`, `name@version`, `name@alias`)."""
    validation_file: str | None = None
    """Held-out examples: a fine-tune file of the tenant's (chat or prompt/completion)."""
    examples: list[dict[str, Any]] | None = Field(default=None, max_length=1000)
    """Held-out examples inline, instead of `validation_file`."""
    prompted_baseline: bool = True
    """Add the base model well prompted (system prompt + few-shot turns) as "prompted"."""
    training_file: str | None = None
    """Where the prompted baseline's few-shot examples come from (a fine-tune file)."""
    few_shot_examples: list[dict[str, Any]] | None = Field(default=None, max_length=256)
    """Few-shot examples inline, instead of `training_file`."""
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    """Which few-shot examples are drawn."""


class MergeSourceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    """One of the tenant's adapter versions: `name@version` (or `name`, `name@alias`)."""
    weight: float = Field(default=1.0, ge=-100, le=100, allow_inf_nan=False)


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["linear", "ties", "dare_linear", "dare_ties", "cat"]
    """PEFT's combination type: all but cat need sources of one rank; cat adds the ranks."""
    sources: list[MergeSourceIn] = Field(min_length=2, max_length=8)
    density: float | None = Field(default=None, gt=0, le=1)
    """ties, dare_linear, dare_ties (required there): the share of each adapter's weights kept."""
    majority_sign_method: Literal["total", "frequency"] = "total"
    """ties, dare_ties: how the sign of each weight is elected."""


class MergeCreate(BaseModel):
    """POST /admin/tenants/{t}/adapters/{name}/versions with JSON: a new version merged from
    several of the tenant's versions, by a job of the training worker."""

    model_config = ConfigDict(extra="forbid")

    merge: MergeSpec


# -- files -----------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# -- jobs ------------------------------------------------------------------------------------


class JobError(BaseModel):
    """Why a job failed. Codes: invalid_training_file, invalid_validation_file (`param` names
    the file), internal_error (the files could not be checked), eval_not_improved,
    out_of_memory, training_error, and loraplex's own error codes (e.g. invalid_adapter when
    the trained adapter is refused at registration)."""

    code: str
    message: str
    param: str | None = None


class JobWarning(BaseModel):
    """A recipe guard rail: few_examples, high_rank, no_general_data, validation_overlap."""

    code: str
    message: str
    param: str | None = None


class SupervisedMethod(BaseModel):
    hyperparameters: ResolvedHyperparameters


class Method(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    """`<adapter>@<version>` once succeeded."""
    organization_id: str
    """The tenant."""
    status: JobStatus
    training_file: str
    validation_file: str | None = None
    hyperparameters: ResolvedHyperparameters
    trained_tokens: int | None = None
    result_files: list[str] = Field(default_factory=list)
    seed: int
    error: JobError | None = None
    estimated_finish: int | None = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    suffix: str | None = None
    method: Method
    lora: LoraRecipe
    """loraplex's extension: the LoRA recipe."""
    eval: dict[str, Any] | None = None
    """loraplex's extension: held-out loss and perplexity of the base model and the adapter."""
    warnings: list[JobWarning] = Field(default_factory=list)
    """loraplex's extension: what the recipe was warned about at creation (never refused)."""
    evaluation_settings: EvaluationSettings | None = None
    """loraplex's extension: how the end-of-job evaluation runs."""
    evaluation: EvaluationReport | None = None
    """loraplex's extension: the end-of-job evaluation report, once the job has one: the
    base model, the prompted baseline and the adapter side by side."""
    kind: Literal["fine_tune", "merge", "export"] = "fine_tune"
    """loraplex's extension: jobs of the training queue that train nothing are merges (a new
    version from several, `fine_tuned_model` names it) and merged-model exports."""
    params: dict[str, Any] | None = None
    """What a merge or an export job does."""


ExportDtype = Literal["auto", "bfloat16", "float16", "float32"]


class ExportCreate(BaseModel):
    """POST .../versions/{v}/export (the body is optional)."""

    model_config = ConfigDict(extra="forbid")

    dtype: ExportDtype = "auto"
    """The merged weights' type; auto: the base model's own."""


class ExportObject(BaseModel):
    """A merged-model export of an adapter version: its job, and once succeeded where the
    model folder is in the store and each file's size and sha256."""

    object: Literal["adapter.export"] = "adapter.export"
    adapter: str
    version: int
    dtype: str = "auto"
    job_id: str
    status: JobStatus
    created_at: int
    finished_at: int | None = None
    location: str | None = None
    """The folder in the store (a local path, or an s3:// URI)."""
    store_key: str | None = None
    files: dict[str, dict[str, Any]] | None = None
    """{path: {"size", "sha256"}} of every file of the folder."""
    error: JobError | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
    type: Literal["message", "metrics"]


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float]
    fine_tuned_model_checkpoint: str | None = None


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    has_more: bool = False
