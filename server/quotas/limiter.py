"""Per-tenant and per-key limits, enforced as OpenAI enforces its own.

A request passes when its tenant and its key (each may have limits; both apply) have room:
- `requests_per_minute` and `tokens_per_minute`: token buckets (see `counters`). Tokens are
  reserved when the request is let in: its prompt tokens (counted with the base model's
  tokenizer) plus `n` x its completion budget (`max_tokens`, else the cap, else what the
  context leaves). When the answer ends the reservation is settled to what was used (the
  engine's usage; for a stream cut short, what was streamed), so unused budget comes back.
- `max_in_flight`: concurrent requests, as leased slots.
- `max_tokens`: a cap on one request's completion budget; asking for more is a 400, asking
  for nothing gets the cap.

Over a limit: 429 with OpenAI's error (`code: rate_limit_exceeded`, `type` the limit that was
hit), `Retry-After` and `retry-after-ms`. Every answer to a tenant with limits carries
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the limits it has (the tighter of
tenant and key), so the `openai` SDK's own retries work unchanged.

The counters are in Redis when several units share the limits. If it cannot be reached,
`fail_open` serves without limits (counted in a metric, logged once per outage), else 503.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from adapters.errors import InvalidInput, Overloaded, Unavailable
from adapters.registry import KeyOwner, Limits
from server.protocol.openai import ChatCompletionRequest, GenerationRequest
from server.quotas.counters import Bucket, BucketState, Counters, CountersUnavailable, Slot
from server.quotas.tokens import PromptTokens
from server.request_log import RequestRecord

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], None]
LimitKind = Literal["requests", "tokens", "concurrency"]


class RateLimited(Overloaded):
    """429: a limit of the tenant or its key was hit. `error_type` is the limit, as OpenAI
    names it in its error objects ("requests", "tokens")."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, kind: LimitKind, retry_after_s: float | None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.error_type = kind
        if retry_after_s is not None:  # the openai SDK waits this long before its retry
            self.headers = {"retry-after-ms": str(math.ceil(retry_after_s * 1000))}


@dataclass
class Reservation:
    """What one request holds against its limits until it ends."""

    prompt_tokens: int | None  # counted with the tokenizer (None when tokens are not limited)
    reserved_tokens: int
    token_buckets: list[Bucket] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    holder: str = ""
    used_tokens: int | None = None

    def used(self, prompt_tokens: int, completion_tokens: int) -> None:
        """What the request really used (the engine's usage, or what was streamed)."""
        self.used_tokens = prompt_tokens + completion_tokens


