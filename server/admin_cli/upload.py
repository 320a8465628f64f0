"""Pushing a local PEFT folder: the cheap checks first (nothing is sent for a folder that is
plainly not an adapter), then a multipart upload of its two adapter files with a progress bar.
The server checks the rest (rank, target modules against the base model, tensor shapes) and
its 400 is shown as is; it stages the files and registers nothing unless all is well.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import httpx
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from safetensors import safe_open

from adapters.validation import CONFIG_FILE, MAX_CONFIG_BYTES, PICKLE_SUFFIXES, WEIGHTS_FILE
from server.admin_cli.client import AdminClient
from server.admin_cli.errors import Refused
from server.admin_cli.output import Output

# Registration reads, hashes and stores what was sent before it answers.
REGISTER_TIMEOUT_S = 600.0


def check_folder(folder: Path) -> tuple[Path, Path]:
    """(config, weights) of a folder that looks like a PEFT LoRA adapter; Refused listing
    every problem otherwise."""
    if not folder.is_dir():
        raise Refused(f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist")
    config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    problems: list[str] = []
    pickles = sorted(p.name for p in folder.iterdir()
                     if p.name.startswith("adapter_model") and p.name.endswith(PICKLE_SUFFIXES))
    if not config.is_file():
        problems.append(f"missing {CONFIG_FILE}")
    else:
        problems += _config_problems(config)
    if not weights.is_file():
        problems.append(f"missing {WEIGHTS_FILE}" + (
            f" ({', '.join(pickles)}: pickle weights are refused, they can run code; save with "
            "safetensors: save_pretrained(..., safe_serialization=True))" if pickles else ""))
    else:
        problems += _weights_problems(weights)
    if problems:
        raise Refused(f"{folder} is not a PEFT LoRA adapter folder: " + "; ".join(problems))
    return config, weights


def _config_problems(config: Path) -> list[str]:
    if config.stat().st_size > MAX_CONFIG_BYTES:
        return [f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes"]
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{CONFIG_FILE} is not valid JSON: {exc}"]
    if not isinstance(data, dict):
        return [f"{CONFIG_FILE} is not a JSON object"]
    peft_type = data.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        return [f"{CONFIG_FILE}: peft_type is {peft_type!r}, not LORA"]
    return []


def _weights_problems(weights: Path) -> list[str]:
    try:  # reads the header only
        with safe_open(str(weights), framework="numpy") as f:
            if not f.keys():
                return [f"{WEIGHTS_FILE} holds no tensors"]
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own and OS errors)
        return [f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}"]
    return []


class _Counted:
    """A file whose reads advance a progress bar (httpx reads each file part in chunks)."""

    def __init__(self, f: BinaryIO, progress: Progress, task: TaskID) -> None:
        self.f, self.progress, self.task, self.sent = f, progress, task, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.f.read(size)
        self.sent += len(chunk)
        self.progress.advance(self.task, len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self.f.seek(offset, whence)
        if whence == 0 and offset == 0:  # read again from the start (httpx does, once)
            self.progress.advance(self.task, -self.sent)
            self.sent = 0
        return position

    def tell(self) -> int:
        return self.f.tell()

    def fileno(self) -> int:  # httpx learns the size from it, for Content-Length
        return self.f.fileno()


class _Files:
    """The adapter files opened for reading, closed however the upload ends."""

    def __init__(self, paths: tuple[Path, ...]) -> None:
        self.paths = paths
        self.opened: list[BinaryIO] = []

    def __enter__(self) -> list[BinaryIO]:
        for p in self.paths:
            self.opened.append(p.open("rb"))
        return self.opened

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for f in self.opened:
            f.close()


def push_folder(client: AdminClient, url: str, folder: Path, out: Output,
                timeout_s: float) -> Any:
    """Upload the adapter in `folder` to `url` (POST .../versions); the new version."""
    config, weights = check_folder(folder)
    total = config.stat().st_size + weights.stat().st_size
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=out.err,
                        disable=out.as_json)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0),
                            read=max(timeout_s, REGISTER_TIMEOUT_S))
    with progress, _Files((config, weights)) as (config_f, weights_f):
        task = progress.add_task(f"Uploading {folder.name}", total=total)
        files = [(CONFIG_FILE, (CONFIG_FILE, _Counted(config_f, progress, task),
                                "application/json")),
                 (WEIGHTS_FILE, (WEIGHTS_FILE, _Counted(weights_f, progress, task),
                                 "application/octet-stream"))]
        return client.request("POST", url, files=files, timeout=timeout)
