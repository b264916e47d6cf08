#!/usr/bin/env bash
# The README's test command: set up (idempotent), then the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --browser
exec .venv/bin/python -m pytest -q "$@"
