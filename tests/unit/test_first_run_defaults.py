"""What a newcomer's first request meets: the default model's sampling defaults, and the
example `loraplex up` prints. (The answer itself is checked against the real engine in
tests/integration/test_serving.py.)"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from adapters.base_model import (
    DEFAULT_MODEL_DIR,
    GENERATION_CONFIG,
    ensure_default_model,
    ensure_generation_defaults,
)
from server.cli import example_chat_request, example_text

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _built_folder(models_dir: Path, generation_config: dict[str, object] | None) -> Path:
    """A default-model folder as an earlier loraplex left it (marker file present)."""
    folder = models_dir / DEFAULT_MODEL_DIR
    folder.mkdir(parents=True)
    (folder / "loraplex-model.json").write_text(json.dumps({"source": "earlier build"}))
    (folder / "model.safetensors").write_bytes(b"weights stay untouched")
    if generation_config is not None:
        (folder / GENERATION_CONFIG).write_text(json.dumps(generation_config))
    return folder


def test_an_existing_model_folder_gets_the_sampling_defaults_without_a_rebuild(tmp_path):
    # What transformers' save_pretrained wrote before the defaults shipped.
    old = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
           "transformers_version": "5.19.0"}
    folder = _built_folder(tmp_path / "models", old)
    assert ensure_default_model(tmp_path / "models") == folder
    config = json.loads((folder / GENERATION_CONFIG).read_text())
    assert config["temperature"] == 0.2 and config["top_p"] == 0.9
    assert config["do_sample"] is True  # transformers refuses a temperature without it
    assert {k: config[k] for k in old} == old  # the rest is kept
    assert (folder / "model.safetensors").read_bytes() == b"weights stay untouched"
    assert sorted(p.name for p in folder.iterdir()) == [
        GENERATION_CONFIG, "loraplex-model.json", "model.safetensors"]  # no temp file left
    # Up to date: left alone.
    before = (folder / GENERATION_CONFIG).stat().st_mtime_ns
    assert ensure_generation_defaults(folder) is False
    assert (folder / GENERATION_CONFIG).stat().st_mtime_ns == before


def test_a_missing_generation_config_is_written_and_set_values_are_kept(tmp_path):
    folder = _built_folder(tmp_path / "a", None)
    ensure_default_model(tmp_path / "a")
    assert json.loads((folder / GENERATION_CONFIG).read_text()) == {
        "do_sample": True, "temperature": 0.2, "top_p": 0.9}
    # A value someone chose stays; only the missing ones are added.
    folder = _built_folder(tmp_path / "b", {"temperature": 0.7})
    assert ensure_generation_defaults(folder) is True
    config = json.loads((folder / GENERATION_CONFIG).read_text())
    assert config == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


def test_the_printed_example_sends_the_tested_request_without_sampling_parameters():
    body = example_chat_request(BASE)
    assert body == {"model": BASE, "messages": [
        {"role": "user", "content": "What is the capital of France?"}]}
    text = example_text("http://127.0.0.1:8000", "admin-secret", BASE)
    # The shell command as a user pastes it: its -d argument is exactly that body.
    chat = text[text.index("curl -s http://127.0.0.1:8000/v1/chat/completions"):]
    args = shlex.split(chat.replace("\\\n", " "))
    assert json.loads(args[args.index("-d") + 1]) == body
    assert "export ADMIN=admin-secret" in text
