"""Padding-free packing (dataset.flatten): a batch as one row, position ids restarting per
example, a block-diagonal causal mask. On the real default model it gives the loss and the
gradients of the padded batch, and no example sees another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.base_model import ensure_default_model
from adapters.training.dataset import IGNORE_INDEX, collate, flatten, tokenize_example
from adapters.training.trainer import _batch_loss, _pad_id, load_tokenizer

MODEL_DIR = Path(__file__).resolve().parents[2] / ".cache" / "models" / "SmolLM2-135M-Instruct"
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}],
    [{"role": "user", "content": "What is the capital of France, and why is it famous?"},
     {"role": "assistant", "content": "Paris, for its art, food and the Eiffel tower."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
]


@pytest.fixture(scope="module")
def model_and_features() -> tuple[object, list[tuple[list[int], list[int]]], int]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ensure_default_model(MODEL_DIR.parent)
    tokenizer = load_tokenizer(MODEL_DIR)
    features = [tokenize_example(tokenizer, c, 256) for c in CONVERSATIONS]
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(MODEL_DIR),
                                                                dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                      target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    return model, features, _pad_id(tokenizer)


def test_flatten_lays_the_examples_end_to_end() -> None:
    batch = flatten([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4, 5], [4, 5])])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The first token of each example is never a target (nothing before it is its context).
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]]
    assert batch["tokens"] == 5
    assert batch["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]


def test_a_batch_over_the_row_limit_takes_several_rows() -> None:
    batch = flatten([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4, 5], [4, 5]), ([6], [6])],
                    row_tokens=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch["attention_mask"][1, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    padded = flatten([([1, 2, 3], [1, 2, 3]), ([4], [4])], row_tokens=3)
    assert padded["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert padded["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX] * 3]
    assert padded["tokens"] == 4
    # Every position attends at least to itself (no fully masked row: no NaN).
    assert padded["attention_mask"].diagonal(dim1=-2, dim2=-1).all()


def test_the_flat_batch_gives_the_padded_batchs_loss_and_gradients(model_and_features) -> None:
    model, features, pad_id = model_and_features
    results = []
    for batch in (collate(features, pad_id), flatten(features), flatten(features, 64)):
        model.zero_grad()
        loss, count = _batch_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), count, grads))
    padded, n_padded, g_padded = results[0]
    assert n_padded > 0
    for flat, n_flat, g_flat in results[1:]:  # one row, and one row per example
        assert n_flat == n_padded
        torch.testing.assert_close(flat, padded, rtol=1e-4, atol=1e-5)
        for name, grad in g_padded.items():
            torch.testing.assert_close(g_flat[name], grad, rtol=1e-3, atol=1e-6)


def test_no_example_attends_to_another(model_and_features) -> None:
    """The logits of the second example are the same alone and after another one."""
    model, features, _ = model_and_features
    with torch.no_grad():
        alone = model(**{k: v for k, v in flatten(features[1:2]).items()
                         if k in ("input_ids", "attention_mask", "position_ids")}).logits
        after = model(**{k: v for k, v in flatten(features[:2]).items()
                         if k in ("input_ids", "attention_mask", "position_ids")}).logits
    torch.testing.assert_close(after[:, len(features[0][0]):], alone, rtol=1e-4, atol=1e-4)
