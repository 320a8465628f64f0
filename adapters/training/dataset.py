"""Training data: validating a JSONL upload, and turning examples into tokens and labels.

Two formats, one per file, like OpenAI's fine-tuning:

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` with at
  least one assistant turn. ``content`` may also be OpenAI's list of text parts
  (``[{"type": "text", "text": "..."}]``), which is joined. An assistant message may carry
  OpenAI's ``"weight": 0`` to keep it out of the loss.
- prompt/completion: ``{"prompt": "...", "completion": "..."}``, trained as one user turn and
  one assistant turn.

Validated examples are normalised: chat content is always a string, and only the keys above are
kept. The loss is taken on assistant tokens only, *including* the end-of-turn token the chat
template puts after each assistant message (``<|im_end|>`` for SmolLM2, which is also its eos and
its pad token): a model that never sees that token in the loss never learns to stop.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

IGNORE_INDEX = -100
MAX_ERRORS = 50
ROLES = ("system", "user", "assistant")
GENERAL_DATA = Path(__file__).with_name("general_data.jsonl")

Format = Literal["chat", "prompt_completion"]


@dataclass
class LineError:
    line: int  # 1-based line number in the file; 0 for a problem of the whole file
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass
class DatasetReport:
    format: Format | None
    examples: list[dict[str, Any]] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# --------------------------------------------------------------------------------- validation


def validate_jsonl(data: bytes, *, tokenizer: Any = None, max_tokens: int | None = None,
                   min_examples: int = 10) -> DatasetReport:
    """Check a JSONL training file; every problem is reported with its 1-based line number.

    At most `MAX_ERRORS` line errors are listed (a warning counts the rest); the file-level
    "too few examples" error (line 0) comes after them. With `tokenizer` and `max_tokens`, an
    example whose chat-templated length is over `max_tokens` is an error.
    """
    report = DatasetReport(format=None)
    unlisted = 0
    fmt_line = 0  # the line that fixed the file's format
    seen: dict[str, int] = {}
    duplicates = 0

    def error(line: int, message: str) -> None:
        nonlocal unlisted
        if len(report.errors) < MAX_ERRORS:
            report.errors.append(LineError(line, message))
        else:
            unlisted += 1

    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            error(number, f"not valid UTF-8 (byte {exc.start})")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            error(number, f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            error(number, f"must be a JSON object, got {_json_type(obj)}")
            continue
        kind, example, problem = _parse_example(obj)
        if problem is not None:
            error(number, problem)
            continue
        assert kind is not None and example is not None
        if report.format is None:
            report.format, fmt_line = kind, number
        elif kind != report.format:
            error(number, f"is in {kind} format but the file is in {report.format} format (from "
                          f"line {fmt_line}); one file must use one format")
            continue
        if tokenizer is not None and max_tokens is not None:
            try:
                length = count_tokens(tokenizer, to_messages(example))
            except Exception as exc:  # noqa: BLE001 - jinja raises for what a template refuses
                error(number, f"the chat template refuses this conversation: {exc}")
                continue
            if length > max_tokens:
                error(number, f"is {length} tokens long with the chat template, over the "
                              f"context length of {max_tokens}")
                continue
        key = json.dumps(example, sort_keys=True)
        if key in seen:
            duplicates += 1
        else:
            seen[key] = number
        report.examples.append(example)

    if unlisted:
        report.warnings.append(f"{unlisted} more line errors not listed (only the first "
                               f"{MAX_ERRORS} are)")
    if duplicates:
        report.warnings.append(f"{duplicates} example(s) duplicate an earlier line")
    if len(report.examples) < min_examples:
        report.errors.append(LineError(0, f"at least {min_examples} valid examples are required, "
                                          f"found {len(report.examples)}"))
    return report


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value), "a value")


def _parse_example(obj: dict[str, Any]) -> tuple[Format | None, dict[str, Any] | None, str | None]:
    """(format, normalised example, None) or (None, None, problem)."""
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            return None, None, "has both 'messages' and 'prompt'/'completion'; use one format"
        messages, problem = _parse_messages(obj["messages"])
        if problem is not None:
            return None, None, problem
        return "chat", {"messages": messages}, None
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                return None, None, f"has no '{key}'"
            if not isinstance(obj[key], str):
                return None, None, f"'{key}' must be a string, got {_json_type(obj[key])}"
            if not obj[key].strip():
                return None, None, f"'{key}' is empty"
        return "prompt_completion", {"prompt": obj["prompt"], "completion": obj["completion"]}, None
    return None, None, ("has neither 'messages' (chat format) nor 'prompt' and 'completion' "
                        "(prompt/completion format)")


def _parse_messages(messages: Any) -> tuple[list[dict[str, Any]], str | None]:
    if not isinstance(messages, list):
        return [], f"'messages' must be an array, got {_json_type(messages)}"
    if not messages:
        return [], "'messages' is empty"
    out: list[dict[str, Any]] = []
    trained = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            return [], f"{where} must be an object, got {_json_type(message)}"
        role = message.get("role")
        if not isinstance(role, str):
            return [], f"{where} has no string 'role'"
        if role not in ROLES:
            return [], f"{where} has unknown role {role!r} (allowed: {', '.join(ROLES)})"
        if "content" not in message or message["content"] is None:
            return [], f"{where} ({role}) has no 'content'"
        content = message["content"]
        if isinstance(content, list):
            content, problem = _join_text_parts(content, where)
            if problem is not None:
                return [], problem
        elif not isinstance(content, str):
            return [], f"{where}.content must be a string, got {_json_type(content)}"
        if role != "system" and not content.strip():
            return [], f"{where} ({role}) has empty content"
        normalised: dict[str, Any] = {"role": role, "content": content}
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                return [], f"{where}: 'weight' is only allowed on assistant messages"
            if weight not in (0, 1) or isinstance(weight, bool):
                return [], f"{where}.weight must be 0 or 1, got {weight!r}"
            normalised["weight"] = int(weight)
        if role == "assistant" and normalised.get("weight", 1) == 1:
            trained += 1
        out.append(normalised)
    if not any(m["role"] == "assistant" for m in out):
        return [], "has no assistant message (nothing to learn from)"
    if not trained:
        return [], "every assistant message has weight 0 (nothing to learn from)"
    return out, None


def _join_text_parts(parts: list[Any], where: str) -> tuple[str, str | None]:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text":
            return "", f"{where}.content[{j}] must be a text part {{\"type\": \"text\", ...}}"
        if not isinstance(part.get("text"), str):
            return "", f"{where}.content[{j}].text must be a string"
        texts.append(part["text"])
    return "".join(texts), None


# ------------------------------------------------------------------------------- tokenization


def to_messages(example: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of a validated example (prompt/completion becomes user + assistant)."""
    if "messages" in example:
        messages: list[dict[str, Any]] = example["messages"]
        return messages
    return [{"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]}]


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only role and content reach the chat template."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
    text: str = tokenizer.apply_chat_template(_template_messages(messages), tokenize=False,
                                              add_generation_prompt=generation_prompt)
    return text


def count_tokens(tokenizer: Any, messages: list[dict[str, Any]]) -> int:
    text = _render(tokenizer, messages)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans to train on.

    A span is one assistant message's text as the template renders it, up to and including the
    end-of-turn token that follows it (the tokenizer's eos, if the template writes one there),
    but not the whitespace the template adds after that token. Spans are found by rendering the
    conversation prefix by prefix: the text the template adds for message i, after the prompt
    for an assistant turn, is that message. Assistant messages with weight 0 get no span.
    """
    full = _render(tokenizer, messages)
    eos = getattr(tokenizer, "eos_token", None)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True) if i else None
        upto = _render(tokenizer, messages[: i + 1])
        if prompt is not None and upto.startswith(prompt) and full.startswith(upto):
            start, end = len(prompt), len(upto)
        else:
            # The template does not render prefixes as prefixes (e.g. a first message that is the
            # assistant's gets a default system prompt): find the content itself.
            start = full.find(message["content"], cursor)
            if start < 0:
                raise ValueError(f"cannot find assistant message {i} in the rendered chat")
            end = start + len(message["content"])
            if eos and full.startswith(eos, end):
                end += len(eos)
        segment = full[start:end]
        if eos and eos in segment:
            end = start + segment.rindex(eos) + len(eos)
        else:
            end = start + len(segment.rstrip())
        cursor = end
        if message.get("weight", 1):
            spans.append((start, end))
    return full, spans


def tokenize_example(tokenizer: Any, messages: list[dict[str, Any]],
                     max_len: int) -> tuple[list[int], list[int]]:
    """input_ids and labels for one conversation, truncated to `max_len` tokens.

    Labels are IGNORE_INDEX (-100) everywhere except the assistant messages' tokens and the
    end-of-turn token after each (so the model learns to stop).
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(a < end and b > start for start, end in spans):
            labels[k] = input_ids[k]
    return input_ids[:max_len], labels[:max_len]


def collate(features: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch: pads get attention_mask 0 and label -100.

    The pad positions come from each sequence's length, never from comparing token ids with
    the pad id: the pad id is often the eos id, and the real eos tokens must keep their labels.
    """
    import torch

    width = max(len(ids) for ids, _ in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(features):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(labs, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


PACKED_ROW_TOKENS = 2048
"""Longest packed row (unless one example is longer): the attention mask is rows x T x T."""


def flatten(features: list[tuple[list[int], list[int]]],
            row_tokens: int = PACKED_ROW_TOKENS) -> dict[str, Any]:
    """A batch with no padding between examples (padding-free packing, as TRL's
    DataCollatorWithFlattening): the examples laid end to end in as few rows of at most
    `row_tokens` tokens as their order allows (one row for a usual batch), position ids
    restarting at each, and a block-diagonal causal attention mask (rows, 1, T, T) so that none
    attends to another. The first token of each example gets label -100: it is not predicted
    from the example before. Same (prediction, target) pairs, hence the same loss, as
    `collate`, without computing the padding; `tokens` counts them. Rows shorter than the
    longest are padded at the end (label -100, each pad its own segment)."""
    import torch

    limit = max(row_tokens, *(len(ids) for ids, _ in features))
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    for feature in features:
        if rows[-1] and sum(len(ids) for ids, _ in rows[-1]) + len(feature[0]) > limit:
            rows.append([])
        rows[-1].append(feature)
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.arange(width).repeat(len(rows), 1) + len(features)  # pads: their own
    segment = 0
    for r, row in enumerate(rows):
        start = 0
        for ids, labs in row:
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids, dtype=torch.long)
            labels[r, start + 1:end] = torch.tensor(labs[1:], dtype=torch.long)
            positions[r, start:end] = torch.arange(len(ids))
            segments[r, start:end] = segment
            segment, start = segment + 1, end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (segments[:, :, None] == segments[:, None, :])
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions,
            "attention_mask": mask[:, None], "tokens": sum(len(ids) for ids, _ in features)}


# --------------------------------------------------------------------------- general mix-in


def load_general_examples(path: Path = GENERAL_DATA) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def mix_general(examples: list[dict[str, Any]], ratio: float, seed: int) -> list[dict[str, Any]]:
    """Add round(len(examples) * ratio) general instruction examples (against forgetting).

    The general examples are drawn without replacement while there are enough, then again. The
    result is the input followed by the drawn examples (the trainer shuffles). ratio 0 returns
    the input unchanged.
    """
    if ratio < 0:
        raise ValueError("ratio must be >= 0")
    count = round(len(examples) * ratio)
    if count == 0:
        return examples
    pool = load_general_examples()
    rng = random.Random(seed)
    drawn: list[dict[str, Any]] = []
    while len(drawn) < count:
        batch = pool[:]
        rng.shuffle(batch)
        drawn.extend(batch[: count - len(drawn)])
    return [*examples, *drawn]
