"""Skill merging: one new LoRA adapter made from several, by PEFT's `add_weighted_adapter`.

Methods (PEFT's combination types): `linear` (weighted sum of the A and B matrices), `ties`
(TIES-Merging: trim to `density`, elect a sign by `majority_sign_method`, disjoint mean),
`dare_linear` / `dare_ties` (DARE: drop at random to `density`, rescale, then linear or TIES),
and `cat` (the adapters side by side: rank is the sum of theirs, the update is exactly the
weighted sum of theirs). All but `cat` need sources of one rank, and the result has that rank.

The result is an ordinary PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
that registration validates and stores like any other; vLLM serves it at full speed, with no
per-request merge cost. The base model is loaded because PEFT's merge works on a model (on a big
base model that is why it runs in the training worker).

`check_merge` holds what can be told from the sources' registry rows (a 400 at the request);
`merge_adapters` imports torch and PEFT.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adapters.errors import InvalidInput

Method = Literal["linear", "ties", "dare_linear", "dare_ties", "cat"]
SignMethod = Literal["total", "frequency"]
WITH_DENSITY: frozenset[str] = frozenset({"ties", "dare_linear", "dare_ties"})
WITH_SIGN: frozenset[str] = frozenset({"ties", "dare_ties"})


@dataclass(frozen=True)
class Source:
    """One adapter version to merge: its name as the tenant wrote it and its registry row's
    rank, targets and base-model hint."""

    model: str
    weight: float
    rank: int
    target_modules: tuple[str, ...]
    base_model: str | None


def check_merge(method: str, sources: Sequence[Source], density: float | None,
                max_lora_rank: int) -> int:
    """Refuse what cannot be merged (InvalidInput, a 400 naming the field); the result's rank."""
    if len({s.model for s in sources}) != len(sources):
        raise InvalidInput("a source is listed twice", param="merge.sources")
    if not all(math.isfinite(s.weight) for s in sources) or not any(s.weight for s in sources):
        raise InvalidInput("weights must be finite numbers, not all 0", param="merge.sources")
    if method in WITH_DENSITY and density is None:
        raise InvalidInput(f"{method} needs a density (the share of each adapter's weights "
                           "kept, in (0, 1])", param="merge.density")
    if method not in WITH_DENSITY and density is not None:
        raise InvalidInput(f"density applies to {', '.join(sorted(WITH_DENSITY))}, not {method}",
                           param="merge.density")
    bases = {s.base_model for s in sources if s.base_model}
    if len(bases) > 1:
        raise InvalidInput(f"the sources were trained on different base models ({sorted(bases)})"
                           "; only adapters of one base model can be merged",
                           param="merge.sources")
    ranks = [s.rank for s in sources]
    if method == "cat":
        rank = sum(ranks)
        if rank > max_lora_rank:
            raise InvalidInput(f"cat makes an adapter of rank {rank} (the sum of {ranks}), over "
                               f"the engine's limit of {max_lora_rank} (an operator can raise "
                               "LORAPLEX_MAX_LORA_RANK); merge fewer or lower-rank adapters",
                               param="merge.method")
        return rank
    if len(set(ranks)) != 1:
        shown = ", ".join(f"{s.model} r={s.rank}" for s in sources)
        raise InvalidInput(f"{method} needs sources of one rank ({shown}); use cat to combine "
                           "different ranks", param="merge.sources")
    return ranks[0]


class MergeError(InvalidInput):
    """The sources' files cannot be merged (found once they are read)."""

    code = "unmergeable"


def merge_adapters(base_model: Path, sources: Sequence[Path], weights: Sequence[float],
                   method: str, out: Path, *, base_model_name: str,
                   density: float | None = None, majority_sign_method: str = "total") -> Path:
    """Merge the adapter folders `sources` into a new adapter folder `out` (written aside and
    renamed into place)."""
    from peft import PeftModel

    from adapters.training.trainer import load_base_model, save_adapter

    for folder in sources:
        config = json.loads((folder / "adapter_config.json").read_text())
        if config.get("use_rslora"):
            # add_weighted_adapter folds each source's scale into the weights and gives the
            # result alpha = r; with rsLoRA kept in the config it would be scaled again.
            raise MergeError(f"{folder.name}: rsLoRA adapters cannot be merged")
    names = [f"source{i}" for i in range(len(sources))]
    model = PeftModel.from_pretrained(load_base_model(base_model), str(sources[0]),
                                      adapter_name=names[0])
    for name, folder in zip(names[1:], sources[1:], strict=True):
        model.load_adapter(str(folder), adapter_name=name)
    options: dict[str, object] = {}
    if method in WITH_DENSITY:
        options["density"] = density
    if method in WITH_SIGN:
        options["majority_sign_method"] = majority_sign_method
    try:
        model.add_weighted_adapter(names, list(weights), "default", combination_type=method,
                                   **options)
    except (ValueError, TypeError) as exc:
        raise MergeError(f"PEFT cannot merge these adapters: {exc}") from exc
    for name in names:
        model.delete_adapter(name)
    model.set_adapter("default")
    return save_adapter(model, out, base_model_name)
