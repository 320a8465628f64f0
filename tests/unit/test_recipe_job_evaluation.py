"""The end-of-job evaluation: the worker computes held-out losses, registers the version, asks
a gateway (GatewayEvaluator -> POST /admin/tenants/{t}/evaluations) for the answers of the base
model, the prompted baseline and the adapter through the engine, stores the report on the job,
and under require_improvement keeps the version only if it beats both baselines.

Training and the loss computation are stand-ins (no torch model); the gateway is the real one on
the scripted stand-in engine of test_recipe_evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import adapters.training.trainer as trainer_module
from adapters.base_model import BaseModelInfo
from adapters.training.evaluator import GatewayEvaluator
from adapters.training.trainer import EvalResult, TrainConfig, TrainResult
from adapters.training.worker import Worker
from adapters.validation import AdapterLimits
from server.app import create_app
from tests.unit.conftest import ADMIN_TOKEN, BASE_MODEL, FakeEngine, Gw, write_adapter
from tests.unit.test_fine_tuning_api import JOBS, upload, wait_for_status
from tests.unit.test_fine_tuning_api import tokenizer as tokenizer  # a fixture
from tests.unit.test_recipe_evaluation import (
    EXPECTED,
    QUESTIONS,
    REFERENCES,
    ScriptedEngine,
    chat_lines,
)

LOSSES = {"base": 2.0, "prompted": 1.5, "adapter": 1.0}


@pytest.fixture
def fake_engine() -> FakeEngine:
    return ScriptedEngine()


class Unreachable(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Training writes a small adapter; the loss of each model is LOSSES[kind]."""
    seen: dict[str, Any] = {"losses": dict(LOSSES), "prompted_examples": []}

    def fake_train(_base: Path, _examples: list[dict[str, Any]], _config: TrainConfig,
                   work_dir: Path, **_callbacks: Callable[..., Any]) -> TrainResult:
        adapter = write_adapter(work_dir / "adapter")
        return TrainResult(adapter_dir=adapter, steps=3, train_loss=0.5, trained_tokens=99,
                           tokens_per_s=1.0, seconds=1.0)

    def fake_evaluate(_base: Path, examples: list[dict[str, Any]], adapter_dir: Path | None,
                      _max_seq_len: int = 512, **_: Any) -> EvalResult:
        prompted = examples[0]["messages"][0]["role"] == "system"
        if prompted:
            seen["prompted_examples"] = examples
        kind = "adapter" if adapter_dir is not None else "prompted" if prompted else "base"
        loss = seen["losses"][kind]
        return EvalResult(loss=loss, perplexity=2.0 ** loss, tokens=10)

    monkeypatch.setattr(trainer_module, "train", fake_train)
    monkeypatch.setattr(trainer_module, "evaluate", fake_evaluate)
    return seen


def make_worker(gw: Gw, base_model_dir: Path, tmp_path: Path,
                transport: httpx.AsyncBaseTransport | None = None) -> Worker:
    transport = transport or httpx.ASGITransport(app=create_app(gw.services))
    evaluator = GatewayEvaluator("http://gateway", ADMIN_TOKEN, 60, transport=transport,
                                 retry_pauses_s=(0.0,))
    return Worker(gw.services.jobs, gw.services.registry, gw.services.store, base_model_dir,
                  BaseModelInfo.from_folder(base_model_dir), AdapterLimits(16, 10**9),
                  BASE_MODEL, tmp_path / "work", worker_id="w1",
                  threads=torch.get_num_threads(), evaluator=evaluator)


