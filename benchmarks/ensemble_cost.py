"""What a several-head model costs a user against its first head alone (issue 10, session 14), or
its recorded inference timesteps against others (session 15).

    python benchmarks/ensemble_cost.py --model BUNDLE --input DIR [--rounds 3] [--threads 1] [--timesteps T ...]

Without ``--timesteps``, writes the model's first head as a one-head bundle (the same weights) into
a temporary folder and compares the two; with it, compares the model as recorded against the same
model run with ``tedm segment --timesteps T ...``. Runs ``tedm segment`` on ``--input`` with each
in turn (A B A B ...), each run its own process with ``--threads`` torch threads, and prints each
run's wall time and peak resident memory (the child's own, from ``os.wait4``) and the per-pair
time ratios (A over B).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence, Tuple


def write_first_head(model: Path, out: Path) -> int:
    """The first head of ``model`` as a one-head bundle at ``out``; returns the model's head count."""
    from tedm_core.bundle import load_bundle, save_bundle
    from tedm_core.heads import FeatureHead

    bundle = load_bundle(model)
    if bundle.head is None:
        raise SystemExit(f"{model}: the supervised baseline has no head")
    head = FeatureHead(replace(bundle.head.config, members=1))
    head.mlp.load_state_dict(bundle.head.mlp.state_dict())
    save_bundle(replace(bundle, head=head.eval(), fingerprint=None, source=None), out)
    return bundle.head.config.members


def timed_segment(
    model: Path, images: Path, output: Path, threads: int, extra: Sequence[str] = ()
) -> Tuple[float, float]:
    """Wall seconds and peak resident MiB of one ``tedm segment`` process (``extra``: more of its options)."""
    command = [sys.executable, "-m", "tedm_core.cli", "segment", "--model", str(model), "--input", str(images)]
    command += ["--output", str(output), "--overwrite", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    tic = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - tic
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tedm segment --model {model} failed; run it by hand to see why")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="a TEDM bundle (of several heads, without --timesteps)"
    )
    parser.add_argument("--input", type=Path, required=True, help="images or volumes to segment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--timesteps", type=int, nargs="+", help="compare against the model on these timesteps, not its first head"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ensemble_cost_"))
    try:
        if args.timesteps:
            other = ["--timesteps", *map(str, args.timesteps)]
            runs = {"as recorded": (args.model, []), f"timesteps {' '.join(other[1:])}": (args.model, other)}
        else:
            members = write_first_head(args.model, work / "first_head")
            runs = {f"{members} heads": (args.model, []), "first head alone": (work / "first_head", [])}
        times = {name: [] for name in runs}
        for round_index in range(1, args.rounds + 1):
            for name, (model, extra) in runs.items():
                seconds, peak = timed_segment(model, args.input, work / "out", args.threads, extra)
                times[name].append(seconds)
                print(f"round {round_index}  {name:>24}: {seconds:6.1f} s, peak {peak:6.0f} MiB", flush=True)
        first, second = times.values()
        ratios = [a / b for a, b in zip(first, second)]
        print(f"per pair: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
