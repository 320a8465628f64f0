"""Serving logic of the tenant API, with no FastAPI in it: resolve the tenant's `model`, hold
its adapter in the engine, forward with the tenant's cache salt, and name the model in the
answer as the tenant called it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from adapters.errors import InvalidInput, NotFound, Unavailable
from adapters.names import parse_model_ref
from adapters.registry import AdapterVersion, KeyOwner, Registry, timestamp
from server.admission import FairAdmission
from server.engine.client import EngineClient, EngineError
from server.engine.readiness import EngineReadiness
from server.lookup_cache import LookupCache
from server.protocol.openai import GenerationRequest, ModelObject
from server.quotas.limiter import RateLimiter, Reservation
from server.quotas.tokens import PromptTokens
from server.request_log import RequestRecord
from server.slots import AdapterSlots

# Resolution is cached per gateway: admin changes made here clear it at once, changes made by
# another gateway or a training worker within a second (`watchers.watch_registry`).
RESOLVE_TTL_S = 60.0


@dataclass(frozen=True)
class Target:
    """What a request runs on: the base model (version None) or one adapter version."""

    engine_name: str
    version: AdapterVersion | None
    adapter: str | None = None  # adapter name (for labels and logs); None for the base model


class Gateway:
    def __init__(self, registry: Registry, slots: AdapterSlots, engine: EngineClient,
                 readiness: EngineReadiness, base_model_name: str,
                 salt_secret: bytes, admission: FairAdmission, limiter: RateLimiter,
                 on_token_gap: Callable[[float], None] | None = None) -> None:
        self.registry = registry
        self.admission = admission
        self.limiter = limiter
        self.on_token_gap = on_token_gap  # inter-token latency, for metrics
        self.readiness = readiness
        self.slots = slots
        self.engine = engine
        self.base_model_name = base_model_name
        self._salt_secret = salt_secret
        self._resolved: LookupCache[tuple[str, str], Target] = LookupCache(RESOLVE_TTL_S)

    def cache_salt(self, tenant: str) -> str:
        """Keyed per-tenant salt: vLLM never shares prefix-cache blocks across tenants."""
        return hmac.new(self._salt_secret, tenant.encode(), hashlib.sha256).hexdigest()

    def forget_resolutions(self) -> None:
        self._resolved.clear()

    async def resolve(self, tenant: str, model: str) -> Target:
        if model == self.base_model_name:
            return Target(self.base_model_name, None)
        return await self._resolved.get((tenant, model), lambda: self._lookup(tenant, model))

    async def _lookup(self, tenant: str, model: str) -> Target:
        try:
            ref = parse_model_ref(model)
        except InvalidInput as exc:
            raise NotFound(f"model {model!r} does not exist", param="model",
                           code="model_not_found") from exc
        version = await self.registry.resolve(tenant, ref)
        return Target(version.engine_name, version, ref.adapter)

    def _hold(self, target: Target) -> contextlib.AbstractAsyncContextManager[Any]:
        """Keep the target's adapter loaded in the engine for the request (nothing for base)."""
        if target.version is None:
            return contextlib.nullcontext()
        return self.slots.hold(target.engine_name, target.version.store_key)

    @contextlib.asynccontextmanager
    async def _forgotten(self, target: Target) -> AsyncIterator[None]:
        """An engine 404 for an adapter held loaded means the engine restarted unseen (faster
        than a health poll, e.g. an external engine): report it, so the gateway starts from a
        clean slate as after any restart, and answer 503 rather than a misleading 404."""
        try:
            yield
        except EngineError as exc:
            if exc.status != 404 or target.version is None:
                raise
            self.readiness.mark_down("the engine no longer knows an adapter it had loaded")
            # The engine refused the request (it no longer knows the adapter): no work done.
            raise Unavailable("the inference engine restarted; retry shortly",
                              code="engine_unavailable", retry_after_s=2, retryable=True) from exc

    async def pin(self, version: AdapterVersion) -> None:
        """Load a version now and keep it resident (preloaded adapters)."""
        await self.slots.pin(version.engine_name, version.store_key)

    @contextlib.asynccontextmanager
    async def _admit(self, caller: KeyOwner, req: GenerationRequest, target: Target,
                     record: RequestRecord) -> AsyncIterator[_Accounting]:
        """Everything a request holds while it runs, in order: the caller's limits (429 over
        one), a fair share of the engine (token-fair admission), the adapter in the engine."""
        tenant = caller.tenant_id
        async with self.limiter.admit(caller, req, record) as reservation:
            estimate = PromptTokens.estimate(req)
            accounting = _Accounting(self.admission, tenant, reservation, estimate, record)
            try:
                async with (self.admission.admit(tenant, estimate, caller.weight),
                            self._hold(target), self._forgotten(target)):
                    yield accounting
            finally:
                accounting.settle()

    async def complete(self, caller: KeyOwner, path: str, req: GenerationRequest,
                       record: RequestRecord) -> dict[str, Any]:
        self.readiness.require()
        tenant = caller.tenant_id
        target = await self.resolve(tenant, req.model)
        _describe(record, req, target)
        async with self._admit(caller, req, target, record) as accounting:
            answer = await self.engine.post_json(
                path, req.engine_body(target.engine_name, self.cache_salt(tenant)))
            accounting.usage(answer.get("usage"))
        answer["model"] = req.model
        return answer

    async def stream(self, caller: KeyOwner, path: str, req: GenerationRequest,
                     record: RequestRecord) -> AsyncGenerator[bytes, None]:
        """Server-sent events, as the engine sends them but naming the tenant's model.

        Errors before the first event (unknown model, a limit, engine refusal) are raised when
        the caller primes the generator, so they become proper HTTP errors. Usage is always
        asked of the engine (for accounting) and passed on only if the client asked for it.

        A stream the engine breaks off later (killed, connection reset, read timeout) can no
        longer get an error status: as vLLM does for its own mid-stream errors, it gets an
        in-band `data: {"error": {...}}` event in OpenAI's shape, then `data: [DONE]`, and
        ends cleanly. The error code is kept in the request record for the access log. A
        stream cut short is accounted for what was streamed.
        """
        started = time.perf_counter()
        self.readiness.require()
        tenant = caller.tenant_id
        target = await self.resolve(tenant, req.model)
        _describe(record, req, target)
        client_wants_usage = bool(req.stream_options and req.stream_options.include_usage)
        # Inside a JSON document an unescaped `"model":"<name>"` can only be the field itself,
        # so a byte replace is exact and cheaper than parsing every chunk.
        needle = f'"model":{json.dumps(target.engine_name)}'.encode()
        replacement = f'"model":{json.dumps(req.model)}'.encode()
        last_token_at: float | None = None
        async with self._admit(caller, req, target, record) as accounting:
            body = req.engine_body(target.engine_name, self.cache_salt(tenant))
            body["stream_options"] = {**(body.get("stream_options") or {}),
                                      "include_usage": True}
            async with self.engine.stream_events(path, body) as bursts:
                yield b""  # primed: the engine accepted the request
                last = b""
                try:
                    async for events in bursts:
                        last = events[-1]
                        out = []
                        generated = 0
                        for event in events:
                            if _USAGE_ONLY in event:
                                accounting.usage(
                                    json.loads(event[len(b"data: "):]).get("usage"))
                                if not client_wants_usage:
                                    continue
                            elif _CHOICES in event and _ROLE_ONLY not in event:
                                generated += 1
                                now = time.perf_counter()
                                if last_token_at is None:
                                    record.ttft_s = now - started
                                elif self.on_token_gap is not None:
                                    self.on_token_gap(now - last_token_at)
                                last_token_at = now
                            out.append(event.replace(needle, replacement, 1))
                        if generated:
                            accounting.streamed(generated)
                        if out:
                            # Events that arrived together leave together: one write.
                            yield b"\n\n".join(out) + b"\n\n"
                    if last.strip() != b"data: [DONE]":  # vLLM sends it last, even after errors
                        raise Unavailable(
                            "the inference engine ended the stream early; retry shortly",
                            code="engine_unavailable", retry_after_s=5)
                except Unavailable as exc:  # the engine broke the stream off mid-way
                    record.error = exc.code
                    # The type is the one server/errors.py gives `Unavailable` (its 503s).
                    error = {"message": exc.message, "type": "service_unavailable_error",
                             "param": None, "code": exc.code}
                    yield (b"data: " + json.dumps({"error": error}).encode()
                           + b"\n\ndata: [DONE]\n\n")

    async def models(self, tenant: str) -> list[ModelObject]:
        """OpenAI model objects for what this tenant may call."""
        data = [ModelObject(id=self.base_model_name, created=0, owned_by="loraplex",
                            root=self.base_model_name, parent=None)]
        for adapter in await self.registry.list_adapters(tenant):
            if not adapter.versions:
                continue
            created = timestamp(adapter.versions[-1].created_at)
            ids = [adapter.name]
            ids += [f"{adapter.name}@{v.version}" for v in adapter.versions]
            ids += [f"{adapter.name}@{a.alias}" for a in adapter.aliases]
            data += [ModelObject(id=i, created=created, owned_by=tenant,
                                 root=self.base_model_name, parent=self.base_model_name)
                     for i in ids]
        return data