def _tightest(*values: int | None) -> int | None:
    given = [v for v in values if v is not None]
    return min(given) if given else None


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class RateLimiter:
    def __init__(self, counters: Counters, tokens: PromptTokens, max_model_len: int,
                 spawn: Spawn, fail_open: bool = True,
                 on_backend_error: Callable[[], None] | None = None,
                 on_rejected: Callable[[str, str], None] | None = None) -> None:
        self.counters = counters
        self.tokens = tokens
        self.max_model_len = max_model_len
        self._spawn = spawn
        self.fail_open = fail_open
        self._on_backend_error = on_backend_error
        self._on_rejected = on_rejected  # (tenant, limit kind), for metrics
        self._outage = False

    @asynccontextmanager
    async def admit(self, caller: KeyOwner, req: GenerationRequest,
                    record: RequestRecord) -> AsyncIterator[Reservation]:
        """Check and take the caller's limits for `req` for the body of the `with` (429 when
        over one); settle the token reservation and free the slot when it ends."""
        t, k = caller.tenant_limits, caller.key_limits
        budget = self._completion_budget(req, _tightest(t.max_tokens, k.max_tokens))
        if not (t.any or k.any):
            yield Reservation(None, 0)
            return
        buckets, token_buckets, slots = _plan(caller)
        prompt = await self.tokens.count(req) if token_buckets else None
        reserved = 0
        if prompt is not None:
            per_choice = budget if budget is not None else max(self.max_model_len - prompt, 1)
            reserved = prompt + req.n * per_choice
            token_buckets = [Bucket(b.key, b.limit, reserved) for b in token_buckets]
        reservation = Reservation(prompt, reserved, token_buckets, slots, uuid.uuid4().hex)
        try:
            await self._take(caller, buckets + token_buckets, reservation, record)
        except CountersUnavailable as exc:
            self._backend_failed(exc)
            yield Reservation(None, 0)  # failing open: served without limits
            return
        self._backend_ok()
        try:
            yield reservation
        finally:
            self._spawn(self._settle(reservation))

    async def report(self, caller: KeyOwner, record: RequestRecord) -> None:
        """Put the caller's current x-ratelimit-* headers on an answer that takes nothing
        (model lists, files, jobs)."""
        buckets, token_buckets, _ = _plan(caller)
        if not buckets and not token_buckets:
            return
        buckets = [Bucket(b.key, b.limit, 0) for b in buckets + token_buckets]  # read only
        try:
            _, states = await self.counters.take(buckets)
        except CountersUnavailable as exc:
            self._outage_seen(exc)  # headers are a courtesy: no 503 for them
            return
        record.headers = _headers(buckets, states)

    def _completion_budget(self, req: GenerationRequest, cap: int | None) -> int | None:
        """The request's completion budget, held to the cap (a 400 above it)."""
        field_name = "max_tokens"
        asked = req.max_tokens
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            field_name, asked = "max_completion_tokens", req.max_completion_tokens
        if cap is None or (asked is not None and asked <= cap):
            return asked
        if asked is not None:
            raise InvalidInput(f"{field_name} is {asked}, over this API key's limit of {cap} "
                               f"tokens per request", param=field_name,
                               code="max_tokens_exceeded")
        req.max_tokens = cap  # the engine stops at the cap, as the tenant was promised
        return cap

    async def _take(self, caller: KeyOwner, buckets: list[Bucket], reservation: Reservation,
                    record: RequestRecord) -> None:
        if reservation.slots:
            full = await self.counters.acquire(reservation.slots, reservation.holder)
            if full is not None:
                slot = reservation.slots[full]
                self._rejected(caller, "concurrency")
                raise RateLimited(
                    f"Too many concurrent requests for {_owner(slot.key, caller)}: limit "
                    f"{slot.limit} in flight. Retry when one of them has finished.",
                    "concurrency", 1)
        if not buckets:
            return
        try:
            taken, states = await self.counters.take(buckets)
        except CountersUnavailable:
            await self._release(reservation)
            raise
        record.headers = _headers(buckets, states)  # on the 429 too
        if taken:
            return
        await self._release(reservation)
        worst = max(range(len(states)), key=lambda i: states[i].retry_after_s)
        bucket, state = buckets[worst], states[worst]
        kind = _kind(bucket)
        self._rejected(caller, kind)
        unit = "tokens per min (TPM)" if kind == "tokens" else "requests per min (RPM)"
        owner = _owner(bucket.key, caller)
        if math.isinf(state.retry_after_s):
            raise RateLimited(
                f"Request too large for {owner} on {unit}: Limit {bucket.limit}, Requested "
                f"{math.ceil(bucket.cost)}. Send a shorter prompt or a smaller max_tokens.",
                kind, None)
        retry = state.retry_after_s
        raise RateLimited(
            f"Rate limit reached for {owner} on {unit}: Limit {bucket.limit}, Used "
            f"{bucket.limit - max(math.floor(state.remaining), 0)}, Requested "
            f"{math.ceil(bucket.cost)}. Please try again in {format_reset(retry)}.",
            kind, retry)

    async def _settle(self, reservation: Reservation) -> None:
        try:
            if reservation.token_buckets:
                used = (reservation.used_tokens if reservation.used_tokens is not None
                        else reservation.prompt_tokens or 0)
                delta = used - reservation.reserved_tokens
                if delta:
                    await self.counters.adjust(
                        [Bucket(b.key, b.limit, delta) for b in reservation.token_buckets])
            await self._release(reservation)
        except CountersUnavailable as exc:
            # In the background: nobody to answer 503 to; the reservation expires by refill.
            self._outage_seen(exc)

    async def _release(self, reservation: Reservation) -> None:
        if reservation.slots:
            await self.counters.release(reservation.slots, reservation.holder)

    def _rejected(self, caller: KeyOwner, kind: str) -> None:
        if self._on_rejected is not None:
            self._on_rejected(caller.tenant_id, kind)

    def _backend_failed(self, exc: CountersUnavailable) -> None:
        """A request could not take from its limits: 503 when failing closed."""
        self._outage_seen(exc)
        if not self.fail_open:
            raise Unavailable("rate limits cannot be checked right now; retry shortly",
                              code="rate_limiter_unavailable", retry_after_s=1) from exc

    def _outage_seen(self, exc: CountersUnavailable) -> None:
        """Count a failed call to the counters; log the outage once."""
        if self._on_backend_error is not None:
            self._on_backend_error()
        if not self._outage:
            self._outage = True
            log.warning("rate-limit counters unreachable (%s): %s until they are back", exc,
                        "serving without limits" if self.fail_open
                        else "refusing requests that have limits (503)")

    def _backend_ok(self) -> None:
        if self._outage:
            self._outage = False
            log.warning("rate-limit counters reachable again: limits enforced")


