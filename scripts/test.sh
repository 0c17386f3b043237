#!/usr/bin/env bash
# Lint, type-check and run the whole test suite (real SoftHSM2 tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check hsmbridge tests benchmarks
.venv/bin/ruff format --check hsmbridge tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
