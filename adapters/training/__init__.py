"""LoRA fine-tuning: the recipe (`recipe`) and dataset validation (`dataset`), no torch needed;
the trainer (`trainer`); the job queue (`jobs`) and the worker (`worker`).

`from adapters.training import train` works, but imports torch, transformers and PEFT only when
a trainer name is first used, so validating an upload stays light.
"""

from __future__ import annotations

from typing import Any

from adapters.training.dataset import (
    DatasetReport,
    LineError,
    collate,
    mix_general,
    to_messages,
    tokenize_example,
    validate_jsonl,
)
from adapters.training.recipe import (
    BASE_LEARNING_RATE,
    Hyperparameters,
    LoraRecipe,
    ResolvedHyperparameters,
    TrainingRecipe,
)

_TRAINER_NAMES = ("EvalResult", "Progress", "TrainConfig", "TrainResult", "TrainingError",
                  "TrainingStopped", "evaluate", "split_holdout", "train")

__all__ = ["BASE_LEARNING_RATE", "DatasetReport", "Hyperparameters", "LineError", "LoraRecipe",
           "ResolvedHyperparameters", "TrainingRecipe", "collate", "mix_general", "to_messages",
           "tokenize_example", "validate_jsonl", *_TRAINER_NAMES]


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from adapters.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
