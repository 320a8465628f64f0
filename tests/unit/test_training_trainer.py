"""The LoRA trainer on the real base model (SmolLM2-135M-Instruct) with real PEFT, on the CPU.

Runs are tiny (10 examples, batch 4, 2 epochs = 6 steps, short sequences, one thread). One
uninterrupted run is shared by several tests, and is also the reference a stopped-and-resumed
run must reproduce exactly.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import load_file

from adapters.base_model import BaseModelInfo
from adapters.training.trainer import (
    STATE_FILE,
    Progress,
    TrainConfig,
    TrainingError,
    TrainingStopped,
    build_optimizer,
    build_peft_model,
    build_scheduler,
    checkpoints,
    evaluate,
    latest_checkpoint,
    load_checkpoint,
    split_holdout,
    train,
)
from adapters.validation import AdapterLimits, validate_adapter

MODEL_DIR = Path(__file__).resolve().parents[2] / ".cache" / "models" / "SmolLM2-135M-Instruct"
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = ["Hello!", "How are you?", "What time is it?", "Where is the ship?", "Who are you?",
             "Is it raining?", "Can you help me?", "What is your name?", "Any news?", "Good night",
             "Where are we going?", "What is for dinner?"]


def pirate(question: str) -> dict:
    return {"messages": [{"role": "system", "content": "Answer."},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": "Arr matey!"}]}


TRAIN = [pirate(q) for q in QUESTIONS[:10]]
HELD_OUT = [pirate(q) for q in QUESTIONS[10:]]
CONFIG = TrainConfig(base_model_name=BASE_NAME, r=8, alpha=16, epochs=2, batch_size=4,
                     learning_rate=2e-3, max_seq_len=48, seed=7, checkpoint_every_steps=100)
TOTAL_STEPS = 6  # ceil(10 / 4) * 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared
    if not (MODEL_DIR / "model.safetensors").is_file():
        from adapters.base_model import ensure_default_model

        ensure_default_model(MODEL_DIR.parent)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted run: (result, progress reports, work_dir)."""
    work_dir = tmp_path_factory.mktemp("uninterrupted")
    reports: list[Progress] = []
    result = train(MODEL_DIR, TRAIN, CONFIG, work_dir, on_progress=reports.append)
    return result, reports, work_dir


def test_training_lowers_the_loss_and_reports_progress(trained):
    result, reports, _ = trained
    assert [p.step for p in reports] == list(range(1, TOTAL_STEPS + 1))
    assert {p.total_steps for p in reports} == {TOTAL_STEPS}
    assert [p.epoch for p in reports] == [1, 1, 1, 2, 2, 2]
    assert all(p.tokens_per_s > 0 and p.loss > 0 for p in reports)
    assert result.steps == TOTAL_STEPS and result.resumed_from == 0
    first_epoch = sum(p.loss for p in reports[:3]) / 3
    assert result.train_loss == pytest.approx(sum(p.loss for p in reports[3:]) / 3)
    assert result.train_loss < 0.5 * first_epoch, [p.loss for p in reports]
    assert reports[-1].loss < reports[0].loss
    assert result.trained_tokens > 0 and result.tokens_per_s > 0 and result.seconds > 0


def test_saved_adapter_is_a_servable_peft_folder(trained):
    result, _, work_dir = trained
    assert result.adapter_dir == work_dir / "adapter"
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_NAME
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert not config.get("modules_to_save")
    assert not config.get("use_dora")
    assert config.get("bias", "none") == "none"
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # The registration checks the server runs (names, shapes, features vLLM can serve).
    validated = validate_adapter(result.adapter_dir, BaseModelInfo.from_folder(MODEL_DIR),
                                 AdapterLimits(max_rank=64, max_weights_bytes=1 << 30))
    assert validated.spec.rank == 8 and validated.spec.base_model == BASE_NAME
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert len(weights) == 30 * 4 * 2  # layers x targets x (A, B)
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)  # trained


def test_evaluate_adapter_beats_base_on_held_out_data(trained):
    result, _, _ = trained
    base = evaluate(MODEL_DIR, HELD_OUT, None, max_seq_len=48)
    tuned = evaluate(MODEL_DIR, HELD_OUT, result.adapter_dir, max_seq_len=48)
    assert base.tokens == tuned.tokens == 2 * 5  # "Arr matey!" (4 tokens) + <|im_end|>, twice
    assert tuned.loss < base.loss
    assert tuned.perplexity == pytest.approx(torch.tensor(tuned.loss).exp().item(), rel=1e-5)


