"""Where a new adapter version's files come from, and which places registration may read.

Three sources, each copying the two adapter files into a staging folder that registration
then validates and stores:

- an upload: file parts named like the adapter files (the admin API's multipart form);
- a local folder under an entry of `LORAPLEX_LOCAL_SOURCE_ALLOWLIST`;
- an `s3://bucket/prefix/` folder under an entry of `LORAPLEX_S3_SOURCE_ALLOWLIST`, read with
  the store's client and credentials (so it needs an S3 store).

Both allow-lists are checked here and nowhere else. Pickle weights are refused before a
byte of them is read, and the declared size limit holds while reading.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from adapters.errors import AdapterInvalid, Forbidden, InvalidInput, NotFound, TooLarge
from adapters.s3.errors import DENIED, NOT_FOUND, error_code, map_error
from adapters.s3.store import download
from adapters.s3.uris import parse_s3_uri, uri_allowed
from adapters.validation import (
    ADAPTER_FILES,
    CONFIG_FILE,
    IGNORED_FILES,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    check_file_names,
)


@dataclass(frozen=True)
class UploadedFile:
    """One file part of an upload: the name it is stored under and its readable body."""

    name: str
    body: BinaryIO


class AdapterSources:
    """Copies adapter files from an upload, an allow-listed folder or an allow-listed S3
    prefix into a staging folder. `s3_client` is the store's boto3 client (None: no S3)."""

    def __init__(self, *, local_allowlist: Sequence[Path], s3_allowlist: Sequence[str],
                 max_bytes: int, s3_client: Any = None) -> None:
        self.local_roots = [root.resolve() for root in local_allowlist]
        self.s3_allowlist = list(s3_allowlist)
        self.max_bytes = max_bytes
        self.s3_client = s3_client

    # -- uploads ---------------------------------------------------------------------------------

    @staticmethod
    def upload_name(field_name: str, filename: str | None) -> str:
        """The file name a form part stands for: its field name when that names an adapter
        file (curl's `-F adapter_config.json=@path`), otherwise the uploaded file's name."""
        known = ADAPTER_FILES + IGNORED_FILES
        return field_name if field_name in known else (filename or field_name)

    async def save_upload(self, files: Sequence[UploadedFile], dest: Path) -> str:
        """Check the names of every part (all problems at once), then copy the adapter files."""
        names = [f.name for f in files]
        problems = check_file_names(names)
        problems += [f"file {n!r} sent twice" for n in sorted(set(names)) if names.count(n) > 1]
        if problems:
            raise AdapterInvalid(problems)
        for f in files:
            if f.name in ADAPTER_FILES:
                await asyncio.to_thread(_copy_stream, f.body, dest / f.name)
        return "upload"

    # -- local folders -----------------------------------------------------------------------

    def local_allowed(self, path: Path) -> bool:
        """Whether `path` (resolved: symbolic links followed) lies under an allowed folder."""
        resolved = path.resolve()
        return any(resolved.is_relative_to(root) for root in self.local_roots)

    async def copy_local(self, path_text: str, dest: Path) -> str:
        path = Path(path_text).resolve()
        if not self.local_allowed(path):
            raise Forbidden(f"{path_text!r} is not under a folder in "
                            "LORAPLEX_LOCAL_SOURCE_ALLOWLIST", param="path",
                            code="source_not_allowed")
        if not path.is_dir():
            raise InvalidInput(f"{path_text!r} is not a folder", param="path")
        names = [p.name for p in path.iterdir()
                 if p.name in ADAPTER_FILES or (p.name.startswith("adapter_model")
                                                and p.name.endswith(PICKLE_SUFFIXES))]
        problems = check_file_names(names)
        # A symlinked file could pull in a file from outside the allow-listed folder.
        problems += [f"{n} is a symbolic link; copy the file itself" for n in names
                     if (path / n).is_symlink()]
        if problems:
            raise AdapterInvalid(problems)
        for name in ADAPTER_FILES:
            await asyncio.to_thread(shutil.copyfile, path / name, dest / name)
        return f"file://{path}"

    # -- S3 ----------------------------------------------------------------------------------

    def s3_allowed(self, uri: str) -> bool:
        return uri_allowed(uri, self.s3_allowlist)

    async def copy_s3(self, uri: str, dest: Path) -> str:
        """Copy the PEFT adapter at `uri` into `dest`: only adapter_config.json and
        adapter_model.safetensors are read, pickle weights are refused, never downloaded."""
        if self.s3_client is None:
            raise InvalidInput("registration from s3:// needs an S3 store (LORAPLEX_STORE=s3://...)",
                               param="source", code="unsupported_source")
        if not self.s3_allowed(uri):
            raise Forbidden(f"{uri!r} is not under an allowed S3 source prefix",
                            param="source", code="source_not_allowed")
        await asyncio.to_thread(_download_adapter, self.s3_client, uri, dest, self.max_bytes)
        return uri


def _copy_stream(body: BinaryIO, target: Path) -> None:
    body.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(body, out, 1 << 20)


def _download_adapter(client: Any, uri: str, dest: Path, max_bytes: int) -> None:
    bucket, prefix = parse_s3_uri(uri)
    base = prefix + "/" if prefix else ""
    try:
        sizes = _list_sizes(client, bucket, base)
        if not sizes:
            raise NotFound(f"no objects under {uri}", param="source", code="source_not_found")
        missing = [n for n in ADAPTER_FILES if n not in sizes]
        pickles = sorted(n for n in sizes if n.endswith(PICKLE_SUFFIXES))
        if WEIGHTS_FILE in missing and pickles:
            raise InvalidInput(f"{uri} holds pickle weights ({', '.join(pickles)}) and no "
                               f"{WEIGHTS_FILE}: pickle is refused (it can run code); save "
                               "the adapter with safetensors", param="source",
                               code="pickle_refused")
        if missing:
            raise InvalidInput(f"{uri} is missing {', '.join(missing)}", param="source",
                               code="source_incomplete")
        total = sum(sizes[n] for n in ADAPTER_FILES)
        if total > max_bytes:
            raise TooLarge(f"{uri}: the adapter files are {total} bytes, over the limit of "
                           f"{max_bytes}", param="source")
        dest.mkdir(parents=True, exist_ok=True)
        left = max_bytes
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            # The object may have grown since it was listed: the limit holds while reading.
            got, _ = download(client, bucket, base + name, dest / name, limit=left)
            if got > left:
                raise TooLarge(f"{uri}: the adapter files are over the limit of "
                               f"{max_bytes} bytes", param="source")
            left -= got
    except ClientError as exc:
        code = error_code(exc)
        if code in NOT_FOUND | {"NoSuchBucket"}:
            raise NotFound(f"{uri}: not found ({code})", param="source",
                           code="source_not_found") from exc
        if code in DENIED:
            raise Forbidden(f"{uri}: the gateway's credentials cannot read it ({code})",
                            param="source", code="source_not_readable") from exc
        raise map_error(exc, f"reading {uri}") from exc
    except (BotoCoreError, OSError) as exc:
        raise map_error(exc, f"reading {uri}") from exc


def _list_sizes(client: Any, bucket: str, base: str) -> dict[str, int]:
    """Object name (below `base`, one level only) -> size."""
    sizes: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base,
                                                                  Delimiter="/"):
        for obj in page.get("Contents", []):
            sizes[obj["Key"][len(base):]] = int(obj["Size"])
    return sizes

