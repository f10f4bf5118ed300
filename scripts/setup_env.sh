# Sourced by run_tests.sh and run_demo.sh: a virtual environment with the CPU build of torch
# installed first (an unpinned torch would pull a multi-GB CUDA build), then this package with
# the extras named in $1 (e.g. "test" or "demo").
venv="${TEDM_VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[$1]"
