"""Held-out loss through the serving engine: the mean cross-entropy of the reference answers'
tokens, as the training worker computes it (adapters/training/trainer.py `evaluate`: the
answer's tokens and the end-of-turn token after them, averaged over every token), but read
from vLLM's prompt log-probabilities, so any of a tenant's models can be scored on demand
at engine speed, with no copy of the model in the gateway.

Per example, the engine's chat template gives three tokenizations (`/tokenize`): the prompt
with the generation prompt (where the answer starts), the conversation continued through the
answer's last token, and the whole conversation (which adds the end-of-turn token). The
whole conversation is then sent as a completion prompt with `prompt_logprobs: 0` and
`max_tokens: 1`, through the gateway like any request of the tenant's (its limits, its fair
share, the adapter held in the engine); the log-probabilities of the answer's tokens and the
end-of-turn token are summed.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters.errors import LoraplexError, Unavailable
from adapters.registry import KeyOwner
from server.gateway import Gateway
from server.protocol.openai import CompletionRequest
from server.request_log import RequestRecord

COMPLETIONS = "/v1/completions"


@dataclass(frozen=True)
class Scored:
    """Where the answer is in a conversation's tokens: `ids[start:end]` is scored."""

    ids: list[int]
    start: int
    end: int


@dataclass
class LossSum:
    """Summed negative log-likelihood and token count over examples (a token mean, as the
    worker's)."""

    nll: float = 0.0
    tokens: int = 0
    failed: int = 0

    @property
    def loss(self) -> float | None:
        return self.nll / self.tokens if self.tokens and not self.failed else None


class EngineLoss:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def locate(self, prompt: Sequence[dict[str, Any]], reference: str) -> Scored | None:
        """The conversation's tokens and the answer's span (with the end-of-turn token); None
        when the template does not render the prompt as a prefix of the conversation."""
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
        answered = [*prompt, {"role": "assistant", "content": reference}]
        before = await self._tokenize(prompt, add_generation_prompt=True)
        through = await self._tokenize(answered, continue_final_message=True)
        whole = await self._tokenize(answered)
        start, end = len(before), len(through) + 1
        if whole[:start] != before or whole[:len(through)] != through or end > len(whole) \
                or end <= start:
            return None
        return Scored(whole, start, end)

    async def nll(self, caller: KeyOwner, model: str, scored: Scored) -> float:
        """Summed negative log-likelihood of `model` on the scored tokens."""
        req = CompletionRequest.model_validate({
            "model": model, "prompt": scored.ids, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 0})
        record = RequestRecord(request_id="eval-" + secrets.token_hex(8), method="POST",
                               path=COMPLETIONS)
        answer = await self.gateway.complete(caller, COMPLETIONS, req, record)
        logprobs = ((answer.get("choices") or [{}])[0]).get("prompt_logprobs")
        if not isinstance(logprobs, list) or len(logprobs) != len(scored.ids):
            raise LoraplexError("the engine gave no prompt log-probabilities")
        total = 0.0
        for i in range(scored.start, scored.end):
            entry = (logprobs[i] or {}).get(str(scored.ids[i]))
            if not isinstance(entry, dict) or not isinstance(entry.get("logprob"), (int, float)):
                raise LoraplexError(f"the engine gave no log-probability for token {i}")
            total -= float(entry["logprob"])
        return total

    async def _tokenize(self, messages: Sequence[dict[str, Any]], **options: bool) -> list[int]:
        try:
            answer = await self.gateway.engine.post_json("/tokenize", {
                "model": self.gateway.base_model_name, "messages": list(messages), **options})
        except Unavailable:
            raise
        except LoraplexError as exc:
            raise LoraplexError(f"the engine could not tokenize an example: {exc.message}") \
                from exc
        tokens = answer.get("tokens")
        if not isinstance(tokens, list):
            raise LoraplexError("the engine's /tokenize gave no tokens")
        return [int(t) for t in tokens]
