"""S3Store against a real S3 endpoint (moto's server on loopback), through the disk cache."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.disk_cache import DiskCache
from adapters.errors import (
    Conflict,
    Corrupt,
    Forbidden,
    InvalidInput,
    NotFound,
    TooLarge,
    Unavailable,
)
from adapters.s3.store import S3Store, make_client
from adapters.s3.uris import parse_s3_uri, uri_allowed
from adapters.sources import AdapterSources
from adapters.store import MANIFEST_FILE, Manifest
from tests.s3_server import MotoS3Server, s3_env

CONFIG = b'{"peft_type": "LORA", "r": 8}'
WEIGHTS = bytes(range(256)) * 64  # 16 KiB; any bytes do for the store


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3Server]:
    """One moto server for this module; each test works in its own bucket."""
    with MotoS3Server() as server:
        yield server


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    s3_env(monkeypatch)


# Few attempts and short timeouts: a stopped server fails fast.
CLIENT_OPTIONS: dict[str, Any] = {"region": "us-east-1", "connect_timeout_s": 1,
                                  "read_timeout_s": 5, "max_attempts": 2}
_clients: dict[str, Any] = {}  # endpoint -> client made by make_client (they cost CPU)


def make_store(server: MotoS3Server, tmp_path: Path, *, bucket: str | None = None,
               create: bool = True, shared_client: bool = True) -> S3Store:
    bucket = bucket or f"b-{secrets.token_hex(6)}"
    if create:
        server.client().create_bucket(Bucket=bucket)
    client = None
    if shared_client:
        client = _clients.get(server.endpoint_url) or _clients.setdefault(
            server.endpoint_url, make_client(endpoint_url=server.endpoint_url, **CLIENT_OPTIONS))
    return S3Store(bucket, "adapters/", DiskCache(tmp_path / "cache", 10 << 20),
                   endpoint_url=server.endpoint_url, client=client, **CLIENT_OPTIONS)


@pytest.fixture
def store(s3: MotoS3Server, tmp_path: Path) -> S3Store:
    return make_store(s3, tmp_path)


def adapter_folder(root: Path, weights: bytes = WEIGHTS) -> tuple[Path, Callable[[str], Manifest]]:
    """A fake adapter folder and a function building its manifest for a key."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": weights}
    for name, data in files.items():
        (root / name).write_bytes(data)

    def manifest(key: str) -> Manifest:
        tenant, adapter, version = key.split("/")
        return Manifest(
            tenant=tenant, adapter=adapter, version=int(version[1:].split("-")[0]),
            files={n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                   for n, d in files.items()},
            base_model="base", rank=8, alpha=16.0, target_modules=["q_proj"],
            created_at="2025-01-01T00:00:00+00:00", source="upload")
    return root, manifest


async def put_adapter(store: S3Store, tmp_path: Path, key: str) -> Path:
    folder, manifest = adapter_folder(tmp_path / "src" / key)
    await store.put(key, folder, manifest(key))
    return folder


def objects(store: S3Store) -> dict[str, bytes]:
    client = store.client
    listed = client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=store.bucket, Key=o["Key"])["Body"].read()
            for o in listed}


def overwrite(store: S3Store, key: str, name: str, data: bytes) -> None:
    store.client.put_object(Bucket=store.bucket, Key=store.object_key(key, name), Body=data)


# -- put and read ------------------------------------------------------------------------------

async def test_put_then_local_path_round_trip(store: S3Store, tmp_path: Path) -> None:
    key = "acme/bot/v1-1a2b3c4d"
    folder = await put_adapter(store, tmp_path, key)
    stored = objects(store)
    assert set(stored) == {f"adapters/{key}/adapter_config.json",
                           f"adapters/{key}/adapter_model.safetensors",
                           f"adapters/{key}/{MANIFEST_FILE}"}
    assert store.description == f"s3://{store.bucket}/adapters"

    path = await store.local_path(key)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (path / name).read_bytes() == (folder / name).read_bytes()
    assert (path / MANIFEST_FILE).read_bytes() == stored[f"adapters/{key}/{MANIFEST_FILE}"]
    assert store.cache.contains(key)
    # A second read is served by the cache, without S3.
    assert await store.local_path(key) == path
    assert (store.cache.stats.fetches, store.cache.stats.hits) == (1, 1)


async def test_a_version_is_immutable(store: S3Store, tmp_path: Path) -> None:
    key = "acme/bot/v1-1a2b3c4d"
    await put_adapter(store, tmp_path, key)
    before = objects(store)
    other, manifest = adapter_folder(tmp_path / "other", weights=b"different weights")
    with pytest.raises(Conflict):
        await store.put(key, other, manifest(key))
    assert objects(store) == before  # nothing overwritten, nothing of the original removed