def _plan(caller: KeyOwner) -> tuple[list[Bucket], list[Bucket], list[Slot]]:
    """The caller's request buckets, token buckets (cost filled in later) and slots. Keys
    carry the tenant in a Redis hash tag, so one call touches one cluster slot."""
    requests, tokens, slots = [], [], []
    owners: Sequence[tuple[str, Limits]] = (
        (f"t:{{{caller.tenant_id}}}", caller.tenant_limits),
        (f"k:{{{caller.tenant_id}}}:{caller.key_id}", caller.key_limits))
    for prefix, limits in owners:
        if limits.requests_per_minute is not None:
            requests.append(Bucket(f"{prefix}:rpm", limits.requests_per_minute, 1))
        if limits.tokens_per_minute is not None:
            tokens.append(Bucket(f"{prefix}:tpm", limits.tokens_per_minute, 0))
        if limits.max_in_flight is not None:
            slots.append(Slot(f"{prefix}:inflight", limits.max_in_flight))
    return requests, tokens, slots


def _owner(key: str, caller: KeyOwner) -> str:
    return (f"tenant {caller.tenant_id!r}" if key.startswith("t:")
            else f"API key {caller.key_id!r} of tenant {caller.tenant_id!r}")


def _kind(bucket: Bucket) -> LimitKind:
    return "tokens" if bucket.key.endswith(":tpm") else "requests"


def _headers(buckets: Sequence[Bucket],
             states: Sequence[BucketState]) -> list[tuple[bytes, bytes]]:
    """x-ratelimit-* of each limited dimension, from the tighter of tenant and key, as the
    raw header pairs the request record adds to the answer."""
    tightest: dict[LimitKind, BucketState] = {}
    for bucket, state in zip(buckets, states, strict=True):
        kind = _kind(bucket)
        if kind not in tightest or state.remaining < tightest[kind].remaining:
            tightest[kind] = state
    headers = []
    for dim, state in tightest.items():
        headers += [(f"x-ratelimit-limit-{dim}", str(state.limit)),
                    (f"x-ratelimit-remaining-{dim}", str(max(math.floor(state.remaining), 0))),
                    (f"x-ratelimit-reset-{dim}", format_reset(state.reset_s))]
    return [(name.encode(), value.encode()) for name, value in headers]
