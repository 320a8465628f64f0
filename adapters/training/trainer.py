"""LoRA fine-tuning: a plain PyTorch loop around PEFT, with checkpoints and resume.

One call, `train(base_model, examples, config, work_dir)`, trains a LoRA adapter and saves it to
`work_dir/adapter/` (adapter_config.json + adapter_model.safetensors, what registration takes).

- The loss is the mean cross-entropy over assistant tokens only (labels from
  `dataset.tokenize_example`, which keep the end-of-turn/eos token in the loss). A step's
  examples are laid end to end in one row without padding (`config.packing`, the default:
  `dataset.flatten`, position ids restarting per example and a block-diagonal causal mask, as
  TRL's padding-free packing), which computes the same loss as the padded batch without
  computing the padding; with packing off they are right-padded with labels -100 and
  attention_mask 0, by position (the pad id is the eos id).
- Each epoch visits the examples in an order drawn from `config.seed`; the orders of all epochs
  are drawn up front and stored in every checkpoint.
- Checkpoints: `work_dir/checkpoints/step-N/` holds the adapter weights (safetensors) and
  `trainer_state.pt` (optimizer, scheduler, step, data orders, RNG states, loss history). Each is
  written under a temporary name and renamed; the last `KEEP_CHECKPOINTS` are kept. When `train`
  finds a checkpoint in `work_dir` it resumes from the latest: a resumed run follows the same
  steps as an uninterrupted one and ends at the same step count.
- `should_stop()` is asked after every step; when it answers True a checkpoint is saved and
  `TrainingStopped` raised. Calling `train` again with the same work_dir resumes.

Float32 on the CPU; on CUDA the base weights are bf16 (the LoRA weights stay float32). With
`load_in_4bit` the base model is loaded NF4-quantized through bitsandbytes (QLoRA).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapters.training.dataset import (
    IGNORE_INDEX,
    collate,
    flatten,
    to_messages,
    tokenize_example,
)

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2
STATE_FILE = "trainer_state.pt"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_GRAD_NORM = 1.0
_STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainingError(Exception):
    """Training cannot run (bad input, missing dependency, foreign checkpoints)."""


class TrainingStopped(Exception):
    """should_stop() asked to stop; a checkpoint was saved first (see `checkpoint`)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training stopped at step {step}"
                         + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        self.step = step
        self.checkpoint = checkpoint


@dataclass(kw_only=True)
class TrainConfig:
    """Hyperparameters (keyword-only; TrainConfig(**json_dict) works). Checked on creation."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False
    loraplus_lr_ratio: float | None = None  # LoRA+: lora_B learns at learning_rate * ratio
    learning_rate: float = 2e-4
    epochs: int = 3
    batch_size: int = 4
    warmup_ratio: float = 0.1
    max_seq_len: int = 512
    seed: int = 42
    load_in_4bit: bool = False
    checkpoint_every_steps: int = 10
    # Padding-free batches (`dataset.flatten`): the same loss, without computing padding.
    packing: bool = True
    base_model_name: str  # written into adapter_config.json base_model_name_or_path

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        problems = []
        if not self.base_model_name:
            problems.append("base_model_name must be set")
        for name in ("r", "epochs", "batch_size", "checkpoint_every_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_seq_len < 2:
            problems.append(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            problems.append(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            problems.append("target_modules must be a non-empty list of module names")
        if problems:
            raise TrainingError("; ".join(problems))

    def training_fields(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (not where or how often to save)."""
        fields = asdict(self)
        # packing changes how a batch is computed, not what it computes.
        for key in ("base_model_name", "checkpoint_every_steps", "packing"):
            fields.pop(key)
        fields["target_modules"] = list(fields["target_modules"])
        return fields


