#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (unit + integration with the
# real vLLM CPU engine, the real default model and a real S3 endpoint on loopback).
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
exec .venv/bin/python -m pytest -ra "$@"
