"""Prompt tokens of a request, before the engine sees it.

`count` uses the base model's own tokenizer (the `tokenizers` library on the model folder's
`tokenizer.json`), for reserving tokens-per-minute: a reservation is settled to the engine's
usage when the answer ends, so the chat template's few extra tokens need not be exact.
`estimate` (characters / 4) is for token-fair admission, which corrects itself from usage too,
and costs nothing. Without a tokenizer file (tests' tiny models) `count` falls back to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from server.protocol.openai import ChatCompletionRequest, CompletionRequest, GenerationRequest

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# Per message: role and separators of the chat template (OpenAI's cookbook uses 3-4).
MESSAGE_OVERHEAD = 4
# Prompts longer than this are tokenized in a worker thread, off the event loop (a 4 MB body
# takes the tokenizer about a second).
THREAD_ABOVE_CHARS = 32_000


class PromptTokens:
    def __init__(self, model_path: Path | None) -> None:
        self._model_path = model_path
        self._tokenizer: Tokenizer | None = None
        self._loaded = False

    def _encoder(self) -> Tokenizer | None:
        if not self._loaded:
            path = self._model_path / "tokenizer.json" if self._model_path else None
            if path is not None and path.is_file():
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(str(path))
            else:
                log.warning("no tokenizer.json in %s: prompt tokens are estimated", path)
            self._loaded = True  # after the load: a concurrent caller never sees it half-done
        return self._tokenizer

    async def count(self, req: GenerationRequest) -> int:
        """The prompt's tokens; the tokenizer is read, and long prompts are tokenized, in a
        thread (off the event loop)."""
        if not self._loaded:
            await asyncio.to_thread(self._encoder)
        if sum(len(p) for p in _parts(req) if isinstance(p, str)) > THREAD_ABOVE_CHARS:
            return await asyncio.to_thread(self.count_now, req)
        return self.count_now(req)

    def count_now(self, req: GenerationRequest) -> int:
        encoder = self._encoder()
        if encoder is None:
            return self.estimate(req)
        total = 0
        for part in _parts(req):
            total += len(part) if isinstance(part, list) else len(
                encoder.encode(part, add_special_tokens=False).ids)
        return total + _overhead(req)

    @staticmethod
    def estimate(req: GenerationRequest) -> int:
        total = 0
        for part in _parts(req):
            total += len(part) if isinstance(part, list) else len(part) // 4 + 1
        return total + _overhead(req)


def _overhead(req: GenerationRequest) -> int:
    if isinstance(req, ChatCompletionRequest):
        return MESSAGE_OVERHEAD * len(req.messages) + 3
    return 0


def _parts(req: GenerationRequest) -> Iterator[str | list[int]]:
    """The prompt's texts (and token-id lists, already counted)."""
    if isinstance(req, ChatCompletionRequest):
        for message in req.messages:
            content = message.content
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                for item in content:
                    if isinstance(item, dict) and isinstance(item.get("text"), str):
                        yield item["text"]
    elif isinstance(req, CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, str):
            yield prompt
        elif prompt and isinstance(prompt[0], int):
            yield [t for t in prompt if isinstance(t, int)]
        else:
            for item in prompt:
                yield item  # type: ignore[misc]
