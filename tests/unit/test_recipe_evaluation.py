"""Evaluation reports through the gateway (server/evaluation.py) on the stand-in engine,
scripted to answer each model differently: the figures agree with a direct computation on a
tiny file, the prompted baseline gets its system prompt and few-shot turns, and bad input gets
a clear 4xx. The metrics themselves are checked against hand-computed values."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapters.training.evaluation import (
    ModelScores,
    beats,
    case_of,
    prompted_messages,
)
from adapters.training.metrics import exact_match, normalize, rouge_l, token_f1
from tests.unit.conftest import BASE_MODEL, FakeEngine, Gw
from tests.unit.test_fine_tuning_api import tokenizer as tokenizer  # a fixture
from tests.unit.test_fine_tuning_api import upload

EVALS = "/v1/fine_tuning/evaluations"
QUESTIONS = ["What is the capital of France?", "What is the largest planet?",
             "What color is the sky?"]
REFERENCES = ["Paris.", "Jupiter is the largest planet.", "The sky is blue."]
ANSWERS = {  # what each model says to each question
    "base": ["Paris", "Planet largest is Jupiter", "Blue."],
    "prompted": ["Paris.", "Jupiter.", "The sky is blue!"],
    "adapter": REFERENCES,
}
# By hand (SQuAD normalisation: lower case, no punctuation, no articles):
#   base:     EM 1,0,0   F1 1, 1 (same bag of 4 tokens), 1/2   ROUGE-L 1, 1/4 (LCS 1 of 4), 1/2
#   prompted: EM 1,0,1   F1 1, 2/5 (1 of 1 vs 1 of 4), 1       ROUGE-L 1, 2/5, 1
#   adapter:  EM 1,1,1   F1 1,1,1                              ROUGE-L 1,1,1
EXPECTED = {
    "base": {"exact_match": 1 / 3, "f1": (1 + 1 + 0.5) / 3, "rouge_l": (1 + 0.25 + 0.5) / 3},
    "prompted": {"exact_match": 2 / 3, "f1": (1 + 0.4 + 1) / 3, "rouge_l": (1 + 0.4 + 1) / 3},
    "adapter": {"exact_match": 1.0, "f1": 1.0, "rouge_l": 1.0},
}


def chat_lines(pairs: list[tuple[str, str]]) -> bytes:
    return "\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]})
                     for q, a in pairs).encode()


class ScriptedEngine(FakeEngine):
    """Answers each question as the model it is asked of would (see ANSWERS); the usage
    counts one token per word."""

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append({"path": request.url.path, "body": body})
        if self.fail_status is not None:
            return self._error(self.fail_status, "injected engine failure")
        model = body["model"]
        if model != self.base_model and model not in self.loaded:
            return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
        kind = ("adapter" if model != self.base_model else
                "prompted" if body["messages"][0]["role"] == "system" else "base")
        question = body["messages"][-1]["content"]
        text = (ANSWERS[kind][QUESTIONS.index(question)] if question in QUESTIONS
                else "I do not know.")
        words = len(text.split())
        return JSONResponse({
            "id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": words,
                      "total_tokens": 9 + words}})


@pytest.fixture
def fake_engine() -> FakeEngine:
    return ScriptedEngine()


@pytest.fixture
async def acme(gw: Gw, tokenizer, make_adapter: Callable[..., Path]) -> dict[str, str]:
    key = await gw.new_tenant("acme")
    await gw.register("acme", "bot", make_adapter())
    return gw.headers("acme", key)


async def files(gw: Gw, headers: dict[str, str]) -> tuple[str, str]:
    held_out = chat_lines(list(zip(QUESTIONS, REFERENCES, strict=True)))
    training = chat_lines([(f"Training question {i}?", f"Training answer {i}.")
                           for i in range(6)] + [(QUESTIONS[0], REFERENCES[0])])
    r1, r2 = await upload(gw, headers, held_out), await upload(gw, headers, training)
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    return r1.json()["id"], r2.json()["id"]


# -- the metrics ------------------------------------------------------------------------------

def test_metrics_against_hand_computed_values() -> None:
    assert normalize("The  Sky, is BLUE!") == "sky is blue"
    assert exact_match("Paris", "paris.") == 1.0 and exact_match("Paris!", "Rome") == 0.0
    assert token_f1("It is Saturn.", "Jupiter is the largest planet.") == pytest.approx(2 / 7)
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("x", "") == 0.0
    assert rouge_l("planet largest is jupiter", "jupiter is largest planet") == 0.25
    # LCS "a b d" (3) of 4 and 5 tokens: P 3/4, R 3/5.
    assert rouge_l("x1 x2 x4 x3", "x1 y x2 x3 z") == pytest.approx(2 * 0.75 * 0.6 / 1.35)


def test_beats_needs_a_strictly_better_figure_than_every_baseline() -> None:
    def col(**figures: float | None) -> ModelScores:
        return ModelScores(model="m", kind="adapter", **figures)

    assert beats(col(loss=1.0), [col(loss=2.0), col(loss=1.5)], "loss")
    assert not beats(col(loss=1.5), [col(loss=2.0), col(loss=1.5)], "loss")  # a tie
    assert beats(col(f1=0.9), [col(f1=0.5), col(f1=0.8)], "f1")
    assert not beats(col(f1=0.9), [col(f1=0.5), col(f1=None)], "f1")  # nothing to compare


def test_the_prompted_conversation_keeps_the_shots_out_of_the_loss() -> None:
    shot = case_of({"prompt": "2+2?", "completion": "4"})
    messages = prompted_messages([{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "3+3?"}], "Follow them.", [shot])
    assert messages == [
        {"role": "system", "content": "Follow them.\n\nBe brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "weight": 0},
        {"role": "user", "content": "3+3?"}]


# -- through the API --------------------------------------------------------------------------

async def test_report_figures_agree_with_a_direct_computation(gw: Gw, acme) -> None:
    held_out, training = await files(gw, acme)
    r = await gw.client.post(EVALS, headers=acme, json={
        "models": [BASE_MODEL, "bot@1"], "validation_file": held_out,
        "training_file": training, "few_shot": 2, "system_prompt": "Answer like the examples.",
        "metric": "rouge_l", "max_tokens": 32, "shown_examples": 2})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["object"] == "evaluation" and report["examples"] == 3
    assert set(report["models"]) == {"base", "prompted", "bot@1"}
    columns = {"base": "base", "prompted": "prompted", "bot@1": "adapter"}
    for key, kind in columns.items():
        column = report["models"][key]
        assert column["kind"] == kind and column["loss"] is None and column["failed"] == 0
        for metric, value in EXPECTED[kind].items():
            assert column[metric] == pytest.approx(value), (key, metric)
        answers = ANSWERS[kind]
        assert column["mean_output_tokens"] == pytest.approx(
            sum(len(a.split()) for a in answers) / 3)
        assert column["mean_output_chars"] == pytest.approx(sum(map(len, answers)) / 3)
    assert report["models"]["bot@1"]["model"] == "bot@1"
    assert report["models"]["prompted"]["model"] == BASE_MODEL
    assert report["best"] == "bot@1" and report["metric"] == "rouge_l"
    assert report["baseline"] == {"system_prompt": "Answer like the examples.", "few_shot": 2}
    assert [s["reference"] for s in report["samples"]] == REFERENCES[:2]
    assert report["samples"][1]["outputs"] == {"base": ANSWERS["base"][1],
                                               "prompted": ANSWERS["prompted"][1],
                                               "bot@1": REFERENCES[1]}
    assert report["errors"] == []

    # What the engine was asked: greedy, the length cap, and for the prompted baseline the
    # system prompt then two training examples as turns (never a held-out question).
    bodies = [b for b in gw.engine.bodies if "messages" in b]
    assert len(bodies) == 9
    assert all(b["temperature"] == 0 and b["max_tokens"] == 32 for b in bodies)
    prompted = [b["messages"] for b in bodies if b["messages"][0]["role"] == "system"]
    assert len(prompted) == 3
    for messages in prompted:
        assert messages[0] == {"role": "system", "content": "Answer like the examples."}
        shots = messages[1:-1]
        assert [m["role"] for m in shots] == ["user", "assistant"] * 2
        assert all(m["content"].startswith("Training") for m in shots)
        assert all(set(m) == {"role", "content"} for m in messages)


async def test_inline_examples_and_the_admin_endpoint(gw: Gw, acme) -> None:
    body = {"models": ["base", "bot"], "prompted_baseline": False,
            "examples": [{"prompt": q, "completion": a}
                         for q, a in zip(QUESTIONS, REFERENCES, strict=True)]}
    r = await gw.admin("POST", "/admin/tenants/acme/evaluations", json=body)
    assert r.status_code == 200, r.text
    report = r.json()
    assert set(report["models"]) == {"base", "bot"} and report["baseline"] is None
    assert report["models"]["bot"]["exact_match"] == 1.0
    assert report["models"]["base"]["f1"] == pytest.approx(EXPECTED["base"]["f1"])
    # The admin token is needed, and the tenant must exist.
    gw.expect_error(await gw.client.post("/admin/tenants/acme/evaluations", json=body), 401)
    gw.expect_error(await gw.admin("POST", "/admin/tenants/nobody/evaluations", json=body), 404)


@pytest.mark.parametrize(("change", "status", "param", "needle"), [
    ({"models": ["nope@3"]}, 404, "model", "nope"),
    ({"models": ["bot@7"]}, 404, None, "bot"),
    ({"models": []}, 400, "models", None),
    ({"models": ["base", "base"]}, 400, "models", "twice"),
    ({"models": ["prompted"]}, 400, "models", "prompted_baseline"),
    ({"metric": "bleu"}, 400, "metric", None),
    ({"max_tokens": 0}, 400, "max_tokens", None),
    ({"surprise": 1}, 400, "surprise", None),
    ({"validation_file": "file-nope"}, 404, "file_id", None),
    ({"validation_file": None}, 400, "validation_file", "held-out"),
    ({"examples": [{"prompt": "hi", "completion": "x"}]}, 400, "examples", "not both"),
    ({"validation_file": None, "examples": [{"prompt": "hi"}, {"foo": 1}]}, 400, "examples",
     "example 1"),
    ({"training_file": None}, 400, "training_file", "few-shot"),
])
async def test_bad_requests_get_clear_4xx(gw: Gw, acme, change: dict[str, Any], status: int,
                                          param: str | None, needle: str | None) -> None:
    held_out, training = await files(gw, acme)
    body = {"models": ["base", "bot@1"], "validation_file": held_out,
            "training_file": training, **change}
    err = gw.expect_error(await gw.client.post(EVALS, headers=acme, json=body), status,
                          contains=needle)
    if param is not None:
        assert err["param"] == param, err
    assert not [b for b in gw.engine.bodies if "messages" in b]  # nothing was generated


async def test_another_tenants_adapter_and_files_do_not_exist(gw: Gw, acme) -> None:
    held_out, training = await files(gw, acme)
    other = gw.headers("other", await gw.new_tenant("other"))
    body = {"models": ["bot@1"], "prompted_baseline": False, "validation_file": held_out}
    gw.expect_error(await gw.client.post(EVALS, headers=other, json=body), 404)
    body["examples"], body["validation_file"] = [{"prompt": "a", "completion": "b"}], None
    gw.expect_error(await gw.client.post(EVALS, headers=other, json=body), 404)
    gw.expect_error(await gw.client.post(EVALS, json=body), 401)


async def test_a_failed_answer_scores_zero_and_is_counted(gw: Gw, acme) -> None:
    held_out, _ = await files(gw, acme)
    gw.engine.fail_status = 400  # the engine refuses every request
    r = await gw.client.post(EVALS, headers=acme, json={
        "models": ["base"], "validation_file": held_out, "prompted_baseline": False})
    assert r.status_code == 200, r.text
    column = r.json()["models"]["base"]
    assert column["failed"] == 3 and column["exact_match"] == 0.0
    assert column["mean_output_tokens"] is None
    assert r.json()["errors"]


async def test_an_evaluations_answers_are_metered_as_the_tenants_requests(gw: Gw, acme) -> None:
    held_out, training = await files(gw, acme)
    r = await gw.client.post(EVALS, headers=acme, json={
        "models": [BASE_MODEL, "bot@1"], "validation_file": held_out,
        "training_file": training, "few_shot": 2})
    assert r.status_code == 200, r.text
    assert await gw.services.usage.flush() is True
    usage = await gw.admin("GET", "/admin/tenants/acme/usage", params={"group_by": "adapter"})
    assert usage.status_code == 200, usage.text
    rows = {e["adapter"]: e for e in usage.json()["data"]}
    words = {kind: sum(len(a.split()) for a in answers) for kind, answers in ANSWERS.items()}
    base, adapter = rows.pop(None), rows.popitem()[1]
    assert not rows
    assert (base["requests"], base["errors"]) == (6, 0)  # the base model, plain and prompted
    assert base["prompt_tokens"] == 6 * 9
    assert base["completion_tokens"] == words["base"] + words["prompted"]
    assert (adapter["requests"], adapter["prompt_tokens"], adapter["completion_tokens"]) == (
        3, 3 * 9, words["adapter"])
