"""The web console at /console (issue 13): static assets shipped in the package."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
