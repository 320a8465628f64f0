"""The residency owner's slots, used by the unit's other gateway processes over a local socket.

One JSON line per message on a Unix socket in the unit's folder. A process holds an adapter
with `hold` (answered once it is loaded) and lets go with `done`; the owner keeps each hold
open in a task of its own, so when a process goes away (a crash, a kill) its connection ends
and every hold it had is released: no slot stays booked by a dead process. `pin`, `unpin`,
`retire` and `snapshot` are plain calls, and `metrics` returns the owner's live metrics
(residency, disk cache) as Prometheus text, so any process can answer a scrape in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from adapters import errors
from adapters.errors import LoraplexError, Unavailable
from server.engine.client import EngineError
from server.slots import LocalSlots

log = logging.getLogger(__name__)
_LIMIT = 1 << 20  # longest message line: a snapshot of hundreds of adapters fits


def _encode_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, EngineError):
        body = json.dumps({"error": {"message": exc.message, "param": exc.param}})
        return {"type": "EngineError", "status": exc.status, "body": body}
    if isinstance(exc, LoraplexError):
        return {"type": type(exc).__name__, "message": exc.message, "param": exc.param,
                "code": exc.code, "retry_after_s": exc.retry_after_s,
                "retryable": getattr(exc, "retryable", False)}
    log.error("residency call failed", exc_info=exc)
    return {"type": "Unavailable", "message": f"adapter residency failed ({type(exc).__name__})",
            "code": "residency_failed", "retry_after_s": 1}


def _decode_error(data: dict[str, Any]) -> LoraplexError:
    if data["type"] == "EngineError":
        return EngineError(int(data["status"]), data["body"].encode())
    cls = getattr(errors, data["type"], None)
    if cls is errors.AdapterInvalid:  # its constructor takes the list of problems
        cls = errors.InvalidInput
    if not (isinstance(cls, type) and issubclass(cls, LoraplexError)):
        cls = Unavailable
    kwargs: dict[str, Any] = {"param": data.get("param"), "code": data.get("code"),
                              "retry_after_s": data.get("retry_after_s")}
    if cls is Unavailable:
        kwargs["retryable"] = bool(data.get("retryable"))
    return cls(data["message"], **kwargs)


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class SlotsServer:
    """Serves `slots` (this process's residency) to the unit's other gateway processes."""

    def __init__(self, slots: LocalSlots, path: Path, metrics_text: Callable[[], bytes]) -> None:
        self.slots = slots
        self.path = path
        self._metrics_text = metrics_text
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # left by a previous run of this unit
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                       limit=_LIMIT)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):  # the processes see the owner go
                writer.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holds: dict[int, asyncio.Task[None]] = {}
        calls: set[asyncio.Task[None]] = set()
        self._connections.add(writer)

        def reply(message: dict[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(_line(message))

        try:
            while line := await reader.readline():
                message = json.loads(line)
                op, ident = message["op"], message["id"]
                if op == "done":  # let go (or stop waiting for) the adapter
                    task = holds.pop(ident, None)
                    if task is not None:
                        task.cancel()
                elif op == "hold":
                    holds[ident] = asyncio.create_task(self._hold(ident, message, reply))
                else:
                    call = asyncio.create_task(self._call(ident, op, message, reply))
                    calls.add(call)
                    call.add_done_callback(calls.discard)
        except (ConnectionError, ValueError, KeyError):
            log.warning("a gateway process sent a bad residency message; dropping it")
        finally:
            # The process is gone (or misbehaved): nothing it held stays booked.
            for task in [*holds.values(), *calls]:
                task.cancel()
            self._connections.discard(writer)
            writer.close()

    async def _hold(self, ident: int, message: dict[str, Any],
                    reply: Callable[[dict[str, Any]], None]) -> None:
        try:
            async with self.slots.hold(message["engine_name"], message["store_key"]):
                reply({"id": ident})
                await asyncio.Event().wait()  # held until `done` (or the process leaves)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            reply({"id": ident, "error": _encode_error(exc)})

    async def _call(self, ident: int, op: str, message: dict[str, Any],
                    reply: Callable[[dict[str, Any]], None]) -> None:
        try:
            result: Any = None
            if op == "pin":
                await self.slots.pin(message["engine_name"], message["store_key"])
            elif op == "unpin":
                await self.slots.unpin(message["engine_name"])
            elif op == "retire":
                await self.slots.retire(message["engine_name"])
            elif op == "snapshot":
                result = await self.slots.snapshot()
            elif op == "metrics":
                result = self._metrics_text().decode()
            else:
                raise errors.InvalidInput(f"unknown residency call {op!r}")
        except Exception as exc:  # noqa: BLE001
            reply({"id": ident, "error": _encode_error(exc)})
        else:
            reply({"id": ident, "result": result})


class RemoteSlots:
    """`AdapterSlots` of another process of this unit (the residency owner), over its socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._connecting = asyncio.Lock()

    async def _send(self, message: dict[str, Any]) -> asyncio.Future[Any]:
        writer = await self._connection()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        writer.write(_line(message))
        return future

    async def _connection(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, self._writer = await asyncio.open_unix_connection(
                        str(self.path), limit=_LIMIT)
                except OSError as exc:
                    raise Unavailable("the unit's adapter residency is not running yet",
                                      code="engine_unavailable", retry_after_s=2,
                                      retryable=True) from exc
                asyncio.create_task(self._read(reader, self._writer))
            return self._writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                future = self._pending.pop(message["id"], None)
                if future is None or future.done():
                    continue
                if "error" in message:
                    future.set_exception(_decode_error(message["error"]))
                else:
                    future.set_result(message.get("result"))
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()  # the next call connects again (the owner may have restarted)
            if self._writer is writer:
                self._writer = None
            gone = Unavailable("the unit's adapter residency went away; retry shortly",
                               code="engine_unavailable", retry_after_s=2)
            pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(gone)

    async def _call(self, op: str, **fields: Any) -> Any:
        return await (await self._send({"op": op, "id": next(self._ids), **fields}))

    def _done(self, ident: int) -> None:
        self._pending.pop(ident, None)
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(_line({"op": "done", "id": ident}))

    @contextlib.asynccontextmanager
    async def hold(self, engine_name: str, store_key: str) -> AsyncIterator[None]:
        ident = next(self._ids)
        future = await self._send({"op": "hold", "id": ident, "engine_name": engine_name,
                                   "store_key": store_key})
        try:
            await future
            yield
        finally:
            self._done(ident)

    async def pin(self, engine_name: str, store_key: str) -> None:
        await self._call("pin", engine_name=engine_name, store_key=store_key)

    async def unpin(self, engine_name: str) -> None:
        await self._call("unpin", engine_name=engine_name)

    async def retire(self, engine_name: str) -> None:
        await self._call("retire", engine_name=engine_name)

    async def snapshot(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("snapshot")
        return result

    async def metrics_text(self) -> bytes:
        text: str = await self._call("metrics")
        return text.encode()

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()