async def test_failed_put_removes_what_it_uploaded(store: S3Store, tmp_path: Path) -> None:
    # A manifest already there (as if from an earlier writer): the files go up, then the
    # manifest write is refused; the files this put wrote must not stay behind.
    key = "acme/bot/v2-00000000"
    manifest_key = store.object_key(key, MANIFEST_FILE)
    store.client.put_object(Bucket=store.bucket, Key=manifest_key, Body=b"{}")
    folder, manifest = adapter_folder(tmp_path / "src")
    with pytest.raises(Conflict):
        await store.put(key, folder, manifest(key))
    assert set(objects(store)) == {manifest_key}


async def test_corrupted_object_is_refused_and_not_cached(store: S3Store, tmp_path: Path) -> None:
    key = "acme/bot/v1-1a2b3c4d"
    await put_adapter(store, tmp_path, key)
    flipped = bytearray(WEIGHTS)
    flipped[100] ^= 0xFF  # same size, different bytes
    overwrite(store, key, "adapter_model.safetensors", bytes(flipped))
    with pytest.raises(Corrupt) as err:
        await store.local_path(key)
    assert key in err.value.message and "adapter_model.safetensors" in err.value.message
    assert not store.cache.contains(key)
    assert not store.cache.path(key).exists()


async def test_truncated_object_is_refused(store: S3Store, tmp_path: Path) -> None:
    key = "acme/bot/v1-1a2b3c4d"
    await put_adapter(store, tmp_path, key)
    overwrite(store, key, "adapter_model.safetensors", WEIGHTS[:-1000])
    with pytest.raises(Corrupt, match="adapter_model.safetensors"):
        await store.local_path(key)
    assert not store.cache.contains(key)


async def test_oversized_object_is_refused(store: S3Store, tmp_path: Path) -> None:
    key = "acme/bot/v1-1a2b3c4d"
    await put_adapter(store, tmp_path, key)
    overwrite(store, key, "adapter_config.json", CONFIG + b" " * 10)
    with pytest.raises(Corrupt, match="adapter_config.json"):
        await store.local_path(key)
    assert not store.cache.contains(key)


async def test_unreadable_manifest_is_corrupt(store: S3Store, tmp_path: Path) -> None:
    key = "acme/bot/v1-1a2b3c4d"
    await put_adapter(store, tmp_path, key)
    overwrite(store, key, MANIFEST_FILE, b"not json")
    with pytest.raises(Corrupt, match="manifest"):
        await store.local_path(key)


async def test_missing_objects_are_not_found(store: S3Store, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="manifest.json is missing"):
        await store.local_path("acme/bot/v9-ffffffff")
    key = "acme/bot/v1-1a2b3c4d"
    await put_adapter(store, tmp_path, key)
    store.client.delete_object(Bucket=store.bucket,
                               Key=store.object_key(key, "adapter_model.safetensors"))
    with pytest.raises(NotFound, match="adapter_model.safetensors is missing"):
        await store.local_path(key)
    assert store.cache.snapshot()["entries"] == 0


async def test_delete_removes_objects_and_cache(store: S3Store, tmp_path: Path) -> None:
    keep, gone = "acme/bot/v1-11111111", "acme/bot/v2-22222222"
    await put_adapter(store, tmp_path, keep)
    await put_adapter(store, tmp_path, gone)
    await store.local_path(gone)
    await store.delete(gone)
    assert all(k.startswith(f"adapters/{keep}/") for k in objects(store))
    assert len(objects(store)) == 3
    assert not store.cache.contains(gone)
    with pytest.raises(NotFound):
        await store.local_path(gone)
    await store.delete(gone)  # deleting a missing key is fine
    assert (await store.local_path(keep)).is_dir()


async def test_missing_bucket_is_unavailable(s3: MotoS3Server, tmp_path: Path) -> None:
    store = make_store(s3, tmp_path, bucket="no-such-bucket-here", create=False)
    with pytest.raises(Unavailable, match="bucket does not exist") as err:
        await store.local_path("acme/bot/v1-1a2b3c4d")
    assert err.value.code == "store_unavailable"


# -- S3 down, then back ------------------------------------------------------------------------

