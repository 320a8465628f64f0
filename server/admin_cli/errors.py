"""What can go wrong in an admin command, and the exit code each means.

    CliError (exit_code)
    ├── Refused         1  the API answered 4xx, or a local check refused the input first
    │   └── ApiError       the API's error object (message shown as is)
    ├── UsageError      2  the command line itself is wrong (argparse also exits 2)
    ├── Unreachable     3  no answer: connection refused, timeout, not a loraplex server
    │   └── ServerError    the server answered 5xx
    └── JobNotSucceeded 4  `jobs follow`: the job ended failed or cancelled
"""

from __future__ import annotations

from typing import Any

OK = 0
REFUSED = 1
USAGE = 2
UNREACHABLE = 3
JOB_NOT_SUCCEEDED = 4
INTERRUPTED = 130

EXIT_CODES_HELP = f"""exit codes:
  {OK}    done (jobs follow: the job succeeded)
  {REFUSED}    refused: the API answered 4xx (its message is shown as is: wrong token, unknown
       tenant, invalid adapter...), or a local check refused the input before sending it
  {USAGE}    usage: the command line is wrong
  {UNREACHABLE}    the server is unreachable, timed out, is not a loraplex server, or answered 5xx
  {JOB_NOT_SUCCEEDED}    jobs follow: the job ended failed or cancelled
  {INTERRUPTED}  interrupted (Ctrl-C)

environment: LORAPLEX_URL (default http://127.0.0.1:8000), LORAPLEX_ADMIN_TOKEN (default: the
token `loraplex up` keeps in the data folder, LORAPLEX_HOME, when that is readable here)"""


class CliError(Exception):
    exit_code = REFUSED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Refused(CliError):
    exit_code = REFUSED


class ApiError(Refused):
    """A 4xx with OpenAI's error object."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message") or f"HTTP {status}"))
        self.status = status
        self.type = error.get("type")
        self.code = error.get("code")
        self.param = error.get("param")


class UsageError(CliError):
    exit_code = USAGE


class Unreachable(CliError):
    exit_code = UNREACHABLE


class ServerError(Unreachable):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class JobNotSucceeded(CliError):
    exit_code = JOB_NOT_SUCCEEDED
