"""A running loraplex for tests of its HTTP clients (the `loraplex` admin commands): the real
gateway (`Services.build` + `create_app`, the app's own lifespan) under a real uvicorn on a
free loopback port, in a thread, wired in-process to the stand-in engine of
tests/unit/conftest.py.

- `serve(app)`: any ASGI app under uvicorn on a free loopback port (also used for stand-ins
  that answer 5xx or are not loraplex at all). It records the path of every HTTP request, and
  while `down` is set answers each with a 503 (a server restarting behind a proxy).
- `live_gateway(settings, base_model_dir, engine)`: the gateway so served; `call(coro)` runs a
  coroutine on the server's own event loop (the registry's connections belong to it), which
  is how a test plays a training worker.
- `make_peft_adapter(folder)`: a real PEFT LoRA adapter (peft's `save_pretrained`) for the
  tiny Llama-shaped base model of tests/unit/conftest.py, made in a child process so that
  torch is not loaded into the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
from starlette.responses import PlainTextResponse

from server.app import create_app
from server.services import Services
from server.settings import Settings
from tests.unit.conftest import BASE_MODEL, HIDDEN, KV_DIM, LAYERS, VOCAB, FakeEngine, SwitchableTransport

T = TypeVar("T")


def wait_for(predicate: Callable[[], bool], what: str, limit_s: float = 30.0) -> None:
    """Poll until `predicate()` holds; the limit only guards against a hung test."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    loop: asyncio.AbstractEventLoop
    paths: list[tuple[str, str]] = field(default_factory=list)  # (method, path) received
    down: bool = False  # answer every request with a 503, not passed to the app

    def count(self, method: str, path: str, prefix: bool = False) -> int:
        """Requests received for `path` (prefix=True: for it or anything under it)."""
        return sum(1 for m, p in list(self.paths)
                   if m == method and (p.startswith(path) if prefix else p == path))

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run `coro` on the server's event loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


@contextlib.contextmanager
def serve(app: Any, lifespan: str = "off") -> Iterator[Served]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.new_event_loop()
    served = Served(f"http://127.0.0.1:{sock.getsockname()[1]}", loop)

    async def recorded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            served.paths.append((scope["method"], scope["path"]))
            if served.down:
                await PlainTextResponse("restarting", status_code=503)(scope, receive, send)
                return
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(recorded, log_level="warning", access_log=False,
                                           lifespan=lifespan, timeout_graceful_shutdown=5))
    failed: list[BaseException] = []

    def run() -> None:
        try:
            loop.run_until_complete(server.serve(sockets=[sock]))
        except BaseException as exc:  # noqa: BLE001 (reported to the test below)
            failed.append(exc)

    thread = threading.Thread(target=run, name="live-gateway", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or bool(failed) or not thread.is_alive(), "uvicorn")
        if not server.started:
            raise RuntimeError(f"uvicorn did not start: {failed}")
        yield served
    finally:
        server.should_exit = True
        thread.join(30)
        loop.close()
        sock.close()


@dataclass
class LiveGateway:
    served: Served
    services: Services
    engine: FakeEngine
    settings: Settings

    @property
    def url(self) -> str:
        return self.served.url

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.served.call(coro)


@contextlib.contextmanager
def live_gateway(settings: Settings, base_model_dir: Path,
                 engine: FakeEngine) -> Iterator[LiveGateway]:
    """The real gateway on `settings` (give it an admin token), served and ready."""
    services = Services.build(settings, model_path=base_model_dir,
                              engine_transport=SwitchableTransport(engine.app))
    with serve(create_app(services), lifespan="on") as served:
        def healthy() -> bool:
            try:
                return httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "the gateway to be ready")
        yield LiveGateway(served, services, engine, settings)


_PEFT_SCRIPT = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
folder, rank, hidden, kv, layers, vocab, base = sys.argv[1:]
hidden, kv = int(hidden), int(kv)
heads = hidden // kv
config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=int(layers), num_attention_heads=heads,
                     num_key_value_heads=1, head_dim=kv, vocab_size=int(vocab))
torch.manual_seed(0)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
    r=int(rank), lora_alpha=2 * int(rank), target_modules=["q_proj", "v_proj"],
    init_lora_weights=False))
model.peft_config["default"].base_model_name_or_path = base
model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
"""


def make_peft_adapter(folder: Path, rank: int = 8) -> Path:
    """A PEFT LoRA adapter (q_proj, v_proj) saved by peft for tests/unit/conftest.py's base
    model (its README.md included, as peft writes one)."""
    subprocess.run([sys.executable, "-c", _PEFT_SCRIPT, str(folder), str(rank), str(HIDDEN),
                    str(KV_DIM), str(LAYERS), str(VOCAB), BASE_MODEL], check=True,
                   capture_output=True, timeout=300)
    return folder
