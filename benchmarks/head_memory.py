#!/usr/bin/env python
"""Factorised first layer vs "upsample every level, concatenate, apply the MLP" (METHOD.md section 4).

Each way runs in its own fresh process on the same features (same seed); the script prints,
measured in this one run, the wall time and the peak memory growth (ru_maxrss) of each, their
ratios, and the largest logit difference.

    python benchmarks/head_memory.py [--preset paper] [--image-size 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from tedm_core.features import TEDM_TIMESTEPS, DecoderFeatureExtractor
from tedm_core.heads import PixelMLP
from tedm_core.model.backbone import PRESETS, build_unet
from tedm_core.model.diffusion import NoiseSchedule


def _child(preset: str, image_size: int, variant: str) -> None:
    torch.manual_seed(0)
    config = PRESETS[preset].with_(image_size=image_size)
    extractor = DecoderFeatureExtractor(build_unet(config).eval(), NoiseSchedule())
    with torch.no_grad():
        flat = [f[0] for f in extractor(torch.rand(1, 1, image_size, image_size) * 2 - 1, TEDM_TIMESTEPS)]
        mlp = PixelMLP(extractor.level_channels, num_outputs=1).eval()
        run = mlp if variant == "factorised" else mlp.forward_dense
        run([f[:1] for f in flat], (image_size, image_size))  # warm-up on one timestep
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tic = time.perf_counter()
        logits = run(flat, (image_size, image_size))
        seconds = time.perf_counter() - tic
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    torch.save(logits, f"/tmp/tedm_head_{variant}.pt")
    print(json.dumps({"seconds": seconds, "peak_kib": grown, "channels": extractor.level_channels}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--variant", choices=["dense", "factorised"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return _child(args.preset, args.image_size, args.variant)
    results = {}
    for variant in ("dense", "factorised"):
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--image-size", str(args.image_size), "--variant", variant], check=True, capture_output=True, text=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    dense, fact = results["dense"], results["factorised"]
    difference = (torch.load("/tmp/tedm_head_dense.pt", weights_only=True) - torch.load("/tmp/tedm_head_factorised.pt", weights_only=True)).abs().max().item()
    print(f"{args.preset} backbone at {args.image_size} px, decoder channels {dense['channels']}, |S| = {len(TEDM_TIMESTEPS)} timesteps of one image")
    print(f"largest |logit difference|: {difference:.2e}")
    print(f"time         dense {dense['seconds'] * 1e3:8.1f} ms    factorised {fact['seconds'] * 1e3:8.1f} ms    ratio {dense['seconds'] / fact['seconds']:5.2f}x")
    print(f"peak memory  dense {dense['peak_kib'] / 1024:8.1f} MiB   factorised {fact['peak_kib'] / 1024:8.1f} MiB   ratio {dense['peak_kib'] / max(1, fact['peak_kib']):5.2f}x")


if __name__ == "__main__":
    main()
