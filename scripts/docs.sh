#!/usr/bin/env bash
# The documentation site (MkDocs, strict). Run after `bash scripts/setup.sh`:
#   bash scripts/docs.sh build    # executes stale tutorials, builds site/ strictly, checks their figures
#   bash scripts/docs.sh serve    # the same at http://127.0.0.1:8000 (add -a 0.0.0.0:8000 on a remote machine)
# See scripts/docs.py for what each step does.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
exec "$python" scripts/docs.py "$@"
