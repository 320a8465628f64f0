"""Adapter stores: where registered adapter versions live, immutable once written.

Layout (the same in every store): `<tenant>/<adapter>/v<version>-<uid>/` holding the adapter
files and `manifest.json` (sha256 and size of each file, base model, rank, target modules,
created time, provenance). The uid keeps a key unique even if an adapter is deleted and its
version numbers start again.

Writes are staged under a temporary name, verified against the manifest, then renamed, so a
reader never sees a half-written version.

Other shared data (training files, training checkpoints) lives in the same store as *blobs*
under a top-level `_data/` folder (`BLOB_ROOT`): `_data/files/<tenant>/<file-id>.jsonl`,
`_data/checkpoints/<job-id>/step-N/`. A tenant name starts with a letter or digit, so no
adapter key is ever under it. A blob is one object, replaced atomically; a *folder* is several
files and a `complete.json` marker (their sizes and sha256) written last: without the marker
a folder does not exist for readers, and a folder once complete is never overwritten.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from adapters.errors import AdapterInvalid, Corrupt, NotFound
from adapters.validation import ADAPTER_FILES, ValidatedAdapter, sha256_file

MANIFEST_FILE = "manifest.json"
BLOB_ROOT = "_data"
FOLDER_MARKER = "complete.json"
MAX_MARKER_BYTES = 1 << 20
READ_CHUNK = 1 << 20


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


def exports_of(tenant: str, adapter: str | None = None, version: int | None = None) -> str:
    """The blob prefix of a tenant's merged-model exports (of one adapter, of one version):
    `exports/<tenant>/<adapter>/<version>/<job-id>/` each."""
    prefix = f"exports/{tenant}"
    if adapter is not None:
        prefix += f"/{adapter}" if version is None else f"/{adapter}/{version}"
    return prefix


def export_key(tenant: str, adapter: str, version: int, job_id: str) -> str:
    return f"{exports_of(tenant, adapter, version)}/{job_id}"


def verify_folder(folder: Path, manifest: Manifest) -> list[str]:
    """Files in `folder` that do not match the manifest (size or sha256)."""
    bad = []
    for name, want in manifest.files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != want["size"] \
                or sha256_file(path) != want["sha256"]:
            bad.append(name)
    return bad


@dataclass
class FolderFile:
    """A file of a stored folder being read: its size and sha256 (from the folder's marker)
    and its bytes, checked against both as they come."""

    size: int
    sha256: str
    chunks: AsyncIterator[bytes]


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

    # -- blobs: shared data that is not an adapter version (keys checked by `check_blob_key`) --

    @abc.abstractmethod
    async def put_blob(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing what was there; readers see all or nothing."""

    @abc.abstractmethod
    async def get_blob(self, key: str, *, limit: int) -> bytes:
        """The bytes of `key` (NotFound if absent; Corrupt if over `limit` bytes)."""

    @abc.abstractmethod
    async def delete_blob(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""

    @abc.abstractmethod
    async def put_folder(self, key: str, folder: Path) -> None:
        """Store every file under `folder` as the folder `key`, its marker last. If `key` is
        already complete it is kept as it is (the first complete writer wins)."""

    @abc.abstractmethod
    async def get_folder(self, key: str, dest: Path) -> None:
        """Copy the complete folder `key` to `dest` (replaced), every file checked against the
        marker; NotFound if `key` has no marker, Corrupt if a file does not match it."""

    @abc.abstractmethod
    async def open_folder_file(self, key: str, rel: str) -> FolderFile:
        """One file of the complete folder `key`, to stream (a download): NotFound if the
        folder or the file is not there. Its bytes are checked against the marker as they are
        read; a mismatch raises Corrupt at the end, before the last chunk is given."""

    @abc.abstractmethod
    async def list_folders(self, prefix: str) -> list[str]:
        """Names of the complete folders directly under `prefix`, sorted."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> None:
        """Remove every blob and folder under `prefix/` (markers first)."""


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

    # -- blobs -------------------------------------------------------------------------------

    def blob_path(self, key: str) -> Path:
        return self.root / BLOB_ROOT / check_blob_key(key)

    async def put_blob(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put_blob, self.blob_path(key), data)

    def _put_blob(self, final: Path, data: bytes) -> None:
        self._staging.mkdir(parents=True, exist_ok=True)
        tmp = self._staging / secrets.token_hex(8)
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    async def get_blob(self, key: str, *, limit: int) -> bytes:
        return await asyncio.to_thread(self._get_blob, key, limit)

    def _get_blob(self, key: str, limit: int) -> bytes:
        try:
            with self.blob_path(key).open("rb") as f:
                data = f.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(f"{key} is not in {self.description}",
                           code="blob_not_found") from exc
        if len(data) > limit:
            raise Corrupt(f"{key} in {self.description} is larger than {limit} bytes")
        return data

    async def delete_blob(self, key: str) -> None:
        await asyncio.to_thread(self.blob_path(key).unlink, True)

    async def put_folder(self, key: str, folder: Path) -> None:
        await asyncio.to_thread(self._put_folder, self.blob_path(key), folder)

    def _put_folder(self, final: Path, folder: Path) -> None:
        if (final / FOLDER_MARKER).is_file():
            return
        staging = self._staging / secrets.token_hex(8)
        try:
            for rel in folder_files(folder):
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / rel, staging / rel)
                fsync_path(staging / rel)
            # The marker describes the staged copies: what a reader gets is what it lists.
            (staging / FOLDER_MARKER).write_text(folder_marker(staging))
            fsync_path(staging / FOLDER_MARKER)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                staging.rename(final)
            except OSError:  # another writer completed it first: keep theirs
                if not (final / FOLDER_MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    async def get_folder(self, key: str, dest: Path) -> None:
        await asyncio.to_thread(self._get_folder, key, dest)

    def _get_folder(self, key: str, dest: Path) -> None:
        source = self.blob_path(key)
        try:
            raw = (source / FOLDER_MARKER).read_bytes()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"folder {key} is not in {self.description} (missing, or never "
                           "completed)", code="blob_not_found") from exc
        files = parse_folder_marker(key, raw)

        def fetch(rel: str, target: Path) -> tuple[int, str]:
            try:
                shutil.copyfile(source / rel, target)
            except FileNotFoundError as exc:
                raise NotFound(f"folder {key} in {self.description}: {rel} is missing",
                               code="blob_not_found") from exc
            return target.stat().st_size, sha256_file(target)

        receive_folder(key, files, dest, fetch)

    async def open_folder_file(self, key: str, rel: str) -> FolderFile:
        folder = self.blob_path(key)
        try:
            raw = await asyncio.to_thread((folder / FOLDER_MARKER).read_bytes)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"folder {key} is not in {self.description}",
                           code="blob_not_found") from exc
        size, digest = listed_file(key, parse_folder_marker(key, raw), rel)
        path = folder / rel
        if not await asyncio.to_thread(path.is_file):
            raise NotFound(f"folder {key} in {self.description}: {rel} is missing",
                           code="blob_not_found")
        return FolderFile(size, digest, checked_chunks(f"{key}/{rel}", size, digest,
                                                       lambda: path.open("rb")))

    async def list_folders(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._list_folders, self.blob_path(prefix))

    @staticmethod
    def _list_folders(base: Path) -> list[str]:
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / FOLDER_MARKER).is_file())

    async def delete_prefix(self, prefix: str) -> None:
        await asyncio.to_thread(self._delete_prefix, self.blob_path(prefix))

    def _delete_prefix(self, base: Path) -> None:
        # Renamed away first: readers see the whole prefix vanish at once, never a part of it.
        self._staging.mkdir(parents=True, exist_ok=True)
        trash = self._staging / f"deleted-{secrets.token_hex(8)}"
        try:
            base.rename(trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)


def check_blob_key(key: str) -> str:
    """`key` if it is a relative '/'-separated path with no empty, '.' or '..' part."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        raise ValueError(f"not a blob key: {key!r}")
    return key


def folder_files(folder: Path) -> list[str]:
    """The files under `folder` (recursively), as sorted '/'-separated relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def folder_marker(folder: Path) -> str:
    """The marker of a folder: the size and sha256 of each of its files."""
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)}
             for rel in folder_files(folder) if rel != FOLDER_MARKER}
    return json.dumps({"files": files, "created_at": datetime.now(timezone.utc).isoformat()},
                      indent=2, sort_keys=True)


def parse_folder_marker(key: str, raw: bytes) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) from a folder marker; Corrupt if it is unreadable."""
    try:
        listed = json.loads(raw)["files"]
        files = {check_blob_key(rel): (int(want["size"]), str(want["sha256"]))
                 for rel, want in listed.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise Corrupt(f"folder {key}: {FOLDER_MARKER} is unreadable: {exc}") from exc
    return files


def listed_file(key: str, files: dict[str, tuple[int, str]], rel: str) -> tuple[int, str]:
    """(size, sha256) of `rel` in a folder's marker; NotFound if the folder has no such file."""
    if rel == FOLDER_MARKER or rel not in files:
        raise NotFound(f"folder {key} has no file {rel!r}", code="blob_not_found")
    return files[rel]


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


async def checked_chunks(what: str, size: int, digest: str,
                         open_: Callable[[], Readable]) -> AsyncIterator[bytes]:
    """The bytes of a blocking reader (opened and read in threads), the last chunk held back
    until the whole is known to match `size` and `digest` (Corrupt otherwise): a reader that
    gets every byte got the right ones. The reader is closed however the stream ends."""
    reader = await asyncio.to_thread(open_)
    hasher, got, held = hashlib.sha256(), 0, b""
    try:
        while chunk := await asyncio.to_thread(reader.read, READ_CHUNK):
            got += len(chunk)
            if got > size:
                break
            hasher.update(chunk)
            if held:
                yield held
            held = chunk
        if (got, hasher.hexdigest()) != (size, digest):
            raise Corrupt(f"{what} does not match its folder's marker (read {got} bytes of "
                          f"{size}, or other bytes than the ones listed)")
        if held:
            yield held
    finally:
        await asyncio.to_thread(reader.close)


def receive_folder(key: str, files: dict[str, tuple[int, str]], dest: Path,
                   fetch: Callable[[str, Path], tuple[int, str]]) -> None:
    """Fetch each listed file into a staging folder next to `dest` (`fetch(rel, target)` ->
    (size, sha256)), check it, then rename the staging folder onto `dest`."""
    staging = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    try:
        for rel, (size, digest) in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            got_size, got_digest = fetch(rel, staging / rel)
            if (got_size, got_digest) != (size, digest):
                raise Corrupt(f"folder {key}: {rel} does not match its marker ({got_size} bytes, "
                              f"sha256 {got_digest[:12]}…; expected {size} bytes, sha256 "
                              f"{digest[:12]}…)")
        staging.mkdir(parents=True, exist_ok=True)  # a folder of no files is still a folder
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file to disk before it is renamed into place (a crash leaves no torn file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
