"""Fixtures of the fast unit tests: no vLLM, no torch, no real model.

- `base_model_dir`: a tiny Llama-shaped base model (one `model.safetensors` of 2D float32
  `.weight` tensors), enough for `BaseModelInfo` to know the module names and shapes.
- `make_adapter`: writes a PEFT LoRA adapter folder for that model with numpy, with knobs to
  produce every bad variant the admin API must refuse.
- `fake_engine`: a small Starlette app that behaves like vLLM's OpenAI server (health, models,
  runtime LoRA load/unload, chat/completions with SSE streaming) and records what it receives.
- `gw`: the real gateway (`Services.build` + `create_app`) wired to the fake engine in-process,
  started and ready, with an `httpx.AsyncClient` to call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from server.app import create_app
from server.services import Services
from server.settings import Settings

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADMIN_TOKEN = "admin-test"
HIDDEN, KV_DIM, FFN, VOCAB, LAYERS = 64, 16, 128, 100, 2

# module suffix -> (block, (out_features, in_features))
MODULES: dict[str, tuple[str, tuple[int, int]]] = {
    "q_proj": ("self_attn", (HIDDEN, HIDDEN)),
    "k_proj": ("self_attn", (KV_DIM, HIDDEN)),
    "v_proj": ("self_attn", (KV_DIM, HIDDEN)),
    "o_proj": ("self_attn", (HIDDEN, HIDDEN)),
    "gate_proj": ("mlp", (FFN, HIDDEN)),
    "up_proj": ("mlp", (FFN, HIDDEN)),
    "down_proj": ("mlp", (HIDDEN, FFN)),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "health_poll(seconds): poll the fake engine's health this often (gw fixture)")
    config.addinivalue_line(
        "markers", "registry_poll(seconds): read the registry generation this often (gw fixture)")


@pytest.fixture(autouse=True)
def _no_loraplex_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read LORAPLEX_* variables; a developer's environment must not leak in."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("LORAPLEX_"):
            monkeypatch.delenv(name)


# -- base model and adapters -----------------------------------------------------------------

def module_path(layer: int, suffix: str) -> str:
    block = MODULES[suffix][0]
    return f"model.layers.{layer}.{block}.{suffix}"


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base-model")
    tensors = {"model.embed_tokens.weight": np.zeros((VOCAB, HIDDEN), np.float32),
               "model.norm.weight": np.ones((HIDDEN,), np.float32)}  # 1D: not a linear layer
    for i in range(LAYERS):
        for suffix, (_block, shape) in MODULES.items():
            tensors[f"{module_path(i, suffix)}.weight"] = np.zeros(shape, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def write_adapter(folder: Path, *, r: int = 8, alpha: float = 16,
                  targets: Iterable[str] | str = ("q_proj", "v_proj"),
                  layers: Iterable[int] = range(LAYERS), seed: int = 0,
                  config_overrides: dict[str, Any] | None = None,
                  config_text: str | None = None,
                  tensors_hook: Callable[[dict[str, np.ndarray]], None] | None = None,
                  truncate_bytes: int = 0, weights: bool = True) -> Path:
    """Write a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).

    Knobs for bad variants: `config_overrides` (e.g. {"use_dora": True}), `config_text` (raw
    config file content), `tensors_hook` (mutate the tensors dict before saving),
    `truncate_bytes` (cut the end off the weights file), `weights=False` (no weights file).
    """
    folder.mkdir(parents=True, exist_ok=True)
    target_list = [targets] if isinstance(targets, str) else list(targets)
    config: dict[str, Any] = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha,
        "target_modules": targets if isinstance(targets, str) else target_list,
        "base_model_name_or_path": BASE_MODEL, "bias": "none", "use_dora": False,
        "modules_to_save": None, "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
    }
    config.update(config_overrides or {})
    (folder / "adapter_config.json").write_text(
        config_text if config_text is not None else json.dumps(config))
    if not weights:
        return folder
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for i in layers:
        for suffix in target_list:
            if suffix not in MODULES:
                continue
            out_f, in_f = MODULES[suffix][1]
            prefix = f"base_model.model.{module_path(i, suffix)}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((r, in_f)) * 0.01
                                                  ).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out_f, r)) * 0.01
                                                  ).astype(np.float32)
    if tensors_hook is not None:
        tensors_hook(tensors)
    path = folder / "adapter_model.safetensors"
    save_file(tensors, str(path))
    if truncate_bytes:
        data = path.read_bytes()
        path.write_bytes(data[:-truncate_bytes])
    return folder


@pytest.fixture
def make_adapter(tmp_path: Path) -> Callable[..., Path]:
    """`make_adapter(at=None, **knobs)` -> a new adapter folder (see `write_adapter`), written
    at `at` or in a fresh folder under tmp_path/adapters."""
    counter = itertools.count()

    def make(at: Path | None = None, **knobs: Any) -> Path:
        folder = at or tmp_path / "adapters" / f"adapter-{next(counter)}"
        return write_adapter(folder, **knobs)

    return make


# -- fake vLLM engine ------------------------------------------------------------------------

def _compact(obj: Any) -> str:
    # vLLM serializes with pydantic: compact JSON, which the gateway's byte replace relies on.
    return json.dumps(obj, separators=(",", ":"))


class FakeEngine:
    """Enough of vLLM's OpenAI server for the gateway, recording every call it gets."""

    def __init__(self, base_model: str = BASE_MODEL) -> None:
        self.base_model = base_model
        self.healthy = True
        self.fail_status: int | None = None  # answer inference with this error status
        self.loaded: dict[str, str] = {}  # lora_name -> lora_path
        self.requests: list[dict[str, Any]] = []  # {"path", "body"} of inference calls
        self.load_calls: list[dict[str, Any]] = []
        self.unload_calls: list[str] = []
        self.app = Starlette(routes=[
            Route("/health", self._health, methods=["GET"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/load_lora_adapter", self._load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self._unload, methods=["POST"]),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
        ])

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests]

    @staticmethod
    def _error(status: int, message: str, type_: str = "BadRequestError",
               param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                       "code": status}}, status_code=status)

    async def _health(self, _request: Request) -> Response:
        return Response(status_code=200 if self.healthy else 503)

    async def _models(self, _request: Request) -> Response:
        data = [{"id": self.base_model, "object": "model", "owned_by": "vllm",
                 "root": self.base_model, "parent": None}]
        data += [{"id": name, "object": "model", "owned_by": "vllm", "root": path,
                  "parent": self.base_model} for name, path in self.loaded.items()]
        return JSONResponse({"object": "list", "data": data})

    async def _load(self, request: Request) -> Response:
        body = await request.json()
        self.load_calls.append(body)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return self._error(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.loaded:
            return self._error(400, f"The lora adapter '{name}' has already been loaded.")
        if not (Path(path) / "adapter_config.json").is_file():
            return self._error(404, f"No adapter found for {path}", "NotFoundError")
        self.loaded[name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: Request) -> Response:
        body = await request.json()
        name = body.get("lora_name")
        self.unload_calls.append(name)
        if name not in self.loaded:
            return self._error(404, f"The lora adapter '{name}' cannot be found.",
                               "NotFoundError")
        del self.loaded[name]
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        body = await request.json()
        self.requests.append({"path": request.url.path, "body": body})
        if self.fail_status is not None:
            return self._error(self.fail_status, "injected engine failure",
                               "InternalServerError")
        model = body.get("model")
        if model != self.base_model and model not in self.loaded:
            return self._error(404, f"The model `{model}` does not exist.", "NotFoundError",
                               "model")
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._events(model, chat, include_usage),
                                     media_type="text/event-stream")
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        if chat:
            return JSONResponse({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                             "finish_reason": "stop"}], "usage": usage})
        return JSONResponse({
            "id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model,
            "choices": [{"index": 0, "text": " Paris.", "finish_reason": "stop"}],
            "usage": usage})

    async def _events(self, model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        for piece in ("Par", "is", "."):
            choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                      else {"index": 0, "text": piece, "finish_reason": None})
            yield "data: " + _compact({"id": "fake", "object": obj, "created": 0,
                                       "model": model, "choices": [choice]}) + "\n\n"
        if include_usage:
            yield "data: " + _compact({
                "id": "fake", "object": obj, "created": 0, "model": model, "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                          "total_tokens": 8}}) + "\n\n"
        yield "data: [DONE]\n\n"


class SwitchableTransport(httpx.AsyncBaseTransport):
    """The fake engine's transport; `down = True` makes every call fail to connect.

    `break_streams` = (n, error) cuts every event stream after its first n events: the
    connection then fails with `error` (what the aiohttp transport raises when the engine is
    killed, resets the connection or stops answering), or just ends if `error` is None.
    `fail_inference` makes every inference call fail with that error once sent (a read
    timeout, a connection lost mid-answer), while health and adapter calls still work.
    """

    def __init__(self, app: Starlette) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.down = False
        self.break_streams: tuple[int, httpx.TransportError | None] | None = None
        self.fail_inference: httpx.TransportError | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused (fake engine is down)",
                                     request=request)
        if self.fail_inference is not None and request.url.path.endswith("completions"):
            raise self.fail_inference
        resp = await self.inner.handle_async_request(request)
        if self.break_streams is not None and \
                resp.headers.get("content-type", "").startswith("text/event-stream"):
            resp.stream = _BrokenStream(resp.stream, *self.break_streams)
        return resp


class _BrokenStream(httpx.AsyncByteStream):
    """The first `events` events of `inner`, then half of the next one and `error`; or, if
    `error` is None, a plain end (a clean close between two events, without vLLM's [DONE])."""

    def __init__(self, inner: httpx.AsyncByteStream | httpx.SyncByteStream, events: int,
                 error: httpx.TransportError | None) -> None:
        assert isinstance(inner, httpx.AsyncByteStream)
        self.inner, self.events, self.error = inner, events, error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        body = b"".join([chunk async for chunk in self.inner])
        events = body.split(b"\n\n")
        assert len(events) > self.events + 1, "the stream has too few events to cut"
        yield b"".join(event + b"\n\n" for event in events[:self.events])
        if self.error is not None:
            cut = events[self.events]
            yield cut[:len(cut) // 2]
            raise self.error


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


# -- the gateway -----------------------------------------------------------------------------

async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], what: str,
                     limit_s: float = 10.0) -> None:
    """Poll until `predicate()` holds; it may be a coroutine function (a check that makes a
    request). The limit only guards against a hung test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s

    async def holds() -> bool:
        result = predicate()
        return await result if inspect.isawaitable(result) else result

    while not await holds():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def assert_openai_error(resp: httpx.Response, status: int, *, contains: str | None = None,
                        code: str | None = None) -> dict[str, Any]:
    """`resp` has `status` and OpenAI's error body; returns the inner error object."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], (str, int)), err
    if contains is not None:
        assert contains.lower() in err["message"].lower(), err
    if code is not None:
        assert err["code"] == code, err
    return err


