"""Evaluations through the serving engine: a tenant's held-out examples answered greedily by
several of its models side by side (adapters/training/evaluation.py builds the report).

Each answer is an ordinary request of the tenant's through the gateway (`Gateway.complete`:
its limits, its fair share, its adapter held in the engine), so an evaluation measures what
serving gives, at full engine speed. Answers run `evaluation_concurrency` at a time. Used by
`POST /v1/fine_tuning/evaluations` (a tenant), `POST /admin/tenants/{t}/evaluations` (an
operator, and the training worker at the end of every job).

An example whose answer fails scores 0 and is counted in its model's `failed`; an engine that
is down fails the whole evaluation (503), since nothing it would report could be trusted.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Sequence
from typing import Any

from adapters.errors import InvalidInput, LoraplexError, Unavailable
from adapters.registry import KeyOwner, Limits
from adapters.training.dataset import validate_jsonl
from adapters.training.evaluation import (
    BASE_KEY,
    PROMPTED_KEY,
    Case,
    EvaluationReport,
    Kind,
    Output,
    Sample,
    best,
    case_of,
    pick_shots,
    prompted_messages,
    score,
)
from adapters.training.jobs import JobStore
from server.gateway import Gateway
from server.protocol.fine_tuning import EvaluationCreate
from server.protocol.openai import ChatCompletionRequest
from server.quotas.usage import UsageMeter
from server.request_log import RequestRecord

CHAT = "/v1/chat/completions"
SHOWN_LINE_ERRORS = 10


class EvaluationService:
    def __init__(self, gateway: Gateway, jobs: JobStore, concurrency: int,
                 meter: UsageMeter | None = None) -> None:
        self.gateway = gateway
        self.jobs = jobs
        self.concurrency = concurrency
        self.meter = meter

    async def caller_for(self, tenant: str) -> KeyOwner:
        """The tenant itself (its limits and weight) for an evaluation an operator asks for."""
        row = await self.jobs.registry.get_tenant(tenant)
        return KeyOwner(tenant, "evaluation", Limits.of(row), Limits(), row.weight or 1.0)

    async def run(self, caller: KeyOwner, body: EvaluationCreate) -> EvaluationReport:
        tenant = caller.tenant_id
        columns = await self._columns(tenant, body)
        cases = (await self._examples(tenant, body, "validation_file", "examples", 1))
        cases = cases[:body.max_examples]
        shots: list[Case] = []
        if body.prompted_baseline and body.few_shot:
            pool = await self._examples(tenant, body, "training_file", "few_shot_examples", 0)
            if not pool:
                raise InvalidInput("the prompted baseline needs few-shot examples: give "
                                   "training_file or few_shot_examples (or few_shot 0)",
                                   param="training_file")
            shots = pick_shots(pool, body.few_shot, body.seed, avoid=[case_of(c) for c in cases])
        held_out = [case_of(c) for c in cases]
        if body.prompted_baseline:
            columns.append((PROMPTED_KEY, self.gateway.base_model_name, "prompted"))

        limit = asyncio.Semaphore(self.concurrency)

        async def answer(model: str, kind: Kind, case: Case) -> Output:
            messages = (prompted_messages(case.prompt, body.prompt, shots) if kind == "prompted"
                        else case.prompt)
            async with limit:
                return await self._answer(caller, model, messages, body.max_tokens)

        outputs = await asyncio.gather(*(
            asyncio.gather(*(answer(model, kind, case) for case in held_out))
            for _key, model, kind in columns))
        models = {key: score(model, kind, held_out, outs)
                  for (key, model, kind), outs in zip(columns, outputs, strict=True)}
        samples = [Sample(prompt=case.prompt, reference=case.reference,
                          outputs={key: outs[i].text
                                   for (key, _, _), outs in zip(columns, outputs, strict=True)})
                   for i, case in enumerate(held_out[:body.shown_examples])]
        errors = sorted({o.error for outs in outputs for o in outs if o.error})
        return EvaluationReport(
            examples=len(held_out), metric=body.metric, models=models,
            best=best(models, body.metric), samples=samples, errors=errors,
            baseline={"system_prompt": body.prompt, "few_shot": len(shots)}
            if body.prompted_baseline else None)

    async def _columns(self, tenant: str, body: EvaluationCreate) -> list[tuple[str, str, Kind]]:
        """(report key, model called, kind) per requested model; each must exist (404)."""
        columns: list[tuple[str, str, Kind]] = []
        for name in body.models:
            if name in (BASE_KEY, self.gateway.base_model_name):
                column: tuple[str, str, Kind] = (BASE_KEY, self.gateway.base_model_name, "base")
            elif name == PROMPTED_KEY:
                raise InvalidInput('"prompted" is not a model; the prompted baseline is added '
                                   "by prompted_baseline", param="models")
            else:
                await self.gateway.resolve(tenant, name)  # NotFound: 404 naming the model
                column = (name, name, "adapter")
            if column[0] in (c[0] for c in columns):
                raise InvalidInput(f"model {name!r} is listed twice", param="models")
            columns.append(column)
        return columns

    async def _examples(self, tenant: str, body: EvaluationCreate, file_param: str,
                        inline_param: str, least: int) -> list[dict[str, Any]]:
        """Validated examples from a tenant's file or inline (one of them), or a 400 naming
        the lines."""
        file_id: str | None = getattr(body, file_param)
        inline: list[dict[str, Any]] | None = getattr(body, inline_param)
        if file_id is not None and inline is not None:
            raise InvalidInput(f"give {file_param} or {inline_param}, not both",
                               param=inline_param)
        if file_id is not None:
            row = await self.jobs.get_file(tenant, file_id)
            if row.purpose != "fine-tune":
                raise InvalidInput(f"file {file_id} has purpose {row.purpose!r}, not "
                                   "'fine-tune'", param=file_param)
            data, where = await self.jobs.read_file(tenant, file_id), file_param
        elif inline is not None:
            data = "\n".join(json.dumps(e) for e in inline).encode()
            where = inline_param
        elif least:
            raise InvalidInput(f"give the held-out examples: {file_param} or {inline_param}",
                               param=file_param)
        else:
            return []
        report = await asyncio.to_thread(validate_jsonl, data, min_examples=least)
        if report.errors:
            shown = "; ".join(str(e) for e in report.errors[:SHOWN_LINE_ERRORS])
            if where == inline_param:
                shown = shown.replace("line ", "example ")
            raise InvalidInput(f"invalid {where}: {shown}", param=where,
                               code=f"invalid_{file_param}")
        return report.examples

    async def _answer(self, caller: KeyOwner, model: str, messages: Sequence[dict[str, Any]],
                      max_tokens: int) -> Output:
        req = ChatCompletionRequest.model_validate({
            "model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
        record = RequestRecord(request_id="eval-" + secrets.token_hex(8), method="POST",
                               path=CHAT)
        record.tenant, record.key_id = caller.tenant_id, caller.key_id
        try:
            answer = await self.gateway.complete(caller, CHAT, req, record)
        except Unavailable:
            self._metered(record, error=True)
            raise
        except LoraplexError as exc:  # refused by the engine, a limit, ...: this one scores 0
            self._metered(record, error=True)
            return Output(None, error=f"{model}: {exc.message}"[:300])
        self._metered(record, error=False)
        choice = (answer.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content")
        tokens = (answer.get("usage") or {}).get("completion_tokens")
        if not isinstance(text, str):
            return Output(None, error=f"{model}: the engine gave no text")
        return Output(text, tokens if isinstance(tokens, int) else None)

    def _metered(self, record: RequestRecord, error: bool) -> None:
        """Metered like a tenant's own request: an evaluation's answers are engine work the
        tenant asked for."""
        if self.meter is not None:
            record.meter(self.meter, error)
