#!/usr/bin/env bash
# Fresh machine -> the demo: set up like scripts/run_tests.sh, then run scripts/demo.py
# (MNI152 from nilearn; about ten minutes on 2 CPU cores). Arguments go to demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TEDM_VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[demo]"
exec python scripts/demo.py "$@"
