#!/usr/bin/env bash
# Fresh machine -> test results: set up .venv (scripts/setup_env.sh), ruff (lint, format), then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh -k geometry`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh test
# One intra-op thread per process: the tests run beside each other's subprocesses on 2 cores,
# where OpenMP oversubscription was measured to slow small models more than tenfold.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Lint and format first: a violation fails CI before the (minutes of) tests run.
ruff check .
ruff format --check .
exec python -m pytest -q -ra "$@"
