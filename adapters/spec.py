"""What an adapter version is: one descriptor that flows validation -> manifest -> registry
row -> API answer, so its fields are listed once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterSpec:
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str | None  # the adapter's base_model_name_or_path, a hint only
    size_bytes: int  # of the weights file
    sha256: str  # of the weights file
