"""How admin commands print: JSON on stdout with `--json` (for scripts), else rich tables and
lines on stdout; notes, progress bars and errors on stderr.

Everything a tenant controls (names, event messages, error messages) is printed as plain
text, never read as rich markup.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Off a terminal (a pipe, a file, a test) rich would wrap at 80 columns, cutting ids in two.
PIPE_WIDTH = 200


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else PIPE_WIDTH
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.out = _console(stderr=False)
        self.err = _console(stderr=True)

    def data(self, obj: Any) -> None:
        """The API's object, as JSON on stdout (one document)."""
        print(json.dumps(obj, indent=2, sort_keys=False), flush=True)

    def json_line(self, obj: Any) -> None:
        """One compact JSON document per line (a stream of them: `jobs follow --json`)."""
        print(json.dumps(obj, separators=(",", ":")), flush=True)

    def line(self, text: str, style: str | None = None) -> None:
        self.out.print(Text(text, style=style or ""), soft_wrap=True)

    def note(self, text: str, style: str | None = None) -> None:
        self.err.print(Text(text, style=style or ""), soft_wrap=True)

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]],
              title: str | None = None, empty: str = "(none)") -> None:
        table = Table(*columns, title=title, title_justify="left", header_style="bold")
        count = 0
        for row in rows:
            table.add_row(*(cell(v) for v in row))
            count += 1
        if count == 0:
            if title:
                self.line(title, "bold")
            self.line(empty, "dim")
            return
        self.out.print(table)

    def fields(self, pairs: Iterable[tuple[str, Any]]) -> None:
        """`name: value` lines, the names aligned."""
        pairs = list(pairs)
        wide = max((len(k) for k, _ in pairs), default=0)
        for key, value in pairs:
            text = Text(f"{key}:".ljust(wide + 2), style="bold")
            text.append_text(cell(value))
            self.out.print(text, soft_wrap=True)


def cell(value: Any) -> Text:
    if isinstance(value, Text):
        return value
    if value is None:
        return Text("-", style="dim")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    return Text(str(value))


def when(ts: int | None) -> str | None:
    """Unix seconds as local time."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def size(n: int | None) -> str | None:
    if n is None:
        return None
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


STATUS_STYLES = {"succeeded": "green", "failed": "red", "cancelled": "yellow",
                 "running": "cyan", "queued": "blue", "validating_files": "blue"}


def status(value: str) -> Text:
    return Text(value, style=STATUS_STYLES.get(value, ""))
