"""Domain errors of loraplex. The gateway maps each class to one HTTP status in one place.

    LoraplexError
    ├── InvalidInput          bad names, bad bodies, bad adapter files      -> 400
    │   └── AdapterInvalid    an adapter that fails validation (all reasons) -> 400
    ├── Unauthenticated       no key, unknown or revoked key                  -> 401
    ├── Forbidden             a valid key used for another tenant / source   -> 403
    ├── NotFound              unknown tenant, adapter, version, alias, model  -> 404
    ├── Conflict              the thing already exists                        -> 409
    ├── TooLarge              body or file over its bound                     -> 413
    ├── Overloaded            no capacity now; try again                      -> 429
    ├── Unavailable           engine or store down; try again                 -> 503
    └── Corrupt               stored bytes fail their checksum; not loaded     -> 502
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error loraplex reports to a caller."""

    code: str = "error"
    error_type: str | None = None  # overrides the `type` the status gives (OpenAI's 429s)
    headers: dict[str, str] | None = None  # extra headers of the error answer

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s


class InvalidInput(LoraplexError):
    code = "invalid_request"


class AdapterInvalid(InvalidInput):
    """Every reason an adapter is refused, collected before anything is stored or loaded."""

    code = "invalid_adapter"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("adapter refused: " + "; ".join(problems))
        self.problems = problems


class Unauthenticated(LoraplexError):
    code = "invalid_api_key"


class Forbidden(LoraplexError):
    code = "forbidden"


class NotFound(LoraplexError):
    code = "not_found"


class Conflict(LoraplexError):
    code = "conflict"


class TooLarge(LoraplexError):
    code = "payload_too_large"


class Overloaded(LoraplexError):
    code = "overloaded"


class Unavailable(LoraplexError):
    """A dependency is down. `retryable`: the request was refused before any work was done
    (the engine was never reached, or not ready), so another unit may safely run it."""

    code = "unavailable"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None, retryable: bool = False) -> None:
        super().__init__(message, param=param, code=code, retry_after_s=retry_after_s)
        self.retryable = retryable


class Corrupt(LoraplexError):
    """Stored adapter bytes do not match their manifest; they are never loaded."""

    code = "adapter_corrupt"
