"""Settings from the environment: list settings are comma-separated, bounds are checked at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import Settings


def test_both_allowlists_take_comma_separated_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: LORAPLEX_LOCAL_SOURCE_ALLOWLIST=/data failed at start (it wanted JSON).
    monkeypatch.setenv("LORAPLEX_LOCAL_SOURCE_ALLOWLIST", "/data, /srv/adapters")
    monkeypatch.setenv("LORAPLEX_S3_SOURCE_ALLOWLIST", "s3://team-a/adapters,s3://team-b")
    settings = Settings()
    assert settings.local_source_allowlist == [Path("/data"), Path("/srv/adapters")]
    assert settings.s3_source_allowlist == ["s3://team-a/adapters", "s3://team-b"]


def test_a_single_local_folder_is_a_list_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_LOCAL_SOURCE_ALLOWLIST", "/data")
    assert Settings().local_source_allowlist == [Path("/data")]


def test_a_json_array_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the local allow-list required before: existing deployments keep working.
    monkeypatch.setenv("LORAPLEX_LOCAL_SOURCE_ALLOWLIST", '["/data", "/srv/a,b"]')
    assert Settings().local_source_allowlist == [Path("/data"), Path("/srv/a,b")]


def test_empty_allowlists_allow_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_LOCAL_SOURCE_ALLOWLIST", "")
    monkeypatch.setenv("LORAPLEX_S3_SOURCE_ALLOWLIST", "")
    settings = Settings()
    assert settings.local_source_allowlist == []
    assert settings.s3_source_allowlist == []


def test_a_bad_s3_allowlist_entry_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_S3_SOURCE_ALLOWLIST", "s3://team-a,https://not-s3")
    with pytest.raises(ValidationError, match="not an s3:// URI"):
        Settings()
