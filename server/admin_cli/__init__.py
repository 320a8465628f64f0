"""`loraplex` admin commands: talk to a running server's admin API (issue 13).

`add_commands` adds the subcommands to the `loraplex` parser; each sets `args.admin_handler`,
which `server.cli.main` calls instead of starting anything. One module per resource group
(tenants, keys, adapters, jobs, engine); client.py is the HTTP side, output.py the printing
side, errors.py the exit codes, command.py what every command shares.
"""

from __future__ import annotations

from server.admin_cli import adapters, engine, jobs, keys, tenants
from server.admin_cli.command import Subparsers, common_options


def add_commands(sub: Subparsers) -> None:
    """Add the admin subcommands (tenants, keys, adapters, jobs, engine) to `sub`."""
    common = common_options()
    for module in (tenants, keys, adapters, jobs, engine):
        module.add(sub, common)
