"""Names of tenants, adapters and aliases, and how a `model` string resolves to them.

Names become folder names and engine adapter names, so they are restricted to a safe
alphabet: no path separators, no leading dot, no `..`, bounded length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.errors import InvalidInput

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(value: str, what: str) -> str:
    """Return `value` if it is a safe name, else raise InvalidInput naming `what`."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise InvalidInput(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            param=what,
        )
    return value


def check_alias(value: str) -> str:
    check_name(value, "alias")
    if value.isdigit():
        raise InvalidInput(f"invalid alias {value!r}: an alias cannot be a number", param="alias")
    return value


@dataclass(frozen=True)
class ModelRef:
    """What a tenant wrote in `model`: an adapter name and an optional version or alias."""

    adapter: str
    version: int | None = None
    alias: str | None = None


def parse_model_ref(model: str) -> ModelRef:
    """Parse `name`, `name@3` or `name@alias`. Raises InvalidInput on anything else."""
    name, sep, tag = model.partition("@")
    check_name(name, "model")
    if not sep:
        return ModelRef(name)
    if tag.isdigit():
        return ModelRef(name, version=int(tag))
    check_alias(tag)
    return ModelRef(name, alias=tag)
