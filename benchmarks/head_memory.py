#!/usr/bin/env python
"""Factorised first layer vs "upsample every level, concatenate, apply the MLP" (docs/method.md, section 4).

The features of one image's |S| timesteps are extracted once and saved; each way then runs in
its own fresh process that loads them, so its peak memory growth is its own. The
script prints, measured in this one run, the wall time and peak resident-memory growth of each, their
ratios, and the largest logit difference.

    python benchmarks/head_memory.py [--preset paper] [--image-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, Optional

import torch

from tedm_core.features import TEDM_TIMESTEPS, DecoderFeatureExtractor
from tedm_core.heads import PixelMLP
from tedm_core.model.backbone import PRESETS, build_unet
from tedm_core.model.diffusion import NoiseSchedule

FEATURES = "/tmp/tedm_head_features.pt"


def _extract(preset: str, image_size: int) -> list:
    torch.manual_seed(0)
    config = PRESETS[preset].with_(image_size=image_size)
    extractor = DecoderFeatureExtractor(build_unet(config).eval(), NoiseSchedule())
    with torch.no_grad():
        flat = [f[0] for f in extractor(torch.rand(1, 1, image_size, image_size) * 2 - 1, TEDM_TIMESTEPS)]
    torch.save(flat, FEATURES)
    return extractor.level_channels


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_bytes() -> int:
    """The kernel's resident-set high-water mark (VmHWM) of this process."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _high_water_bytes() <= _rss_bytes() + 64 * 1024
    except OSError:
        return False


class _PeakRss:
    """The peak resident set size above the level at entry.

    Where the kernel lets the high-water mark be reset (``/proc/self/clear_refs``), the peak is the
    kernel's own VmHWM after the block: exact, whatever the allocation's lifetime. Elsewhere the
    RSS is polled every millisecond, which can miss a buffer that lives shorter than a poll (or
    while the polling thread waits for the GIL). (ru_maxrss is a lifetime high-water mark, set by
    imports and loading, so it would hide this.) ``method`` says which was used."""

    def __enter__(self) -> _PeakRss:
        self.method = "VmHWM" if _reset_high_water() else "polled"
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        if self.method == "VmHWM":
            self.peak = max(self.peak, _high_water_bytes())

    @property
    def grown_kib(self) -> int:
        return (self.peak - self.base) // 1024


def json_of_child(command: list, what: str, env: Optional[Dict[str, str]] = None) -> dict:
    """Run ``command`` (a benchmark's child process, its own fresh process for its own peak
    memory) with ``env`` added to this one's, and return the JSON of its last line of output;
    a failure ends the benchmark with ``what`` and the end of the child's error output."""
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(image_size: int, variant: str) -> None:
    flat = torch.load(FEATURES, weights_only=True)
    torch.manual_seed(0)
    mlp = PixelMLP([f.shape[1] for f in flat], num_outputs=1).eval()
    run = mlp if variant == "factorised" else mlp.forward_dense
    with torch.no_grad(), _PeakRss() as memory:
        tic = time.perf_counter()
        logits = run(flat, (image_size, image_size))
        seconds = time.perf_counter() - tic
    grown = memory.grown_kib
    torch.save(logits, f"/tmp/tedm_head_{variant}.pt")
    print(json.dumps({"seconds": seconds, "peak_kib": grown}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--variant", choices=["dense", "factorised"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return _child(args.image_size, args.variant)
    channels = _extract(args.preset, args.image_size)
    results = {}
    for variant in ("dense", "factorised"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--preset",
                args.preset,
                "--image-size",
                str(args.image_size),
                "--variant",
                variant,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    dense, fact = results["dense"], results["factorised"]
    difference = (
        (
            torch.load("/tmp/tedm_head_dense.pt", weights_only=True)
            - torch.load("/tmp/tedm_head_factorised.pt", weights_only=True)
        )
        .abs()
        .max()
        .item()
    )
    print(
        f"{args.preset} backbone at {args.image_size} px, decoder channels {channels}, |S| = "
        f"{len(TEDM_TIMESTEPS)} timesteps of one image"
    )
    print(f"largest |logit difference|: {difference:.2e}")
    print(
        f"time         dense {dense['seconds'] * 1e3:8.1f} ms    factorised "
        f"{fact['seconds'] * 1e3:8.1f} ms    ratio {dense['seconds'] / fact['seconds']:5.2f}x"
    )
    print(
        f"peak memory  dense {dense['peak_kib'] / 1024:8.1f} MiB   factorised "
        f"{fact['peak_kib'] / 1024:8.1f} MiB   ratio {dense['peak_kib'] / max(1, fact['peak_kib']):5.2f}x"
    )


if __name__ == "__main__":
    main()