# Byte patterns of vLLM's compact JSON chunks (pydantic model_dump_json, no spaces).
_USAGE_ONLY = b'"choices":[],'
_CHOICES = b'"choices":[{'
_ROLE_ONLY = b'"delta":{"role":"assistant","content":""}'


def _describe(record: RequestRecord, req: GenerationRequest, target: Target) -> None:
    record.model = req.model
    record.stream = req.stream
    record.adapter = target.adapter


class _Accounting:
    """One request's tokens, told to everyone who counts them: the request record (metrics,
    usage metering), the rate-limit reservation (settled to use) and token-fair admission
    (which charged an estimate of the prompt at admission and the tokens as they stream)."""

    def __init__(self, admission: FairAdmission, tenant: str, reservation: Reservation,
                 estimate: int, record: RequestRecord) -> None:
        self._admission = admission
        self._tenant = tenant
        self._reservation = reservation
        self._estimate = estimate
        self._record = record
        self._streamed = 0  # generated chunks seen (a stream without usage: ~ tokens)
        self._usage: tuple[int, int] | None = None

    def streamed(self, chunks: int) -> None:
        self._streamed += chunks
        self._admission.charge(self._tenant, completion_tokens=chunks)

    def usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self._usage = (int(usage.get("prompt_tokens") or 0),
                           int(usage.get("completion_tokens") or 0))

    def settle(self) -> None:
        if self._usage is not None:
            prompt, completion = self._usage
        elif self._streamed:  # cut short: charged for what was streamed
            prompt = self._reservation.prompt_tokens or self._estimate
            completion = self._streamed
        else:  # no answer: the engine refused it or it never got there
            return
        self._record.prompt_tokens, self._record.completion_tokens = prompt, completion
        self._reservation.used(prompt, completion)
        self._admission.charge(self._tenant, prompt_tokens=prompt - self._estimate,
                               completion_tokens=completion - self._streamed)
