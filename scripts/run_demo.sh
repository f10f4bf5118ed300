#!/usr/bin/env bash
# Fresh machine -> the demo: set up .venv (scripts/setup_env.sh), then scripts/demo.py
# (MNI152 from nilearn; about ten minutes on 2 CPU cores). Arguments go to demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh demo
exec python scripts/demo.py "$@"
