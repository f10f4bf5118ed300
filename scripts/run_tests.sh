#!/usr/bin/env bash
# Fresh machine -> test results: a virtual environment, the CPU build of torch first (an
# unpinned torch would pull a multi-GB CUDA build), the package with its test extras, pytest.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh -k geometry`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TEDM_VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# One intra-op thread per process: the tests run beside each other's subprocesses on 2 cores,
# where OpenMP oversubscription was measured to slow small models more than tenfold.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -ra "$@"
