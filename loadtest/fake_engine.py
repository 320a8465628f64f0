"""A stand-in for vLLM's OpenAI server that streams at a fixed pace, to measure the gateway alone.

On this CPU machine the real engine makes ~10 tokens/s and its queueing noise is seconds,
far above the gateway's own cost. This server answers instantly and streams `tokens` chunks
`gap_ms` apart, so gateway-vs-direct differences are the gateway's. It implements the routes
the gateway uses: /health, /v1/models, /v1/{load,unload}_lora_adapter, /v1/chat/completions,
/v1/completions.

    .venv/bin/python loadtest/fake_engine.py --port 18500 --gap-ms 20

With `--slots N` it is a capacity model instead (what loadtest/bench_fairness.py uses): an
idealised continuous-batching engine running at most N sequences at once; more wait in
arrival order, like vLLM's waiting queue. A running request's first token comes
`--step-ms + --prefill-ms-per-token x prompt tokens` after it gets a slot, each further one
`--decode-ms` later, whatever the other running requests do. So only who is let in when
(the gateway's admission) decides the waiting. GET /stats tells the slots' occupancy and
the adapter loads and unloads so far.

    .venv/bin/python loadtest/fake_engine.py --port 18500 --slots 32 --step-ms 30 \
        --prefill-ms-per-token 0.1 --decode-ms 30

With `--load-blocks`, an adapter load holds the whole engine, as in vLLM, whose engine core
runs `add_lora` between two steps of its busy loop: loads run one at a time and no stream gets
a token while one runs (what loadtest/bench_zipf.py uses).

Prompt tokens are estimated as characters / 4 (token-id lists: their length); every answer
carries OpenAI `usage`, and so does a stream's last chunk when `stream_options.include_usage`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Pace:
    """When tokens come out: the first `ttft` after a slot is granted, then one per `decode_s`."""

    step_s: float
    prefill_s_per_token: float
    decode_s: float

    def ttft(self, prompt_tokens: int) -> float:
        return self.step_s + self.prefill_s_per_token * prompt_tokens


class Slots:
    """At most `n` requests run at once (None: no bound); the others wait first come, first
    served. Busy slot-seconds are integrated, so a benchmark can read the engine's utilisation."""

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.running = 0
        self.completed = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._busy_s = 0.0
        self._since = time.monotonic()

    def _tick(self) -> None:
        now = time.monotonic()
        self._busy_s += self.running * (now - self._since)
        self._since = now

    async def acquire(self) -> None:
        if self.n is None or (self.running < self.n and not self._waiting):
            self._tick()
            self.running += 1
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(ticket)
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self.release()  # granted just as the client went away: hand it on
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            raise

    def release(self) -> None:
        self.completed += 1
        while self._waiting:  # the slot passes straight to the next waiting request
            ticket = self._waiting.popleft()
            if not ticket.done():
                ticket.set_result(None)
                return
        self._tick()
        self.running -= 1

    def stats(self) -> dict[str, Any]:
        self._tick()
        return {"slots": self.n, "running": self.running, "waiting": len(self._waiting),
                "completed": self.completed, "busy_slot_s": self._busy_s,
                "time_s": time.monotonic()}


