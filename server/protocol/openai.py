"""Wire format of the tenant API: just enough validation to give clear 400s at the gateway.

Fields vLLM supports and these models do not name pass through untouched (`extra="allow"`);
vLLM validates them and its 400s are relayed. Fields that steer the engine itself are
removed (ENGINE_ONLY_FIELDS) and `cache_salt` is always set by the gateway.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

# vLLM extensions a tenant must not set: they address engine internals, other requests or
# the prefix cache (cache_salt is replaced with the tenant's own salt).
ENGINE_ONLY_FIELDS = frozenset({
    "cache_salt", "kv_transfer_params", "ec_transfer_params", "vllm_xargs", "priority",
    "request_id", "session_id", "chat_template", "mm_payload", "media_io_kwargs",
    "mm_processor_kwargs", "return_mm_kwargs", "routed_experts_prompt_start", "lora_request",
})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


# vLLM computes prompt log-probabilities with the wrong LoRA mapping when LoRA is enabled
# (as it always is here): on vLLM 0.32 the EngineCore dies on such a request (an einsum shape
# error in the LoRA logits path), taking every tenant's requests with it; vllm-project/vllm
# issues 29955, 16668 and 51594. So neither the field nor `echo` with log-probabilities (which
# asks for them) reaches the engine.
NO_PROMPT_LOGPROBS = ("prompt log-probabilities are not available on this server: vLLM's "
                      "multi-LoRA engine cannot compute them")


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=16)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = None
    prompt_logprobs: int | None = Field(default=None, description=NO_PROMPT_LOGPROBS)
    echo: bool | None = None

    @field_validator("prompt_logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, v: int | None) -> None:
        if v is not None:
            raise PydanticCustomError("unsupported", NO_PROMPT_LOGPROBS)

    def engine_body(self, engine_model: str, cache_salt: str) -> dict[str, Any]:
        body = {k: v for k, v in self.model_dump(exclude_unset=True).items()
                if k not in ENGINE_ONLY_FIELDS}
        body["model"] = engine_model
        body["cache_salt"] = cache_salt
        return body


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Any] | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _no_echoed_logprobs(self) -> ChatCompletionRequest:
        _refuse_echoed_logprobs(self, "top_logprobs")
        return self


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if v == [] or v == "":
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _no_echoed_logprobs(self) -> CompletionRequest:
        _refuse_echoed_logprobs(self, "logprobs")
        return self


def _refuse_echoed_logprobs(req: GenerationRequest, field: str) -> None:
    """vLLM turns `echo` with log-probabilities into prompt log-probabilities."""
    if req.echo and (req.model_extra or {}).get(field) is not None:
        raise PydanticCustomError("unsupported", f"echo with {field}: {NO_PROMPT_LOGPROBS}")


class ModelObject(BaseModel):
    """OpenAI's model object, with vLLM's `root` and `parent` (the base model of an adapter)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
