"""What a several-head model costs a user against its first head alone (issue 10, session 14).

    python benchmarks/ensemble_cost.py --model BUNDLE --input DIR [--rounds 3] [--threads 1]

Writes the model's first head as a one-head bundle (the same weights) into a temporary folder,
then runs ``tedm segment`` on ``--input`` with each model in turn (A B A B ...), each run its own
process with ``--threads`` torch threads, and prints each run's wall time and peak resident memory
(the child's own, from ``os.wait4``) and the per-pair time ratios.
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
from typing import Tuple


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


def timed_segment(model: Path, images: Path, output: Path, threads: int) -> Tuple[float, float]:
    """Wall seconds and peak resident MiB of one ``tedm segment`` process."""
    command = [sys.executable, "-m", "tedm_core.cli", "segment", "--model", str(model), "--input", str(images)]
    command += ["--output", str(output), "--overwrite"]
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
    parser.add_argument("--model", type=Path, required=True, help="a several-head bundle")
    parser.add_argument("--input", type=Path, required=True, help="images or volumes to segment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ensemble_cost_"))
    try:
        members = write_first_head(args.model, work / "first_head")
        models = {f"{members} heads": args.model, "first head alone": work / "first_head"}
        times = {name: [] for name in models}
        for round_index in range(1, args.rounds + 1):
            for name, model in models.items():
                seconds, peak = timed_segment(model, args.input, work / "out", args.threads)
                times[name].append(seconds)
                print(f"round {round_index}  {name:>16}: {seconds:6.1f} s, peak {peak:6.0f} MiB", flush=True)
        several, single = times.values()
        ratios = [a / b for a, b in zip(several, single)]
        print(f"per pair: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
