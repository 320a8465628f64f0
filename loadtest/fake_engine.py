"""A stand-in for vLLM's OpenAI server that streams at a fixed pace, to measure the gateway alone.

On this CPU machine the real engine makes ~10 tokens/s and its queueing noise is seconds,
far above the gateway's own cost. This server answers instantly and streams `tokens` chunks
`gap_ms` apart, so gateway-vs-direct differences are the gateway's. It implements the routes
the gateway uses: /health, /v1/models, /v1/{load,unload}_lora_adapter, /v1/chat/completions.

    .venv/bin/python loadtest/fake_engine.py --port 18500 --gap-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def build_app(gap_s: float, load_s: float = 0.0) -> Starlette:
    """`gap_s` between streamed tokens; `load_s` per runtime adapter load (vLLM reads the
    files and copies the weights into its slots: ~25 ms for 2 MB on this CPU, more on a GPU
    for big adapters)."""
    loras: dict[str, str] = {}

    async def health(_r: Request) -> Response:
        return Response()

    async def models(_r: Request) -> JSONResponse:
        data = [{"id": BASE, "object": "model", "parent": None}]
        data += [{"id": n, "object": "model", "parent": BASE} for n in loras]
        return JSONResponse({"object": "list", "data": data})

    async def load(r: Request) -> Response:
        body = await r.json()
        await asyncio.sleep(load_s)
        loras[body["lora_name"]] = body["lora_path"]
        return Response()

    async def unload(r: Request) -> Response:
        loras.pop((await r.json())["lora_name"], None)
        return Response()

    async def chat(r: Request) -> Response:
        body = await r.json()
        model, n = body["model"], int(body.get("max_tokens") or 16)
        if model != BASE and model not in loras:
            return JSONResponse({"error": {"message": "no such model", "type": "NotFoundError",
                                           "param": None, "code": 404}}, status_code=404)
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> str:
            return "data: " + json.dumps({
                "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}]},
                separators=(",", ":")) + "\n\n"

        async def events():  # type: ignore[no-untyped-def]
            yield chunk({"role": "assistant", "content": ""})
            for i in range(n):
                await asyncio.sleep(gap_s)
                yield chunk({"content": f" w{i}"}, "length" if i == n - 1 else None)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({
                    "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [], "usage": {
                        "prompt_tokens": 20, "completion_tokens": n, "total_tokens": 20 + n}},
                    separators=(",", ":")) + "\n\n"
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        await asyncio.sleep(gap_s * n)
        return JSONResponse({"id": "chatcmpl-x", "object": "chat.completion", "model": model,
                             "choices": [{"index": 0, "finish_reason": "length",
                                          "message": {"role": "assistant", "content": "w" * n}}],
                             "usage": {"prompt_tokens": 20, "completion_tokens": n,
                                       "total_tokens": 20 + n}})

    return Starlette(routes=[
        Route("/health", health), Route("/v1/models", models),
        Route("/v1/load_lora_adapter", load, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--gap-ms", type=float, default=20.0)
    p.add_argument("--load-ms", type=float, default=0.0, help="time of one adapter load")
    args = p.parse_args()
    uvicorn.run(build_app(args.gap_ms / 1000, args.load_ms / 1000), host="127.0.0.1",
                port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
