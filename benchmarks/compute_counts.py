#!/usr/bin/env python
"""Multiply-accumulates per image, counted with ptflops, as in the paper's Table 4.

N = one UNet pass; LEDM = 3 passes (truncated after the last tapped level) + its head;
TEDM and LEDMe = 8 passes + head. Also the truncation saving of the feature extractor.

    python benchmarks/compute_counts.py [--preset paper] [--image-size 128]
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

import torch
from ptflops import get_model_complexity_info

from tedm_core.features import LEDM_TIMESTEPS, TEDM_TIMESTEPS, DecoderFeatureExtractor
from tedm_core.heads import FeatureHead, HeadConfig
from tedm_core.model.backbone import PRESETS, build_unet
from tedm_core.model.diffusion import NoiseSchedule


class _UNetPass(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x):
        return self.unet(x, torch.full((x.shape[0],), 25, dtype=torch.long))


class _Extract(torch.nn.Module):
    """The truncated UNet pass as the extractor runs it (one timestep)."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, x):
        return self.extractor(x, (25,))[0]


class _Head(torch.nn.Module):
    def __init__(self, head, features, size):
        super().__init__()
        self.head, self.features, self.size = head, features, size

    def forward(self, _x):
        return self.head.logits(self.features, self.size)


def gmac(module, shape) -> float:
    macs, _ = get_model_complexity_info(module, shape, as_strings=False, print_per_layer_stat=False, verbose=False)
    return macs / 1e9


def count_macs(preset: str, image_size: Optional[int] = None) -> Dict[str, Any]:
    """GMAC per image of one UNet pass, the truncated feature pass, and each method (head included)."""
    config = PRESETS[preset]
    image_size = image_size or config.image_size
    config = config.with_(image_size=image_size)
    shape = (config.in_channels, image_size, image_size)
    unet = build_unet(config).eval()
    extractor = DecoderFeatureExtractor(unet, NoiseSchedule())
    full = gmac(_UNetPass(unet), shape)
    truncated = gmac(_Extract(extractor), shape)
    out: Dict[str, Any] = {
        "preset": preset,
        "image_size": image_size,
        "parameters_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "unet_gmac": full,
        "truncated_pass_gmac": truncated,
    }
    for method, steps in (("ledm", LEDM_TIMESTEPS), ("tedm", TEDM_TIMESTEPS), ("ledme", TEDM_TIMESTEPS)):
        head = FeatureHead(HeadConfig.for_method(method, extractor.level_channels, 2)).eval()
        with torch.no_grad():
            features = extractor(torch.zeros(1, *shape), steps)
        head_gmac = gmac(_Head(head, features, (image_size, image_size)), shape)
        out[f"{method}_gmac"] = len(steps) * truncated + head_gmac
        out[f"{method}_head_gmac"] = head_gmac
        out[f"{method}_steps"] = len(steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    counts = count_macs(args.preset, args.image_size)
    full, truncated = counts["unet_gmac"], counts["truncated_pass_gmac"]
    rows = [(m, counts[f"{m}_steps"], counts[f"{m}_gmac"], counts[f"{m}_head_gmac"]) for m in ("ledm", "tedm", "ledme")]
    print(
        f"{args.preset} UNet at {args.image_size} px: one full pass N = {full:.1f} GMAC; truncated "
        f"feature pass {truncated:.1f} GMAC ({100 * (1 - truncated / full):.1f} % saved)"
    )
    for method, s, total, head_gmac in rows:
        print(
            f"{method:6s} |S|={s}: {total:7.1f} GMAC per image ({total / full:4.1f} N), of which head {head_gmac:.2f}"
        )


if __name__ == "__main__":
    main()
