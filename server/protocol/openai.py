"""Wire format of the tenant API: just enough validation to give clear 400s at the gateway.

Fields vLLM supports and these models do not name pass through untouched (`extra="allow"`);
vLLM validates them and its 400s are relayed. Fields that steer the engine itself are
removed (ENGINE_ONLY_FIELDS) and `cache_salt` is always set by the gateway.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if v == [] or v == "":
            raise ValueError("prompt must not be empty")
        return v


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
