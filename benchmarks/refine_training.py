#!/usr/bin/env python
"""Refine's head training alone, as a Refine after two corrected slices runs it, and variants of it.

    python benchmarks/benchmark.py --quick        # writes the bundle this reads
    python benchmarks/refine_training.py [--bundle /tmp/tedm_benchmark/bundle_volume] [--rounds 3]

``refine_bundle`` on two slices' cached features (no anchors: a model not fitted on the volume,
the benchmark's case), 120 steps of 2 timesteps per slice, timed whole, with the minor page faults
it causes (``getrusage``: glibc returning and re-mapping large blocks shows there). Variants,
interleaved round by round: Refine as it runs where the session's passes run in fp32 and where
they run in bf16 (bf16 autocast, the coarse levels summed as matrix products, chunks of 4 maps;
session 24), bf16 with chunks of 2 maps, the head and features wholly
in bf16 (a bound on what bf16 arithmetic could save), fp32 with chunks of 1 or 4 maps, fp32 with
fused Adam. Each answers whether a change to the training pays; a change of rounding in the
learning is adopted only on validation (docs/results/REFINE_VALIDATION.md). The features come
from the segmenter's own passes over random slices: timings do not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from tedm_core.bundle import load_bundle
from tedm_core.pipelines import fit
from tedm_core.pipelines.segment import Segmenter, cache_dtype

# Each variant: the precision Refine's training is asked for, and a patch (see _patched).
VARIANTS = {
    "fp32 (Refine where the passes run in fp32)": ("fp32", None),
    "bf16 (Refine where the passes run in bf16)": ("bf16", None),
    "bf16, chunks of 2 maps": ("bf16", "chunks of 2"),
    "bf16 head and features (bound)": ("fp32", "wholly bf16"),
    "fp32, chunks of 1 map": ("fp32", "chunks of 1"),
    "fp32, chunks of 4 maps": ("fp32", "chunks of 4"),
    "fp32, fused Adam": ("fp32", "fused Adam"),
}


def _patched(patch: Optional[str]) -> contextlib.AbstractContextManager:
    """The patch that makes Refine's training a variant, undone on exit."""
    stack = contextlib.ExitStack()
    if patch is not None and patch.startswith("chunks of "):
        maps = int(patch.split()[2])
        stack.callback(setattr, fit, "maps_per_chunk", fit.maps_per_chunk)
        fit.maps_per_chunk = lambda device, dtype=None: maps
    elif patch == "wholly bf16":
        # Not a candidate (Adam on bf16 weights loses small updates): the most that bf16
        # arithmetic could save, with no autocast casts and no fp32 master weights.
        train = fit.train_head

        def in_bf16(head, features, *args, **kwargs):
            head.to(torch.bfloat16)
            try:
                return train(head, [[f.to(torch.bfloat16) for f in draw] for draw in features], *args, **kwargs)
            finally:
                head.float()

        stack.callback(setattr, fit, "train_head", train)
        fit.train_head = in_bf16
    elif patch == "fused Adam":
        adam = torch.optim.Adam
        stack.callback(setattr, torch.optim, "Adam", adam)
        torch.optim.Adam = lambda *args, **kwargs: adam(*args, fused=True, **kwargs)
    return stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/tedm_benchmark/bundle_volume"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not args.bundle.is_dir():
        raise SystemExit(f"{args.bundle}: no bundle there; run python benchmarks/benchmark.py --quick first")
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    segmenter = Segmenter(bundle, device="cpu")
    size = bundle.image_size
    slices = (torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).numpy()
    with torch.inference_mode():  # cached as a session caches them
        features = [f.to("cpu", cache_dtype(f.dtype)) for f in segmenter._features(torch.from_numpy(slices))]
    labels = (np.random.default_rng(0).random((2, size, size)) > 0.7).astype(np.int64)

    def refine(precision: str) -> None:
        fit.refine_bundle(
            bundle, slices, labels, features=features, device="cpu", precision=precision, show_progress=False
        )

    seconds: Dict[str, List[float]] = {name: [] for name in VARIANTS}
    faults: Dict[str, List[int]] = {name: [] for name in VARIANTS}
    for precision, patch in VARIANTS.values():  # warm-up: oneDNN's kernels for each variant
        with _patched(patch):
            refine(precision)
    for _ in range(args.rounds):
        for name, (precision, patch) in VARIANTS.items():
            with _patched(patch):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                tic = time.perf_counter()
                refine(precision)
                seconds[name].append(time.perf_counter() - tic)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(f"Refine's training, {args.threads} thread(s), {args.rounds} rounds\n")
    print("| variant | seconds, each round | minor page faults, each round |\n|---|---|---|")
    show: Callable[[List[float]], str] = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    for name in VARIANTS:
        print(f"| {name} | {show(seconds[name])} | {', '.join(map(str, faults[name]))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
