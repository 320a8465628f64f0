"""What every admin command shares: the connection options, `--json`, and the wrapper that
turns a command's errors into one stderr line and an exit code (errors.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeAlias

from pydantic import ValidationError

from server.admin_cli.client import DEFAULT_TIMEOUT_S, AdminClient, admin_token, server_url
from server.admin_cli.errors import (
    EXIT_CODES_HELP,
    INTERRUPTED,
    OK,
    USAGE,
    ApiError,
    CliError,
    UsageError,
)
from server.admin_cli.output import Output
from server.settings import Settings

# A command: parsed arguments, a connected client and the output -> an exit code (None: OK).
Run = Callable[[argparse.Namespace, AdminClient, Output], "int | None"]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def common_options() -> argparse.ArgumentParser:
    """The options of every admin command (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument("--url", help="the loraplex server (env LORAPLEX_URL; default "
                                     "http://127.0.0.1:8000)")
    group.add_argument("--admin-token", metavar="TOKEN",
                       help="admin bearer token (env LORAPLEX_ADMIN_TOKEN; default: the one "
                            "`loraplex up` keeps in the data folder)")
    group.add_argument("--json", action="store_true",
                       help="print the API's JSON instead of tables (for scripts)")
    group.add_argument("--timeout", type=positive, default=DEFAULT_TIMEOUT_S, metavar="S",
                       help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT_S:g})")
    return common


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def group(sub: Subparsers, name: str, help_: str) -> Subparsers:
    """An admin command group (`loraplex tenants ...`); its actions are added to the answer."""
    parser = sub.add_parser(name, help=help_, description=help_, epilog=EXIT_CODES_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def action(sub: Subparsers, name: str, help_: str, run: Run,
           common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One command (`loraplex tenants list`); add its arguments to the answer."""
    parser = sub.add_parser(name, help=help_, description=help_, parents=[common],
                            epilog=EXIT_CODES_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(admin_handler=handler(run))
    return parser


def handler(run: Run) -> Callable[[argparse.Namespace], int]:
    """`run` with a client for the configured server; its errors become an exit code."""

    def handle(args: argparse.Namespace) -> int:
        out = Output(args.json)
        try:
            settings = Settings()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]).upper()
            out.note(f"error: LORAPLEX_{where}: {first['msg']}", "red")
            return USAGE
        client = AdminClient(server_url(args.url, settings),
                             admin_token(args.admin_token, settings), args.timeout)
        try:
            return run(args, client, out) or OK
        except ApiError as exc:
            out.note(f"error (HTTP {exc.status}): {exc.message}", "red")
            if exc.status == 401:
                out.note("check --admin-token or LORAPLEX_ADMIN_TOKEN (the admin token "
                         "`loraplex up` printed)")
            return exc.exit_code
        except CliError as exc:
            out.note(f"error: {exc.message}", "red")
            return exc.exit_code
        except KeyboardInterrupt:
            out.note("interrupted")
            return INTERRUPTED
        finally:
            client.close()

    return handle


def confirm(question: str, yes: bool) -> None:
    """Go on when `--yes` was given or the user answers y on a terminal; otherwise stop
    (UsageError), before anything is sent."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question} Pass --yes to confirm.")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UsageError("not confirmed; nothing was changed")
