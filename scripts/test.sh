#!/usr/bin/env bash
# The README's test command: set up (idempotent), lint and format check (ruff), then the whole test
# suite on the CPU. Extra arguments go to pytest (e.g. -m "not slow", the inner loop).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --browser
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