async def run_job(gw: Gw, worker: Worker, evaluation: dict[str, Any],
                  require_improvement: bool = True) -> dict[str, Any]:
    key = await gw.new_tenant("acme")
    headers = gw.headers("acme", key)
    training = chat_lines([(f"Training question {i}?", f"Training answer {i}.")
                           for i in range(12)] + [(QUESTIONS[1], REFERENCES[1])])
    held_out = chat_lines(list(zip(QUESTIONS, REFERENCES, strict=True)))
    train_id = (await upload(gw, headers, training)).json()["id"]
    valid_id = (await upload(gw, headers, held_out)).json()["id"]
    r = await gw.client.post(JOBS, headers=headers, json={
        "model": BASE_MODEL, "training_file": train_id, "validation_file": valid_id,
        "suffix": "bot", "lora": {"r": 8, "require_improvement": require_improvement},
        "evaluation": evaluation})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    await wait_for_status(gw, headers, job_id, "queued")
    claimed = await gw.services.jobs.claim(worker.worker_id, 30)
    assert claimed is not None and claimed.id == job_id
    await worker.run_job(claimed)
    r = await gw.client.get(f"{JOBS}/{job_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_a_job_ends_with_the_three_columns(gw: Gw, tokenizer, stand_ins, base_model_dir,
                                                 tmp_path) -> None:
    job = await run_job(gw, make_worker(gw, base_model_dir, tmp_path),
                        {"metric": "f1", "few_shot": 2, "system_prompt": "Be like them."})
    assert job["status"] == "succeeded", job["error"]
    assert job["fine_tuned_model"] == "bot@1"
    report = job["evaluation"]
    assert set(report["models"]) == {"base", "prompted", "bot@1"}
    for key, kind in (("base", "base"), ("prompted", "prompted"), ("bot@1", "adapter")):
        column = report["models"][key]
        assert column["kind"] == kind
        assert column["loss"] == LOSSES[kind]
        for metric, value in EXPECTED[kind].items():
            assert column[metric] == pytest.approx(value), (key, metric)
    assert report["metric"] == "f1" and report["improved"] is True and report["best"] == "bot@1"
    assert report["baseline"] == {"system_prompt": "Be like them.", "few_shot": 2}
    assert len(report["samples"]) == 3 and report["errors"] == []
    assert job["evaluation_settings"]["few_shot"] == 2
    assert job["eval"]["prompted_loss"] == LOSSES["prompted"]

    # The loss and the answers of the prompted baseline saw the same two shots, none of them
    # a held-out question (one is also in the training file).
    prompted_bodies = [b["messages"] for b in gw.engine.bodies
                       if b.get("messages", [{}])[0].get("role") == "system"]
    assert len(prompted_bodies) == 3
    engine_shots = [m["content"] for m in prompted_bodies[0][1:-1]]
    loss_shots = [m["content"] for m in stand_ins["prompted_examples"][0]["messages"][1:-2]]
    assert engine_shots == loss_shots and len(engine_shots) == 4
    assert not set(engine_shots) & set(QUESTIONS)
    assert [m.get("weight", 1) for m in stand_ins["prompted_examples"][0]["messages"]
            if m["role"] == "assistant"] == [0, 0, 1]


async def test_require_improvement_means_beating_the_prompted_baseline_too(
        gw: Gw, tokenizer, stand_ins, base_model_dir, tmp_path) -> None:
    stand_ins["losses"]["adapter"] = 1.7  # better than the base model, not the prompted one
    job = await run_job(gw, make_worker(gw, base_model_dir, tmp_path), {"metric": "loss"})
    assert job["status"] == "failed"
    assert job["error"]["code"] == "eval_not_improved", job["error"]
    assert "prompted baseline" in job["error"]["message"]
    assert job["fine_tuned_model"] is None
    assert job["evaluation"]["improved"] is False
    assert job["evaluation"]["best"] == "prompted"
    # The version it registered to be evaluated is gone again.
    r = await gw.admin("GET", "/admin/tenants/acme/adapters/bot/versions/1")
    gw.expect_error(r, 404)


async def test_without_a_gateway_the_report_has_the_losses_and_says_why(
        gw: Gw, tokenizer, stand_ins, base_model_dir, tmp_path) -> None:
    worker = make_worker(gw, base_model_dir, tmp_path, transport=Unreachable())
    job = await run_job(gw, worker, {"metric": "loss"})
    assert job["status"] == "succeeded", job["error"]
    report = job["evaluation"]
    assert {k: m["loss"] for k, m in report["models"].items()} == {
        "base": 2.0, "prompted": 1.5, "bot@1": 1.0}
    assert all(m["f1"] is None for m in report["models"].values())
    assert report["improved"] is True
    assert "unreachable" in report["errors"][0]


async def test_a_metric_that_could_not_be_measured_fails_the_job_clearly(
        gw: Gw, tokenizer, stand_ins, base_model_dir, tmp_path) -> None:
    worker = make_worker(gw, base_model_dir, tmp_path, transport=Unreachable())
    job = await run_job(gw, worker, {"metric": "rouge_l"})
    assert job["status"] == "failed"
    assert job["error"]["code"] == "evaluation_failed", job["error"]
    assert "unreachable" in job["error"]["message"]


async def test_a_bad_evaluation_object_is_a_400_at_creation(gw: Gw, tokenizer) -> None:
    key = await gw.new_tenant("acme")
    headers = gw.headers("acme", key)
    train_id = (await upload(gw, headers, chat_lines([("q", "a")] * 12))).json()["id"]
    for evaluation, param in (({"metric": "bleu"}, "evaluation.metric"),
                              ({"few_shot": 99}, "evaluation.few_shot"),
                              ({"colour": "red"}, "evaluation.colour")):
        r = await gw.client.post(JOBS, headers=headers, json={
            "model": BASE_MODEL, "training_file": train_id, "evaluation": evaluation})
        assert gw.expect_error(r, 400)["param"] == param
