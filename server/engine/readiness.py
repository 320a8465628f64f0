"""Whether the engine can take work now: the one owner of that fact.

Three things move it, each through one method:
- the health watcher finds the engine answering (`mark_up`) or not (`mark_down`);
- the engine supervisor sees the spawned process exit (`mark_down`, at once, not at the next
  health poll);
- the gateway gets an engine 404 for an adapter it holds loaded, which means the engine
  restarted unseen (`mark_down`; the next health poll then starts from a clean adapter slate).

Whoever needs the fact gets this object at construction: the gateway (`require` before
forwarding), the admin service (pin now or at the next start), `/healthz`.
"""

from __future__ import annotations

import logging

from prometheus_client import Gauge

from adapters.errors import Unavailable

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5


class EngineReadiness:
    def __init__(self, up_gauge: Gauge | None = None) -> None:
        self._ready = False
        self._gauge = up_gauge

    @property
    def ready(self) -> bool:
        return self._ready

    def require(self) -> None:
        """Raise 503 (with Retry-After) unless the engine can take a request now."""
        if not self._ready:
            raise Unavailable("the inference engine is not ready", code="engine_unavailable",
                              retry_after_s=RETRY_AFTER_S, retryable=True)

    def mark_up(self) -> None:
        self._set(True)

    def mark_down(self, reason: str) -> None:
        """Stop sending the engine work until the health watcher finds it answering again."""
        if self._ready:
            log.warning("engine is down: %s", reason)
        self._set(False)

    def _set(self, ready: bool) -> None:
        self._ready = ready
        if self._gauge is not None:
            self._gauge.set(1 if ready else 0)
