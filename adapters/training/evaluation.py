"""Evaluation reports: held-out examples answered by several models side by side.

    held-out example            its conversation up to the last trained assistant turn is the
                                prompt (`Case.prompt`); that turn's text is the reference
    models                      "base" (the base model as is), "prompted" (the base model
                                with a system prompt and k few-shot turns from the training
                                data, `prompted_messages`), and adapter versions by name
    generation                  greedy, through the serving engine (server/evaluation.py)
    scores (`score`)            exact match, token F1, ROUGE-L (adapters/training/metrics.py),
                                mean output length; held-out loss where the worker computed it
    report (`EvaluationReport`) one `ModelScores` per model, a few examples side by side

`beats` answers require_improvement: the adapter beats the base model and the prompted
baseline on the chosen metric (lower loss, higher anything else).

No torch here: the gateway builds reports too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.training.dataset import to_messages
from adapters.training.metrics import exact_match, rouge_l, token_f1

Metric = Literal["loss", "exact_match", "f1", "rouge_l"]
Kind = Literal["base", "prompted", "adapter"]
LOWER_IS_BETTER: frozenset[str] = frozenset({"loss"})
BASE_KEY, PROMPTED_KEY = "base", "prompted"
DEFAULT_SYSTEM_PROMPT = ("You are a helpful assistant. Answer in exactly the style, format and "
                         "length of the example answers.")


class EvaluationSettings(BaseModel):
    """How an evaluation runs: a job's `evaluation` object (loraplex's extension), and the
    settings of an on-demand evaluation. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    metric: Metric = "loss"
    """What `require_improvement` compares (and `best` names): loss, exact_match, f1, rouge_l."""
    system_prompt: str | None = Field(default=None, max_length=8000)
    """The prompted baseline's system prompt; without it, a generic instruction to follow the
    examples' style."""
    few_shot: int = Field(default=3, ge=0, le=16)
    """Training examples given to the prompted baseline as earlier turns."""
    max_tokens: int = Field(default=256, ge=1, le=4096)
    """Longest answer generated per example."""
    max_examples: int = Field(default=100, ge=1, le=1000)
    """Held-out examples evaluated (the first ones of the file)."""
    shown_examples: int = Field(default=3, ge=0, le=20)
    """Examples shown side by side in the report."""

    @property
    def prompt(self) -> str:
        return self.system_prompt if self.system_prompt is not None else DEFAULT_SYSTEM_PROMPT


class ModelScores(BaseModel):
    """One model's column of the report. A metric is None where it does not apply (loss of a
    model evaluated only through the engine) or could not be measured."""

    model: str
    """The model called: the base model's name or `<adapter>@<version>`."""
    kind: Kind
    exact_match: float | None = None
    f1: float | None = None
    rouge_l: float | None = None
    loss: float | None = None
    """Mean cross-entropy of the reference answers' tokens (computed by the training worker)."""
    mean_output_tokens: float | None = None
    mean_output_chars: float | None = None
    failed: int = 0
    """Examples whose generation failed (scored 0)."""


class Sample(BaseModel):
    """One held-out example side by side."""

    prompt: list[dict[str, Any]]
    reference: str
    outputs: dict[str, str | None]


class EvaluationReport(BaseModel):
    object: Literal["evaluation"] = "evaluation"
    examples: int
    metric: Metric
    models: dict[str, ModelScores]
    """Keyed "base", "prompted", and each adapter's `<name>@<version>`."""
    best: str | None = None
    """The key of the best model on `metric` (None if no model has that figure)."""
    samples: list[Sample] = Field(default_factory=list)
    baseline: dict[str, Any] | None = None
    """The prompted baseline's system prompt and few-shot count."""
    improved: bool | None = None
    """Jobs only: the adapter beats the base model and the prompted baseline on `metric`."""
    errors: list[str] = Field(default_factory=list)
    """What could not be measured, and why (e.g. the serving engine was unreachable)."""


@dataclass(frozen=True)
class Case:
    """A held-out example as a question: the prompt and the reference answer."""

    prompt: list[dict[str, Any]]
    reference: str
    full: list[dict[str, Any]]  # every message, for the loss


def case_of(example: dict[str, Any]) -> Case:
    """The prompt is everything before the last trained assistant turn (a validated example
    has one), the reference is that turn's content."""
    messages = to_messages(example)
    last = max(i for i, m in enumerate(messages)
               if m["role"] == "assistant" and m.get("weight", 1))
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    return Case(prompt=prompt, reference=messages[last]["content"], full=messages)


def pick_shots(pool: Sequence[dict[str, Any]], k: int, seed: int,
               avoid: Sequence[Case] = ()) -> list[Case]:
    """k examples of `pool` (seeded), none with the prompt of an evaluated case (that would
    hand the baseline the answer)."""
    banned = {_key(c.prompt) for c in avoid}
    candidates = [c for c in map(case_of, pool) if _key(c.prompt) not in banned]
    random.Random(seed).shuffle(candidates)
    return candidates[:k]


def _key(messages: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in messages)


def prompted_messages(messages: list[dict[str, Any]], system_prompt: str,
                      shots: Sequence[Case]) -> list[dict[str, Any]]:
    """The base model well prompted: one system message (ours, then the conversation's own),
    the shots as earlier turns (their answers out of any loss: weight 0), then the
    conversation."""
    own_system = [m["content"] for m in messages if m["role"] == "system"]
    system = "\n\n".join([system_prompt, *own_system]).strip()
    turns: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for shot in shots:
        turns += [{"role": m["role"], "content": m["content"]} for m in shot.prompt
                  if m["role"] != "system"]
        turns.append({"role": "assistant", "content": shot.reference, "weight": 0})
    return turns + [m for m in messages if m["role"] != "system"]


@dataclass
class Output:
    """One generated answer: its text (None if generation failed, and why) and its tokens."""

    text: str | None
    tokens: int | None = None
    error: str | None = None


def score(model: str, kind: Kind, cases: Sequence[Case], outputs: Sequence[Output],
          loss: float | None = None) -> ModelScores:
    """A model's column: metric means over every case (a failed one scores 0)."""
    if len(cases) != len(outputs):
        raise ValueError("one output per case")
    n = max(len(cases), 1)
    done = [(c, o.text) for c, o in zip(cases, outputs, strict=True) if o.text is not None]
    counted = [o.tokens for o in outputs if o.text is not None and o.tokens is not None]
    return ModelScores(
        model=model, kind=kind, loss=loss, failed=len(cases) - len(done),
        exact_match=sum(exact_match(t, c.reference) for c, t in done) / n,
        f1=sum(token_f1(t, c.reference) for c, t in done) / n,
        rouge_l=sum(rouge_l(t, c.reference) for c, t in done) / n,
        mean_output_tokens=sum(counted) / len(counted) if counted else None,
        mean_output_chars=sum(len(t) for _, t in done) / len(done) if done else None)


def best(models: dict[str, ModelScores], metric: str) -> str | None:
    figures = {k: getattr(m, metric) for k, m in models.items() if getattr(m, metric) is not None}
    if not figures:
        return None
    pick = min if metric in LOWER_IS_BETTER else max
    return pick(figures, key=lambda k: figures[k])


def beats(candidate: ModelScores, others: Sequence[ModelScores], metric: str) -> bool:
    """Strictly better than every one of `others` on `metric`; False where a figure is
    missing (nothing proves it better)."""
    mine = getattr(candidate, metric)
    if mine is None:
        return False
    for other in others:
        theirs = getattr(other, metric)
        if theirs is None:
            return False
        if not (mine < theirs if metric in LOWER_IS_BETTER else mine > theirs):
            return False
    return True