def _chars(content: Any) -> int:
    """Characters of a message content: a string, or a list of parts with `text`."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return 0


def prompt_tokens(body: dict[str, Any]) -> int:
    """A tokenizer-free estimate (4 characters a token), as good as a stand-in needs."""
    if "messages" in body:
        return max(1, sum(_chars(m.get("content")) for m in body["messages"]) // 4)
    prompt = body.get("prompt") or ""
    if isinstance(prompt, str):
        return max(1, len(prompt) // 4)
    if prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)  # token ids
    return max(1, sum(len(p) if isinstance(p, list) else len(p) // 4 for p in prompt))


def _compact(doc: dict[str, Any]) -> str:
    # vLLM's compact JSON: the gateway byte-replaces `"model":"<engine name>"` in it.
    return json.dumps(doc, separators=(",", ":"))


def build_app(gap_s: float, load_s: float = 0.0, slots: int | None = None,
              pace: Pace | None = None, load_blocks: bool = False) -> Starlette:
    """`gap_s` between streamed tokens (and before the first); `load_s` per runtime adapter
    load (vLLM reads the files and copies the weights into its slots: ~25 ms for 2 MB on this
    CPU, more on a GPU for big adapters). `slots` and `pace`: the capacity model above.
    `load_blocks`: a load holds the engine (one at a time, every stream paused meanwhile)."""
    loras: dict[str, str] = {}
    loads: dict[str, int] = {}  # runtime loads and unloads per adapter, for GET /stats
    unloads: dict[str, int] = {}
    load_lock = asyncio.Lock()
    engine_free = asyncio.Event()
    engine_free.set()
    running = Slots(slots)
    pace = pace or Pace(gap_s, 0.0, gap_s)
    role_first = slots is None  # the plain pacer sends the role at once; vLLM with the first token

    async def health(_r: Request) -> Response:
        return Response()

    async def stats(_r: Request) -> JSONResponse:
        return JSONResponse({**running.stats(), "loads": loads, "unloads": unloads})

    async def models(_r: Request) -> JSONResponse:
        data = [{"id": BASE, "object": "model", "parent": None}]
        data += [{"id": n, "object": "model", "parent": BASE} for n in loras]
        return JSONResponse({"object": "list", "data": data})

    async def load(r: Request) -> Response:
        body = await r.json()
        if load_blocks:
            async with load_lock:
                engine_free.clear()
                try:
                    await asyncio.sleep(load_s)
                finally:
                    engine_free.set()
        else:
            await asyncio.sleep(load_s)
        loras[body["lora_name"]] = body["lora_path"]
        loads[body["lora_name"]] = loads.get(body["lora_name"], 0) + 1
        return Response()

    async def unload(r: Request) -> Response:
        name = (await r.json())["lora_name"]
        loras.pop(name, None)
        unloads[name] = unloads.get(name, 0) + 1
        return Response()

    async def generate(r: Request) -> Response:
        body = await r.json()
        chat = r.url.path.endswith("/chat/completions")
        model, n = body["model"], max(1, int(body.get("max_tokens") or 16))
        if model != BASE and model not in loras:
            return JSONResponse({"error": {"message": "no such model", "type": "NotFoundError",
                                           "param": None, "code": 404}}, status_code=404)
        created, prompt = int(time.time()), prompt_tokens(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        head = ({"id": "chatcmpl-x", "object": "chat.completion.chunk"} if chat
                else {"id": "cmpl-x", "object": "text_completion"})

        def chunk(text: str | None, finish: str | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None,
                          "finish_reason": finish}
            return "data: " + _compact({**head, "created": created, "model": model,
                                        "choices": [choice]}) + "\n\n"

        async def events() -> AsyncIterator[str]:
            if chat and role_first:
                yield chunk(None)
            await running.acquire()
            try:
                due = time.monotonic() + pace.ttft(prompt)
                for i in range(n):
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    if not engine_free.is_set():  # an adapter load holds the engine
                        await engine_free.wait()
                        due = time.monotonic()
                    if chat and i == 0 and not role_first:
                        yield chunk(None)
                    yield chunk(f" w{i}", "length" if i == n - 1 else None)
                    # The capacity model keeps to its schedule (a late wake-up does not slow
                    # the rest of the stream); the plain pacer counts the gap from the send.
                    due = (due if slots else time.monotonic()) + pace.decode_s
            finally:
                running.release()
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + _compact({**head, "created": created, "model": model,
                                           "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        await running.acquire()
        try:
            await asyncio.sleep(pace.ttft(prompt) + pace.decode_s * (n - 1))
        finally:
            running.release()
        text = "w" * n
        choice = ({"index": 0, "finish_reason": "length", "logprobs": None,
                   "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "finish_reason": "length", "logprobs": None, "text": text})
        return Response(_compact({**head, "object": "chat.completion" if chat else head["object"],
                                  "created": created, "model": model, "choices": [choice],
                                  "usage": usage}), media_type="application/json")

    return Starlette(routes=[
        Route("/health", health), Route("/stats", stats), Route("/v1/models", models),
        Route("/v1/load_lora_adapter", load, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/completions", generate, methods=["POST"]),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--gap-ms", type=float, default=20.0,
                   help="without --slots: ms before each streamed token")
    p.add_argument("--load-ms", type=float, default=0.0, help="time of one adapter load")
    p.add_argument("--load-blocks", action="store_true",
                   help="a load holds the engine: one at a time, no tokens meanwhile (vLLM)")
    p.add_argument("--slots", type=int, default=None,
                   help="capacity model: sequences running at once (more wait, FCFS)")
    p.add_argument("--step-ms", type=float, default=30.0,
                   help="capacity model: fixed part of the time to first token")
    p.add_argument("--prefill-ms-per-token", type=float, default=0.1,
                   help="capacity model: time to first token per prompt token")
    p.add_argument("--decode-ms", type=float, default=30.0,
                   help="capacity model: time of each further token")
    args = p.parse_args()
    pace = None
    if args.slots is not None:
        pace = Pace(args.step_ms / 1000, args.prefill_ms_per_token / 1000, args.decode_ms / 1000)
    uvicorn.run(build_app(args.gap_ms / 1000, args.load_ms / 1000, args.slots, pace,
                          args.load_blocks),
                host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
