#!/usr/bin/env python
"""Live peak memory and time of one radiograph's UNet passes against the maps per UNet call (issue 11).

    python benchmarks/benchmark.py --quick        # writes the bundle this reads
    python benchmarks/maps_per_call.py [--bundle /tmp/tedm_benchmark/bundle_cxr]

One 64 px radiograph grid and its mirror, |S| timesteps each, go through the segmenter's
extractor (its precision, memory layout and attention) in calls of 1, 2, 4 or 8 maps, after one
untimed round of the same calls (a process's first call at a shape builds what oneDNN keeps for
it; ``benchmark.py`` warms both ways up likewise). Each setting runs in two fresh processes: one
with glibc's mmap threshold fixed, as benchmark.py's memory runs, for the peak the passes hold
live, and one with glibc's defaults, as its timed runs, for the best of 7 rounds. It answers one
question: what fewer maps per call would buy the radiographs' ``memory_ratio_vs_straightforward``
and what it would cost in speed. The passes run as ``Segmenter._features`` runs them: in bf16 on
the segmenter's bf16 copy of the UNet, without autocast (session 21), where bf16 was measured
faster.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import FIXED_MMAP_THRESHOLD
from head_memory import _PeakRss, json_of_child

from tedm_core.bundle import load_bundle
from tedm_core.pipelines.segment import Segmenter

ROUNDS = 7


def measure(bundle: Path, maps_per_call: int, what: str) -> Dict[str, float]:
    """``what`` = "memory": MiB of resident memory one round of passes adds at its peak, and a
    checksum of its features; "time": its best time of ``ROUNDS`` in seconds."""
    torch.set_num_threads(1)
    segmenter = Segmenter(load_bundle(bundle), device="cpu")
    timesteps = list(segmenter.timesteps)
    size = segmenter.bundle.image_size
    grid = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    images = [segmenter._to_device(image) for image in (grid * 2 - 1, (grid * 2 - 1).flip(-1))]

    def passes():
        for image in images:
            for start in range(0, len(timesteps), maps_per_call):
                yield segmenter.extractor(image, timesteps[start : start + maps_per_call])

    for _ in passes():  # the warm-up round
        pass
    if what == "time":
        best = float("inf")
        for _ in range(ROUNDS):
            tic = time.perf_counter()
            for _ in passes():
                pass
            best = min(best, time.perf_counter() - tic)
        return {"seconds": best}
    with _PeakRss() as memory:
        for _ in passes():
            pass
    # Outside the measured block: its float64 copies are the checksum's, not the passes' (the
    # inference noise is fixed, so another round of passes computes the same features).
    checksum = sum(float(level.double().sum()) for levels in passes() for level in levels)
    return {"peak_mib": memory.grown_kib / 1024, "checksum": checksum}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/tedm_benchmark/bundle_cxr"))
    parser.add_argument("--child", nargs=2, metavar=("MAPS", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.bundle, int(args.child[0]), args.child[1])))
        return 0
    if not args.bundle.is_dir():
        raise SystemExit(f"{args.bundle}: no bundle there; run python benchmarks/benchmark.py --quick first")

    def child(maps: int, what: str) -> Dict[str, float]:
        command = [sys.executable, __file__, "--bundle", str(args.bundle), "--child", str(maps), what]
        return json_of_child(
            command, f"{maps} maps per call ({what})", FIXED_MMAP_THRESHOLD if what == "memory" else None
        )

    print(
        "| maps per UNet call | live peak (MiB) | one radiograph's passes (ms, best of "
        f"{ROUNDS}) | feature checksum |\n|---|---|---|---|"
    )
    for maps in (1, 2, 4, 8):
        memory, timing = child(maps, "memory"), child(maps, "time")
        print(
            f"| {maps} | {memory['peak_mib']:.1f} | {1000 * timing['seconds']:.1f} | {memory['checksum']:.6f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