async def test_s3_down_is_unavailable_but_cached_versions_still_serve(tmp_path: Path) -> None:
    with MotoS3Server() as own:  # its own server: this test stops it
        store = make_store(own, tmp_path, shared_client=False)  # the constructor's own client
        cached, uncached = "acme/bot/v1-11111111", "acme/bot/v2-22222222"
        await put_adapter(store, tmp_path, cached)
        await put_adapter(store, tmp_path, uncached)
        path = await store.local_path(cached)

        own.stop()
        with pytest.raises(Unavailable) as err:
            await store.local_path(uncached)
        assert err.value.code == "store_unavailable" and err.value.retry_after_s == 5
        assert isinstance(err.value.__cause__, Exception)  # the botocore error, kept
        assert not store.cache.contains(uncached)
        assert await store.local_path(cached) == path  # served from the cache
        with pytest.raises(Unavailable):
            await put_adapter(store, tmp_path, "acme/bot/v3-33333333")

        own.start()  # moto starts empty: the bucket and version are written again
        own.client().create_bucket(Bucket=store.bucket)
        await put_adapter(store, tmp_path, uncached)
        fetched = await store.local_path(uncached)
        assert (fetched / "adapter_model.safetensors").read_bytes() == WEIGHTS


# -- registration from an S3 source ------------------------------------------------------------

@pytest.fixture
def source(store: S3Store) -> Callable[[str, dict[str, bytes]], str]:
    """Write objects under s3://<bucket>/<prefix>/ and return that URI."""
    def write(prefix: str, files: dict[str, bytes]) -> str:
        for name, data in files.items():
            store.client.put_object(Bucket=store.bucket, Key=f"{prefix}/{name}", Body=data)
        return f"s3://{store.bucket}/{prefix}/"
    return write


def _sources(store: S3Store, allowlist: list[str], max_bytes: int = 1 << 30) -> AdapterSources:
    """Registration's sources, reading S3 with the store's client (as the gateway wires them)."""
    return AdapterSources(local_allowlist=[], s3_allowlist=allowlist, max_bytes=max_bytes,
                          s3_client=store.client)


ADAPTER = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS,
           "README.md": b"# readme"}


async def test_source_under_the_allowlist_is_downloaded(
        store: S3Store, source: Callable[..., str], tmp_path: Path) -> None:
    uri = source("team/ad1", ADAPTER)
    dest = tmp_path / "dest"
    await _sources(store, [f"s3://{store.bucket}/team"]).copy_s3(uri, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]
    assert (dest / "adapter_model.safetensors").read_bytes() == WEIGHTS


@pytest.mark.parametrize("prefix", ["other/ad1", "team-evil/ad1", "teamx"])
async def test_source_outside_the_allowlist_is_forbidden(
        store: S3Store, source: Callable[..., str], tmp_path: Path, prefix: str) -> None:
    uri = source(prefix, ADAPTER)
    dest = tmp_path / "dest"
    with pytest.raises(Forbidden) as err:
        await _sources(store, [f"s3://{store.bucket}/team",
                               "s3://another-bucket"]).copy_s3(uri, dest)
    assert err.value.code == "source_not_allowed"
    assert not dest.exists()


async def test_pickle_only_source_is_refused(
        store: S3Store, source: Callable[..., str], tmp_path: Path) -> None:
    uri = source("team/pickled", {"adapter_config.json": CONFIG, "adapter_model.bin": WEIGHTS})
    with pytest.raises(InvalidInput, match="pickle") as err:
        await _sources(store, [f"s3://{store.bucket}/team"]).copy_s3(uri, tmp_path / "dest")
    assert "adapter_model.bin" in err.value.message
    assert not (tmp_path / "dest").exists()


async def test_incomplete_empty_and_oversized_sources(
        store: S3Store, source: Callable[..., str], tmp_path: Path) -> None:
    allow = [f"s3://{store.bucket}/team"]
    uri = source("team/half", {"adapter_model.safetensors": WEIGHTS})
    with pytest.raises(InvalidInput, match="adapter_config.json"):
        await _sources(store, allow).copy_s3(uri, tmp_path / "a")
    with pytest.raises(NotFound):
        await _sources(store, allow).copy_s3(f"s3://{store.bucket}/team/nothing/", tmp_path / "b")
    uri = source("team/big", ADAPTER)
    with pytest.raises(TooLarge):
        await _sources(store, allow, len(WEIGHTS)).copy_s3(uri, tmp_path / "c")


# -- URIs --------------------------------------------------------------------------------------

def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("http://bucket/x", "s3://", "s3://B/x", "s3://bucket/a//b", "s3://bucket/a/../b",
                "bucket/x"):
        with pytest.raises(InvalidInput):
            parse_s3_uri(bad)


@pytest.mark.parametrize(("uri", "allowed"), [
    ("s3://b-1/team/x", True), ("s3://b-1/team", True), ("s3://b-1/team-evil/x", False),
    ("s3://b-1/tea", False), ("s3://b-2/team/x", False), ("s3://open/anything/at/all", True),
])
def test_allowlist_matches_whole_segments(uri: str, allowed: bool) -> None:
    allowlist: list[Any] = ["s3://b-1/team/", "s3://open"]
    assert uri_allowed(uri, allowlist) is allowed
