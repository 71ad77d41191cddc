#!/usr/bin/env bash
# Create .venv and install the project's requirements (idempotent).
#   bash scripts/setup.sh        runtime only
#   bash scripts/setup.sh dev    runtime + test tools + Chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "dev" ]; then
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  if [ ! -x /usr/bin/chromium ]; then
    # Playwright cannot download its own browsers here: the tests drive Debian's Chromium.
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