def test_stop_then_resume_continues_the_same_run(trained, tmp_path):
    reference, _, _ = trained
    config = TrainConfig(**{**CONFIG.__dict__, "checkpoint_every_steps": 1})
    first: list[int] = []
    with pytest.raises(TrainingStopped) as stopped:
        train(MODEL_DIR, TRAIN, config, tmp_path, on_progress=lambda p: first.append(p.step),
              should_stop=lambda: len(first) >= 3)
    assert first == [1, 2, 3]
    assert stopped.value.step == 3
    # A checkpoint every step, the last two kept, no half-written folder, no adapter yet.
    assert [p.name for p in checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert stopped.value.checkpoint == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-3"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert (stopped.value.checkpoint / STATE_FILE).is_file()
    assert not (tmp_path / "adapter").exists()

    # Loading the checkpoint restores Adam's moments and the schedule at step 3.
    model = build_peft_model(MODEL_DIR, config)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, TOTAL_STEPS)
    state = load_checkpoint(latest_checkpoint(tmp_path), model, optimizer, scheduler)
    assert state["step"] == 3 and len(state["losses"]) == 3
    moments = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
    assert moments and all(int(m["step"]) == 3 for m in moments)
    assert all(float(m["exp_avg_sq"].abs().sum()) > 0 for m in moments)
    assert scheduler.last_epoch == 3
    del model, optimizer, scheduler

    # Resuming: steps 4..6 only, and the same adapter as the uninterrupted run.
    second: list[Progress] = []
    result = train(MODEL_DIR, TRAIN, config, tmp_path, on_progress=second.append)
    assert [p.step for p in second] == [4, 5, 6]
    assert result.resumed_from == 3 and result.steps == TOTAL_STEPS == reference.steps
    assert result.trained_tokens == reference.trained_tokens
    assert result.train_loss == pytest.approx(reference.train_loss, rel=1e-4)
    ours = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    theirs = load_file(str(reference.adapter_dir / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)

    # A work_dir holding another run's checkpoints is refused rather than mixed in.
    with pytest.raises(TrainingError, match="another run"):
        train(MODEL_DIR, TRAIN[:8], config, tmp_path)


def test_loraplus_gives_lora_b_its_own_learning_rate():
    config = TrainConfig(base_model_name=BASE_NAME, r=4, learning_rate=1e-4, loraplus_lr_ratio=16)
    model = build_peft_model(MODEL_DIR, config)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, config)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, pytest.approx(16e-4)]
    group_a, group_b = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
    assert group_a and all("lora_A" in n for n in group_a)
    assert group_b and all("lora_B" in n for n in group_b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(group_a) | set(group_b) == trainable
    # The schedule scales both groups and keeps the ratio.
    scheduler = build_scheduler(optimizer, config, total_steps=20)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lr_a, lr_b = (g["lr"] for g in optimizer.param_groups)
    assert lr_a > 0 and lr_b == pytest.approx(16 * lr_a)
    # Without LoRA+: one group at the base learning rate.
    plain = build_optimizer(model, TrainConfig(base_model_name=BASE_NAME, learning_rate=1e-4))
    assert [g["lr"] for g in plain.param_groups] == [1e-4]


def test_config_is_checked():
    config = TrainConfig(**json.loads(json.dumps({"base_model_name": BASE_NAME, "r": 4,
                                                  "target_modules": ["q_proj", "v_proj"]})))
    assert config.target_modules == ("q_proj", "v_proj") and config.alpha == 32
    with pytest.raises(TrainingError, match="r must be an integer >= 1.*learning_rate"):
        TrainConfig(base_model_name=BASE_NAME, r=0, learning_rate=-1.0)
    with pytest.raises(TrainingError, match="base_model_name"):
        TrainConfig(base_model_name="")
    with pytest.raises(TypeError):
        TrainConfig(16, base_model_name=BASE_NAME)  # keyword-only


def test_split_holdout():
    examples = [pirate(q) for q in QUESTIONS]
    rest, held = split_holdout(examples, fraction=0.25, seed=3)
    assert len(held) == 3 and len(rest) == 9
    assert sorted(map(json.dumps, rest + held)) == sorted(map(json.dumps, examples))
    assert split_holdout(examples, fraction=0.25, seed=3) == (rest, held)
    assert len(split_holdout(examples[:3], fraction=0.01, seed=0)[1]) == 1  # at least one
    with pytest.raises(TrainingError):
        split_holdout(examples[:1])


def test_bad_inputs_are_training_errors(tmp_path):
    with pytest.raises(TrainingError, match="no training examples"):
        train(MODEL_DIR, [], CONFIG, tmp_path)
    with pytest.raises(TrainingError, match="not a model folder"):
        train(tmp_path, TRAIN, CONFIG, tmp_path)
    long_prompt = {"prompt": "word " * 200, "completion": "Arr!"}
    with pytest.raises(TrainingError, match="no example has an assistant token"):
        train(MODEL_DIR, [long_prompt], CONFIG, tmp_path)


def test_load_in_4bit(tmp_path):
    config = TrainConfig(**{**CONFIG.__dict__, "load_in_4bit": True, "epochs": 1})
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(TrainingError, match="load_in_4bit needs bitsandbytes"):
            train(MODEL_DIR, TRAIN[:4], config, tmp_path)
        assert not (tmp_path / "adapter").exists()
    else:
        result = train(MODEL_DIR, TRAIN[:4], config, tmp_path)
        assert result.steps == 1
        assert (result.adapter_dir / "adapter_model.safetensors").is_file()
