"""Wire format of the files and fine-tuning jobs API, shaped like OpenAI's so the official SDK
works unchanged.

LoRA settings beyond OpenAI's `hyperparameters` go in a top-level `lora` object (`LoraRecipe`,
from adapters.training.recipe); the base model must be the one this server serves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