@dataclass
class Gw:
    client: httpx.AsyncClient
    services: Services
    engine: FakeEngine
    transport: SwitchableTransport
    settings: Settings
    admin_headers: dict[str, str] = field(
        default_factory=lambda: {"Authorization": f"Bearer {ADMIN_TOKEN}"})

    expect_error = staticmethod(assert_openai_error)

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.admin_headers, **kwargs.pop("headers", {})}
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def new_tenant(self, tenant: str) -> str:
        """Create a tenant and one key for it; returns the key."""
        resp = await self.admin("POST", "/admin/tenants", json={"id": tenant})
        assert resp.status_code == 201, resp.text
        resp = await self.admin("POST", f"/admin/tenants/{tenant}/keys")
        assert resp.status_code == 201, resp.text
        return resp.json()["key"]

    async def upload(self, tenant: str, name: str, folder: Path | None = None,
                     files: list[tuple[str, tuple[str, bytes, str]]] | None = None
                     ) -> httpx.Response:
        """POST the files of `folder` (or explicit multipart `files`) as a new version."""
        if files is None:
            assert folder is not None
            files = [(p.name, (p.name, p.read_bytes(), "application/octet-stream"))
                     for p in sorted(folder.iterdir())]
        return await self.admin("POST", f"/admin/tenants/{tenant}/adapters/{name}/versions",
                                files=files)

    async def register(self, tenant: str, name: str, folder: Path) -> dict[str, Any]:
        resp = await self.upload(tenant, name, folder)
        assert resp.status_code == 201, resp.text
        return resp.json()

    @staticmethod
    def headers(tenant: str, key: str) -> dict[str, str]:
        return {"X-Tenant-ID": tenant, "Authorization": f"Bearer {key}"}

    async def chat(self, tenant: str, key: str, model: str, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "Capital of France?"}],
                **extra}
        return await self.client.post("/v1/chat/completions", json=body,
                                      headers=self.headers(tenant, key))

    async def settle(self) -> None:
        """Wait for background work the admin API spawned (retiring deleted versions)."""
        while tasks := self.services.background.pending():
            await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def gw(request: pytest.FixtureRequest, tmp_path: Path, base_model_dir: Path,
             fake_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gw]:
    # The health watcher checks once at start; later polls only where a test asks for them,
    # so that a test switching the engine off and on again cannot race a poll.
    health = request.node.get_closest_marker("health_poll")
    registry = request.node.get_closest_marker("registry_poll")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    settings = Settings(home=tmp_path / "home", admin_token=ADMIN_TOKEN,
                        engine_url="http://fake-engine", max_resident_adapters=2, max_loras=1,
                        max_lora_rank=16, local_source_allowlist=[allowed],
                        engine_health_poll_s=health.args[0] if health else 3600.0,
                        registry_poll_s=registry.args[0] if registry else 1.0)
    async with serve_gateway(settings, base_model_dir, fake_engine) as env:
        yield env
        env.transport.down = False


@contextlib.asynccontextmanager
async def serve_gateway(settings: Settings, base_model_dir: Path,
                        engine: FakeEngine) -> AsyncIterator[Gw]:
    """The real gateway (`Services.build` + `create_app`) on `settings`, wired in-process to
    the stand-in `engine`, started and ready; background work settled before it stops."""
    transport = SwitchableTransport(engine.app)
    services = Services.build(settings, model_path=base_model_dir, engine_transport=transport)
    app = create_app(services)
    await services.start()  # what the app's lifespan does (no asgi-lifespan installed)
    try:
        await wait_until(lambda: services.readiness.ready, "the engine to be ready")
        async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                base_url="http://test") as client:
            env = Gw(client=client, services=services, engine=engine, transport=transport,
                     settings=settings)
            yield env
            await env.settle()
    finally:
        await services.stop()
