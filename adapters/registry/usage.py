"""Daily usage in the registry database (`usage_daily`): what every gateway's meter adds, and
what the bills are made from.

`add` is an upsert that adds to the counters already there (`INSERT ... ON CONFLICT DO UPDATE
SET requests = usage_daily.requests + excluded.requests, ...`), so any number of gateways
flush at once without losing a count: the database does each addition under the row's lock.
Rows are written in primary-key order, so two flushes touching the same rows lock them in the
same order and never deadlock.

`query` sums a UTC day range (both ends included), grouped by any of the day, the tenant, the
adapter and the key. Rows outlive their tenant, adapter and key (no foreign keys), so a
deleted tenant's bill stays readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from sqlalchemy import ColumnElement, exists, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from adapters.errors import InvalidInput, NotFound
from adapters.registry import Registry
from adapters.registry.models import Tenant, UsageDay

__all__ = ["GROUP_FIELDS", "UsageRow", "UsageStore", "UsageTotal"]

# What a query may group by, and the column of each.
GROUP_FIELDS: dict[str, Any] = {
    "tenant": UsageDay.tenant_id,
    "day": UsageDay.day,
    "adapter": UsageDay.adapter,
    "key": UsageDay.key_id,
}
_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "errors")
_PK = ("day", "tenant_id", "adapter", "key_id")
# Rows per INSERT statement: 9 bound values each stays far under SQLite's and asyncpg's limits
# on parameters per statement (32766 and 32767).
_CHUNK = 500


@dataclass(frozen=True)
class UsageRow:
    """One row of `usage_daily`: a UTC day's usage by one key of one tenant on one adapter.
    `adapter` is "" for the base model, `key_id` "" when no key is known."""

    day: date
    tenant_id: str
    adapter: str
    key_id: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0


@dataclass(frozen=True)
class UsageTotal:
    """A sum over a query's range. A field the query did not group by is None (`tenant_id`
    always holds the tenant in a one-tenant query); `adapter` is "" for the base model."""

    day: date | None
    tenant_id: str | None
    adapter: str | None
    key_id: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int


class UsageStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def add(self, rows: Sequence[UsageRow]) -> None:
        """Add these counts to the stored ones, in one transaction: all of them or none."""
        merged = _merge(rows)
        if not merged:
            return
        insert = (postgresql.insert if self.registry.engine.dialect.name == "postgresql"
                  else sqlite.insert)
        values = [{"day": k[0], "tenant_id": k[1], "adapter": k[2], "key_id": k[3],
                   **dict(zip(_COUNTERS, counts, strict=True))}
                  for k, counts in sorted(merged.items())]
        async with self.registry.transaction() as s:
            for i in range(0, len(values), _CHUNK):
                stmt = insert(UsageDay).values(values[i:i + _CHUNK])
                stmt = stmt.on_conflict_do_update(
                    index_elements=list(_PK),
                    set_={name: getattr(UsageDay, name) + getattr(stmt.excluded, name)
                          for name in _COUNTERS})
                await s.execute(stmt)

    async def query(self, tenant_id: str, start: date, end: date,
                    group_by: Sequence[str]) -> list[UsageTotal]:
        """One tenant's usage from `start` to `end` (both included), grouped by any of "day",
        "adapter" and "key", ordered by those fields in the order given. A tenant the registry
        does not know, and that has no usage either (deleted ones keep theirs), is NotFound."""
        _check_group_by(group_by, tuple(f for f in GROUP_FIELDS if f != "tenant"))
        async with self.registry.transaction() as s:
            known = await s.scalar(select(or_(
                exists().where(Tenant.id == tenant_id),
                exists().where(UsageDay.tenant_id == tenant_id))))
            if not known:
                raise NotFound(f"tenant {tenant_id!r} not found", code="tenant_not_found")
            totals = await _totals(s, start, end, group_by, UsageDay.tenant_id == tenant_id)
        return [replace(t, tenant_id=tenant_id) for t in totals]

    async def query_all(self, start: date, end: date,
                        group_by: Sequence[str]) -> list[UsageTotal]:
        """Every tenant's usage from `start` to `end` (both included), grouped by any of
        "tenant", "day", "adapter" and "key", ordered by those fields in the order given."""
        _check_group_by(group_by, tuple(GROUP_FIELDS))
        async with self.registry.transaction() as s:
            return await _totals(s, start, end, group_by, None)


def _merge(rows: Iterable[UsageRow]) -> dict[tuple[date, str, str, str], list[int]]:
    """Rows with the same key summed: one INSERT must not name a row twice (PostgreSQL
    refuses an ON CONFLICT DO UPDATE that would change one row twice)."""
    merged: dict[tuple[date, str, str, str], list[int]] = {}
    for row in rows:
        counts = merged.setdefault((row.day, row.tenant_id, row.adapter, row.key_id), [0] * 4)
        for i, name in enumerate(_COUNTERS):
            counts[i] += getattr(row, name)
    return merged


def _check_group_by(group_by: Sequence[str], allowed: tuple[str, ...]) -> None:
    for name in group_by:
        if name not in allowed:
            raise InvalidInput(f"cannot group usage by {name!r}: use any of {', '.join(allowed)}",
                               param="group_by", code="invalid_value")
    if len(set(group_by)) != len(group_by):
        raise InvalidInput("group_by names a field twice", param="group_by",
                           code="invalid_value")


async def _totals(s: AsyncSession, start: date, end: date, group_by: Sequence[str],
                  where: ColumnElement[bool] | None) -> list[UsageTotal]:
    columns = [GROUP_FIELDS[name] for name in group_by]
    sums = [func.sum(getattr(UsageDay, name)) for name in _COUNTERS]
    q = select(*columns, *sums).where(UsageDay.day >= start, UsageDay.day <= end)
    if where is not None:
        q = q.where(where)
    if columns:
        q = q.group_by(*columns).order_by(*columns)
    totals = []
    for row in (await s.execute(q)).all():
        grouped = dict(zip(group_by, row[:len(columns)], strict=True))
        counts = row[len(columns):]
        if counts[0] is None:  # no grouping and no rows: SUM over nothing is NULL
            continue
        totals.append(UsageTotal(
            day=grouped.get("day"), tenant_id=grouped.get("tenant"),
            adapter=grouped.get("adapter"), key_id=grouped.get("key"),
            # PostgreSQL's sum(bigint) is numeric (a Decimal here): back to int.
            **{name: int(value) for name, value in zip(_COUNTERS, counts, strict=True)}))
    return totals

