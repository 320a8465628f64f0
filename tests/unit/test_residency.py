"""`adapters.residency.Residency` with a fake loader: single flight, LRU, pins, waiting,
failures and retirement."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.errors import Overloaded
from adapters.residency import Residency


class FakeLoader:
    """Records load/unload calls. Like vLLM, loading a name that is loaded fails.

    `load_gates` / `unload_gates`: a call for that name waits for the event (slow engine).
    `fail_loads[name] = n`: the next n loads of that name fail.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.loaded: set[str] = set()
        self.load_gates: dict[str, asyncio.Event] = {}
        self.unload_gates: dict[str, asyncio.Event] = {}
        self.fail_loads: dict[str, int] = {}
        self.fail_unloads = False

    async def load_adapter(self, engine_name: str, path: Path) -> None:
        self.calls.append(("load", engine_name))
        assert path == Path("/store") / engine_name
        gate = self.load_gates.get(engine_name)
        if gate is not None:
            await gate.wait()
        if self.fail_loads.get(engine_name, 0) > 0:
            self.fail_loads[engine_name] -= 1
            raise RuntimeError(f"engine refused {engine_name}")
        if engine_name in self.loaded:
            raise RuntimeError(f"The lora adapter '{engine_name}' has already been loaded.")
        self.loaded.add(engine_name)

    async def unload_adapter(self, engine_name: str) -> None:
        self.calls.append(("unload", engine_name))
        gate = self.unload_gates.get(engine_name)
        if gate is not None:
            await gate.wait()
        if self.fail_unloads:
            raise RuntimeError("engine restarted; it does not know that adapter")
        self.loaded.discard(engine_name)


def fetcher(name: str, counts: dict[str, int] | None = None):
    async def fetch() -> Path:
        if counts is not None:
            counts[name] = counts.get(name, 0) + 1
        return Path("/store") / name
    return fetch


async def use_once(r: Residency, name: str) -> None:
    async with r.use(name, fetcher(name)):
        pass


async def spin(times: int = 50) -> None:
    """Let every ready task run a step, several times over."""
    for _ in range(times):
        await asyncio.sleep(0)


async def until(predicate, what: str) -> None:
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


class Holder:
    """Holds an adapter in a background task until released."""

    def __init__(self, r: Residency, name: str) -> None:
        self.entered = asyncio.Event()
        self._release = asyncio.Event()
        self.task = asyncio.create_task(self._run(r, name))

    async def _run(self, r: Residency, name: str) -> None:
        async with r.use(name, fetcher(name)):
            self.entered.set()
            await self._release.wait()

    async def __aenter__(self) -> Holder:
        await self.entered.wait()
        return self

    async def release(self) -> None:
        self._release.set()
        await self.task

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


def resident(r: Residency) -> list[str]:
    return [s["engine_name"] for s in r.snapshot()["resident"]]


def ready(r: Residency) -> set[str]:
    return {s["engine_name"] for s in r.snapshot()["resident"] if s["state"] == "ready"}


# -- single flight ------------------------------------------------------------------------------

async def test_concurrent_first_uses_load_once():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    gate = loader.load_gates["a"] = asyncio.Event()
    counts: dict[str, int] = {}
    inside = 0

    async def request() -> None:
        nonlocal inside
        async with r.use("a", fetcher("a", counts)):
            assert "a" in loader.loaded  # never entered before the load finished
            inside += 1

    tasks = [asyncio.create_task(request()) for _ in range(8)]
    await until(lambda: loader.calls == [("load", "a")], "the load to start")
    await spin()
    assert inside == 0
    gate.set()
    await asyncio.gather(*tasks)
    assert inside == 8
    assert loader.calls == [("load", "a")]
    assert counts == {"a": 1}
    assert r.stats.loads == 1
    assert r.snapshot()["resident"][0]["in_flight"] == 0


