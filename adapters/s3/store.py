"""Adapter versions in S3 (or any S3-compatible store), served from a checked local cache.

Layout: `<prefix>/<key>/<file>` for each adapter file and `<prefix>/<key>/manifest.json`.
The manifest is written last and only if absent (`If-None-Match: *`): it is the commit
marker, so a version without one is incomplete and never read, and an existing version is
never overwritten (the adapter files are written the same way).

Reads go through a `DiskCache`: the engine loads a local folder, and every byte that enters
the cache was checked against the manifest's sizes and sha256 first, so a corrupted or
truncated object is refused (Corrupt) instead of being loaded.

Blobs (training files, checkpoints; see adapters/store.py) live under `<prefix>/_data/`. A
folder's files go under `<key>/<uid>/` and its marker `<key>/complete.json` (naming the uid)
is written last and only if absent, so two writers of one folder never mix their files: the
second one's marker is refused and its objects removed. Blobs bypass the disk cache.

boto3 is synchronous; every call runs in a thread. botocore's own retries (standard mode,
`max_attempts`) absorb brief throttling and 5xx; what is left is mapped to the domain errors
by `adapters.s3.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters.disk_cache import DiskCache
from adapters.errors import Corrupt, LoraplexError, NotFound, Unavailable
from adapters.s3.errors import NOT_FOUND, RETRY_AFTER_S, error_code, map_error
from adapters.store import (
    BLOB_ROOT,
    FOLDER_MARKER,
    MANIFEST_FILE,
    MAX_MARKER_BYTES,
    AdapterStore,
    FolderFile,
    Manifest,
    check_blob_key,
    checked_chunks,
    folder_files,
    listed_file,
    parse_folder_marker,
    receive_folder,
)
from adapters.validation import ADAPTER_FILES

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def make_client(*, endpoint_url: str | None = None, region: str | None = None,
                connect_timeout_s: float = 3, read_timeout_s: float = 10,
                max_attempts: int = 3) -> Any:
    """A boto3 S3 client with bounded timeouts and retries; credentials from the standard
    AWS chain (environment, config files, instance role)."""
    config = Config(connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                    retries={"max_attempts": max_attempts, "mode": "standard"})
    # A session of its own: the default one is shared and not safe to build from threads.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url,
                                          region_name=region, config=config)


class S3Store(AdapterStore):
    """Versions under `s3://bucket/prefix/`, read through `cache`. `client` replaces the
    boto3 client built from the other options (tests, a shared client)."""

    def __init__(self, bucket: str, prefix: str, cache: DiskCache, *,
                 endpoint_url: str | None = None, region: str | None = None,
                 connect_timeout_s: float = 3, read_timeout_s: float = 10,
                 max_attempts: int = 3, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache = cache
        self.client = client or make_client(
            endpoint_url=endpoint_url, region=region, connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s, max_attempts=max_attempts)

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def object_key(self, key: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, key, name) if p)

    # -- writing -----------------------------------------------------------------------------

    async def put(self, key: str, folder: Path, manifest: Manifest) -> None:
        await asyncio.to_thread(self._put, key, folder, manifest)

    def _put(self, key: str, folder: Path, manifest: Manifest) -> None:
        uploaded: list[str] = []
        what = f"storing {key} in {self.description}"
        try:
            for name, want in manifest.files.items():
                with (folder / name).open("rb") as body:
                    self._put_object(self.object_key(key, name), body, str(want["sha256"]))
                uploaded.append(self.object_key(key, name))
            # Last: its presence is what makes the version exist.
            manifest_key = self.object_key(key, MANIFEST_FILE)
            data = manifest.to_json().encode()
            self._put_object(manifest_key, data, hashlib.sha256(data).hexdigest())
            uploaded.append(manifest_key)
            sizes = {self.object_key(key, n): int(w["size"]) for n, w in manifest.files.items()}
            sizes[manifest_key] = len(data)
            for obj, size in sizes.items():
                got = self.client.head_object(Bucket=self.bucket, Key=obj)["ContentLength"]
                if got != size:
                    raise Corrupt(f"{key}: s3://{self.bucket}/{obj} holds {got} bytes after "
                                  f"upload, expected {size}", code="store_write_mismatch")
        except BaseException as exc:
            self._delete_objects(uploaded)
            if isinstance(exc, Exception) and not isinstance(exc, LoraplexError):
                raise map_error(exc, what, key=key) from exc
            raise

    def _put_object(self, obj: str, body: BinaryIO | bytes, sha256_hex: str) -> None:
        # If-None-Match: never replace an existing (immutable) object. ChecksumSHA256: S3
        # refuses the upload if the bytes sent are not the ones the manifest describes.
        self.client.put_object(
            Bucket=self.bucket, Key=obj, Body=body, IfNoneMatch="*",
            ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256_hex)).decode())

    def _delete_objects(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys], "Quiet": True})
        except (BotoCoreError, ClientError) as exc:  # leftovers have no manifest: never read
            log.warning("could not clean up %d objects in s3://%s: %s", len(keys), self.bucket,
                        exc)

    # -- reading -----------------------------------------------------------------------------

    async def local_path(self, key: str, *, pin: bool = False) -> Path:
        """The verified local folder of `key` (see `DiskCache.get` for `pin`)."""

        async def fetch(tmp: Path) -> None:
            await asyncio.to_thread(self._fetch, key, tmp)

        return await self.cache.get(key, fetch, pin=pin)

    async def checkout(self, key: str) -> Path:
        # Pinned: another key's fetch must not evict a folder the engine may still read.
        return await self.local_path(key, pin=True)

    def release(self, key: str) -> None:
        self.cache.unpin(key)

    def _fetch(self, key: str, tmp: Path) -> None:
        what = f"reading {key} from {self.description}"
        current = MANIFEST_FILE  # the object being read, for a NotFound message
        try:
            raw = self._get_bytes(self.object_key(key, MANIFEST_FILE), limit=1 << 20)
            manifest = _parse_manifest(key, raw)
            for name, want in manifest.files.items():
                current = name
                size, digest = download(self.client, self.bucket, self.object_key(key, name),
                                         tmp / name, limit=int(want["size"]))
                if size != want["size"] or digest != want["sha256"]:
                    raise Corrupt(f"adapter version {key}: {name} does not match its manifest "
                                  f"({size} bytes, sha256 {digest[:12]}…; expected "
                                  f"{want['size']} bytes, sha256 {str(want['sha256'])[:12]}…); "
                                  "not loaded")
            (tmp / MANIFEST_FILE).write_bytes(raw)
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                raise NotFound(f"adapter version {key} is not in {self.description}: "
                               f"{current} is missing (deleted, or never completed)",
                               code="adapter_files_missing") from exc
            raise map_error(exc, what, key=key) from exc
        except (BotoCoreError, OSError) as exc:
            raise map_error(exc, what, key=key) from exc

    def _get_bytes(self, obj: str, limit: int) -> bytes:
        resp = self.client.get_object(Bucket=self.bucket, Key=obj)
        data: bytes = resp["Body"].read(limit + 1)
        resp["Body"].close()
        if len(data) > limit:
            raise Corrupt(f"s3://{self.bucket}/{obj} is larger than {limit} bytes")
        return data

    # -- deleting ----------------------------------------------------------------------------

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self._delete, key)
        finally:
            # Even if S3 failed: a cached copy of a deleted version must not be served.
            await self.cache.remove(key)

    def _delete(self, key: str) -> None:
        prefix = self.object_key(key, "") + "/"
        try:
            # The manifest first: from then on the version no longer exists for readers.
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key, MANIFEST_FILE))
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    resp = self.client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
                    if resp.get("Errors"):
                        raise Unavailable(f"deleting {key} from {self.description}: "
                                          f"{resp['Errors'][0].get('Message', 'failed')}",
                                          code="store_unavailable", retry_after_s=RETRY_AFTER_S)
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and error_code(exc) in NOT_FOUND | {"NoSuchBucket"}:
                return
            raise map_error(exc, f"deleting {key} from {self.description}", key=key) from exc

    # -- blobs -------------------------------------------------------------------------------

    def blob_object(self, key: str) -> str:
        return self.object_key(BLOB_ROOT, check_blob_key(key))

    async def put_blob(self, key: str, data: bytes) -> None:
        obj = self.blob_object(key)
        try:
            await asyncio.to_thread(self._put_object_checked, obj, data, hashlib.sha256(data))
        except (BotoCoreError, ClientError) as exc:
            raise map_error(exc, f"storing {key} in {self.description}", key=key) from exc

    def _put_object_checked(self, obj: str, body: BinaryIO | bytes, digest: Any,
                            **extra: Any) -> None:
        self.client.put_object(Bucket=self.bucket, Key=obj, Body=body,
                               ChecksumSHA256=base64.b64encode(digest.digest()).decode(),
                               **extra)

    async def get_blob(self, key: str, *, limit: int) -> bytes:
        obj = self.blob_object(key)
        try:
            return await asyncio.to_thread(self._get_bytes, obj, limit)
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                raise NotFound(f"{key} is not in {self.description}",
                               code="blob_not_found") from exc
            raise map_error(exc, f"reading {key} from {self.description}", key=key) from exc
        except BotoCoreError as exc:
            raise map_error(exc, f"reading {key} from {self.description}", key=key) from exc

    async def delete_blob(self, key: str) -> None:
        obj = self.blob_object(key)
        try:
            await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=obj)
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and error_code(exc) in NOT_FOUND | {"NoSuchBucket"}:
                return
            raise map_error(exc, f"deleting {key} from {self.description}", key=key) from exc

    async def put_folder(self, key: str, folder: Path) -> None:
        await asyncio.to_thread(self._put_folder, key, folder)

    def _put_folder(self, key: str, folder: Path) -> None:
        what = f"storing {key} in {self.description}"
        base = self.blob_object(key)
        marker_obj = f"{base}/{FOLDER_MARKER}"
        uid = secrets.token_hex(6)
        uploaded: list[str] = []
        try:
            if self._exists(marker_obj):
                return
            files: dict[str, dict[str, int | str]] = {}
            for rel in folder_files(folder):
                with (folder / rel).open("rb") as body:
                    digest, size = hashlib.sha256(), 0
                    while chunk := body.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                    body.seek(0)
                    # S3 refuses the bytes if they are not the ones hashed (file changed).
                    self._put_object_checked(f"{base}/{uid}/{rel}", body, digest)
                uploaded.append(f"{base}/{uid}/{rel}")
                files[rel] = {"size": size, "sha256": digest.hexdigest()}
            marker = json.dumps({"uid": uid, "files": files,
                                 "created_at": datetime.now(timezone.utc).isoformat()},
                                indent=2, sort_keys=True).encode()
            try:
                self._put_object_checked(marker_obj, marker, hashlib.sha256(marker),
                                         IfNoneMatch="*")
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if error_code(exc) == "PreconditionFailed" or status == 412:
                    self._delete_objects(uploaded)  # another writer completed it first
                    return
                raise
        except BaseException as exc:
            self._delete_objects(uploaded)
            if isinstance(exc, Exception) and not isinstance(exc, LoraplexError):
                raise map_error(exc, what, key=key) from exc
            raise

    def _exists(self, obj: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=obj)
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                return False
            raise
        return True

    async def get_folder(self, key: str, dest: Path) -> None:
        await asyncio.to_thread(self._get_folder, key, dest)

    def _get_folder(self, key: str, dest: Path) -> None:
        what = f"reading {key} from {self.description}"
        base = self.blob_object(key)
        current = FOLDER_MARKER
        try:
            raw = self._get_bytes(f"{base}/{FOLDER_MARKER}", limit=MAX_MARKER_BYTES)
            files = parse_folder_marker(key, raw)
            try:
                uid = check_blob_key(str(json.loads(raw)["uid"]))
            except (ValueError, KeyError) as exc:
                raise Corrupt(f"folder {key}: {FOLDER_MARKER} names no uid") from exc

            def fetch(rel: str, target: Path) -> tuple[int, str]:
                nonlocal current
                current = rel
                return download(self.client, self.bucket, f"{base}/{uid}/{rel}", target,
                                limit=files[rel][0])

            receive_folder(key, files, dest, fetch)
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                raise NotFound(f"folder {key} is not in {self.description}: {current} is "
                               "missing (deleted, or never completed)",
                               code="blob_not_found") from exc
            raise map_error(exc, what, key=key) from exc
        except (BotoCoreError, OSError) as exc:
            raise map_error(exc, what, key=key) from exc

    async def open_folder_file(self, key: str, rel: str) -> FolderFile:
        what = f"reading {key}/{rel} from {self.description}"
        base = self.blob_object(key)
        try:
            raw = await asyncio.to_thread(self._get_bytes, f"{base}/{FOLDER_MARKER}",
                                          MAX_MARKER_BYTES)
            size, digest = listed_file(key, parse_folder_marker(key, raw), rel)
            try:
                uid = check_blob_key(str(json.loads(raw)["uid"]))
            except (ValueError, KeyError) as exc:
                raise Corrupt(f"folder {key}: {FOLDER_MARKER} names no uid") from exc
            body = (await asyncio.to_thread(self.client.get_object, Bucket=self.bucket,
                                            Key=f"{base}/{uid}/{rel}"))["Body"]
        except ClientError as exc:
            if error_code(exc) in NOT_FOUND:
                raise NotFound(f"folder {key} is not in {self.description}, or has no {rel}",
                               code="blob_not_found") from exc
            raise map_error(exc, what, key=key) from exc
        except BotoCoreError as exc:
            raise map_error(exc, what, key=key) from exc
        return FolderFile(size, digest, checked_chunks(f"{key}/{rel}", size, digest,
                                                       lambda: body))

    async def list_folders(self, prefix: str) -> list[str]:
        base = self.blob_object(prefix) + "/"
        try:
            keys = await asyncio.to_thread(self._list, base)
        except (BotoCoreError, ClientError) as exc:
            raise map_error(exc, f"listing {prefix} in {self.description}") from exc
        names = set()
        for obj in keys:
            name, _, rest = obj[len(base):].partition("/")
            if name and rest == FOLDER_MARKER:
                names.add(name)
        return sorted(names)

    def _list(self, base: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys

    async def delete_prefix(self, prefix: str) -> None:
        await asyncio.to_thread(self._delete_prefix, prefix)

    def _delete_prefix(self, prefix: str) -> None:
        what = f"deleting {prefix} from {self.description}"
        try:
            keys = self._list(self.blob_object(prefix) + "/")
            markers = [k for k in keys if k.endswith("/" + FOLDER_MARKER)]
            rest = [k for k in keys if not k.endswith("/" + FOLDER_MARKER)]
            # Markers first: from then on no folder under the prefix exists for readers.
            for batch in (markers, rest):
                for start in range(0, len(batch), 1000):  # delete_objects takes 1000 at most
                    resp = self.client.delete_objects(Bucket=self.bucket, Delete={
                        "Objects": [{"Key": k} for k in batch[start:start + 1000]],
                        "Quiet": True})
                    if resp.get("Errors"):
                        raise Unavailable(f"{what}: "
                                          f"{resp['Errors'][0].get('Message', 'failed')}",
                                          code="store_unavailable",
                                          retry_after_s=RETRY_AFTER_S)
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and error_code(exc) == "NoSuchBucket":
                return
            raise map_error(exc, what, key=prefix) from exc


def download(client: Any, bucket: str, obj: str, target: Path,
             limit: int | None) -> tuple[int, str]:
    """Stream one object to `target`; (bytes, sha256). Stops once past `limit`, so an
    oversized object is never fully read: the size returned is then over the limit."""
    body, digest, size = client.get_object(Bucket=bucket, Key=obj)["Body"], hashlib.sha256(), 0
    try:
        with target.open("wb") as out:
            while chunk := body.read(CHUNK):
                size += len(chunk)
                if limit is not None and size > limit:
                    break
                digest.update(chunk)
                out.write(chunk)
    finally:
        body.close()
    return size, digest.hexdigest()


def _parse_manifest(key: str, raw: bytes) -> Manifest:
    try:
        manifest = Manifest(**json.loads(raw))
        names_ok = all(n in ADAPTER_FILES for n in manifest.files)
    except (ValueError, TypeError) as exc:
        raise Corrupt(f"adapter version {key}: manifest.json is unreadable: {exc}") from exc
    if not names_ok or not manifest.files:
        raise Corrupt(f"adapter version {key}: manifest.json lists unexpected files "
                      f"{sorted(manifest.files)}")
    return manifest

