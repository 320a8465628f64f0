"""Training data: JSONL validation (every error with its line), and the loss mask traps.

Uses the real SmolLM2 tokenizer and chat template (no model weights are loaded here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adapters.training.dataset import (
    GENERAL_DATA,
    IGNORE_INDEX,
    MAX_ERRORS,
    collate,
    load_general_examples,
    mix_general,
    to_messages,
    tokenize_example,
    validate_jsonl,
)

MODEL_DIR = Path(__file__).resolve().parents[2] / ".cache" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tokenizer():
    if not (MODEL_DIR / "tokenizer.json").is_file():
        from adapters.base_model import ensure_default_model

        ensure_default_model(MODEL_DIR.parent)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


def chat(i: int, answer: str = "Arr matey!") -> dict:
    return {"messages": [{"role": "system", "content": "You are a pirate."},
                         {"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": answer}]}


def pc(i: int) -> dict:
    return {"prompt": f"Question {i}?", "completion": "Arr matey!"}


def jsonl(objs: list) -> bytes:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs).encode()


# ----------------------------------------------------------------------------- validation


def test_chat_format_accepted_and_normalised():
    lines = [chat(i) for i in range(11)]
    lines.append({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                            {"type": "text", "text": "there"}]},
                               {"role": "assistant", "content": "Arr!", "weight": 1}]})
    report = validate_jsonl(jsonl(lines) + b"\n\n")  # trailing blank lines are ignored
    assert report.ok, report.errors
    assert report.format == "chat"
    assert len(report.examples) == 12
    assert report.examples[-1]["messages"][0]["content"] == "Hi there"
    assert report.examples[0] == chat(0)


def test_prompt_completion_format_accepted():
    report = validate_jsonl(jsonl([pc(i) for i in range(10)]))
    assert report.ok, report.errors
    assert report.format == "prompt_completion"
    assert report.examples[3] == pc(3)
    assert to_messages(report.examples[3]) == [{"role": "user", "content": "Question 3?"},
                                               {"role": "assistant", "content": "Arr matey!"}]


def test_every_error_kind_names_its_line():
    good = [json.dumps(chat(i)) for i in range(12)]
    bad = {
        2: ("{not json", "not valid JSON"),
        3: ("[1, 2]", "must be a JSON object, got an array"),
        5: (json.dumps({"messages": [{"role": "wizard", "content": "x"},
                                     {"role": "assistant", "content": "y"}]}), "unknown role"),
        6: (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
            "no assistant message"),
        7: (json.dumps({"messages": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "  "}]}), "empty content"),
        8: (json.dumps({"messages": [{"role": "user", "content": 42},
                                     {"role": "assistant", "content": "y"}]}),
            "content must be a string"),
        9: (json.dumps({"prompt": "q", "completion": 7}), "must be a string"),
        10: (json.dumps({"messages": "hello"}), "'messages' must be an array"),
        11: (json.dumps({"prompt": "q", "completion": ""}), "'completion' is empty"),
        12: (json.dumps({"something": "else"}), "neither 'messages'"),
        13: (json.dumps({"messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "y", "weight": 2}]}),
             "weight must be 0 or 1"),
    }
    lines: list[str | bytes] = []
    it = iter(good)
    for number in range(1, 20):
        if number == 4:
            lines.append(b'{"prompt": "caf\xe9", "completion": "x"}')  # Latin-1, not UTF-8
        elif number == 14:
            lines.append("")  # a blank line: ignored, but still counted
        elif number in bad:
            lines.append(bad[number][0])
        else:
            lines.append(next(it))
    data = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines)
    report = validate_jsonl(data)
    assert not report.ok
    by_line = {e.line: e.message for e in report.errors}
    assert "not valid UTF-8" in by_line.pop(4)
    for number, (_, expected) in bad.items():
        assert expected in by_line.pop(number), (number, report.errors)
    assert len(report.examples) == 6  # lines 1 and 15..19
    assert "at least 10 valid examples are required, found 6" in by_line.pop(0)
    assert not by_line, f"unexpected errors: {by_line}"


def test_mixed_formats_refused():
    lines = [chat(i) for i in range(10)] + [pc(0)] + [chat(10)]
    report = validate_jsonl(jsonl(lines))
    assert not report.ok
    assert [e.line for e in report.errors] == [11]
    assert "prompt_completion format" in report.errors[0].message
    assert "chat format" in report.errors[0].message
    assert report.format == "chat"


def test_too_few_examples_refused():
    report = validate_jsonl(jsonl([chat(i) for i in range(9)]))
    assert not report.ok
    assert report.errors[0].line == 0
    assert "at least 10" in report.errors[0].message
    assert validate_jsonl(jsonl([chat(i) for i in range(3)]), min_examples=3).ok
    assert not validate_jsonl(b"").ok


def test_error_list_is_capped():
    report = validate_jsonl(b"\n".join([b"nope"] * (MAX_ERRORS + 10)))
    line_errors = [e for e in report.errors if e.line > 0]
    assert len(line_errors) == MAX_ERRORS
    assert line_errors[-1].line == MAX_ERRORS
    assert any("10 more line errors" in w for w in report.warnings)


def test_duplicates_are_a_warning():
    report = validate_jsonl(jsonl([chat(i) for i in range(10)] + [chat(0)]))
    assert report.ok
    assert any("duplicate" in w for w in report.warnings)


def test_over_length_refused_with_tokenizer(tokenizer):
    long_answer = "Arr " * 300
    lines = [chat(i) for i in range(10)] + [chat(10, long_answer)]
    assert validate_jsonl(jsonl(lines)).ok  # no tokenizer: no length check
    report = validate_jsonl(jsonl(lines), tokenizer=tokenizer, max_tokens=128)
    assert [e.line for e in report.errors] == [11]
    assert "over the context length of 128" in report.errors[0].message
    assert len(report.examples) == 10


def test_general_data_is_valid(tokenizer):
    report = validate_jsonl(GENERAL_DATA.read_bytes(), tokenizer=tokenizer, max_tokens=256,
                            min_examples=30)
    assert report.ok, report.errors
    assert report.format == "chat"
    assert not report.warnings


def test_mix_general():
    examples = [pc(i) for i in range(10)]
    assert mix_general(examples, 0.0, seed=1) is examples
    mixed = mix_general(examples, 0.5, seed=1)
    assert len(mixed) == 15
    assert mixed[:10] == examples
    general = load_general_examples()
    assert all(m in general for m in mixed[10:])
    assert len({json.dumps(m) for m in mixed[10:]}) == 5  # drawn without replacement
    assert mixed == mix_general(examples, 0.5, seed=1)
    assert mixed != mix_general(examples, 0.5, seed=2)
    assert len(mix_general(examples, 10.0, seed=1)) == 110  # more than the pool: drawn again


# --------------------------------------------------------------------------------- masking


def labelled_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_only_assistant_tokens_and_their_eos_are_labelled(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    eos = tokenizer.eos_token_id
    messages = [{"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Arr matey!"},
                {"role": "user", "content": "Again please"},
                {"role": "assistant", "content": "Yo ho ho!"}]
    ids, labels = tokenize_example(tokenizer, messages, max_len=512)
    assert len(ids) == len(labels)
    assert ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    # Exactly the assistant contents, each followed by its <|im_end|>, are in the loss.
    assert labelled_text(tokenizer, ids, labels) == "Arr matey!<|im_end|>Yo ho ho!<|im_end|>"
    for i, lab in enumerate(labels):
        assert lab in (IGNORE_INDEX, ids[i])
    # System and user tokens are not.
    for text in ("You are a pirate.", "Hello there", "Again please", "system", "user"):
        assert text not in labelled_text(tokenizer, ids, labels)
    # Every token of each assistant content is labelled.
    for answer in ("Arr matey!", "Yo ho ho!"):
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        start = next(k for k in range(len(ids)) if ids[k:k + len(answer_ids)] == answer_ids)
        span = range(start, start + len(answer_ids))
        assert all(labels[k] == ids[k] for k in span)
        # ... and the EOS right after it too (the model must learn to stop) ...
        assert ids[span.stop] == eos and labels[span.stop] == eos
        # ... but not the newline the template writes after that eos.
        assert labels[span.stop + 1] == IGNORE_INDEX
    # The eos tokens closing the system and user turns stay out of the loss.
    eos_positions = [k for k, t in enumerate(ids) if t == eos]
    assert len(eos_positions) == 5
    assert [labels[k] == eos for k in eos_positions] == [False, False, True, False, True]


def test_prompt_completion_mask_and_default_system_prompt(tokenizer):
    ids, labels = tokenize_example(tokenizer, to_messages(pc(1)), max_len=512)
    # The template adds its default system prompt; it stays out of the loss.
    assert "SmolLM" in tokenizer.decode(ids)
    assert labelled_text(tokenizer, ids, labels) == "Arr matey!<|im_end|>"


def test_conversation_starting_with_the_assistant(tokenizer):
    ids, labels = tokenize_example(tokenizer, [{"role": "assistant", "content": "Ahoy!"}], 512)
    assert labelled_text(tokenizer, ids, labels) == "Ahoy!<|im_end|>"


def test_weight_zero_assistant_turn_is_not_trained(tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "Wrong!", "weight": 0},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "Right!"}]
    ids, labels = tokenize_example(tokenizer, messages, 512)
    assert labelled_text(tokenizer, ids, labels) == "Right!<|im_end|>"


def test_truncation(tokenizer):
    ids, labels = tokenize_example(tokenizer, chat(0)["messages"], max_len=12)
    assert len(ids) == len(labels) == 12
    full_ids, full_labels = tokenize_example(tokenizer, chat(0)["messages"], max_len=512)
    assert ids == full_ids[:12] and labels == full_labels[:12]


def test_padding_with_eos_as_pad_keeps_the_real_eos_labelled(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap is real for SmolLM2
    pad = eos = tokenizer.eos_token_id
    short = tokenize_example(tokenizer, chat(0, "Arr!")["messages"], 512)
    long = tokenize_example(tokenizer, chat(1, "Arr matey, a long answer it is!")["messages"], 512)
    batch = collate([short, long], pad_token_id=pad)
    n_short, n_long = len(short[0]), len(long[0])
    assert n_short < n_long
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (2, n_long)
    # Pad positions: pad id (== eos id), no attention, no loss.
    assert ids[0, n_short:].tolist() == [pad] * (n_long - n_short)
    assert mask[0, n_short:].tolist() == [0] * (n_long - n_short)
    assert labels[0, n_short:].tolist() == [IGNORE_INDEX] * (n_long - n_short)
    assert mask[0, :n_short].tolist() == [1] * n_short and mask[1].tolist() == [1] * n_long
    # The real eos closing each assistant turn keeps its label.
    for row, (row_ids, row_labels) in enumerate((short, long)):
        assert labels[row, : len(row_ids)].tolist() == row_labels
        last_eos = max(k for k, t in enumerate(row_ids) if t == eos)
        assert labels[row, last_eos].item() == eos
    assert (labels == eos).sum().item() == 2
