"""Training files live in the shared store: a file uploaded through one unit (its own home
folder) is read and deleted through another (same registry, same store), for the local-folder
store and for S3 (moto's server on loopback). Rows written before keep working."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.disk_cache import DiskCache
from adapters.errors import NotFound, Unavailable
from adapters.registry import Registry
from adapters.registry.models import TrainingFile
from adapters.s3.store import S3Store
from adapters.store import BLOB_ROOT, AdapterStore, LocalStore
from adapters.training.jobs import JobStore, checkpoints_prefix, file_key
from adapters.training.recipe import TrainingRecipe
from tests.s3_server import MotoS3Server, s3_env

DATA = b'{"messages": [{"role": "user", "content": "hi"}, ' \
       b'{"role": "assistant", "content": "arr"}]}\n'

Unit = Callable[[Path], JobStore]  # a unit's JobStore, given its home folder


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
async def unit(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Unit]:
    """Builds units sharing one registry database and one store; each unit has its own
    Registry object, store object and home folder (S3: its own disk cache there)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared-registry.db'}"
    first = Registry(url)
    await first.create_schema()
    await first.create_tenant("acme")
    registries = [first]
    if request.param == "s3":
        s3_env(monkeypatch)
        server: MotoS3Server = request.getfixturevalue("s3")
        bucket = server.new_bucket()
        client = server.store_client()

    def build(home: Path) -> JobStore:
        store: AdapterStore
        if request.param == "local":
            store = LocalStore(tmp_path / "shared-store")
        else:
            store = S3Store(bucket, "lpx", DiskCache(home / "cache", 1 << 20), client=client)
        registry = Registry(url)
        registries.append(registry)
        return JobStore(registry, store)

    yield build
    for registry in registries:
        await registry.close()


async def test_a_file_uploaded_through_one_unit_is_read_through_another(
        unit: Unit, tmp_path: Path) -> None:
    a, b = unit(tmp_path / "unit-a"), unit(tmp_path / "unit-b")
    row = await a.create_file("acme", "t.jsonl", "fine-tune", DATA)
    assert row.path == file_key("acme", row.id) == f"files/acme/{row.id}.jsonl"
    assert await b.read_file("acme", row.id) == DATA
    assert not (tmp_path / "unit-a" / "files").exists()  # nothing in a unit's own folder
    # Another tenant's file does not exist, even through the store.
    await a.registry.create_tenant("other")
    with pytest.raises(NotFound):
        await b.read_file("other", row.id)

    await b.delete_file("acme", row.id)
    with pytest.raises(NotFound):
        await a.read_file("acme", row.id)
    with pytest.raises(NotFound):  # the blob went with the row
        await a.store.get_blob(row.path, limit=len(DATA))


async def test_a_row_never_names_a_missing_blob(unit: Unit, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = unit(tmp_path / "unit-a")
    # The blob is written first: if the store fails, no row is made.
    async def store_down(_key: str, _data: bytes) -> None:
        raise Unavailable("store down", code="store_unavailable")

    with monkeypatch.context() as m:
        m.setattr(jobs.store, "put_blob", store_down)
        with pytest.raises(Unavailable):
            await jobs.create_file("acme", "t.jsonl", "fine-tune", DATA)
    assert await jobs.list_files("acme") == []
    # If the row cannot be written, the blob is removed again.
    real_transaction = jobs.registry.transaction

    @contextlib.asynccontextmanager
    async def failing_commit() -> AsyncIterator[Any]:
        async with real_transaction() as s:
            yield s
            raise RuntimeError("database went away at commit")

    with monkeypatch.context() as m:
        m.setattr(jobs.registry, "transaction", failing_commit)
        with pytest.raises(RuntimeError, match="went away"):
            await jobs.create_file("acme", "t.jsonl", "fine-tune", DATA)
    assert await jobs.list_files("acme") == []
    assert blobs(jobs.store) == []
    row = await jobs.create_file("acme", "t.jsonl", "fine-tune", DATA)
    assert blobs(jobs.store) == [f"{BLOB_ROOT}/{row.path}"]
    # The row goes first: a store that fails to delete leaves garbage, never a dangling row.
    async def delete_fails(_key: str) -> None:
        raise Unavailable("store down", code="store_unavailable")

    with monkeypatch.context() as m:
        m.setattr(jobs.store, "delete_blob", delete_fails)
        await jobs.delete_file("acme", row.id)
    assert await jobs.list_files("acme") == []
    assert await jobs.store.get_blob(row.path, limit=len(DATA)) == DATA  # harmless garbage


async def test_rows_from_before_keep_their_local_files(unit: Unit, tmp_path: Path) -> None:
    jobs = unit(tmp_path / "unit-a")
    old = tmp_path / "unit-a" / "files" / "acme" / "file-old.jsonl"
    old.parent.mkdir(parents=True)
    old.write_bytes(DATA)
    async with jobs.registry.transaction() as s:
        s.add(TrainingFile(id="file-old", tenant_id="acme", filename="old.jsonl",
                           purpose="fine-tune", bytes=len(DATA), path=str(old)))
        s.add(TrainingFile(id="file-gone", tenant_id="acme", filename="gone.jsonl",
                           purpose="fine-tune", bytes=len(DATA),
                           path=str(old.with_name("file-gone.jsonl"))))
    assert await jobs.read_file("acme", "file-old") == DATA
    with pytest.raises(NotFound):
        await jobs.read_file("acme", "file-gone")
    await jobs.delete_file("acme", "file-old")
    assert not old.exists()


async def test_cancelling_a_job_deletes_its_checkpoints(unit: Unit, tmp_path: Path) -> None:
    a, b = unit(tmp_path / "unit-a"), unit(tmp_path / "unit-b")
    f = await a.create_file("acme", "t.jsonl", "fine-tune", DATA)
    job = await a.create_job("acme", model="m", training_file=f.id, recipe=TrainingRecipe())
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "trainer_state.pt").write_bytes(b"state")
    await a.store.put_folder(f"{checkpoints_prefix(job.id)}/step-5", folder)
    await b.cancel_job("acme", job.id)  # a worker that died left them; the cancel removes them
    assert await a.store.list_folders(checkpoints_prefix(job.id)) == []
    if isinstance(a.store, LocalStore):
        assert not (a.store.root / BLOB_ROOT / "checkpoints" / job.id).exists()


def blobs(store: AdapterStore) -> list[str]:
    """Every object in the store, by key relative to its root."""
    if isinstance(store, LocalStore):
        return sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*")
                      if p.is_file())
    assert isinstance(store, S3Store)
    listed = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return sorted(o["Key"].removeprefix(store.prefix + "/") for o in listed)
