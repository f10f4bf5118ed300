#!/usr/bin/env python
"""The UNet pass with int8 convolutions against the default pass (issue 11: "bf16 or int8 where it pays").

    python benchmarks/benchmark.py --quick        # writes the bundle this reads
    python benchmarks/int8_pass.py [--bundle /tmp/tedm_benchmark/bundle_cxr] [--profile]

Every ``Conv2d`` of a copy of the segmenter's UNet (channels-last) becomes oneDNN's int8
convolution (``onednn::qconv2d_pointwise``, the kernel PyTorch's x86 int8 path lowers to): weights
per output channel, activations per tensor with static scales calibrated on other radiographs,
bf16 out. The rest of the pass (GroupNorm, SiLU, attention, the timestep MLP) stays as the default
runs it. Printed, all in this process and on one thread: the time of one radiograph's pass (its
inference timesteps in one call) in rounds alternating default and int8, and each way's largest
relative L2 error of the tapped features against fp32 on radiographs not used for calibration.
``--profile`` adds torch.profiler's table of each way: where the int8 way's time goes.

Eager PyTorch has no kernel that turns bf16 activations into uint8 in one pass, so each
convolution's input is converted in separate passes over memory (to fp32, quantize, raw bytes);
that is what this measures, since fusing them needs ``torch.compile``, measured elsewhere
(docs/results/PERFORMANCE.md, sessions 4, 8 and 23).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from tedm_core.bundle import load_bundle
from tedm_core.features import DecoderFeatureExtractor, LevelFeatures
from tedm_core.io.images import read_grey
from tedm_core.pipelines.segment import Segmenter
from tedm_core.preprocessing.intensity import normalise_intensity
from tedm_core.preprocessing.spatial import to_model_grid
from tedm_core.runtime import autocast

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UINT8_ZERO = 128  # activations are quantised symmetrically around this zero point


class Int8Conv2d(torch.nn.Module):
    """``conv`` as oneDNN's int8 convolution: weights per output channel, the input per tensor
    with the static range ``input_amax``, the output in bf16."""

    def __init__(self, conv: torch.nn.Conv2d, input_amax: float) -> None:
        super().__init__()
        weight = conv.weight.detach().float()
        self.weight_scale = (weight.abs().amax(dim=(1, 2, 3)) / 127).clamp_min(1e-12)
        int8_weight = torch.round(weight / self.weight_scale[:, None, None, None]).clamp(-128, 127).to(torch.int8)
        self.input_scale = max(input_amax, 1e-8) / 127
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.weight_zero = torch.zeros_like(self.weight_scale, dtype=torch.long)
        self.packed = torch.ops.onednn.qconv_prepack(
            int8_weight, self.weight_scale, self.input_scale, UINT8_ZERO, *self.geometry, None
        )
        self.bias = None if conv.bias is None else conv.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantised = torch.quantize_per_tensor(x.float(), self.input_scale, UINT8_ZERO, torch.quint8).int_repr()
        return torch.ops.onednn.qconv2d_pointwise(
            quantised, self.input_scale, UINT8_ZERO, self.packed, self.weight_scale, self.weight_zero, self.bias,
            *self.geometry, 1.0, 0, torch.bfloat16, "none", [], "",
        )  # fmt: skip


def input_ranges(unet: torch.nn.Module, run: Callable[[], object]) -> Dict[str, float]:
    """The largest |input| each convolution of ``unet`` sees while ``run`` runs (fp32)."""
    ranges: Dict[str, float] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            ranges[name] = max(ranges.get(name, 0.0), float(args[0].detach().abs().max()))

        return hook

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def with_int8_convolutions(unet: torch.nn.Module, ranges: Dict[str, float]) -> torch.nn.Module:
    unet = copy.deepcopy(unet)
    for name, conv in [(n, m) for n, m in unet.named_modules() if n in ranges]:  # those the taps reach
        parent, _, attribute = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, attribute, Int8Conv2d(conv, ranges[name]))
    return unet


def radiograph_grids(folder: Path, segmenter: Segmenter, count: int) -> List[torch.Tensor]:
    intensity, size = segmenter.bundle.backbone.intensity, segmenter.bundle.image_size
    grids = []
    for path in sorted(folder.glob("*.png"))[:count]:
        grid, _ = to_model_grid(torch.from_numpy(normalise_intensity(read_grey(path), intensity))[None], size)
        grids.append(grid.contiguous(memory_format=segmenter.memory_format))
    return grids


def relative_error(features: List[LevelFeatures], reference: List[LevelFeatures]) -> float:
    return max(
        float((level.float() - ref.float()).norm() / ref.float().norm())
        for levels, ref_levels in zip(features, reference)
        for level, ref in zip(levels, ref_levels)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("/tmp/tedm_benchmark/bundle_cxr"))
    parser.add_argument("--cxr", type=Path, default=DATA / "cxr" / "shenzhen" / "images")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not args.bundle.is_dir():
        raise SystemExit(f"{args.bundle}: no bundle there; run python benchmarks/benchmark.py --quick first")
    if not args.cxr.is_dir():
        raise SystemExit(f"{args.cxr}: no radiographs there (the data lives in ../shared/data)")
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    segmenter = Segmenter(bundle, device="cpu")
    default = segmenter.extractor
    fp32 = Segmenter(bundle, device="cpu", precision="fp32").extractor  # bf16 runs a bf16 copy of the UNet
    timesteps = list(segmenter.timesteps)
    grids = radiograph_grids(args.cxr, segmenter, 7)
    calibration, evaluation = grids[:4], grids[4:]

    def passes(extractor: DecoderFeatureExtractor, images: List[torch.Tensor], precision: str) -> List[LevelFeatures]:
        with autocast(segmenter.device, precision):
            return [extractor(image, timesteps) for image in images]

    ranges = input_ranges(fp32.unet, lambda: passes(fp32, calibration, "fp32"))
    int8 = DecoderFeatureExtractor(with_int8_convolutions(fp32.unet, ranges), fp32.schedule, fp32.levels)
    ways = {"default": (default, segmenter.precision), "int8 convolutions": (int8, "bf16")}

    reference = passes(fp32, evaluation, "fp32")
    print(f"{len(ranges)} convolutions; default precision {segmenter.precision}, {segmenter.memory_format}")
    print(f"| way | relative L2 error of the features vs fp32 ({len(evaluation)} radiographs) |\n|---|---|")
    for name, (extractor, precision) in ways.items():
        print(f"| {name} | {relative_error(passes(extractor, evaluation, precision), reference):.4f} |")

    seconds: Dict[str, List[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, (extractor, precision) in ways.items():
            passes(extractor, evaluation[:1], precision)  # warm
            start = time.perf_counter()
            for _ in range(4):
                passes(extractor, evaluation[:1], precision)
            seconds[name].append((time.perf_counter() - start) / 4)
    ratios = [d / q for d, q in zip(seconds["default"], seconds["int8 convolutions"])]
    print("\n| round | default | int8 convolutions | default / int8 |\n|---|---|---|---|")
    for i, (plain, int8_seconds) in enumerate(zip(seconds["default"], seconds["int8 convolutions"])):
        print(f"| {i + 1} | {plain * 1e3:.1f} ms | {int8_seconds * 1e3:.1f} ms | {plain / int8_seconds:.2f} |")
    print(f"median default / int8 per {len(timesteps)}-map pass: {statistics.median(ratios):.2f}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, (extractor, precision) in ways.items():
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                for _ in range(10):
                    passes(extractor, evaluation[:1], precision)
            print(f"\n{name}, 10 passes\n" + profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
