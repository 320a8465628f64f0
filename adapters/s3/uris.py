"""`s3://bucket/prefix` URIs: parsing and whole-segment prefix matching."""

from __future__ import annotations

import re
from collections.abc import Iterable

from adapters.errors import InvalidInput

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"); the prefix may be empty."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise InvalidInput(f"{uri!r} is not an s3:// URI", param="source")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.match(bucket):
        raise InvalidInput(f"{uri!r}: {bucket!r} is not a valid bucket name", param="source")
    # Empty, "." and ".." segments: some servers normalise them, so a prefix check on the
    # raw text would not be a check on what is read.
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise InvalidInput(f"{uri!r} has an empty, '.' or '..' path segment", param="source")
    return bucket, prefix


def uri_allowed(uri: str, allowlist: Iterable[str]) -> bool:
    """Whether `uri` lies under an allow-listed `s3://bucket/prefix`, by whole path segments
    (`s3://b/team` allows `s3://b/team/x`, not `s3://b/team-evil/x`)."""
    bucket, prefix = parse_s3_uri(uri)
    for allowed in allowlist:
        try:
            a_bucket, a_prefix = parse_s3_uri(allowed)
        except InvalidInput as exc:  # configuration, not the caller's fault
            raise ValueError(f"bad entry in the S3 source allow-list: {allowed!r}") from exc
        if a_bucket == bucket and (not a_prefix or prefix == a_prefix
                                   or prefix.startswith(a_prefix + "/")):
            return True
    return False

