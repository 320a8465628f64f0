"""Merged-model export: the base model with an adapter merged in (PEFT `merge_and_unload`), as
a standard transformers model folder (config.json, generation_config.json, safetensors
weights, the tokenizer and its chat template), for deployment anywhere a plain model runs.

The merge is done in float32 and the result saved in the base model's own dtype (so it loads
like the base model did), or the one asked for. `loraplex_export.json` says where it came
from. Every file's size and sha256 are returned (and kept by the store's folder marker).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from adapters.store import folder_files
from adapters.validation import sha256_file

EXPORT_INFO = "loraplex_export.json"


def export_merged(base_model: Path, adapter: Path, out: Path, info: dict[str, Any],
                  dtype_name: str = "auto") -> dict[str, dict[str, Any]]:
    """Write the merged model to `out` (aside, then renamed); {file: {"size", "sha256"}}.
    `dtype_name` "auto" keeps the base model's dtype; else a torch dtype's name."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = (getattr(AutoConfig.from_pretrained(str(base_model)), "torch_dtype", None)
             if dtype_name == "auto" else getattr(torch, dtype_name))
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if isinstance(dtype, torch.dtype):
        merged = merged.to(dtype)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(str(staging), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base_model)).save_pretrained(str(staging))
    (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return {rel: {"size": (out / rel).stat().st_size, "sha256": sha256_file(out / rel)}
            for rel in folder_files(out)}
