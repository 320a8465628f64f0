"""DiskCache: LRU by bytes, pins, single flight, failed fetches, restart, temp cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.disk_cache import COMPLETE_MARKER, TMP_DIR, DiskCache
from adapters.errors import InvalidInput


class Fetcher:
    """A fetch function that writes `size` bytes per key and counts its calls."""

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None  # set: fetches wait for it
        self.fail: Exception | None = None

    def for_key(self, key: str) -> Callable[[Path], object]:
        async def fetch(tmp: Path) -> None:
            self.calls.append(key)
            if self.gate is not None:
                await self.gate.wait()
            (tmp / "adapter_model.safetensors").write_bytes(b"x" * self.size)
            if self.fail is not None:
                raise self.fail
        return fetch


async def fill(cache: DiskCache, fetcher: Fetcher, *keys: str) -> None:
    for key in keys:
        await cache.get(key, fetcher.for_key(key))


async def test_miss_then_hit_returns_the_filled_folder(tmp_path: Path) -> None:
    cache, fetcher = DiskCache(tmp_path / "c", 10_000), Fetcher()
    path = await cache.get("acme/bot/v1-aa", fetcher.for_key("acme/bot/v1-aa"))
    again = await cache.get("acme/bot/v1-aa", fetcher.for_key("acme/bot/v1-aa"))
    assert path == again == tmp_path / "c" / "acme/bot/v1-aa"
    assert (path / "adapter_model.safetensors").read_bytes() == b"x" * 100
    assert fetcher.calls == ["acme/bot/v1-aa"]
    assert cache.contains("acme/bot/v1-aa")
    snap = cache.snapshot()
    assert (snap["hits"], snap["misses"], snap["fetches"]) == (1, 1, 1)
    assert snap["entries"] == 1 and snap["bytes"] >= 100


async def test_lru_eviction_by_bytes(tmp_path: Path) -> None:
    # Each entry is 100 bytes of data (+ an empty marker); room for three.
    cache, fetcher = DiskCache(tmp_path / "c", 350), Fetcher()
    await fill(cache, fetcher, "t/a/v1-1", "t/a/v2-2", "t/a/v3-3")
    await cache.get("t/a/v1-1", fetcher.for_key("t/a/v1-1"))  # v1 is now most recent
    await fill(cache, fetcher, "t/b/v1-4")
    assert not cache.contains("t/a/v2-2")  # least recently used
    assert not (tmp_path / "c" / "t/a/v2-2").exists()
    assert all(cache.contains(k) for k in ("t/a/v1-1", "t/a/v3-3", "t/b/v1-4"))
    assert cache.stats.evictions == 1 and cache.stats.bytes <= 350


async def test_pinned_entries_are_never_evicted(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    cache, fetcher = DiskCache(tmp_path / "c", 250), Fetcher()
    await cache.get("t/a/v1-1", fetcher.for_key("t/a/v1-1"), pin=True)
    await fill(cache, fetcher, "t/a/v2-2")
    cache.pin("t/a/v2-2")
    await fill(cache, fetcher, "t/a/v3-3")  # over the bound, everything else pinned
    assert all(cache.contains(k) for k in ("t/a/v1-1", "t/a/v2-2", "t/a/v3-3"))
    await fill(cache, fetcher, "t/a/v4-4")  # v3 is unpinned: it goes, the pinned stay
    assert not cache.contains("t/a/v3-3")
    assert cache.contains("t/a/v1-1") and cache.contains("t/a/v2-2")
    assert "over its bound" in caplog.text
    # Unpinning lets the cache shrink back under its bound.
    cache.unpin("t/a/v1-1")
    cache.unpin("t/a/v2-2")
    await cache.aclose()
    assert cache.stats.bytes <= 250
    assert cache.contains("t/a/v4-4")  # the most recently used stays


async def test_single_flight_under_concurrent_misses(tmp_path: Path) -> None:
    cache, fetcher = DiskCache(tmp_path / "c", 10_000), Fetcher()
    fetcher.gate = asyncio.Event()
    key = "t/a/v1-1"
    gets = [asyncio.create_task(cache.get(key, fetcher.for_key(key))) for _ in range(10)]
    await asyncio.sleep(0)
    fetcher.gate.set()
    paths = await asyncio.gather(*gets)
    assert fetcher.calls == [key]
    assert set(paths) == {tmp_path / "c" / key}
    assert cache.stats.fetches == 1


async def test_failed_fetch_reaches_every_waiter_and_leaves_nothing(tmp_path: Path) -> None:
    cache, fetcher = DiskCache(tmp_path / "c", 10_000), Fetcher()
    fetcher.gate, fetcher.fail = asyncio.Event(), RuntimeError("bad bytes")
    key = "t/a/v1-1"
    gets = [asyncio.create_task(cache.get(key, fetcher.for_key(key))) for _ in range(5)]
    await asyncio.sleep(0)
    fetcher.gate.set()
    results = await asyncio.gather(*gets, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "bad bytes" for r in results)
    assert fetcher.calls == [key]
    assert not cache.contains(key)
    assert not (tmp_path / "c" / key).exists()
    assert list((tmp_path / "c" / TMP_DIR).iterdir()) == []
    # A later get tries again.
    fetcher.fail = None
    path = await cache.get(key, fetcher.for_key(key))
    assert (path / "adapter_model.safetensors").is_file()
    assert fetcher.calls == [key, key]


async def test_restart_reuses_complete_entries_and_drops_temp(tmp_path: Path) -> None:
    root = tmp_path / "c"
    first, fetcher = DiskCache(root, 10_000), Fetcher()
    await fill(first, fetcher, "t/a/v1-1", "t/b/v2-2")
    # Left over by a crash: a half-filled temp folder, and an unmarked folder at a key.
    (root / TMP_DIR / "deadbeef").mkdir(parents=True)
    (root / TMP_DIR / "deadbeef" / "adapter_model.safetensors").write_bytes(b"partial")
    (root / "t/c/v1-3").mkdir(parents=True)

    again = DiskCache(root, 10_000)
    assert not (root / TMP_DIR).exists()
    assert again.contains("t/a/v1-1") and again.contains("t/b/v2-2")
    assert not again.contains("t/c/v1-3")
    assert again.stats.entries == 2 and again.stats.bytes == first.stats.bytes
    refetch = Fetcher()
    path = await again.get("t/a/v1-1", refetch.for_key("t/a/v1-1"))
    assert refetch.calls == [] and (path / "adapter_model.safetensors").is_file()
    # The unmarked folder is replaced by a real fetch.
    await again.get("t/c/v1-3", refetch.for_key("t/c/v1-3"))
    assert refetch.calls == ["t/c/v1-3"] and (root / "t/c/v1-3" / COMPLETE_MARKER).is_file()


async def test_remove_waits_for_the_last_pin(tmp_path: Path) -> None:
    cache, fetcher = DiskCache(tmp_path / "c", 10_000), Fetcher()
    key = "t/a/v1-1"
    async with cache.hold(key, fetcher.for_key(key)) as path:
        await cache.remove(key)
        assert (path / "adapter_model.safetensors").is_file()  # still being read
    await cache.aclose()
    assert not cache.contains(key) and not path.exists()
    assert not (tmp_path / "c" / "t").exists()  # empty parents pruned
    await cache.remove(key)  # removing a missing key is fine
    assert cache.stats.entries == 0


@pytest.mark.parametrize("key", ["", "../x", "a//b", ".tmp/x", "a/./b", "/abs"])
async def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    cache = DiskCache(tmp_path / "c", 10_000)
    with pytest.raises(InvalidInput):
        await cache.get(key, Fetcher().for_key(key))
    assert cache.stats.fetches == 0
