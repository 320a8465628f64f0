"""`loraplex` admin commands: talk to a running server's admin API (issue 13).

`add_commands` adds the subcommands to the `loraplex` parser; each sets `args.admin_handler`,
which `server.cli.main` calls instead of starting anything.
"""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the admin subcommands (tenants, keys, adapters, jobs, engine) to `sub`."""
