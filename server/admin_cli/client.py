"""The admin API over HTTP (httpx, sync): every answer is JSON or one of errors.py's errors."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from server.admin_cli.errors import ApiError, Refused, ServerError, Unreachable
from server.settings import Settings

DEFAULT_TIMEOUT_S = 60.0
SHOWN_BODY_CHARS = 200


def admin_token(flag: str | None, settings: Settings) -> str | None:
    """--admin-token, else LORAPLEX_ADMIN_TOKEN, else the token `loraplex up` generated and
    keeps in the data folder (the same machine, the same user), else none."""
    if flag:
        return flag
    if settings.admin_token:
        return settings.admin_token
    stored = settings.home / "admin_token"
    try:
        return stored.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def server_url(flag: str | None, settings: Settings) -> str:
    """--url, else LORAPLEX_URL, else this machine's gateway port."""
    return (flag or settings.url or f"http://127.0.0.1:{settings.port}").rstrip("/")


def path(*segments: str) -> str:
    """A URL path from names the user typed, each percent-encoded. A segment that is empty,
    '.' or '..' is refused: the URL would name another resource once normalized."""
    for s in segments:
        if s in ("", ".", ".."):
            raise Refused(f"invalid name {s!r}")
    return "/" + "/".join(quote(s, safe="") for s in segments)


class AdminClient:
    def __init__(self, url: str, token: str | None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, transport=transport,
                                 timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))

    def close(self) -> None:
        self.http.close()

    def get(self, url: str, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", url, params=params)

    def post(self, url: str, json: Any = None) -> Any:
        return self.request("POST", url, json=json)

    def put(self, url: str, json: Any = None) -> Any:
        return self.request("PUT", url, json=json)

    def delete(self, url: str) -> Any:
        return self.request("DELETE", url)

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        """Send; the decoded JSON answer. Raises ApiError (4xx), ServerError (5xx), or
        Unreachable (no answer, or one that is not the admin API's JSON)."""
        if "params" in kwargs and kwargs["params"] is not None:
            kwargs["params"] = {k: v for k, v in kwargs["params"].items() if v is not None}
        try:
            resp = self.http.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            raise Unreachable(f"no answer from {self.url} in time ({type(exc).__name__}); "
                              "the server may be busy or down") from exc
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach the loraplex server at {self.url}: "
                              f"{exc or type(exc).__name__}") from exc
        return self.decode(resp)

    def decode(self, resp: httpx.Response) -> Any:
        """The JSON of a read answer, or the error it carries (as `request` raises it)."""
        try:
            body = resp.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if resp.status_code >= 500:
            message = (error or {}).get("message") if isinstance(error, dict) else None
            raise ServerError(resp.status_code, f"server error (HTTP {resp.status_code}) at "
                              f"{resp.request.url}: {message or _snippet(resp)}")
        if resp.status_code >= 400:
            if isinstance(error, dict) and error.get("message"):
                raise ApiError(resp.status_code, error)
            # Something answered, but not the loraplex admin API (a wrong --url).
            raise Unreachable(f"HTTP {resp.status_code} from {resp.request.url}, not a loraplex "
                              f"admin API answer (check --url): {_snippet(resp)}")
        if body is None:
            raise Unreachable(f"{resp.request.url} answered HTTP {resp.status_code} without JSON; "
                              "is --url a loraplex server?")
        return body


def _snippet(resp: httpx.Response) -> str:
    text = " ".join(resp.text.split())
    return (text[:SHOWN_BODY_CHARS] + "...") if len(text) > SHOWN_BODY_CHARS else text or "(empty)"

