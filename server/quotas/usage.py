"""Usage metering: every request's tokens counted in memory, added to the registry database
(`usage_daily`, see `adapters.registry.usage`) by a periodic flush, and read back as bills.

`UsageMeter.record` is called on the request path: a dict update, no I/O. The counts are kept
per (UTC day, tenant, adapter, key); the day is the one the request finished in. Every
`LORAPLEX_USAGE_FLUSH_S` seconds (default 5) `flush` swaps the dict out and adds it to the
database in one transaction; the database adds it to what other gateways flushed, so no count
is lost to a race. If the write fails (the database is down), the counts go back into the dict
and the next flush writes them with what came since: nothing is lost while the database is
away, up to `max_entries` distinct keys held (100,000 by default); usage for a key past that
is dropped and counted (`dropped_requests`), with a warning.

Loss bound: a crash (SIGKILL, OOM kill, power loss) loses at most the counts recorded since
the last successful flush, one flush interval (`LORAPLEX_USAGE_FLUSH_S`, 5 s) while the
database is up. A graceful stop loses nothing: `close` flushes a last time after the request
path has stopped (its failure, the database being down at that moment, is logged with what
was lost). A flush that is in flight when its loop is cancelled is finished first, never cut
off: a write cut off mid-commit could not tell whether it had counted.

`UsageService` answers the usage API: it checks the query (dates, range, grouping, format)
and turns the store's sums into the wire objects of `server.protocol.usage`, or into CSV.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Literal

from adapters.errors import InvalidInput
from adapters.registry.usage import UsageRow, UsageStore, UsageTotal
from server.protocol.usage import CSV_FIELDS, UsageEntry, UsageList

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
_Key = tuple[date, str, str, str]  # (UTC day, tenant, adapter or "", key id or "")

MAX_ENTRIES = 100_000
# The usage_daily columns' lengths: a longer value would fail every flush that holds it.
_TENANT_LEN, _ADAPTER_LEN, _KEY_LEN = 64, 64, 32


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UsageMeter:
    def __init__(self, store: UsageStore, clock: Clock = utcnow,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.store = store
        self._clock = clock
        self.max_entries = max_entries
        # key -> [requests, prompt_tokens, completion_tokens, errors]
        self._counts: dict[_Key, list[int]] = {}
        self._lock = asyncio.Lock()  # one flush at a time; close waits for one in flight
        self._writing: asyncio.Task[bool] | None = None
        self.dropped_requests = 0  # requests whose usage was dropped past max_entries
        self.failed_flushes = 0
        self._dropped_unlogged = 0

    @property
    def pending(self) -> int:
        """Distinct (day, tenant, adapter, key) entries not yet written."""
        return len(self._counts)

    def record(self, tenant: str, adapter: str | None, key_id: str | None,
               prompt_tokens: int, completion_tokens: int, error: bool) -> None:
        """Count one finished request. `adapter` None is the base model, `key_id` None a
        request without a known key. In memory only: never waits, never fails."""
        day = self._clock().astimezone(timezone.utc).date()
        key = (day, tenant[:_TENANT_LEN], (adapter or "")[:_ADAPTER_LEN],
               (key_id or "")[:_KEY_LEN])
        counts = self._counts.get(key)
        if counts is None:
            if len(self._counts) >= self.max_entries:
                self._drop(1)
                return
            counts = self._counts[key] = [0, 0, 0, 0]
        counts[0] += 1
        counts[1] += max(0, prompt_tokens)
        counts[2] += max(0, completion_tokens)
        counts[3] += 1 if error else 0

    async def flush(self) -> bool:
        """Write what was recorded since the last flush. True when it is written (or there
        was nothing); False when the write failed and the counts were kept for the next one."""
        async with self._lock:
            self._log_drops()
            batch, self._counts = self._counts, {}
            if not batch:
                return True
            rows = [UsageRow(*key, *counts) for key, counts in batch.items()]
            try:
                await self.store.add(rows)
            except Exception as exc:  # noqa: BLE001 - any failure: keep the counts, retry
                self._merge_back(batch)
                self.failed_flushes += 1
                log.warning("usage flush failed (%s: %s); %d entries kept for the next flush",
                            type(exc).__name__, exc, len(self._counts))
                return False
            except BaseException:  # cancelled: the transaction rolled back; keep the counts
                self._merge_back(batch)
                raise
            return True

    async def run(self, interval_s: float) -> None:
        """Flush every `interval_s` seconds, until cancelled. A flush in flight when the loop
        is cancelled still finishes (`close` waits for it)."""
        while True:
            await asyncio.sleep(interval_s)
            self._writing = asyncio.ensure_future(self.flush())
            await asyncio.shield(self._writing)

    async def close(self) -> None:
        """The last flush, at shutdown (after the request path has stopped)."""
        if not await self.flush():
            lost = sum(counts[0] for counts in self._counts.values())
            log.error("usage of %d requests (%d entries) could not be written at shutdown "
                      "and is lost", lost, len(self._counts))

    def _merge_back(self, batch: dict[_Key, list[int]]) -> None:
        """Put a batch that was not written back under what was recorded since."""
        for key, counts in batch.items():
            current = self._counts.get(key)
            if current is not None:
                for i, value in enumerate(counts):
                    current[i] += value
            elif len(self._counts) < self.max_entries:
                self._counts[key] = counts
            else:
                self._drop(counts[0])

    def _drop(self, requests: int) -> None:
        self.dropped_requests += requests
        self._dropped_unlogged += requests

    def _log_drops(self) -> None:
        if self._dropped_unlogged:
            log.warning("usage of %d requests dropped: more than %d entries waiting to be "
                        "written (is the database down?)", self._dropped_unlogged,
                        self.max_entries)
            self._dropped_unlogged = 0


# -- the usage API -----------------------------------------------------------------------------

DEFAULT_DAYS = 30  # the default range: the last 30 UTC days, today included
MAX_DAYS = 366
FORMATS = ("json", "csv")
TENANT_FIELDS = ("day", "adapter", "key")
ALL_FIELDS = ("tenant", "day", "adapter", "key")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class UsageReport:
    """A usage answer: the list, and how it is to be sent (`format`, CSV `filename`)."""

    usage: UsageList
    format: Literal["json", "csv"]
    filename: str

    def csv(self) -> str:
        """A header row, then one row per entry: the fields of UsageEntry, null empty."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(CSV_FIELDS)
        for entry in self.usage.data:
            values = entry.model_dump(mode="json")
            writer.writerow(["" if values[f] is None else values[f] for f in CSV_FIELDS])
        return out.getvalue()


