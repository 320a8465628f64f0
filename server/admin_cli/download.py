"""Downloading a merged-model export: each file the export lists, streamed with a progress bar,
its size and sha256 checked against the listing, into a staging folder renamed onto the
destination only when every file is right (a failed or interrupted download leaves nothing
that looks like a model).
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
from pathlib import Path
from typing import Any

import httpx
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from server.admin_cli.client import AdminClient
from server.admin_cli.errors import Refused, Unreachable
from server.admin_cli.output import Output

CHUNK = 1 << 20


def download_export(client: AdminClient, export: dict[str, Any], dest: Path, out: Output) -> None:
    """Every file of a succeeded `export` (the API's object) into the new folder `dest`."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise Refused(f"{dest} already exists and is not an empty folder; nothing downloaded")
    files: dict[str, dict[str, Any]] = export.get("files") or {}
    staging = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=out.err,
                        disable=out.as_json)
    try:
        with progress:
            task = progress.add_task(f"Downloading {export['adapter']}@{export['version']}",
                                     total=sum(int(f["size"]) for f in files.values()))
            for rel, meta in files.items():
                target = staging / rel
                if staging.resolve() not in target.resolve().parents:
                    raise Refused(f"the export lists a file outside its folder: {rel!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                size, digest = _fetch(client, meta["url"], target,
                                      lambda n: progress.advance(task, n))
                if (size, digest) != (int(meta["size"]), meta["sha256"]):
                    raise Refused(f"{rel} did not download intact ({size} bytes, sha256 "
                                  f"{digest[:12]}...; the export lists {meta['size']} bytes, "
                                  f"sha256 {meta['sha256'][:12]}...); nothing kept")
        if dest.exists():
            dest.rmdir()  # empty, checked above
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch(client: AdminClient, url: str, target: Path,
           advance: Any) -> tuple[int, str]:
    """Stream `url` into `target`; (bytes, sha256)."""
    digest, size = hashlib.sha256(), 0
    try:
        with client.http.stream("GET", url) as resp:
            if resp.status_code != 200:
                resp.read()
                client.decode(resp)  # raises the API's error
                raise Unreachable(f"{url} answered HTTP {resp.status_code}")
            with target.open("wb") as f:
                for chunk in resp.iter_bytes(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                    advance(len(chunk))
    except httpx.TimeoutException as exc:
        raise Unreachable(f"no data from {client.url} in time while downloading "
                          f"({type(exc).__name__})") from exc
    except httpx.HTTPError as exc:  # cut short: the server found the stored file corrupt
        raise Unreachable(f"the download of {url} broke off ({exc or type(exc).__name__}); "
                          "nothing kept") from exc
    return size, digest.hexdigest()
