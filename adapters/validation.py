"""Validate a PEFT LoRA adapter folder against the served base model, before it is stored.

Like vLLM's `PEFTHelper.validate_legal`, every problem is collected and reported at once.
Beyond vLLM's own checks this also catches what vLLM accepts silently: a target module that
does not exist in the base model (vLLM then serves the base model), tensors whose shapes do not
fit the base model, and truncated weight files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from adapters.base_model import BaseModelInfo
from adapters.errors import AdapterInvalid
from adapters.spec import AdapterSpec

# vLLM only accepts these values for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Files PEFT writes beside an adapter that are harmless and dropped at registration.
IGNORED_FILES = ("README.md",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1024 * 1024
_TENSOR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int
    max_weights_bytes: int


@dataclass
class ValidatedAdapter:
    """What registration records about an adapter that passed every check."""

    spec: AdapterSpec
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    warnings: list[str] = field(default_factory=list)


def check_file_names(names: list[str]) -> list[str]:
    """Problems with a set of uploaded file names (pickle, unknown, missing, unsafe)."""
    problems = []
    for name in names:
        if "/" in name or "\\" in name or name.startswith("."):
            problems.append(f"file name {name!r} is not a plain file name")
        elif name.endswith(PICKLE_SUFFIXES):
            problems.append(f"{name}: pickle weights are refused (they can run code); "
                            f"save with safetensors ({WEIGHTS_FILE})")
        elif name not in ADAPTER_FILES and name not in IGNORED_FILES:
            problems.append(f"unexpected file {name!r}; an adapter is {' + '.join(ADAPTER_FILES)}")
    for required in ADAPTER_FILES:
        if required not in names:
            problems.append(f"missing {required}")
    return problems


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_adapter(folder: Path, base: BaseModelInfo, limits: AdapterLimits) -> ValidatedAdapter:
    """Check an adapter folder; raise AdapterInvalid with every problem found."""
    names = sorted(p.name for p in folder.iterdir())
    problems = check_file_names(names)
    if problems:
        raise AdapterInvalid(problems)

    config = _read_config(folder / CONFIG_FILE, problems)
    weights = folder / WEIGHTS_FILE
    size = weights.stat().st_size
    if size > limits.max_weights_bytes:
        problems.append(f"{WEIGHTS_FILE} is {size} bytes, over the limit of "
                        f"{limits.max_weights_bytes}")
    if config is None or problems:
        raise AdapterInvalid(problems)

    rank, alpha, targets = _check_config(config, base, limits, problems)
    _check_tensors(weights, size, base, rank, config, problems)
    if problems:
        raise AdapterInvalid(problems)

    files = {name: sha256_file(folder / name) for name in ADAPTER_FILES}
    spec = AdapterSpec(rank=rank, alpha=alpha, target_modules=targets,
                       base_model=config.get("base_model_name_or_path"), size_bytes=size,
                       sha256=files[WEIGHTS_FILE])
    return ValidatedAdapter(spec=spec, files=files)


def _read_config(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        problems.append(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{CONFIG_FILE} is not valid JSON: {exc}")
        return None
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} must be a JSON object")
        return None
    return config


def _check_config(config: dict[str, Any], base: BaseModelInfo, limits: AdapterLimits,
                  problems: list[str]) -> tuple[int, float, list[str]]:
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        problems.append(f"r must be a positive integer, got {rank!r}")
        rank = 0
    rank_pattern = config.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict):
        problems.append("rank_pattern must be an object of module pattern -> rank")
        rank_pattern = {}
    ranks = [rank, *rank_pattern.values()]
    if any(isinstance(r, int) and r > limits.max_rank for r in ranks):
        # The engine was started for at most this rank; say which knob raises it (a larger
        # one costs every request, adapter or not).
        problems.append(f"rank {max(r for r in ranks if isinstance(r, int))} is over the "
                        f"engine's limit of {limits.max_rank}; an operator can raise "
                        f"LORAPLEX_MAX_LORA_RANK (one of {', '.join(map(str, VLLM_LORA_RANKS))}"
                        f") and restart the engine")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        problems.append(f"lora_alpha must be a positive number, got {alpha!r}")
        alpha = 0
    # What vLLM cannot serve (vLLM PEFTHelper._validate_features and its issues).
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) cannot be served by vLLM (vLLM #6983)")
    if config.get("modules_to_save"):
        problems.append("modules_to_save cannot be served by vLLM (vLLM #9280)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("LoRA bias cannot be served by vLLM; train with bias='none'")
    if config.get("layer_replication"):
        problems.append("layer_replication cannot be served by vLLM")
    if config.get("alora_invocation_tokens"):
        problems.append("Activated LoRA (aLoRA) cannot be served by vLLM")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica",
                                                      "lora_ga"):
        problems.append(f"init_lora_weights={init!r} changes the base weights; vLLM cannot "
                        "serve it")

    targets = config.get("target_modules")
    suffixes = base.module_suffixes()
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            problems.append(f"target_modules {targets!r} is not a valid regular expression: {exc}")
            return rank, float(alpha), []
        matched = [m for m in base.linear_shapes if pattern.fullmatch(m)]
        if not matched:
            problems.append(f"target_modules pattern {targets!r} matches no module of the base "
                            "model")
        target_list = sorted({m.rsplit(".", 1)[-1] for m in matched})
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in suffixes]
        if unknown:
            problems.append(f"target modules {unknown} do not exist in the base model (it has "
                            f"{sorted(suffixes)}); vLLM would silently serve the base model")
        target_list = sorted(set(targets))
    else:
        problems.append("target_modules must be a non-empty list of module names or a regex")
        target_list = []
    return rank, float(alpha), target_list


def _check_tensors(weights: Path, size: int, base: BaseModelInfo, rank: int,
                   config: dict[str, Any], problems: list[str]) -> None:
    try:
        with safe_open(weights, framework="numpy") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    except Exception as exc:  # safetensors raises several types for a bad header  # noqa: BLE001
        problems.append(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}")
        return
    _check_payload_size(weights, size, problems)
    if not keys:
        problems.append(f"{WEIGHTS_FILE} holds no tensors")
        return
    patterned = bool(config.get("rank_pattern"))
    for key in keys:
        m = _TENSOR_KEY.match(key)
        if m is None:
            problems.append(f"tensor {key!r} is not a LoRA A/B weight")
            continue
        module, ab = m.group("module"), m.group("ab")
        if module not in base.linear_shapes:
            problems.append(f"tensor {key!r} targets module {module!r}, which the base model "
                            "does not have")
            continue
        out_f, in_f = base.linear_shapes[module]
        shape = shapes[key]
        ok = len(shape) == 2 and (
            (ab == "A" and shape[1] == in_f and (patterned or shape[0] == rank))
            or (ab == "B" and shape[0] == out_f and (patterned or shape[1] == rank)))
        if not ok:
            want = f"({rank}, {in_f})" if ab == "A" else f"({out_f}, {rank})"
            problems.append(f"tensor {key!r} has shape {shape}, expected {want} for the base "
                            "model")
        if len(problems) > 20:
            problems.append("... (more problems not listed)")
            return


def _check_payload_size(weights: Path, size: int, problems: list[str]) -> None:
    """A truncated file can still have an intact header: compare the data end with the size."""
    with weights.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if 8 + header_len + end != size:
        problems.append(f"{WEIGHTS_FILE} is {size} bytes but its header describes "
                        f"{8 + header_len + end}: truncated or padded")
