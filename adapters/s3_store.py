"""Adapter versions in S3 (or any S3-compatible store), served from a checked local cache.

Layout: `<prefix>/<key>/<file>` for each adapter file and `<prefix>/<key>/manifest.json`.
The manifest is written last and only if absent (`If-None-Match: *`): it is the commit
marker, so a version without one is incomplete and never read, and an existing version is
never overwritten (the adapter files are written the same way).

Reads go through a `DiskCache`: the engine loads a local folder, and every byte that enters
the cache was checked against the manifest's sizes and sha256 first, so a corrupted or
truncated object is refused (Corrupt) instead of being loaded.

boto3 is synchronous; every call runs in a thread. botocore's own retries (standard mode,
`max_attempts`) absorb brief throttling and 5xx; what is left is mapped to the domain errors:
connection problems, timeouts, throttling and 5xx -> Unavailable (503, retry in 5 s), a
missing object -> NotFound, a refused conditional write -> Conflict.

`S3Store.download_source` reads a PEFT adapter from an allow-listed `s3://` prefix for
registration, with the store's client and credentials.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from adapters.disk_cache import DiskCache
from adapters.errors import (
    Conflict,
    Corrupt,
    Forbidden,
    InvalidInput,
    LoraplexError,
    NotFound,
    TooLarge,
    Unavailable,
)
from adapters.store import MANIFEST_FILE, AdapterStore, Manifest
from adapters.validation import ADAPTER_FILES, CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
CHUNK = 1 << 20
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_DENIED = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ExpiredToken", "InvalidToken", "403"}
_BAD_BODY = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}
_TRANSIENT = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError,
              ConnectionClosedError, ResponseStreamingError, IncompleteReadError)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"); the prefix may be empty."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise InvalidInput(f"{uri!r} is not an s3:// URI", param="source")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.match(bucket):
        raise InvalidInput(f"{uri!r}: {bucket!r} is not a valid bucket name", param="source")
    # Empty, "." and ".." segments: some servers normalise them, so a prefix check on the
    # raw text would not be a check on what is read.
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise InvalidInput(f"{uri!r} has an empty, '.' or '..' path segment", param="source")
    return bucket, prefix


def uri_allowed(uri: str, allowlist: Iterable[str]) -> bool:
    """Whether `uri` lies under an allow-listed `s3://bucket/prefix`, by whole path segments
    (`s3://b/team` allows `s3://b/team/x`, not `s3://b/team-evil/x`)."""
    bucket, prefix = parse_s3_uri(uri)
    for allowed in allowlist:
        try:
            a_bucket, a_prefix = parse_s3_uri(allowed)
        except InvalidInput as exc:  # configuration, not the caller's fault
            raise ValueError(f"bad entry in the S3 source allow-list: {allowed!r}") from exc
        if a_bucket == bucket and (not a_prefix or prefix == a_prefix
                                   or prefix.startswith(a_prefix + "/")):
            return True
    return False


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
                raise _map_error(exc, what, key=key) from exc
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
                size, digest = _download(self.client, self.bucket, self.object_key(key, name),
                                         tmp / name, limit=int(want["size"]))
                if size != want["size"] or digest != want["sha256"]:
                    raise Corrupt(f"adapter version {key}: {name} does not match its manifest "
                                  f"({size} bytes, sha256 {digest[:12]}…; expected "
                                  f"{want['size']} bytes, sha256 {str(want['sha256'])[:12]}…); "
                                  "not loaded")
            (tmp / MANIFEST_FILE).write_bytes(raw)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                raise NotFound(f"adapter version {key} is not in {self.description}: "
                               f"{current} is missing (deleted, or never completed)",
                               code="adapter_files_missing") from exc
            raise _map_error(exc, what, key=key) from exc
        except (BotoCoreError, OSError) as exc:
            raise _map_error(exc, what, key=key) from exc

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
            if isinstance(exc, ClientError) and _error_code(exc) in _NOT_FOUND | {"NoSuchBucket"}:
                return
            raise _map_error(exc, f"deleting {key} from {self.description}", key=key) from exc

    # -- registration from S3 ----------------------------------------------------------------

    async def download_source(self, uri: str, dest: Path, allowlist: list[str], *,
                              max_bytes: int | None = None) -> None:
        """Copy the PEFT adapter at `uri` (an `s3://bucket/prefix/` folder under an entry of
        `allowlist`) into the folder `dest`: only adapter_config.json and
        adapter_model.safetensors are read. Pickle weights are refused, never downloaded;
        `max_bytes` bounds the two files together (TooLarge)."""
        if not uri_allowed(uri, allowlist):
            raise Forbidden(f"{uri!r} is not under an allowed S3 source prefix",
                            param="source", code="source_not_allowed")
        await asyncio.to_thread(self._download_source, uri, dest, max_bytes)

    def _download_source(self, uri: str, dest: Path, max_bytes: int | None) -> None:
        bucket, prefix = parse_s3_uri(uri)
        base = prefix + "/" if prefix else ""
        try:
            sizes: dict[str, int] = {}
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=base, Delimiter="/"):
                for obj in page.get("Contents", []):
                    sizes[obj["Key"][len(base):]] = obj["Size"]
            if not sizes:
                raise NotFound(f"no objects under {uri}", param="source",
                               code="source_not_found")
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
            if max_bytes is not None and total > max_bytes:
                raise TooLarge(f"{uri}: the adapter files are {total} bytes, over the limit of "
                               f"{max_bytes}", param="source")
            dest.mkdir(parents=True, exist_ok=True)
            left = max_bytes
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                # The object may have grown since it was listed: the limit holds while reading.
                got, _ = _download(self.client, bucket, base + name, dest / name, limit=left)
                if left is not None:
                    if got > left:
                        raise TooLarge(f"{uri}: the adapter files are over the limit of "
                                       f"{max_bytes} bytes", param="source")
                    left -= got
        except ClientError as exc:
            code = _error_code(exc)
            if code in _NOT_FOUND | {"NoSuchBucket"}:
                raise NotFound(f"{uri}: not found ({code})", param="source",
                               code="source_not_found") from exc
            if code in _DENIED:
                raise Forbidden(f"{uri}: the gateway's credentials cannot read it ({code})",
                                param="source", code="source_not_readable") from exc
            raise _map_error(exc, f"reading {uri}") from exc
        except (BotoCoreError, OSError) as exc:
            raise _map_error(exc, f"reading {uri}") from exc


# -- helpers -----------------------------------------------------------------------------------

def _download(client: Any, bucket: str, obj: str, target: Path,
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


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _map_error(exc: Exception, what: str, *, key: str | None = None) -> LoraplexError:
    """A botocore (or local I/O) failure as the domain error a caller sees."""
    def unavailable(reason: str) -> Unavailable:
        return Unavailable(f"adapter store unavailable while {what}: {reason}",
                           code="store_unavailable", retry_after_s=RETRY_AFTER_S)

    if isinstance(exc, LoraplexError):
        return exc
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "PreconditionFailed" or status == 412:
            return Conflict(f"{key or what} already exists in the store and is immutable",
                            code="version_exists")
        if code in _BAD_BODY:
            return InvalidInput(f"{what}: the files changed while they were being stored",
                                code="adapter_changed")
        if code == "NoSuchBucket":
            return unavailable("the bucket does not exist (check the store configuration)")
        if code in _DENIED or status == 403:
            return unavailable(f"access denied ({code}); check the gateway's AWS credentials")
        # Throttling, 5xx and anything else unexpected: botocore already retried.
        return unavailable(f"{code or status} {exc.response.get('Error', {}).get('Message', '')}"
                           .strip())
    if isinstance(exc, _TRANSIENT):
        return unavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, NoCredentialsError):
        return unavailable("no AWS credentials found")
    if isinstance(exc, BotoCoreError):
        return unavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return Unavailable(f"local disk error while {what}: {exc}", code="cache_unavailable",
                           retry_after_s=RETRY_AFTER_S)
    return unavailable(repr(exc))
