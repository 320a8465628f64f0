"""Random (untrained) LoRA adapters saved by PEFT, for tests and benchmarks.

They are real PEFT adapters for the base model (same files, names and shapes a trained one
has) whose random weights are large enough to change greedy output, so each one is
distinguishable from the base model and from the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_random_adapters(base_model: Path, out_dir: Path, count: int, *, rank: int = 8,
                         targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0,
                         std: float = 0.05, base_model_name: str | None = None) -> list[Path]:
    """Save `count` adapters as `out_dir/adapter-<i>/`; returns their folders."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                        lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name or str(base_model)
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    folders = []
    for i in range(count):
        generator = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in lora_params:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        folder = out_dir / f"adapter-{i}"
        # save_embedding_layers=False: no hub lookup of the base config (we are offline).
        peft_model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
        (folder / "README.md").unlink(missing_ok=True)
        folders.append(folder)
    return folders
