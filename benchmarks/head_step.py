#!/usr/bin/env python
"""Time of one TEDM head training step (what ``fit_bundle`` repeats 300 times): fp32 against bf16
autocast, and all timesteps against a random 2 per image (``train_head``'s ``timesteps_per_image``,
what Refine uses). Shapes of a `small4` backbone at 64 px, 8 images x 8 timesteps per step; the
variants interleaved, best of ``--repeats`` rounds of ``--steps`` steps each.

    python benchmarks/head_step.py [--threads 1] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from tedm_core.heads import FeatureHead, HeadConfig
from tedm_core.pipelines.fit import train_head
from tedm_core.runtime import autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    channels, sizes, images, timesteps = (128, 128, 64, 32), (8, 16, 32, 64), 8, 8
    features = [[torch.randn(images, timesteps, c, s, s, generator=generator) for c, s in zip(channels, sizes)]]
    targets = (torch.rand(images, 64, 64, generator=generator) > 0.6).long()
    start = FeatureHead(HeadConfig.for_method("tedm", channels, 2))
    device = torch.device("cpu")

    def run(precision: str, per_image) -> float:
        head = copy.deepcopy(start)
        tic = time.perf_counter()
        with autocast(device, precision):
            train_head(head, features, targets, args.steps, timesteps_per_image=per_image)
        return (time.perf_counter() - tic) / args.steps

    variants = {"fp32": ("fp32", None), "bf16 autocast": ("bf16", None), "fp32, 2 timesteps per image": ("fp32", 2)}
    best = {name: float("inf") for name in variants}
    for _ in range(args.repeats):
        for name, (precision, per_image) in variants.items():
            best[name] = min(best[name], run(precision, per_image))
    print(f"| head step ({images} images x {timesteps} timesteps, {args.threads} thread(s)) | seconds | vs fp32 |")
    print("|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {best['fp32'] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