async def test_resident_adapter_is_a_hit_not_a_reload():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    for _ in range(3):
        await use_once(r, "a")
    assert loader.calls == [("load", "a")]
    assert r.stats.hits == 2 and r.stats.loads == 1


async def test_cancelled_first_request_does_not_strand_the_others():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    gate = loader.load_gates["a"] = asyncio.Event()
    first = asyncio.create_task(use_once(r, "a"))
    await until(lambda: loader.calls == [("load", "a")], "the load to start")
    second = asyncio.create_task(use_once(r, "a"))
    await spin()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    await second
    assert loader.calls == [("load", "a")]
    assert [(s["engine_name"], s["state"], s["in_flight"]) for s in r.snapshot()["resident"]
            ] == [("a", "ready", 0)]


# -- LRU -----------------------------------------------------------------------------------------

async def test_lru_eviction_order():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    await use_once(r, "a")
    await use_once(r, "b")
    await use_once(r, "a")  # a is now the most recently used
    await use_once(r, "c")  # evicts b
    assert loader.calls == [("load", "a"), ("load", "b"), ("unload", "b"), ("load", "c")]
    assert resident(r) == ["a", "c"]
    await use_once(r, "d")  # evicts a
    assert loader.calls[-2:] == [("unload", "a"), ("load", "d")]
    assert resident(r) == ["c", "d"]
    assert loader.loaded == {"c", "d"}
    assert r.stats.evictions == 2 and r.stats.unloads == 2


async def test_held_adapter_is_never_evicted():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    async with Holder(r, "a"):
        await use_once(r, "b")
        await use_once(r, "c")  # a is the least recently used, but held: b goes
        await use_once(r, "d")  # and again
        assert ("unload", "a") not in loader.calls
        assert "a" in loader.loaded
        assert loader.calls == [("load", "a"), ("load", "b"), ("unload", "b"), ("load", "c"),
                                ("unload", "c"), ("load", "d")]
    await use_once(r, "e")  # released: now a can go
    assert ("unload", "a") in loader.calls


async def test_loading_adapter_is_not_evicted():
    loader = FakeLoader()
    r = Residency(loader, capacity=1, slot_wait_s=0.05)
    gate = loader.load_gates["a"] = asyncio.Event()
    first = asyncio.create_task(use_once(r, "a"))
    await until(lambda: loader.calls == [("load", "a")], "the load to start")
    with pytest.raises(Overloaded):
        await use_once(r, "b")
    gate.set()
    await first
    assert loader.calls == [("load", "a")]


async def test_failed_unload_of_victim_does_not_block_the_load():
    loader = FakeLoader()
    r = Residency(loader, capacity=1, slot_wait_s=5)
    await use_once(r, "a")
    loader.fail_unloads = True
    await use_once(r, "b")
    assert loader.calls == [("load", "a"), ("unload", "a"), ("load", "b")]
    assert resident(r) == ["b"]


# -- waiting for a slot --------------------------------------------------------------------------

async def test_all_slots_held_gives_overloaded_after_waiting():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=0.05)
    async with Holder(r, "a"), Holder(r, "b"):
        with pytest.raises(Overloaded) as info:
            await use_once(r, "c")
        assert info.value.code == "adapter_slots_busy"
        assert info.value.retry_after_s and info.value.retry_after_s > 0
        assert loader.calls == [("load", "a"), ("load", "b")]
        # Adapters already resident are still served while the slots are full.
        await use_once(r, "a")
    assert resident(r) == ["b", "a"]
    assert loader.loaded == {"a", "b"}


async def test_waiting_request_gets_the_slot_when_one_is_released():
    loader = FakeLoader()
    r = Residency(loader, capacity=1, slot_wait_s=30)
    holder = Holder(r, "a")
    await holder.entered.wait()
    waiting = asyncio.create_task(use_once(r, "b"))
    await spin()
    assert not waiting.done()
    assert loader.calls == [("load", "a")]
    await holder.release()
    await waiting
    assert loader.calls == [("load", "a"), ("unload", "a"), ("load", "b")]
    assert resident(r) == ["b"]


