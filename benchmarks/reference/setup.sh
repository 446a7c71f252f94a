#!/usr/bin/env bash
# The reference library, DIAGNijmegen's lightstream 1.0.7 from PyPI, in its own virtual environment
# .venv-reference (it shares this package's name, so it cannot live in .venv). Idempotent.
#
#     bash benchmarks/reference/setup.sh
#     BASE_PYTHON=python3 WHEELS=benchmarks/wheels bash benchmarks/reference/setup.sh   # offline
#
# The reference needs torch, torchvision, lightning and numpy. They are not installed a second
# time: the new environment reads them from the site-packages of BASE_PYTHON (default
# .venv/bin/python, which scripts/setup.sh makes with this project's torch/torchvision pins; it is
# run first when .venv is missing), through a .pth file that puts them after the environment's own
# site-packages, so the reference's `lightstream` comes first. BASE_PYTHON's pip installs the
# reference into the new environment's site-packages (--target: the base's own packages are not
# touched). WHEELS: install it from that folder of wheels instead of PyPI
# (benchmarks/carry_wheels.sh fills it, for the GPU machine, which has no network).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-reference
WANT=1.0.7

check() {  # the reference imports from outside the repository, without PYTHONPATH
  (cd / && env -u PYTHONPATH "$OLDPWD/$VENV/bin/python" -c "
import importlib.metadata, pathlib, sys
import torch, torchvision, lightning, numpy
import lightstream
from lightstream.core.scnn.scnn import StreamingCNN
version = importlib.metadata.version('lightstream')
where = pathlib.Path(lightstream.__file__).resolve()
assert version == '$WANT' and pathlib.Path(sys.prefix).resolve() in where.parents, (version, where)
print(f'reference lightstream {version} at {where.parent}, torch {torch.__version__}')")
}

if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then exit 0; fi

if [ -z "${BASE_PYTHON:-}" ]; then
  BASE_PYTHON=.venv/bin/python
  [ -x "$BASE_PYTHON" ] || bash scripts/setup.sh
fi
"$BASE_PYTHON" -c "import torch, torchvision, lightning, numpy" \
  || { echo "reference setup: $BASE_PYTHON lacks torch, torchvision, lightning or numpy" >&2; exit 1; }

rm -rf "$VENV"
"$BASE_PYTHON" -m venv --without-pip "$VENV"
own=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# shellcheck disable=SC2046
"$BASE_PYTHON" -m pip install -q --no-deps --target "$own" \
  $([ -n "${WHEELS:-}" ] && echo --no-index --find-links "$WHEELS") "lightstream==$WANT"
"$BASE_PYTHON" -c "import sysconfig; print('\n'.join(dict.fromkeys(sysconfig.get_paths()[k] for k in ('purelib', 'platlib'))))" \
  > "$own/zz_base_site_packages.pth"
check
