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
  # Playwright cannot download its own browsers here: the tests drive Debian's Chromium. The metrics test scrapes
  # the app with Debian's Prometheus server (skipped, saying why, where it cannot be installed).
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  updated=""
  if [ ! -x /usr/bin/chromium ]; then
    $SUDO apt-get update -qq && updated=1
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
  if [ ! -x /usr/bin/prometheus ]; then
    [ -n "$updated" ] || $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
      || echo "setup: Debian's prometheus could not be installed; the Prometheus scrape test will be skipped" >&2
  fi
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
