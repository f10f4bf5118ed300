#!/usr/bin/env python
"""DDPM pretraining step time of a preset: attention through SDPA (the default) against MONAI's
explicit attention, and the stored layout against channels-last.

The step is ``tedm pretrain``'s (forward, MSE on the noise, backward, Adam) on random images,
batch 16 by default; the variants are interleaved, best of ``--repeats`` rounds each, so a
change in the machine's load hits them all alike.

    python benchmarks/train_step.py [--preset small4] [--batch-size 16] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import best_times, explicit_attention_copy

from tedm_core.choices import PRESET_NAMES
from tedm_core.model.backbone import PRESETS
from tedm_core.model.checkpoint import Backbone


def train_step(
    backbone: Backbone, unet: torch.nn.Module, batch: int, memory_format: torch.memory_format
) -> Callable[[], None]:
    """One pretraining step of a private copy of ``unet``, as ``tedm_core.pipelines.pretrain`` runs it."""
    model = copy.deepcopy(unet).train().to(memory_format=memory_format)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    size = backbone.config.image_size
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, backbone.config.in_channels, size, size, generator=generator) * 2 - 1

    def step() -> None:
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, backbone.noise_schedule.num_train_timesteps, (batch,), generator=generator)
        x_t = backbone.noise_schedule.add_noise(x0, noise, t).contiguous(memory_format=memory_format)
        loss = (model(x_t, t).float() - noise).pow(2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = Backbone.new(PRESETS[args.preset])
    unet = backbone.unet
    variants = {
        "sdpa, stored layout (default)": train_step(backbone, unet, args.batch_size, torch.contiguous_format),
        "explicit attention, stored layout": train_step(
            backbone, explicit_attention_copy(unet), args.batch_size, torch.contiguous_format
        ),
        "sdpa, channels-last": train_step(backbone, unet, args.batch_size, torch.channels_last),
    }
    best = best_times(variants, args.repeats)
    load = os.getloadavg()[0]
    print(f"{args.preset}, batch {args.batch_size}, {torch.get_num_threads()} threads, load average {load:.1f}")
    default = best["sdpa, stored layout (default)"]
    for name, seconds in best.items():
        print(f"  {name:36s} {seconds:6.3f} s per step   (default is {seconds / default:.2f}x faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