class UsageService:
    def __init__(self, store: UsageStore, clock: Clock = utcnow) -> None:
        self.store = store
        self._clock = clock

    async def tenant_usage(self, tenant: str, start: str | None, end: str | None,
                           group_by: str | None, format: str | None) -> UsageReport:
        """One tenant's usage; `group_by` any of day, adapter, key (default: day)."""
        first, last, fields, fmt = self._parse(start, end, group_by, format, TENANT_FIELDS,
                                               "day")
        totals = await self.store.query(tenant, first, last, fields)
        return _report(totals, first, last, fields, fmt, f"usage-{tenant}-{first}-{last}.csv")

    async def all_usage(self, start: str | None, end: str | None, group_by: str | None,
                        format: str | None) -> UsageReport:
        """Every tenant's usage; `group_by` any of tenant, day, adapter, key (default:
        tenant,day)."""
        first, last, fields, fmt = self._parse(start, end, group_by, format, ALL_FIELDS,
                                               "tenant,day")
        totals = await self.store.query_all(first, last, fields)
        return _report(totals, first, last, fields, fmt, f"usage-{first}-{last}.csv")

    def _parse(self, start: str | None, end: str | None, group_by: str | None,
               format: str | None, allowed: Sequence[str], default_group_by: str
               ) -> tuple[date, date, tuple[str, ...], Literal["json", "csv"]]:
        last = (_parse_date(end, "end") if end is not None
                else self._clock().astimezone(timezone.utc).date())
        if start is not None:
            first = _parse_date(start, "start")
        else:
            try:
                first = last - timedelta(days=DEFAULT_DAYS - 1)
            except OverflowError:
                first = date.min
        if last < first:
            raise InvalidInput(f"end ({last}) is before start ({first})", param="end",
                               code="invalid_range")
        if (last - first).days + 1 > MAX_DAYS:
            raise InvalidInput(f"the range from {first} to {last} is over {MAX_DAYS} days; "
                               "ask for it in parts", param="start", code="invalid_range")
        fields = _parse_group_by(default_group_by if group_by is None else group_by, allowed)
        fmt = "json" if format is None else format.strip().lower()
        if fmt == "json":
            return first, last, fields, "json"
        if fmt == "csv":
            return first, last, fields, "csv"
        raise InvalidInput(f"unknown format {format!r}: use one of {', '.join(FORMATS)}",
                           param="format", code="invalid_value")


def _parse_date(value: str, param: str) -> date:
    try:
        if not _ISO_DATE.fullmatch(value.strip()):
            raise ValueError(value)
        return date.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(f"{param} {value!r} is not a date: use YYYY-MM-DD (UTC)",
                           param=param, code="invalid_value") from None


def _parse_group_by(value: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """Comma-separated field names; empty: no grouping (one total). Repeats count once."""
    fields: list[str] = []
    for name in (part.strip().lower() for part in value.split(",")):
        if not name or name in fields:
            continue
        if name not in allowed:
            raise InvalidInput(f"cannot group usage by {name!r}: use any of "
                               f"{', '.join(allowed)}, comma-separated", param="group_by",
                               code="invalid_value")
        fields.append(name)
    return tuple(fields)


def _report(totals: list[UsageTotal], start: date, end: date, group_by: tuple[str, ...],
            fmt: Literal["json", "csv"], filename: str) -> UsageReport:
    data = [UsageEntry(
        tenant=t.tenant_id, adapter=t.adapter or None, day=t.day, key_id=t.key_id or None,
        requests=t.requests, prompt_tokens=t.prompt_tokens,
        completion_tokens=t.completion_tokens,
        total_tokens=t.prompt_tokens + t.completion_tokens, errors=t.errors) for t in totals]
    return UsageReport(UsageList(data=data, start=start, end=end, group_by=list(group_by)),
                       fmt, filename)
