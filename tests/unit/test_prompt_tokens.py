"""Prompt tokens before the engine sees a request: the base model's tokenizer when its folder
has one, else an estimate; chat messages, content parts and every completion prompt form."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from server.protocol.openai import ChatCompletionRequest, CompletionRequest
from server.quotas.tokens import MESSAGE_OVERHEAD, PromptTokens


def word_tokenizer(folder: Path) -> Path:
    """A tokenizer.json where every whitespace-separated word is one token."""
    vocab = {"[UNK]": 0, "the": 1, "sky": 2, "is": 3, "blue": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_counts_with_the_model_tokenizer(tmp_path: Path) -> None:
    tokens = PromptTokens(word_tokenizer(tmp_path / "model"))
    assert tokens.count_now(CompletionRequest(model="m", prompt="the sky is very blue")) == 5
    assert tokens.count_now(CompletionRequest(model="m", prompt=["the sky", "is blue"])) == 4
    assert tokens.count_now(CompletionRequest(model="m", prompt=[5, 6, 7])) == 3
    assert tokens.count_now(CompletionRequest(model="m", prompt=[[5, 6], [7]])) == 3
    chat = ChatCompletionRequest(model="m", messages=[
        {"role": "system", "content": "the sky"},
        {"role": "user", "content": [{"type": "text", "text": "is blue"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]}])
    assert tokens.count_now(chat) == 4 + 2 * MESSAGE_OVERHEAD + 3


def test_without_a_tokenizer_it_estimates(tmp_path: Path) -> None:
    tokens = PromptTokens(tmp_path)  # no tokenizer.json
    req = CompletionRequest(model="m", prompt="x" * 400)
    assert tokens.count_now(req) == PromptTokens.estimate(req) == 101


async def test_long_prompts_are_counted_off_the_event_loop(tmp_path: Path) -> None:
    tokens = PromptTokens(word_tokenizer(tmp_path / "model"))
    long = CompletionRequest(model="m", prompt="the sky is blue " * 20_000)
    assert await tokens.count(long) == 80_000
