"""botocore failures as the domain errors a caller sees (adapters/errors.py).

Connection problems, timeouts, throttling and 5xx -> Unavailable (503, retry in 5 s; botocore
already retried), a refused conditional write -> Conflict, a body whose checksum S3 refused ->
InvalidInput, a local disk error -> Unavailable (cache). A missing object is the caller's to
map (NotFound means different things to different callers): see `error_code` and `NOT_FOUND`.
"""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from adapters.errors import Conflict, InvalidInput, LoraplexError, Unavailable

RETRY_AFTER_S = 5
NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"})
_BAD_BODY = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
_TRANSIENT = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError,
              ConnectionClosedError, ResponseStreamingError, IncompleteReadError)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def map_error(exc: Exception, what: str, *, key: str | None = None) -> LoraplexError:
    """A botocore (or local I/O) failure as the domain error a caller sees."""
    def unavailable(reason: str) -> Unavailable:
        return Unavailable(f"adapter store unavailable while {what}: {reason}",
                           code="store_unavailable", retry_after_s=RETRY_AFTER_S)

    if isinstance(exc, LoraplexError):
        return exc
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "PreconditionFailed" or status == 412:
            return Conflict(f"{key or what} already exists in the store and is immutable",
                            code="version_exists")
        if code in _BAD_BODY:
            return InvalidInput(f"{what}: the files changed while they were being stored",
                                code="adapter_changed")
        if code == "NoSuchBucket":
            return unavailable("the bucket does not exist (check the store configuration)")
        if code in DENIED or status == 403:
            return unavailable(f"access denied ({code}); check the gateway's AWS credentials")
        # Throttling, 5xx and anything else unexpected: botocore already retried.
        return unavailable(f"{code or status} {exc.response.get('Error', {}).get('Message', '')}"
                           .strip())
    if isinstance(exc, _TRANSIENT):
        return unavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, NoCredentialsError):
        return unavailable("no AWS credentials found")
    if isinstance(exc, BotoCoreError):
        return unavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return Unavailable(f"local disk error while {what}: {exc}", code="cache_unavailable",
                           retry_after_s=RETRY_AFTER_S)
    return unavailable(repr(exc))
