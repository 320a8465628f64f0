"""Blobs and folders (training files, checkpoints) in both stores: the local folder and S3
(moto's server on loopback). Every test runs against each store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.disk_cache import DiskCache
from adapters.errors import Corrupt, NotFound, Unavailable
from adapters.s3.store import S3Store, make_client
from adapters.store import BLOB_ROOT, FOLDER_MARKER, AdapterStore, LocalStore
from adapters.validation import sha256_file
from tests.s3_server import MotoS3Server, s3_env


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> AdapterStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    s3_env(monkeypatch)
    server: MotoS3Server = request.getfixturevalue("s3")
    bucket = server.new_bucket()
    client = server.store_client()
    return S3Store(bucket, "adapters/", DiskCache(tmp_path / "cache", 10 << 20), client=client)


def raw_objects(store: AdapterStore) -> dict[str, bytes]:
    """Everything the store holds, by key relative to its root (S3: to its prefix)."""
    if isinstance(store, LocalStore):
        return {p.relative_to(store.root).as_posix(): p.read_bytes()
                for p in store.root.rglob("*") if p.is_file()}
    assert isinstance(store, S3Store)
    listed = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return {o["Key"].removeprefix(store.prefix + "/"):
            store.client.get_object(Bucket=store.bucket, Key=o["Key"])["Body"].read()
            for o in listed}


def checkpoint_folder(root: Path, weights: bytes = b"w" * 5000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_model.safetensors").write_bytes(weights)
    (root / "trainer_state.pt").write_bytes(b"state")
    (root / "sub").mkdir()
    (root / "sub" / "extra.json").write_text("{}")
    return root


# -- blobs ------------------------------------------------------------------------------------

async def test_blob_round_trip_replace_and_delete(store: AdapterStore) -> None:
    key = "files/acme/file-1.jsonl"
    await store.put_blob(key, b'{"a": 1}\n')
    assert await store.get_blob(key, limit=100) == b'{"a": 1}\n'
    assert raw_objects(store) == {f"{BLOB_ROOT}/{key}": b'{"a": 1}\n'}  # nothing else left
    await store.put_blob(key, b"second")
    assert await store.get_blob(key, limit=6) == b"second"
    with pytest.raises(Corrupt):
        await store.get_blob(key, limit=5)
    await store.delete_blob(key)
    await store.delete_blob(key)  # a missing blob: not an error
    with pytest.raises(NotFound) as missing:
        await store.get_blob(key, limit=100)
    assert missing.value.code == "blob_not_found"
    assert raw_objects(store) == {}


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/", "a\\b"])
async def test_blob_keys_are_checked(store: AdapterStore, key: str) -> None:
    with pytest.raises(ValueError, match="not a blob key"):
        await store.put_blob(key, b"x")


async def test_blobs_never_meet_adapter_keys(store: AdapterStore) -> None:
    """A tenant named like a blob folder still has its own keys: blobs live under _data/."""
    await store.put_blob("checkpoints/ftjob-1/x", b"blob")
    await store.delete_prefix("checkpoints")
    assert raw_objects(store) == {}
    assert not BLOB_ROOT[0].isalnum()  # tenant names start with a letter or digit


# -- folders ----------------------------------------------------------------------------------

async def test_folder_round_trip(store: AdapterStore, tmp_path: Path) -> None:
    src = checkpoint_folder(tmp_path / "src")
    await store.put_folder("checkpoints/job-1/step-5", src)
    assert await store.list_folders("checkpoints/job-1") == ["step-5"]
    dest = tmp_path / "work" / "checkpoints" / "step-5"
    dest.mkdir(parents=True)
    (dest / "stale").write_text("replaced")
    await store.get_folder("checkpoints/job-1/step-5", dest)
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    want = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    assert got == want
    assert sorted(p.name for p in dest.parent.iterdir()) == ["step-5"]  # no staging left


async def test_a_folder_without_its_marker_does_not_exist(store: AdapterStore,
                                                          tmp_path: Path) -> None:
    await store.put_folder("checkpoints/job-1/step-5", checkpoint_folder(tmp_path / "a"))
    await store.put_folder("checkpoints/job-1/step-10", checkpoint_folder(tmp_path / "b"))
    marker = next(k for k in raw_objects(store) if k.endswith(f"step-10/{FOLDER_MARKER}"))
    delete_raw(store, marker)  # as if the writer died before its last write
    assert await store.list_folders("checkpoints/job-1") == ["step-5"]
    with pytest.raises(NotFound):
        await store.get_folder("checkpoints/job-1/step-10", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert await store.list_folders("checkpoints/nothing-here") == []


async def test_a_complete_folder_is_never_overwritten(store: AdapterStore,
                                                      tmp_path: Path) -> None:
    await store.put_folder("checkpoints/j/step-5", checkpoint_folder(tmp_path / "a", b"first"))
    before = raw_objects(store)
    await store.put_folder("checkpoints/j/step-5", checkpoint_folder(tmp_path / "b", b"second"))
    assert raw_objects(store) == before  # the first complete writer wins, nothing left over
    if isinstance(store, S3Store):  # two writers at once: the second's marker is refused
        store._exists = lambda _obj: False  # type: ignore[method-assign]
        await store.put_folder("checkpoints/j/step-5", checkpoint_folder(tmp_path / "c", b"3"))
        assert raw_objects(store) == before
    await store.get_folder("checkpoints/j/step-5", tmp_path / "dest")
    assert (tmp_path / "dest" / "adapter_model.safetensors").read_bytes() == b"first"


async def test_a_folder_that_does_not_match_its_marker_is_corrupt(store: AdapterStore,
                                                                  tmp_path: Path) -> None:
    await store.put_folder("checkpoints/j/step-5", checkpoint_folder(tmp_path / "a"))
    weights = next(k for k in raw_objects(store) if k.endswith("adapter_model.safetensors"))
    write_raw(store, weights, b"w" * 4999 + b"X")  # same size, other bytes
    with pytest.raises(Corrupt, match="does not match"):
        await store.get_folder("checkpoints/j/step-5", tmp_path / "dest")
    write_raw(store, weights, b"w" * 6000)  # longer
    with pytest.raises(Corrupt):
        await store.get_folder("checkpoints/j/step-5", tmp_path / "dest")
    marker = next(k for k in raw_objects(store) if k.endswith(FOLDER_MARKER))
    write_raw(store, marker, b"not json")
    with pytest.raises(Corrupt, match="unreadable"):
        await store.get_folder("checkpoints/j/step-5", tmp_path / "dest")
    write_raw(store, marker, json.dumps({"uid": "u", "files": {"../escape": {
        "size": 1, "sha256": "0"}}}).encode())
    with pytest.raises(Corrupt):
        await store.get_folder("checkpoints/j/step-5", tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".dest*"))


async def read_all(chunks) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join([c async for c in chunks])


async def test_a_folder_file_streams_checked_against_its_marker(store: AdapterStore,
                                                                tmp_path: Path) -> None:
    weights = bytes(range(256)) * 9000  # over two read chunks
    src = checkpoint_folder(tmp_path / "a", weights)
    await store.put_folder("exports/t/a/1/job", src)
    file = await store.open_folder_file("exports/t/a/1/job", "adapter_model.safetensors")
    assert file.size == len(weights) and file.sha256 == sha256_file(
        src / "adapter_model.safetensors")
    assert await read_all(file.chunks) == weights
    nested = await store.open_folder_file("exports/t/a/1/job", "sub/extra.json")
    assert await read_all(nested.chunks) == b"{}"
    for missing in ("nope.bin", FOLDER_MARKER, "../a/1/job/trainer_state.pt", "sub"):
        with pytest.raises(NotFound):
            await store.open_folder_file("exports/t/a/1/job", missing)
    with pytest.raises(NotFound):
        await store.open_folder_file("exports/t/a/1/other-job", "trainer_state.pt")

    # Changed under the store: the stream never completes (the last chunk is held back).
    stored = next(k for k in raw_objects(store) if k.endswith("adapter_model.safetensors"))
    write_raw(store, stored, weights[:-1] + b"X")
    file = await store.open_folder_file("exports/t/a/1/job", "adapter_model.safetensors")
    got = b""
    with pytest.raises(Corrupt, match="does not match"):
        async for chunk in file.chunks:
            got += chunk
    assert len(got) < len(weights)
    write_raw(store, stored, weights + b"more")
    file = await store.open_folder_file("exports/t/a/1/job", "adapter_model.safetensors")
    with pytest.raises(Corrupt):
        await read_all(file.chunks)


async def test_delete_prefix_removes_every_folder_and_blob_under_it(store: AdapterStore,
                                                                    tmp_path: Path) -> None:
    for step in (5, 10):
        await store.put_folder(f"checkpoints/job-1/step-{step}", checkpoint_folder(
            tmp_path / f"s{step}"))
    await store.put_folder("checkpoints/job-10/step-5", checkpoint_folder(tmp_path / "other"))
    await store.delete_prefix("checkpoints/job-1")
    assert await store.list_folders("checkpoints/job-1") == []
    assert await store.list_folders("checkpoints/job-10") == ["step-5"]  # a prefix is a folder
    assert all("/job-10/" in k for k in raw_objects(store)), raw_objects(store)
    await store.delete_prefix("checkpoints/job-1")  # nothing there: not an error


async def test_s3_down_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3_env(monkeypatch)
    with MotoS3Server() as server:
        server.client().create_bucket(Bucket="bkt")
        client = make_client(endpoint_url=server.endpoint_url, region="us-east-1",
                             connect_timeout_s=1, read_timeout_s=2, max_attempts=1)
        store = S3Store("bkt", "", DiskCache(tmp_path / "cache", 1 << 20), client=client)
        await store.put_blob("files/t/f.jsonl", b"x")
    for call in (store.get_blob("files/t/f.jsonl", limit=10), store.put_blob("files/t/g", b"y"),
                 store.list_folders("checkpoints/j"), store.delete_prefix("checkpoints/j"),
                 store.put_folder("checkpoints/j/step-1", checkpoint_folder(tmp_path / "c"))):
        with pytest.raises(Unavailable) as down:
            await call
        assert down.value.code == "store_unavailable"


def delete_raw(store: AdapterStore, key: str) -> None:
    if isinstance(store, LocalStore):
        (store.root / key).unlink()
    else:
        assert isinstance(store, S3Store)
        store.client.delete_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}")


def write_raw(store: AdapterStore, key: str, data: bytes) -> None:
    if isinstance(store, LocalStore):
        (store.root / key).write_bytes(data)
    else:
        assert isinstance(store, S3Store)
        store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data)
