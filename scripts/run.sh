#!/usr/bin/env bash
# Set up the runtime requirements and start the app (arguments go to app.py, e.g. --model tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
