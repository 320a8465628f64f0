"""A bounded local folder of verified adapter versions, keyed by store key.

A remote store (S3) cannot be loaded from directly: the engine needs a local folder. This
cache keeps the folders the engine reads, bounded in bytes with least-recently-used eviction.

Entry life: `fetch(tmp)` fills a folder under `<root>/.tmp/` (the caller verifies the bytes
against the manifest inside `fetch`), a marker file is written, and the folder is renamed
to `<root>/<key>/` in one step. Only a renamed folder carries the marker, so at start every
marked folder is complete and trusted without hashing again, and `.tmp/` is thrown away.

Concurrency: one fetch per key at a time (single flight; the fetch runs as its own task so a
cancelled caller does not strand the others). Entries the engine reads are pinned and never
evicted. Every change to the final folders (rename into place, eviction, removal) runs under
one lock, so a re-fetch of a key never races the deletion of its previous folder. All file
work runs in threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters.errors import InvalidInput
from adapters.store import fsync_path

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
COMPLETE_MARKER = ".loraplex-complete"

Fetch = Callable[[Path], Awaitable[None]]


@dataclass
class CacheStats:
    hits: int = 0  # gets answered by a complete entry
    misses: int = 0  # gets that had to wait for a fetch (their own or a shared one)
    fetches: int = 0  # fetch calls started
    fetch_failures: int = 0
    evictions: int = 0
    bytes: int = 0  # total size of the complete entries
    entries: int = 0


@dataclass
class _Entry:
    size: int
    pins: int = 0
    doomed: bool = False  # removed while pinned: delete when the last pin goes


class DiskCache:
    """Verified adapter folders under `root`, at most `max_bytes` of them unless pinned."""

    def __init__(self, root: Path, max_bytes: int,
                 on_fetched: Callable[[float], None] = lambda _seconds: None) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.root = root
        self._on_fetched = on_fetched  # seconds of each completed fetch, for metrics
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self._fs_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        # Construction runs once at startup, before serving: doing this I/O inline is fine.
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / TMP_DIR, ignore_errors=True)
        for key, size, _stamp in sorted(_scan(root), key=lambda e: e[2]):
            self._entries[key] = _Entry(size)
        self._recount()

    # -- reading -----------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def contains(self, key: str) -> bool:
        return key in self._entries

    async def get(self, key: str, fetch: Fetch, *, pin: bool = False) -> Path:
        """The folder of `key`, fetched on a miss. With `pin=True` it is pinned before it is
        returned (call `unpin` later), so no eviction can slip in between."""
        path = self.path(key)
        entry = self._entries.get(key)
        if entry is not None:
            self.stats.hits += 1
        while entry is None:
            self.stats.misses += 1
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._fill(key, fetch))
                self._inflight[key] = task
                task.add_done_callback(self._fill_done(key))
            await asyncio.shield(task)
            # Gone only if other fills evicted it before this caller resumed: fetch again.
            entry = self._entries.get(key)
        self._entries.move_to_end(key)
        if pin:
            entry.pins += 1
        return path

    @asynccontextmanager
    async def hold(self, key: str, fetch: Fetch) -> AsyncIterator[Path]:
        """`get` with the entry pinned for the body (a reader that must not lose its files)."""
        path = await self.get(key, fetch, pin=True)
        try:
            yield path
        finally:
            self.unpin(key)

    # -- pins and removal --------------------------------------------------------------------

    def pin(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"{key} is not in the adapter cache")
        entry.pins += 1

    def unpin(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.pins == 0:
            log.warning("unpin of %s, which is not pinned", key)
            return
        entry.pins -= 1
        if entry.pins == 0 and (entry.doomed or self.stats.bytes > self.max_bytes):
            # Pins may have held the cache over its bound, or held a removed entry back.
            self._spawn(self._trim())

    async def remove(self, key: str) -> None:
        """Drop `key` (a deleted version): now if unpinned, else when its last pin goes."""
        task = self._inflight.get(_check_key(key))
        if task is not None:  # let a fetch in flight finish, then drop what it brought
            await asyncio.gather(asyncio.shield(task), return_exceptions=True)
        async with self._fs_lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            if entry.pins:
                entry.doomed = True
                return
            await self._delete_locked([key])

    async def aclose(self) -> None:
        """Wait for background trims (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        return {"root": str(self.root), "max_bytes": self.max_bytes, **asdict(self.stats),
                "pinned": sum(1 for e in self._entries.values() if e.pins),
                "fetching": len(self._inflight)}

    # -- internals ---------------------------------------------------------------------------

    async def _fill(self, key: str, fetch: Fetch) -> Path:
        self.stats.fetches += 1
        started = time.monotonic()
        tmp = self.root / TMP_DIR / secrets.token_hex(8)
        await asyncio.to_thread(tmp.mkdir, parents=True)
        try:
            await fetch(tmp)
            size = await asyncio.to_thread(_seal, tmp)
            async with self._fs_lock:
                await asyncio.to_thread(_move_into_place, tmp, self.root / key)
                self._entries[key] = _Entry(size)
                self._recount()
                # Same lock hold: no other fill evicts the new entry before its getters run.
                await self._evict_locked(protect=key)
        except BaseException:
            if key not in self._entries:  # failed before it was placed: nothing stays
                self.stats.fetch_failures += 1
                await asyncio.to_thread(shutil.rmtree, tmp, True)
            raise
        self._on_fetched(time.monotonic() - started)
        return self.root / key

    def _fill_done(self, key: str) -> Callable[[asyncio.Task[Path]], None]:
        def done(task: asyncio.Task[Path]) -> None:
            self._inflight.pop(key, None)
            if not task.cancelled():
                task.exception()  # retrieved: every caller may have gone away
        return done

    async def _trim(self) -> None:
        async with self._fs_lock:
            doomed = [k for k, e in self._entries.items() if e.doomed and e.pins == 0]
            await self._delete_locked(doomed)
            await self._evict_locked(protect=None)

    async def _evict_locked(self, protect: str | None) -> None:
        # The entry just added is protected: its getters have not had it yet.
        victims, over = [], self.stats.bytes - self.max_bytes
        for key, entry in self._entries.items():
            if over <= 0:
                break
            if entry.pins == 0 and key != protect and key not in self._inflight:
                victims.append(key)
                over -= entry.size
        if over > 0:
            log.warning("adapter cache at %s holds %d bytes, over its bound of %d: the rest "
                        "is pinned or in use", self.root, self.stats.bytes, self.max_bytes)
        self.stats.evictions += len(victims)
        await self._delete_locked(victims)

    async def _delete_locked(self, keys: list[str]) -> None:
        if not keys:
            return
        # Out of the index first: from here a get is a miss, whose rename waits for the lock.
        for key in keys:
            self._entries.pop(key, None)
        self._recount()
        await asyncio.to_thread(_delete_folders, self.root, keys)

    def _recount(self) -> None:
        self.stats.entries = len(self._entries)
        self.stats.bytes = sum(e.size for e in self._entries.values())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _check_key(key: str) -> str:
    # Keys become paths: refuse anything that could leave the root or hit our own names.
    parts = key.split("/")
    if not key or any(not p or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        raise InvalidInput(f"{key!r} is not a valid adapter store key")
    return key


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _seal(tmp: Path) -> int:
    """Mark a filled folder complete (durably) and return its size."""
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    (tmp / COMPLETE_MARKER).write_bytes(b"")
    fsync_path(tmp / COMPLETE_MARKER)
    return _folder_size(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():  # an unmarked leftover (a marked one would be in the index)
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, final)


def _delete_folders(root: Path, keys: list[str]) -> None:
    for key in keys:
        folder = root / key
        # Rename away first, so a crash mid-delete leaves no marked, half-deleted entry.
        trash = root / TMP_DIR / f"trash-{secrets.token_hex(8)}"
        try:
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(folder, trash)
        except FileNotFoundError:
            continue
        except OSError as exc:  # the index has dropped it; a leftover costs only disk
            log.warning("could not remove cached adapter %s: %s", folder, exc)
            continue
        shutil.rmtree(trash, ignore_errors=True)
        _prune_empty_parents(root, folder.parent)


def _prune_empty_parents(root: Path, folder: Path) -> None:
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:  # not empty (another entry of the same adapter), or gone
            return
        folder = folder.parent


def _scan(root: Path) -> list[tuple[str, int, float]]:
    """(key, size, marker mtime) of every complete entry under root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d != TMP_DIR]
        if COMPLETE_MARKER in filenames:
            dirnames[:] = []  # an entry; its contents are not entries
            key = here.relative_to(root).as_posix()
            found.append((key, _folder_size(here), (here / COMPLETE_MARKER).stat().st_mtime))
    return found
