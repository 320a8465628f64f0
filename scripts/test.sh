#!/usr/bin/env bash
# Install everything the tests need, check the code (ruff, strict mypy on server/ and
# adapters/, both configured in pyproject.toml), then run the whole suite (unit, the API fuzz
# run against the fake engine, integration with the real vLLM CPU engine, the real default
# model and a real S3 endpoint on loopback).
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -ra "$@"
