#!/usr/bin/env bash
# Set up everything (venv, requirements, Chromium) and run the whole test suite: lint, unit, API, browser.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not browser"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
