"""Wire models of the usage API (`GET /admin/tenants/{tenant}/usage`, `GET /admin/usage`).

Every entry carries every field. A field the query did not group by is null (the sums are
over all its values). Grouped by adapter, `adapter` is also null for the base model; grouped
by key, `key_id` is also null for requests without a known key: the list's `group_by` tells
the two meanings apart. The CSV export has the same columns, in the same
order, with an empty cell for null.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, Field

# The CSV columns, in order: the fields of UsageEntry.
CSV_FIELDS = ("tenant", "adapter", "day", "key_id", "requests", "prompt_tokens",
              "completion_tokens", "total_tokens", "errors")


class UsageEntry(BaseModel):
    tenant: str | None = Field(description="The tenant; null only in `GET /admin/usage` when "
                                           "not grouped by tenant.")
    adapter: str | None = Field(description="The adapter's name when grouped by adapter, null "
                                            "for the base model; null when not grouped by it.")
    day: date | None = Field(description="The UTC day (ISO date) when grouped by day, else null.")
    key_id: str | None = Field(description="The API key's id when grouped by key, null for "
                                           "requests without a known key; null when not "
                                           "grouped by it.")
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")
    errors: int = Field(description="Requests that ended in an error (counted in `requests`).")


class UsageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageEntry] = Field(description="One entry per group with any usage, ordered "
                                               "by the `group_by` fields in their order.")
    start: date = Field(description="The first UTC day summed.")
    end: date = Field(description="The last UTC day summed (included).")
    group_by: list[str] = Field(description="What the entries are grouped by: any of "
                                            "\"tenant\", \"day\", \"adapter\", \"key\".")
