"""Recipe guard rails: what a job is warned about at creation (never refused for).

- `few_examples`: under MIN_EXAMPLES training examples, an adapter tends to memorise them
  rather than learn the task.
- `high_rank`: a rank over HIGH_RANK rarely helps a LoRA adapter, and costs every request the
  engine serves (vLLM sizes its LoRA kernels to the largest rank it accepts).
- `no_general_data`: a long run (LONG_RUN_STEPS optimizer steps or more) on the tenant's data
  alone drifts away from what the base model knew (catastrophic forgetting);
  `lora.general_data_ratio` mixes general instruction data in.
- `validation_overlap`: validation examples whose prompt is also in the training file make the
  held-out figures (and `require_improvement`) measure memory, not generalisation.

The files were validated line by line at upload, so parsing them again cannot fail here.
"""

from __future__ import annotations

import math
from typing import Any

from adapters.training.dataset import validate_jsonl
from adapters.training.evaluation import case_of
from adapters.training.recipe import TrainingRecipe

MIN_EXAMPLES = 500
HIGH_RANK = 64
LONG_RUN_STEPS = 1000


def _warning(code: str, param: str, message: str) -> dict[str, Any]:
    return {"code": code, "param": param, "message": message}


def estimated_steps(recipe: TrainingRecipe, examples: int) -> int:
    """Optimizer steps of the run, general data included."""
    mixed = examples + round(examples * recipe.lora.general_data_ratio)
    hp = recipe.hyperparameters
    return math.ceil(mixed / hp.batch_size) * hp.n_epochs


def rank_warnings(recipe: TrainingRecipe) -> list[dict[str, Any]]:
    if recipe.lora.r <= HIGH_RANK:
        return []
    return [_warning("high_rank", "lora.r",
                     f"lora.r is {recipe.lora.r}: ranks above {HIGH_RANK} rarely train a better "
                     "adapter and make the engine slower for every request; try 16 to 64")]


def data_warnings(recipe: TrainingRecipe, training: bytes,
                  validation: bytes | None) -> list[dict[str, Any]]:
    """Warnings about the training (and validation) data under this recipe."""
    examples = validate_jsonl(training, min_examples=0).examples
    found = []
    if len(examples) < MIN_EXAMPLES:
        found.append(_warning(
            "few_examples", "training_file",
            f"the training file has {len(examples)} examples; with fewer than {MIN_EXAMPLES} an "
            "adapter tends to memorise them instead of learning the task (add examples, or "
            "keep n_epochs low and check the evaluation report)"))
    steps = estimated_steps(recipe, len(examples))
    if steps >= LONG_RUN_STEPS and not recipe.lora.general_data_ratio:
        found.append(_warning(
            "no_general_data", "lora.general_data_ratio",
            f"a long run (about {steps} steps) on this data alone can make the model forget "
            "what it knew; set lora.general_data_ratio (e.g. 0.1) to mix general data in"))
    if validation is not None:
        held_out = validate_jsonl(validation, min_examples=0).examples
        trained = {_prompt_key(e) for e in examples}
        shared = sum(_prompt_key(e) in trained for e in held_out)
        if shared:
            found.append(_warning(
                "validation_overlap", "validation_file",
                f"{shared} of {len(held_out)} validation examples have a prompt that is also in "
                "the training file; the held-out figures then measure memory, not "
                "generalisation (remove them from one of the files)"))
    return found


def _prompt_key(example: dict[str, Any]) -> str:
    prompt = case_of(example).prompt
    return "\x00".join(f"{m['role']}\x01{' '.join(m['content'].split())}" for m in prompt)