@dataclass
class Progress:
    step: int  # steps done, 1..total_steps
    total_steps: int
    epoch: int  # 1-based epoch of that step
    loss: float  # that step's mean assistant-token loss
    tokens_per_s: float  # tokens (padding excluded) per second in this call of train()


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    train_loss: float  # mean step loss over the last epoch
    trained_tokens: int  # tokens seen over all steps (padding excluded), resumed steps included
    tokens_per_s: float  # in this call of train()
    seconds: float  # wall time of this call of train()
    resumed_from: int = 0  # the checkpoint step this call resumed from (0: fresh start)
    skipped_examples: int = 0  # examples with no assistant token left within max_seq_len


@dataclass
class EvalResult:
    loss: float  # mean assistant-token cross-entropy
    perplexity: float
    tokens: int  # assistant tokens scored


# ------------------------------------------------------------------------------------ helpers


def split_holdout(examples: list[dict[str, Any]], fraction: float = 0.1,
                  seed: int = 42) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle and split off round(len * fraction) examples (at least 1) for evaluation."""
    if len(examples) < 2:
        raise TrainingError("need at least 2 examples to hold one out")
    if not 0 < fraction < 1:
        raise TrainingError("fraction must be between 0 and 1")
    count = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    holdout = [examples[i] for i in order[:count]]
    rest = [examples[i] for i in order[count:]]
    return rest, holdout


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _compute_dtype(dev: torch.device) -> torch.dtype:
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(base_model: Path) -> Any:
    from transformers import AutoTokenizer

    if not (base_model / "config.json").is_file():
        raise TrainingError(f"{base_model} is not a model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingError(f"the tokenizer of {base_model} has no chat template")
    return tokenizer


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def load_base_model(base_model: Path, *, load_in_4bit: bool = False) -> Any:
    """The base model on `device()`: float32 on the CPU, bf16 on CUDA, or NF4 with 4-bit."""
    from transformers import AutoModelForCausalLM

    dev = device()
    dtype = _compute_dtype(dev)
    if load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainingError("load_in_4bit needs bitsandbytes (pip install bitsandbytes), "
                                "which is not installed; train without load_in_4bit instead")
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype,
                                                     quantization_config=quantization,
                                                     device_map={"": str(dev)})
        model = prepare_model_for_kbit_training(
            model, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype)
        model = model.to(dev)  # type: ignore[arg-type]  # transformers types .to() narrowly
    model.config.use_cache = False
    return model


def build_peft_model(base_model: Path, config: TrainConfig) -> Any:
    """Base model + a fresh LoRA adapter named "default" (initialised from config.seed)."""
    from peft import LoraConfig, get_peft_model

    model = load_base_model(base_model, load_in_4bit=config.load_in_4bit)
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), use_rslora=config.use_rslora,
                      bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:  # e.g. a target module the model does not have
        raise TrainingError(f"cannot add LoRA to the base model: {exc}") from exc
    peft_model.peft_config["default"].base_model_name_or_path = config.base_model_name
    return peft_model


def build_optimizer(model: Any, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable (LoRA) weights; with LoRA+ lora_B gets its own, larger lr."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.loraplus_lr_ratio is None:
        groups = [{"params": [p for _, p in params], "lr": config.learning_rate}]
    else:
        groups = [
            {"params": [p for n, p in params if "lora_B" not in n], "lr": config.learning_rate},
            {"params": [p for n, p in params if "lora_B" in n],
             "lr": config.learning_rate * config.loraplus_lr_ratio},
        ]
    return torch.optim.AdamW(groups, weight_decay=0.0)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    from transformers import get_cosine_schedule_with_warmup

    warmup = math.ceil(total_steps * config.warmup_ratio)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def _fingerprint(examples: list[dict[str, Any]], config: TrainConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(config.training_fields(), sort_keys=True).encode())
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# -------------------------------------------------------------------------------- checkpoints


def checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints in work_dir, oldest first."""
    root = work_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and (path / STATE_FILE).is_file() and (path / ADAPTER_FILES[1]).is_file():
            found.append((int(m.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(work_dir: Path) -> Path | None:
    found = checkpoints(work_dir)
    return found[-1] if found else None


def save_checkpoint(work_dir: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: dict[str, Any]) -> Path:
    """Write checkpoints/step-N under a temporary name, rename it, keep the last few."""
    root = work_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']}"
    staging = root / f".step-{state['step']}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True, save_embedding_layers=False)
    (staging / "README.md").unlink(missing_ok=True)
    torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state()}, staging / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in checkpoints(work_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(checkpoint: Path, model: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG states; return the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("version") != _STATE_VERSION:
        raise TrainingError(f"{checkpoint} was written by another trainer version")
    weights = load_file(str(checkpoint / ADAPTER_FILES[1]), device=str(device()))
    result: Any = set_peft_model_state_dict(model, weights)  # torch's load-result tuple
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise TrainingError(f"{checkpoint} does not fit the model: missing {missing[:3]}, "
                            f"unexpected {list(result.unexpected_keys)[:3]}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    restored: dict[str, Any] = state
    return restored


def save_adapter(model: Any, target: Path, base_model_name: str) -> Path:
    """adapter_config.json + adapter_model.safetensors, written aside and renamed into place."""
    model.peft_config["default"].base_model_name_or_path = base_model_name
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    # save_embedding_layers=False: PEFT would otherwise look the base model up on the hub.
    model.save_pretrained(str(staging), safe_serialization=True, save_embedding_layers=False)
    for extra in staging.iterdir():
        if extra.name not in ADAPTER_FILES:
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


# ------------------------------------------------------------------------------------- train


def _batch_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the label tokens (next-token prediction) and their count. A
    flattened batch (`flatten`) carries its position ids and its 4D mask."""
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   **extra).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    count = int((targets != IGNORE_INDEX).sum())
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / max(count, 1), count


def _tokenize_all(tokenizer: Any, examples: list[dict[str, Any]],
                  max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    features, skipped = [], 0
    for number, example in enumerate(examples):
        try:
            ids, labels = tokenize_example(tokenizer, to_messages(example), max_len)
        except Exception as exc:  # a malformed example or a template that refuses it
            raise TrainingError(f"example {number} cannot be tokenized: {exc}") from exc
        if any(label != IGNORE_INDEX for label in labels[1:]):
            features.append((ids, labels))
        else:
            skipped += 1
    return features, skipped


def _batch(features: list[tuple[list[int], list[int]]], pad_id: int, packing: bool,
           dev: torch.device) -> dict[str, Any]:
    """A step's batch on `dev`: flattened without padding, or right-padded; `tokens` is its
    count of real (non-padding) tokens."""
    if packing:
        batch = flatten(features)
    else:
        batch = collate(features, pad_id)
        batch["tokens"] = int(batch["attention_mask"].sum())
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(base_model: Path, examples: list[dict[str, Any]], config: TrainConfig, work_dir: Path, *,
          on_progress: Callable[[Progress], None] = lambda _p: None,
          should_stop: Callable[[], bool] = lambda: False) -> TrainResult:
    """Train a LoRA adapter on validated examples; resume from work_dir's latest checkpoint."""
    started = time.monotonic()
    base_model, work_dir = Path(base_model), Path(work_dir)
    if not examples:
        raise TrainingError("no training examples")
    tokenizer = load_tokenizer(base_model)
    features, skipped = _tokenize_all(tokenizer, examples, config.max_seq_len)
    if not features:
        raise TrainingError(f"no example has an assistant token within max_seq_len="
                            f"{config.max_seq_len}")
    if skipped:
        log.warning("%d example(s) have no assistant token within %d tokens and are skipped",
                    skipped, config.max_seq_len)
    pad_id = _pad_id(tokenizer)
    steps_per_epoch = math.ceil(len(features) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    fingerprint = _fingerprint(examples, config)

    checkpoint = latest_checkpoint(work_dir)
    if checkpoint is not None:
        peek = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        if peek.get("fingerprint") != fingerprint or peek.get("total_steps") != total_steps:
            raise TrainingError(f"{work_dir} holds checkpoints of another run (different "
                                "examples or settings); use a fresh work_dir")

    work_dir.mkdir(parents=True, exist_ok=True)
    model = build_peft_model(base_model, config)
    model.train()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)

    generator = torch.Generator().manual_seed(config.seed)
    state: dict[str, Any] = {
        "version": _STATE_VERSION, "step": 0, "total_steps": total_steps,
        "fingerprint": fingerprint,
        "orders": [torch.randperm(len(features), generator=generator).tolist()
                   for _ in range(config.epochs)],
        "epoch": 0, "losses": [], "trained_tokens": 0,
    }
    resumed_from = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        for key in ("optimizer", "scheduler", "rng"):
            state.pop(key)
        resumed_from = state["step"]
        log.info("resuming from %s at step %d of %d", checkpoint, resumed_from, total_steps)

    dev = device()
    run_tokens = 0
    run_started = time.monotonic()
    last_saved = resumed_from
    if state["step"] < total_steps and should_stop():
        raise TrainingStopped(state["step"], checkpoint)
    while state["step"] < total_steps:
        step = state["step"]
        epoch, index = divmod(step, steps_per_epoch)
        order = state["orders"][epoch][index * config.batch_size:(index + 1) * config.batch_size]
        batch = _batch([features[i] for i in order], pad_id, config.packing, dev)
        loss, _ = _batch_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        tokens = int(batch["tokens"])
        run_tokens += tokens
        state["step"] = step + 1
        state["epoch"] = epoch + 1
        state["trained_tokens"] += tokens
        state["losses"].append(float(loss.detach()))
        elapsed = max(time.monotonic() - run_started, 1e-9)
        on_progress(Progress(step=step + 1, total_steps=total_steps, epoch=epoch + 1,
                             loss=state["losses"][-1], tokens_per_s=run_tokens / elapsed))
        if state["step"] >= total_steps:
            break
        if state["step"] % config.checkpoint_every_steps == 0:
            save_checkpoint(work_dir, model, optimizer, scheduler, state)
            last_saved = state["step"]
        if should_stop():
            saved = (latest_checkpoint(work_dir) if last_saved == state["step"] else
                     save_checkpoint(work_dir, model, optimizer, scheduler, state))
            raise TrainingStopped(state["step"], saved)

    adapter_dir = save_adapter(model, work_dir / "adapter", config.base_model_name)
    last_epoch = state["losses"][-steps_per_epoch:]
    run_seconds = max(time.monotonic() - run_started, 1e-9)
    return TrainResult(adapter_dir=adapter_dir, steps=total_steps,
                       train_loss=sum(last_epoch) / len(last_epoch),
                       trained_tokens=state["trained_tokens"],
                       tokens_per_s=run_tokens / run_seconds,
                       seconds=time.monotonic() - started, resumed_from=resumed_from,
                       skipped_examples=skipped)


# ---------------------------------------------------------------------------------- evaluate


@torch.no_grad()
def evaluate(base_model: Path, examples: list[dict[str, Any]], adapter_dir: Path | None,
             max_seq_len: int = 512, *, batch_size: int = 4) -> EvalResult:
    """Mean assistant-token loss of the base model, or of base + adapter, on `examples`."""
    base_model = Path(base_model)
    tokenizer = load_tokenizer(base_model)
    features, _ = _tokenize_all(tokenizer, examples, max_seq_len)
    if not features:
        raise TrainingError("no example has an assistant token to evaluate")
    model = load_base_model(base_model)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    dev = device()
    pad_id = _pad_id(tokenizer)
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(dev) for k, v in
                 collate(features[start:start + batch_size], pad_id).items()}
        loss, count = _batch_loss(model, batch)
        total_loss += float(loss) * count
        total_tokens += count
    mean = total_loss / total_tokens
    return EvalResult(loss=mean, perplexity=math.exp(min(mean, 80.0)), tokens=total_tokens)
