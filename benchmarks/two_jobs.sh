#!/usr/bin/env bash
# Two segmentations at once on one machine, against one alone, per OpenMP waiting setting (issue 11).
#
#   python benchmarks/benchmark.py --quick     # or a whole run: writes the work folder this reads
#   bash benchmarks/two_jobs.sh [WORK] [THREADS]
#
# Each job is benchmark.py's pipeline child on WORK's volume (its warm-up input, then the volume
# file to file), printing its seconds and the time of its UNet passes. For libgomp's default and for
# each setting below: one job with THREADS torch threads (default: one per core), then two such
# jobs at once; and two jobs at once with THREADS/2 threads each. PyTorch's OpenMP threads spin
# before they sleep, which makes one job fast and two jobs at once many times slower (README,
# "Threads, and two jobs on one machine"). One run per line: compare runs made together only.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/tedm_benchmark}"
THREADS="${2:-$(nproc)}"
HALF=$(( THREADS > 1 ? THREADS / 2 : 1 ))
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
[ -d "$WORK/bundle_volume" ] || {
    echo "$WORK: no benchmark work folder there; run python benchmarks/benchmark.py --quick first" >&2
    exit 2
}

job() {  # one pipeline child with $1 threads -> "seconds s (UNet passes s)"
    "$PYTHON" benchmarks/benchmark.py --child tedm volume --work "$WORK" --threads "$1" | tail -1 |
        "$PYTHON" -c 'import json, sys; r = json.load(sys.stdin); print("%.1f s (UNet %.1f s)" % (r["seconds"], r["unet"]))'
}

for setting in default OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=1000 GOMP_SPINCOUNT=10000; do
    unset OMP_WAIT_POLICY GOMP_SPINCOUNT
    [ "$setting" = default ] || export "${setting?}"
    echo "== $setting: one job, $THREADS threads: $(job "$THREADS")"
    a=$(mktemp) b=$(mktemp)
    job "$THREADS" >"$a" & job "$THREADS" >"$b"; wait
    echo "== $setting: two jobs at once, $THREADS threads each: $(cat "$a") / $(cat "$b")"
    job "$HALF" >"$a" & job "$HALF" >"$b"; wait
    echo "== $setting: two jobs at once, $HALF thread(s) each: $(cat "$a") / $(cat "$b")"
    rm -f "$a" "$b"
done
