#!/usr/bin/env python
"""Live peak memory of one radiograph's UNet passes against the maps per UNet call (issue 11).

    python benchmarks/benchmark.py --quick        # writes the bundle this reads
    python benchmarks/maps_per_call.py [--bundle /tmp/tedm_benchmark/bundle_cxr]

One 64 px radiograph grid and its mirror, |S| timesteps each, go through the segmenter's
extractor (its precision, memory layout and attention) in calls of 1, 2, 4 or 8 maps. Each
setting runs in its own fresh process with glibc's mmap threshold fixed, as benchmark.py's memory
runs, so the peak is what the passes hold live. It answers one question: whether fewer maps per
call could bring the radiographs' ``memory_ratio_vs_straightforward`` to 5 (the straightforward
way holds ~40 MiB there). The passes run as ``Segmenter._features`` runs them: in bf16 on the
segmenter's bf16 copy of the UNet, without autocast (session 21), where bf16 was measured faster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import FIXED_MMAP_THRESHOLD
from head_memory import _PeakRss

from tedm_core.bundle import load_bundle
from tedm_core.pipelines.segment import Segmenter


def peak_of_one_radiograph(bundle: Path, maps_per_call: int) -> Tuple[float, float]:
    """MiB of resident memory the passes add at their peak, in this process, and a checksum of the features."""
    torch.set_num_threads(1)
    segmenter = Segmenter(load_bundle(bundle), device="cpu")
    timesteps = list(segmenter.timesteps)
    size = segmenter.bundle.image_size
    grid = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    images = (grid * 2 - 1, (grid * 2 - 1).flip(-1))

    def passes():
        for image in images:
            for start in range(0, len(timesteps), maps_per_call):
                yield segmenter.extractor(segmenter._to_device(image), timesteps[start : start + maps_per_call])

    with _PeakRss() as memory:
        for _ in passes():
            pass
    # Outside the measured block: its float64 copies are the checksum's, not the passes' (the
    # inference noise is fixed, so the second round of passes computes the same features).
    checksum = sum(float(level.double().sum()) for levels in passes() for level in levels)
    return memory.grown_kib / 1024, checksum


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/tedm_benchmark/bundle_cxr"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(peak_of_one_radiograph(args.bundle, args.child)))
        return 0
    if not args.bundle.is_dir():
        raise SystemExit(f"{args.bundle}: no bundle there; run python benchmarks/benchmark.py --quick first")
    print("| maps per UNet call | live peak (MiB) | feature checksum |\n|---|---|---|")
    for maps in (1, 2, 4, 8):
        command = [sys.executable, __file__, "--bundle", str(args.bundle), "--child", str(maps)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **FIXED_MMAP_THRESHOLD})
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        peak, checksum = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {maps} | {peak:.1f} | {checksum:.6f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
