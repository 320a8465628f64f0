"""Adapter stores: where registered adapter versions live, immutable once written.

Layout (the same in every store): `<tenant>/<adapter>/v<version>-<uid>/` holding the adapter
files and `manifest.json` (sha256 and size of each file, base model, rank, target modules,
created time, provenance). The uid keeps a key unique even if an adapter is deleted and its
version numbers start again.

Writes are staged under a temporary name, verified against the manifest, then renamed, so a
reader never sees a half-written version.
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from adapters.errors import AdapterInvalid
from adapters.validation import ADAPTER_FILES, ValidatedAdapter, sha256_file

MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    tenant: str
    adapter: str
    version: int
    files: dict[str, dict[str, int | str]]  # name -> {"sha256", "size"}
    base_model: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    created_at: str
    source: str

    @classmethod
    def build(cls, tenant: str, adapter: str, version: int, folder: Path,
              checked: ValidatedAdapter, source: str) -> Manifest:
        files: dict[str, dict[str, int | str]] = {
            name: {"sha256": checked.files[name], "size": (folder / name).stat().st_size}
            for name in ADAPTER_FILES}
        return cls(tenant=tenant, adapter=adapter, version=version, files=files,
                   base_model=checked.spec.base_model, rank=checked.spec.rank,
                   alpha=checked.spec.alpha, target_modules=checked.spec.target_modules,
                   created_at=datetime.now(timezone.utc).isoformat(), source=source)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def version_key(tenant: str, adapter: str, version: int) -> str:
    return f"{tenant}/{adapter}/v{version}-{secrets.token_hex(4)}"


def verify_folder(folder: Path, manifest: Manifest) -> list[str]:
    """Files in `folder` that do not match the manifest (size or sha256)."""
    bad = []
    for name, want in manifest.files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != want["size"] \
                or sha256_file(path) != want["sha256"]:
            bad.append(name)
    return bad


class AdapterStore(abc.ABC):
    """Where adapter versions are kept. Keys come from `version_key`."""

    @abc.abstractmethod
    async def put(self, key: str, folder: Path, manifest: Manifest) -> None:
        """Store the adapter files of `folder` under `key`, all or nothing."""

    @abc.abstractmethod
    async def local_path(self, key: str) -> Path:
        """A local folder holding the verified files of `key`, for the engine to load."""

    async def checkout(self, key: str) -> Path:
        """Like `local_path`, and the folder stays until `release` (the engine reads it while
        the adapter is loaded)."""
        return await self.local_path(key)

    def release(self, key: str) -> None:  # noqa: B027 - optional hook, a no-op by default
        """The engine no longer needs the folder of `key`."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where this store keeps adapters, for logs and status."""


class LocalStore(AdapterStore):
    """Adapters in a local folder; the engine loads them in place (no cache needed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = root / ".staging"

    @property
    def description(self) -> str:
        return str(self.root)

    async def put(self, key: str, folder: Path, manifest: Manifest) -> None:
        await asyncio.to_thread(self._put, key, folder, manifest)

    def _put(self, key: str, folder: Path, manifest: Manifest) -> None:
        final = self.root / key
        staging = self._staging / secrets.token_hex(8)
        staging.mkdir(parents=True)
        try:
            for name in manifest.files:
                shutil.copyfile(folder / name, staging / name)
                fsync_path(staging / name)
            (staging / MANIFEST_FILE).write_text(manifest.to_json())
            fsync_path(staging / MANIFEST_FILE)
            bad = verify_folder(staging, manifest)
            if bad:
                raise AdapterInvalid([f"{name} changed while it was being stored" for name in bad])
            final.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    async def local_path(self, key: str) -> Path:
        return self.root / key

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.root / key, True)


def fsync_path(path: Path) -> None:
    """Flush a file to disk before it is renamed into place (a crash leaves no torn file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