async def test_zero_wait_fails_at_once_when_full():
    loader = FakeLoader()
    r = Residency(loader, capacity=1, slot_wait_s=0)
    async with Holder(r, "a"):
        with pytest.raises(Overloaded):
            await use_once(r, "b")


# -- failed loads --------------------------------------------------------------------------------

async def test_failed_load_lets_later_requests_retry():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    loader.fail_loads["a"] = 1
    with pytest.raises(RuntimeError, match="engine refused"):
        await use_once(r, "a")
    assert resident(r) == []
    assert r.stats.load_failures == 1
    await use_once(r, "a")
    assert loader.calls == [("load", "a"), ("load", "a")]
    assert ready(r) == {"a"}


async def test_failed_load_fails_every_waiter_and_frees_the_slot():
    loader = FakeLoader()
    r = Residency(loader, capacity=1, slot_wait_s=5)
    gate = loader.load_gates["a"] = asyncio.Event()
    loader.fail_loads["a"] = 1
    tasks = [asyncio.create_task(use_once(r, "a")) for _ in range(4)]
    await until(lambda: loader.calls == [("load", "a")], "the load to start")
    await spin()
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(x, RuntimeError) for x in results), results
    assert resident(r) == []
    await use_once(r, "b")  # the only slot is free again
    assert ready(r) == {"b"}


async def test_failed_fetch_is_a_failed_load():
    loader = FakeLoader()
    r = Residency(loader, capacity=1, slot_wait_s=5)

    async def broken() -> Path:
        raise OSError("store unreachable")

    with pytest.raises(OSError):
        async with r.use("a", broken):
            pass
    assert resident(r) == [] and loader.calls == []
    await use_once(r, "a")
    assert ready(r) == {"a"}


# -- retirement ----------------------------------------------------------------------------------

async def test_retire_waits_for_in_flight_users():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    holder = Holder(r, "a")
    await holder.entered.wait()
    retiring = asyncio.create_task(r.retire("a"))
    await spin()
    assert not retiring.done()
    assert ("unload", "a") not in loader.calls
    assert "a" in loader.loaded
    await holder.release()
    await retiring
    assert loader.calls == [("load", "a"), ("unload", "a")]
    assert loader.loaded == set()
    assert resident(r) == []


async def test_retire_of_a_loading_adapter_waits_for_the_load():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    gate = loader.load_gates["a"] = asyncio.Event()
    first = asyncio.create_task(use_once(r, "a"))
    await until(lambda: loader.calls == [("load", "a")], "the load to start")
    retiring = asyncio.create_task(r.retire("a"))
    await spin()
    assert not retiring.done()
    gate.set()
    await first
    await retiring
    assert loader.calls == [("load", "a"), ("unload", "a")]
    assert loader.loaded == set() and resident(r) == []


async def test_retire_of_unknown_adapter_does_nothing():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    await r.retire("never-loaded")
    assert loader.calls == []


async def test_forget_all_makes_the_next_use_load_again():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    await use_once(r, "a")
    r.forget_all()
    loader.loaded.clear()  # the engine restarted
    await use_once(r, "a")
    assert loader.calls == [("load", "a"), ("load", "a")]


async def test_reusing_an_adapter_while_its_eviction_is_in_flight():
    loader = FakeLoader()
    r = Residency(loader, capacity=2, slot_wait_s=5)
    await use_once(r, "a")
    await use_once(r, "b")
    gate = loader.unload_gates["a"] = asyncio.Event()  # the engine is slow to unload a
    c_request = asyncio.create_task(use_once(r, "c"))  # evicts a
    await until(lambda: ("unload", "a") in loader.calls, "a's eviction to start")
    a_request = asyncio.create_task(use_once(r, "a"))  # a again, while it is unloading
    await spin()
    gate.set()
    results = await asyncio.gather(c_request, a_request, return_exceptions=True)
    assert results == [None, None]
    assert ready(r) == loader.loaded
