#!/usr/bin/env python
"""TEDM against a straightforward implementation of the same method, and against the machine's fp32 peak.

    python benchmarks/benchmark.py [--quick] [--json FILE] [--threads N]

Everything is measured in this one run, with the same torch threads everywhere:

* whole-volume segmentation of a BraTS volume (FLAIR, 240x240x155; ``--quick``: 6 of its slices)
  and of a set of radiographs, read from and written to files, by the pipeline (the product's
  batch path, ``tedm_core.pipelines.batch.run_batch``, as ``tedm segment`` runs it) and by the straightforward
  implementation kept in this file (one UNet call per slice and timestep, full decoder and output
  convolution, every slice including background, every decoder level upsampled to the image
  size and concatenated before the MLP, per-step probabilities kept for the whole volume, fp32);
  each way runs in its own fresh process, so its peak resident memory growth is its own (measured
  in a second run with a fixed glibc mmap threshold, so that it is the live peak: see ``spawn``),
  and first segments a warm-up input of the same kind, untimed (see ``run_child``);
  the radiographs are timed in five alternating rounds and each way's median counts;
* the UNet passes as the pipeline runs them, the DDPM training step, and a square fp32 (and
  bf16) matrix product, interleaved, best of a few repeats each: achieved FLOP/s = ptflops MACs x 2
  / time, over the matrix product's FLOP/s;
* where the pipeline's time goes (``torch.profiler`` over the UNet; wall clock for IO and head);
* Refine after two corrected slices over a full segmentation, through
  ``tedm_core.pipelines.interactive.InteractiveSession``, the object the worker and so the Slicer
  module run (without MRML and the worker's transport), split into training the head and
  re-applying it (``--profile-refine``: that Refine under ``torch.profiler``).

Weights: the ``small`` preset at 64 px, untrained (seed 0), with a TEDM head fitted for a few
steps on two tumour slices of the case: timings do not depend on the weights, and the fitted
head makes the compared masks non-trivial (their Dice says whether two implementations agree,
not how good the model is).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_memory import _PeakRss, json_of_child

from tedm_core.bundle import ModelBundle, load_bundle, save_bundle
from tedm_core.features import INFERENCE_SEED, DecoderFeatureExtractor, timestep_noise
from tedm_core.heads import class_probabilities
from tedm_core.io.volumes import read_case, read_volume, volume_suffix, write_float_volume, write_label_volume
from tedm_core.model.backbone import PRESETS, attention_modules
from tedm_core.model.checkpoint import Backbone
from tedm_core.pipelines.fit import fit_bundle
from tedm_core.pipelines.interactive import InteractiveSession, Reporter
from tedm_core.pipelines.segment import Segmenter
from tedm_core.pipelines.volume import (
    classes_to_label_values,
    label_array_to_classes,
    labelled_slices_from_volumes,
    nonempty_slice_mask,
    normalise_volume,
    resolve_axis,
)
from tedm_core.preprocessing.intensity import MULTIMODAL_MRI, RADIOGRAPH, above_background
from tedm_core.preprocessing.spatial import from_model_grid, to_model_grid
from tedm_core.runtime import autocast
from tedm_core.slicing import extract_slices, reassemble, to_slices

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# One timing of the fp32 peak is this many 1024x1024 products (~0.3 s): long enough not to be
# decided by one scheduling hiccup on a shared machine, like the UNet timings it is compared with.
MATMULS_PER_TIMING = 8
CONV_PEAK_CHANNELS = 256
GOALS = {  # key: (comparison, goal)
    "speedup_vs_straightforward": (">=", 3.0),
    "memory_ratio_vs_straightforward": (">=", 5.0),
    "dice_vs_straightforward": (">=", 0.99),
    "pipeline_over_unet": ("<=", 1.3),
    "refine_fraction": ("<=", 0.15),
    "unet_fraction_of_fp32_peak": (">=", 0.8),
    "train_fraction_of_fp32_peak": (">=", 0.5),
    "dice_vs_fp32": (">=", 0.99),
}


# ---------------------------------------------------------------------------------------------
# The straightforward implementation of the same method


def explicit_attention_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``unet`` with MONAI's default attention (softmax(QK^T)V materialised) instead of
    the SDPA kernel ``tedm_core.model.backbone.build_unet`` switches on: the same weights."""
    unet = copy.deepcopy(unet)
    for module in attention_modules(unet):
        module.use_flash_attention = False
    return unet


def plain_bundle(bundle: ModelBundle) -> ModelBundle:
    """``bundle`` with an explicit-attention copy of its UNet (the bundle itself untouched)."""
    return replace(bundle, backbone=replace(bundle.backbone, unet=explicit_attention_copy(bundle.backbone.unet)))


class Straightforward:
    """TEDM as one would first write it: per slice, per timestep, one UNet call (batch 1, full
    decoder and output convolution), every decoder level upsampled to the image size and
    concatenated, the MLP applied to that, fp32, default memory layout, MONAI's default (explicit)
    attention; with the bundle's test-time flip, all of it again for the mirrored slice. Same
    taps, same noise (``timestep_noise`` of (seed, t)) and same weights as the pipeline, so the
    outputs agree."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.unet = explicit_attention_copy(bundle.backbone.unet).eval()
        self.schedule = bundle.backbone.noise_schedule
        self.mlps = [mlp.eval() for mlp in bundle.head.member_mlps]
        self.size = bundle.image_size
        self.unet_seconds = 0.0
        self.captured: Dict[int, torch.Tensor] = {}
        for level, block in enumerate(self.unet.up_blocks):  # every level, before its upsampler
            if getattr(block, "upsampler", None) is not None:
                block.upsampler.register_forward_pre_hook(
                    lambda _m, args, i=level: self.captured.__setitem__(i, args[0])
                )
            else:
                block.register_forward_hook(lambda _m, _a, out, i=level: self.captured.__setitem__(i, out))

    @torch.no_grad()
    def per_step_probabilities(self, image: np.ndarray) -> np.ndarray:
        """One normalised slice (C, H, W) -> per-step class probabilities (S, K, H, W) on its grid."""
        grid, transform = to_model_grid(torch.from_numpy(np.ascontiguousarray(image[None])), self.size)
        out = []
        for t in self.bundle.prediction_timesteps:  # the steps the pipeline predicts with
            step = torch.tensor([t])
            x_t = self.schedule.add_noise(grid, timestep_noise(grid.shape[1:], (t,), INFERENCE_SEED), step)
            tic = time.perf_counter()
            self.unet(x_t, step)
            self.unet_seconds += time.perf_counter() - tic
            levels = [self.captured[i] for i in sorted(self.captured)]
            for mlp in self.mlps:  # an ensemble head's members: each one's maps count as steps
                probabilities = class_probabilities(mlp.forward_dense(levels, (self.size, self.size)))
                out.append(from_model_grid(probabilities, transform)[0])
        return torch.stack(out).numpy()

    def segment_slices(self, slices: np.ndarray):
        """(N, C, H, W) -> labels (N, H, W), uncertainty (N, H, W); all per-step maps kept, of
        the mirrored slices too when the bundle predicts with a test-time flip."""
        orientations = 2 if self.bundle.test_time_flip else 1
        per_step = np.empty(
            (len(slices), orientations, len(self.bundle.prediction_timesteps) * len(self.mlps), self.bundle.num_classes)
            + slices.shape[2:],
            np.float32,
        )
        for n, image in enumerate(slices):
            per_step[n, 0] = self.per_step_probabilities(image)
            if orientations == 2:
                per_step[n, 1] = self.per_step_probabilities(image[..., ::-1])[..., ::-1]
        labels = per_step.mean(axis=(1, 2)).argmax(axis=1).astype(np.uint8)
        return labels, per_step.std(axis=2).max(axis=2).mean(axis=1)


# ---------------------------------------------------------------------------------------------
# One way on one workload, in a fresh process (``--child``)


def _timed(module: torch.nn.Module, totals: Dict[str, float], key: str) -> None:
    """Count the wall time of ``module``'s forward calls into ``totals[key]``."""
    _timed_function(module, "forward", totals, key)


def _timed_function(
    owner: Any, name: str, totals: Dict[str, float], key: str, sync: Optional[Callable[[], None]] = None
) -> Callable[..., Any]:
    """Count the wall time of ``owner.name`` (a function the pipeline looks up there) into
    ``totals[key]``, calling ``sync`` before and after (a GPU's kernels then count where they
    run); returns the original, for the caller to put back."""
    function = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if sync is not None:
            sync()
        tic = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            if sync is not None:
                sync()
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - tic

    setattr(owner, name, wrapper)
    return function


def straightforward_case(straightforward: Straightforward, image: Path, out: Path, totals: Dict[str, float]) -> None:
    """One image or volume file -> label and uncertainty files, as ``tedm segment`` names and writes them."""
    bundle = straightforward.bundle
    tic = time.perf_counter()
    volume = read_case([image], channel_names=None)
    totals["read"] = totals.get("read", 0.0) + time.perf_counter() - tic
    slices, layout = extract_slices(normalise_volume(volume, bundle.intensity), resolve_axis(volume, bundle.axis))
    labels, uncertainty = straightforward.segment_slices(slices)
    labels, uncertainty = reassemble(labels, layout), reassemble(uncertainty, layout)
    tic = time.perf_counter()
    name = image.name[: len(image.name) - len(volume_suffix(image))]
    suffix = ".png" if volume_suffix(image) == ".png" else ".nii.gz"
    write_float_volume(out / f"{name}_uncertainty{suffix}", uncertainty, volume)
    values = [0, 255] if suffix == ".png" else list(bundle.label_values)  # batch.file_label_values' rule
    write_label_volume(out / f"{name}{suffix}", classes_to_label_values(labels, values), volume)
    totals["write"] = totals.get("write", 0.0) + time.perf_counter() - tic


# Each workload's input folder and warm-up input folder under the work folder (see ``prepare``).
INPUT_FOLDERS = {"volume": ("volume_in", "volume_warm"), "cxr": ("cxr", "cxr_warm")}


def run_child(way: str, workload: str, work: Path) -> Dict[str, Any]:
    """One way on one workload's input folder, writing into ``out_<way>_<workload>``.

    The pipeline is the product's own path: :func:`tedm_core.pipelines.batch.run_batch`, the one
    writer behind ``tedm segment`` and ``scripts/batch_segment.py`` (reading, background slices
    skipped, passes, head, reassembly, atomic writes). Its reads, writes, UNet and head calls are
    timed by wrapping the functions it calls, not by changing them.

    Both ways first segment the workload's warm-up input (another radiograph, or two slices of the
    volume), untimed: a process's first segmentation also builds what the libraries keep for
    the rest of its life (oneDNN's kernels for each shape, the file formats' codecs), 20 MiB of the
    straightforward way's 38.5 MiB on a radiograph (session 28). The pipeline's set-up (measuring
    bf16 against fp32) did that for its passes before the timer, the straightforward way's
    first call inside it, so it was counted against one way only. ``first_peak_mib`` keeps the
    warm-up's own peak."""
    from tedm_core.pipelines import batch

    inputs, warm_inputs = (work / folder for folder in INPUT_FOLDERS[workload])
    out, warm_out = work / f"out_{way}_{workload}", work / f"warm_{way}_{workload}"
    for folder in (out, warm_out):
        folder.mkdir(exist_ok=True)
    bundle = load_bundle(work / f"bundle_{workload}")
    totals: Dict[str, float] = {}
    tic = time.perf_counter()  # the model's set-up: the pipeline's includes measuring bf16 against fp32
    if way == "tedm":
        segmenter = Segmenter(bundle, device="cpu")
        options = batch.BatchOptions(overwrite=True, uncertainty=True, show_progress=False)

        def segment_folder(folder: Path, into: Path) -> None:
            report = batch.run_batch(segmenter, folder, into, options)
            assert not report.failed, [r.error for r in report.failed]

    else:
        straightforward = Straightforward(bundle)

        def segment_folder(folder: Path, into: Path) -> None:
            for image in sorted(folder.iterdir()):
                straightforward_case(straightforward, image, into, totals)

    setup = time.perf_counter() - tic
    with _PeakRss() as first:
        tic = time.perf_counter()
        segment_folder(warm_inputs, warm_out)
        warmup = time.perf_counter() - tic
    totals.clear()  # the warm-up's reads and writes are not the measured run's
    totals.update(setup=setup, warmup=warmup)
    if way == "tedm":  # timed from here on
        _timed(segmenter.extractor, totals, "unet")
        for mlp in segmenter.head.member_mlps:
            _timed(mlp, totals, "head")
        _timed_function(batch, "read_case", totals, "read")
        _timed_function(batch, "write_float_volume", totals, "write")
        _timed_function(batch, "write_label_volume", totals, "write")
    else:
        straightforward.unet_seconds = 0.0
    with _PeakRss() as memory:
        tic = time.perf_counter()
        segment_folder(inputs, out)
        seconds = time.perf_counter() - tic
    if way == "straightforward":
        totals["unet"] = straightforward.unet_seconds
    return {
        "seconds": seconds,
        "peak_mib": memory.grown_kib / 1024,
        "first_peak_mib": first.grown_kib / 1024,
        "peak_method": memory.method,
        **totals,
    }


# glibc raises its mmap threshold whenever a large block is freed; blocks of that size then come
# from the heap and stay resident after they are freed, so the resident peak depends on the
# allocation history: 5-41 MiB between identical runs of the radiograph workload (session 9).
# With a fixed threshold every block above it is mapped and returned to the system when freed,
# so the resident peak is the live peak (the straightforward way, warm, on one radiograph:
# 18.3-18.8 MiB in six runs, session 28). Allocation gets slower (page faults), so the timed runs
# keep glibc's default and the memory is measured in a second run.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
# Timed runs per way and workload (the median counts). On this project's shared virtual
# machines one run of the radiograph workload varied 2.36-2.98 s (pipeline) and 5.21-6.91 s
# (straightforward) in five alternating pairs, enough to move the ratio from 2.4 to 3.1 between
# full runs (session 9); five rounds of it cost ~45 s. The volume's straightforward run takes
# two minutes, so it runs once (it varied 114-130 s over three full runs).
TIMING_ROUNDS = {"volume": 1, "cxr": 5}


def spawn(way: str, workload: str, work: Path, threads: int, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    command = [sys.executable, __file__, "--child", way, workload, "--work", str(work), "--threads", str(threads)]
    return json_of_child(command, f"{way} on {workload}", env)


# ---------------------------------------------------------------------------------------------
# Setup: inputs and weights


def prepare(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """The volume (all of it, or a few slices with ``--quick``), the radiographs and the two bundles."""
    case = args.case
    volume = read_case([case / "FLAIR.nii.gz"], channel_names=["FLAIR"])
    truth = read_volume(case / "GT_W.nii.gz", allow_constant=True)
    areas = (truth.array[0] > 0).reshape(truth.array.shape[1], -1).sum(axis=1)  # per file-K slice
    top = int(np.argmax(areas))
    fit_slices = [top, top - 8]
    whole_volume, whole_truth = volume, truth
    if args.slices:  # evenly spaced slices of the whole volume, plus the two the head is fitted on
        keep = sorted(set(np.linspace(0, len(areas) - 1, args.slices).round().astype(int).tolist()) | set(fit_slices))
        volume = replace(volume, array=volume.array[:, keep])
        truth = replace(truth, array=truth.array[:, keep])
        fit_slices = [keep.index(k) for k in fit_slices]
    # The input folder holds the image alone: for a one-channel model every volume file under
    # it is a case (tedm_core.io.cases), so the ground truth is kept apart.
    # Each way's warm-up input (run_child): two of the volume's slices, and the radiograph
    # before the measured ones.
    warm = replace(volume, array=volume.array[:, sorted(fit_slices)])
    for folder, image in zip(INPUT_FOLDERS["volume"], (volume, warm)):
        (work / folder).mkdir(exist_ok=True)
        write_float_volume(work / folder / "FLAIR.nii.gz", image.array[0], image)

    radiographs = sorted((args.cxr).glob("*.png"))[-args.radiographs - 1 :]  # the in-domain test end of the list
    for folder, paths in zip(INPUT_FOLDERS["cxr"], (radiographs[1:], radiographs[:1])):
        (work / folder).mkdir(exist_ok=True)
        for old in (work / folder).iterdir():
            old.unlink()
        for path in paths:
            (work / folder / path.name).symlink_to(path)

    torch.manual_seed(0)
    backbone = Backbone.new(PRESETS["small"], intensity=MULTIMODAL_MRI, channel_names=["FLAIR"])
    pairs = labelled_slices_from_volumes(volume, truth, backbone.intensity, [0, 1], axis="axial", slices=fit_slices)
    tic = time.perf_counter()
    bundle = fit_bundle(
        backbone, pairs.slices, pairs.labels, "tedm", ["background", "tumour"], [0, 1],
        steps=args.head_steps, noise_draws=1, device="cpu", precision="fp32", show_progress=False,
    )  # fmt: skip
    fit_seconds = time.perf_counter() - tic
    save_bundle(bundle, work / "bundle_volume", overwrite=True)
    radiograph = replace(bundle, backbone=replace(bundle.backbone, intensity=RADIOGRAPH))
    save_bundle(radiograph, work / "bundle_cxr", overwrite=True)
    return {
        "bundle": bundle,
        "volume": volume,
        "truth": truth,
        "whole_volume": whole_volume,
        "whole_truth": whole_truth,
        "fit_seconds": fit_seconds,
    }


# ---------------------------------------------------------------------------------------------
# In-process measurements


def _rounded(value: Any) -> Any:
    return round(value, 2) if isinstance(value, float) else value


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def gmac(module: torch.nn.Module, shape: Sequence[int]) -> float:
    from ptflops import get_model_complexity_info

    macs, _ = get_model_complexity_info(
        module, tuple(shape), as_strings=False, print_per_layer_stat=False, verbose=False
    )
    return macs / 1e9


class _OneStep(torch.nn.Module):
    """ptflops wrapper: the pipeline's truncated pass (``full=False``) or the whole UNet, one timestep."""

    def __init__(self, extractor: DecoderFeatureExtractor, full: bool) -> None:
        super().__init__()
        self.extractor, self.full = extractor, full

    def forward(self, x: torch.Tensor) -> Any:
        if self.full:
            return self.extractor.unet(x, torch.full((x.shape[0],), 25, dtype=torch.long))
        return self.extractor(x, (25,))[0]


def best_times(functions: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """Each function's best wall time over ``repeats`` rounds, the functions interleaved in each
    round, so that a change in the machine's load hits them all alike."""
    best = {name: float("inf") for name in functions}
    for fn in functions.values():  # warm-up: oneDNN primitive creation, allocator
        fn()
    for _ in range(repeats):
        for name, fn in functions.items():
            tic = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - tic)
    return best


def measure_compute(bundle: ModelBundle, slices: np.ndarray, repeats: int, train_batch: int) -> Dict[str, Any]:
    """UNet passes (as the pipeline runs them, and variants), training steps and matrix products."""
    size = bundle.image_size
    grid, transform = to_model_grid(torch.from_numpy(slices), size)
    default = Segmenter(bundle, device="cpu")
    fp32 = Segmenter(bundle, device="cpu", precision="fp32")
    contiguous = Segmenter(bundle, device="cpu", memory_format="contiguous", precision="fp32")
    # plain: the UNet as one would first run it (stored layout, MONAI's explicit attention), fp32
    plain = Segmenter(plain_bundle(bundle), device="cpu", memory_format="contiguous", precision="fp32")
    # channels-last, explicit attention
    explicit = Segmenter(plain_bundle(bundle), device="cpu", precision="fp32")
    steps = len(default.timesteps)
    batch = min(default.batch_size, len(grid))
    per_map = gmac(_OneStep(plain.extractor, full=False), grid.shape[1:])
    per_image_full = gmac(_OneStep(plain.extractor, full=True), grid.shape[1:])

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a[:256, :256].bfloat16(), b[:256, :256].bfloat16()  # emulated on CPUs without AVX512-BF16: kept small
    # The other fp32 matrix-product engine in the same process: oneDNN's direct convolution (an
    # implicit matrix product, K = 256 x 9). torch.mm goes to MKL, which runs its AVX2 code on AMD
    # CPUs: on the AVX-512 EPYCs this project had in session 8 it reached ~95 GFLOP/s where this
    # convolution reached ~220, so the peak is the faster of the two, never a flattering one.
    conv_in = torch.randn(1, CONV_PEAK_CHANNELS, 64, 64).contiguous(memory_format=torch.channels_last)
    conv_weight = torch.randn(CONV_PEAK_CHANNELS, CONV_PEAK_CHANNELS, 3, 3).contiguous(
        memory_format=torch.channels_last
    )
    conv_flop = 2 * CONV_PEAK_CHANNELS**2 * 9 * 64 * 64

    def train_step_fn(
        memory_format: torch.memory_format, unet: Optional[torch.nn.Module] = None, precision: str = "fp32"
    ) -> Callable[[], None]:
        model = copy.deepcopy(unet or bundle.backbone.unet).train().to(memory_format=memory_format)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
        schedule = bundle.backbone.noise_schedule
        x0 = grid[torch.arange(train_batch) % len(grid)].contiguous(memory_format=memory_format)
        generator = torch.Generator().manual_seed(0)

        def step() -> None:
            noise = torch.randn(x0.shape, generator=generator).contiguous(memory_format=memory_format)
            t = torch.randint(0, 1000, (train_batch,), generator=generator)
            with autocast(torch.device("cpu"), precision):
                prediction = model(schedule.add_noise(x0, noise, t), t)
            loss = F.mse_loss(prediction.float(), noise)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

        return step

    def passes(segmenter: Segmenter, slices_per_call: int) -> Callable[[], None]:
        """All of ``grid`` through ``segmenter``'s UNet, ``slices_per_call`` slices per call:
        every variant does the same work, long enough (seconds) for one timing to mean something."""
        return lambda: [
            segmenter._features(grid[i : i + slices_per_call]) for i in range(0, len(grid), slices_per_call)
        ]

    def autocast_passes(segmenter: Segmenter, slices_per_call: int) -> Callable[[], None]:
        """``passes`` of an fp32 segmenter under bf16 autocast: the default until session 21."""
        run = passes(segmenter, slices_per_call)

        def call() -> None:
            with autocast(torch.device("cpu"), "bf16"):
                run()

        return call

    # the head on the same slices' features, in the default precision and in fp32
    features = {"head": (default, default._features(grid)), "head_fp32": (fp32, fp32._features(grid))}

    functions = {
        "matmul_fp32": lambda: [torch.mm(a, b) for _ in range(MATMULS_PER_TIMING)],
        "matmul_bf16": lambda: torch.mm(a16, b16),
        "conv_fp32": lambda: [F.conv2d(conv_in, conv_weight, padding=1) for _ in range(MATMULS_PER_TIMING)],
        "unet": passes(default, batch),
        "unet_fp32": passes(fp32, batch),
        # bf16 autocast over the fp32 weights, with explicit attention (measured faster there)
        "unet_bf16_autocast": autocast_passes(explicit, batch),
        **{name: (lambda seg=seg, f=f: seg._head_predict(f, transform)) for name, (seg, f) in features.items()},
        "unet_contiguous": passes(contiguous, batch),
        "unet_explicit_attention": passes(explicit, batch),
        "unet_plain": passes(plain, batch),
        "train_contiguous": train_step_fn(torch.contiguous_format),
        "train_channels_last": train_step_fn(torch.channels_last),
        "train_explicit_attention": train_step_fn(
            torch.contiguous_format, explicit_attention_copy(bundle.backbone.unet)
        ),
        # reported, not used: pretraining stays fp32 until a bf16 backbone is shown to be as good
        "train_bf16_autocast": train_step_fn(torch.channels_last, precision="bf16"),
    }
    for slices_per_call in (2, 4):
        if len(grid) >= slices_per_call and slices_per_call != batch:
            functions[f"unet_{slices_per_call}_slices"] = passes(default, slices_per_call)
    best = best_times(functions, repeats)
    matmul_peak = 2 * n**3 * MATMULS_PER_TIMING / best["matmul_fp32"]
    conv_peak = conv_flop * MATMULS_PER_TIMING / best["conv_fp32"]
    peak = max(matmul_peak, conv_peak)
    result: Dict[str, Any] = {
        "gmac_per_map": per_map,
        "gmac_per_image_full_pass": per_image_full,
        "maps_per_call": batch * steps,
        "precision": default.precision,
        "fp32_peak_gflops": peak / 1e9,
        "fp32_matmul_gflops": matmul_peak / 1e9,
        "fp32_conv_gflops": conv_peak / 1e9,
        "bf16_matmul_gflops": 2 * 256**3 / best["matmul_bf16"] / 1e9,
        "seconds": best,
    }
    variants = ("unet", "unet_bf16_autocast", "unet_fp32", "unet_contiguous", "unet_explicit_attention", "unet_plain")
    for name in variants + ("unet_2_slices", "unet_4_slices"):
        if name in best:
            result[f"{name}_gflops"] = 2 * per_map * 1e9 * len(grid) * steps / best[name] / 1e9
    for name in ("train_contiguous", "train_channels_last", "train_explicit_attention", "train_bf16_autocast"):
        result[f"{name}_gflops"] = 3 * 2 * per_image_full * 1e9 * train_batch / best[name] / 1e9
    result["head_speed_vs_fp32"] = best["head_fp32"] / best["head"]
    result["unet_fraction_of_fp32_peak"] = result["unet_gflops"] * 1e9 / peak
    # pretraining (tedm_core.pipelines.pretrain) runs the stored layout
    result["train_fraction_of_fp32_peak"] = result["train_contiguous_gflops"] * 1e9 / peak

    # Agreement of the default (fastest kept) configuration with the plain one (these slices), and
    # what bf16 gives: speed and agreement of one map (bf16 is emulated, so slow, on
    # CPUs without AVX512-BF16/AMX).
    result["dice_vs_fp32"] = dice(default.predict(slices).labels, plain.predict(slices).labels)
    index = int(np.argmax([above_background(s).sum() for s in slices]))
    one = slices[index : index + 1]
    single = {p: Segmenter(bundle, device="cpu", precision=p, timesteps=bundle.timesteps[:1]) for p in ("fp32", "bf16")}
    grid_one, _ = to_model_grid(torch.from_numpy(one), size)
    one_map = best_times({p: (lambda s=s: s._features(grid_one)) for p, s in single.items()}, 1)
    result["bf16_unet_speed_vs_fp32"] = one_map["fp32"] / one_map["bf16"]
    result["bf16_dice_vs_fp32"] = dice(single["bf16"].predict(one).labels, single["fp32"].predict(one).labels)
    return result


def measure_compile(bundle: ModelBundle, slices: np.ndarray, precision: str) -> Dict[str, float]:
    """``torch.compile`` (inductor) of the whole UNet, channels-last, at the pipeline's maps per call:
    the compile time and the steady-state speed against eager. (The extractor's per-pass hooks and
    early stop would break the graph; this is the best case for compiling.)"""
    unet = copy.deepcopy(bundle.backbone.unet).eval().to(memory_format=torch.channels_last)
    grid, _ = to_model_grid(torch.from_numpy(slices[:4]), bundle.image_size)
    maps = grid.repeat_interleave(len(bundle.timesteps), dim=0).contiguous(memory_format=torch.channels_last)
    t = torch.full((maps.shape[0],), 25, dtype=torch.long)
    with torch.no_grad(), autocast(torch.device("cpu"), precision):  # the default's precision
        tic = time.perf_counter()
        compiled = torch.compile(unet)
        compiled(maps, t)
        compile_seconds = time.perf_counter() - tic
        best = best_times({"eager": lambda: unet(maps, t), "compiled": lambda: compiled(maps, t)}, 2)
    return {
        "precision": precision,
        "compile_seconds": compile_seconds,
        "compiled_speed_vs_eager": best["eager"] / best["compiled"],
    }


def profile_unet(bundle: ModelBundle, slices: np.ndarray, device: str = "cpu") -> Dict[str, float]:
    """Share of the UNet passes' own time per kind of operation (torch.profiler): self CPU time
    on the CPU, the GPU's kernel time on CUDA (one call of the Segmenter's batch)."""
    segmenter = Segmenter(bundle, device=device)
    grid, _ = to_model_grid(torch.from_numpy(slices[: segmenter.batch_size]), bundle.image_size)
    segmenter._features(grid)
    on_gpu = segmenter.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        segmenter._features(grid)
        if on_gpu:
            torch.cuda.synchronize(segmenter.device)
    kinds = {
        "convolution": ("conv",),
        "normalisation": ("group_norm", "batch_norm", "layer_norm"),
        "attention": ("bmm", "baddbmm", "softmax", "scaled_dot_product", "matmul", "addmm", "linear", "mm"),
        "activation": ("silu", "relu", "gelu"),
        "up/downsampling": ("upsample", "interpolate"),
    }
    shares: Dict[str, float] = dict.fromkeys(list(kinds) + ["other (adds, copies, layout)"], 0.0)
    total = 0.0
    for event in prof.key_averages():
        if on_gpu and event.device_type != DeviceType.CPU:
            continue  # a kernel: its time counts under the operation that launched it
        name = event.key.lower()
        own = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        total += own
        kind = next((k for k, words in kinds.items() if any(w in name for w in words)), "other (adds, copies, layout)")
        shares[kind] += own
    return {k: v / max(total, 1e-9) for k, v in shares.items()}


def measure_refine(bundle: ModelBundle, volume: Any, truth: Any, profile_ops: bool = False) -> Dict[str, Any]:
    """Segment the whole volume (whatever ``--slices`` says: Refine's cost is fixed, so its
    fraction means something only against a whole volume's segmentation), then Refine after two
    corrected slices, through the product's own object:
    :class:`~tedm_core.pipelines.interactive.InteractiveSession`, which the worker (``tedm serve``)
    and so the Slicer module run (as ``benchmarks/refine_vs_segment.py --in-process``). The two
    tumour slices the segmentation got most wrong are corrected to the ground truth."""
    session = InteractiveSession(volume)
    tic = time.perf_counter()
    segmented = session.segment(bundle, device="cpu")
    segment_seconds = time.perf_counter() - tic

    layout = session.layout
    current = to_slices(segmented.labels, layout)
    truth_slices = to_slices(label_array_to_classes(truth, [0, 1]).astype(np.uint8), layout)
    tumour = [n for n in range(len(truth_slices)) if truth_slices[n].any()]
    corrected = sorted(sorted(tumour, key=lambda n: dice(current[n], truth_slices[n]))[:2])
    edited = current.copy()
    edited[corrected] = truth_slices[corrected]
    # Where Refine's time goes, from its own progress reports: the last training step's report
    # ends the head's training, the rest is re-applying it to the cached features.
    trained_at: List[float] = []

    def note_progress(fraction: float, message: str) -> None:
        if message.startswith("refine step") and fraction >= 0.8:
            trained_at.append(time.perf_counter())

    # With profile_ops the Refine runs under torch.profiler, which slows it: its times then only
    # say where the time goes, not how much there is.
    profiler = profile(activities=[ProfilerActivity.CPU]) if profile_ops else contextlib.nullcontext()
    with profiler:
        tic = time.perf_counter()
        refined = session.refine(reassemble(edited, layout), reporter=Reporter(progress=note_progress))
        refine_seconds = time.perf_counter() - tic
    if profile_ops:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    train_seconds = trained_at[0] - tic if trained_at else float("nan")
    assert refined.changed_slices == corrected, (refined.changed_slices, corrected)
    cache_mib = session.feature_cache_nbytes / 2**20
    session.close()
    return {
        "segment_seconds": segment_seconds,
        "refine_seconds": refine_seconds,
        "refine_train_seconds": train_seconds,
        "refine_reapply_seconds": refine_seconds - train_seconds,
        "slices_run": int(segmented.slices_run),
        "corrected_slices": corrected,
        "feature_cache_mib": cache_mib,
        "refine_fraction": refine_seconds / segment_seconds,
        "profiled": profile_ops,
    }


# ---------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 slices, 1 radiograph, 1 repeat and round (minutes)")
    parser.add_argument("--slices", type=int, help="segment this many evenly spaced slices (+2) instead of the volume")
    parser.add_argument("--radiographs", type=int, help="how many radiographs (default 8, --quick 1)")
    parser.add_argument("--json", type=Path, help="write the key ratios (and the details) to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads everywhere (default: torch's)")
    parser.add_argument("--case", type=Path, default=DATA / "brain" / "brats" / "Brats18_CBICA_AAB_1")
    parser.add_argument("--cxr", type=Path, default=DATA / "cxr" / "shenzhen" / "images")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/tedm_benchmark"), help="scratch folder (outside the repo)"
    )
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes to compile)")
    parser.add_argument("--refine-only", action="store_true", help="measure refine_fraction alone")
    parser.add_argument(
        "--profile-refine", action="store_true", help="with --refine-only: where Refine's time goes (torch.profiler)"
    )
    parser.add_argument("--child", nargs=2, metavar=("WAY", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if args.child:
        print(json.dumps(run_child(args.child[0], args.child[1], args.work)))
        return 0
    if not args.case.is_dir() or not args.cxr.is_dir():
        raise SystemExit(f"data not found: {args.case} / {args.cxr} (the data lives in ../shared/data)")
    if args.quick:
        args.slices = args.slices or 2
    args.radiographs = args.radiographs or (1 if args.quick else 8)
    args.head_steps = 10 if args.quick else 50
    repeats = 1 if args.quick else 3
    args.work.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    print(
        f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, load average {load_before[0]:.1f}",
        flush=True,
    )

    setup = prepare(args, args.work)
    bundle = setup["bundle"]
    print(
        f"head fitted in {setup['fit_seconds']:.1f} s; volume {setup['volume'].array.shape[1:]} (K, J, I)", flush=True
    )

    if args.refine_only:
        refine = measure_refine(bundle, setup["whole_volume"], setup["whole_truth"], args.profile_refine)
        print(json.dumps(refine))
        if args.json:
            args.json.write_text(
                json.dumps({"refine_fraction": refine["refine_fraction"], "details": refine}, indent=1)
            )
        return 0
    runs: Dict[str, Dict[str, Any]] = {}
    ways = ("tedm", "straightforward")
    for workload in ("volume", "cxr"):
        # Timed runs alternate between the two ways; each way's median run counts.
        rounds = TIMING_ROUNDS[workload] if not args.quick else 1
        timed: Dict[str, List[Dict[str, Any]]] = {way: [] for way in ways}
        for _ in range(rounds):
            for way in ways:
                timed[way].append(spawn(way, workload, args.work, threads))
        for way in ways:
            median = sorted(timed[way], key=lambda run: run["seconds"])[rounds // 2]
            memory_run = spawn(way, workload, args.work, threads, FIXED_MMAP_THRESHOLD)
            runs[f"{way}_{workload}"] = {
                **median,
                "seconds_of_each_round": [run["seconds"] for run in timed[way]],
                "peak_mib": memory_run["peak_mib"],
                "peak_mib_default_malloc": median["peak_mib"],
            }
            print(
                f"{way:15s} {workload:6s} {json.dumps({k: _rounded(v) for k, v in runs[f'{way}_{workload}'].items()})}",
                flush=True,
            )

    def label_file_dice(name: str) -> float:
        ours = read_volume(args.work / f"out_tedm_{name}", allow_constant=True).array
        plain = read_volume(args.work / f"out_straightforward_{name}", allow_constant=True).array
        return dice(ours, plain)

    volume_dice = label_file_dice("volume/FLAIR.nii.gz")
    cxr_dice = [
        label_file_dice(f"cxr/{p.name}")
        for p in sorted((args.work / "out_tedm_cxr").glob("*.png"))
        if "_uncertainty" not in p.name
    ]

    slices, _ = extract_slices(normalise_volume(setup["whole_volume"], bundle.intensity), bundle.axis)
    brain = slices[nonempty_slice_mask(slices)]
    brain = brain[np.linspace(0, len(brain) - 1, 8).round().astype(int)]  # 8 slices across the brain
    compute = measure_compute(bundle, brain[:8], repeats, train_batch=8 if args.quick else 16)
    profile = profile_unet(bundle, brain)
    refine = measure_refine(bundle, setup["whole_volume"], setup["whole_truth"])
    if args.compile:
        compute["compile"] = measure_compile(bundle, brain, compute["precision"])
        print(f"torch.compile: {json.dumps(compute['compile'])}")
    load_after = os.getloadavg()

    vol, vol_plain = runs["tedm_volume"], runs["straightforward_volume"]
    cxr, cxr_plain = runs["tedm_cxr"], runs["straightforward_cxr"]
    speedups = {"volume": vol_plain["seconds"] / vol["seconds"], "cxr": cxr_plain["seconds"] / cxr["seconds"]}
    memory = {
        "volume": vol_plain["peak_mib"] / vol["peak_mib"],
        "cxr": cxr_plain["peak_mib"] / max(cxr["peak_mib"], 1e-3),
    }
    dices = {"volume": volume_dice, "cxr": float(np.mean(cxr_dice))}
    results: Dict[str, Any] = {
        # The smaller of the two workloads' ratios: a goal is met only if met on both.
        "speedup_vs_straightforward": min(speedups.values()),
        "memory_ratio_vs_straightforward": min(memory.values()),
        "dice_vs_straightforward": min(dices.values()),
        "pipeline_over_unet": vol["seconds"] / vol["unet"],
        "refine_fraction": refine["refine_fraction"],
        "unet_fraction_of_fp32_peak": compute["unet_fraction_of_fp32_peak"],
        "train_fraction_of_fp32_peak": compute["train_fraction_of_fp32_peak"],
        "dice_vs_fp32": compute["dice_vs_fp32"],
    }
    details = {
        "quick": args.quick, "threads": threads, "cpus": os.cpu_count(), "torch": torch.__version__,
        "load_average_before_after": [load_before[0], load_after[0]], "seconds_total": time.perf_counter() - started,
        "speedups": speedups, "memory_ratios": memory, "dices": dices, "runs": runs, "compute": compute,
        "unet_profile": profile, "refine": refine,
    }  # fmt: skip

    print(
        f"\nwhere the UNet passes' time goes (torch.profiler, self CPU time, {compute['maps_per_call']} maps per call):"
    )
    print("  " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in profile.items()))
    rest = vol["seconds"] - vol["read"] - vol["unet"] - vol["head"] - vol["write"]
    print(
        f"pipeline on the volume: read {vol['read']:.2f} s, UNet {vol['unet']:.2f} s, head {vol['head']:.2f} s, "
        f"write {vol['write']:.2f} s, the rest (normalise, slice, resize, reassemble) {rest:.2f} s"
    )
    c = compute
    print(
        f"fp32 peak {c['fp32_peak_gflops']:.1f} GFLOP/s (the faster of torch.mm {c['fp32_matmul_gflops']:.1f} and a "
        f"3x3 convolution {c['fp32_conv_gflops']:.1f}), bf16 matmul {c['bf16_matmul_gflops']:.1f} GFLOP/s; "
        f"UNet {c['gmac_per_map']:.3f} GMAC per map (truncated), {c['gmac_per_image_full_pass']:.3f} full"
    )
    print(
        f"UNet GFLOP/s: default {c['unet_gflops']:.1f} ({c['maps_per_call']} maps per call; channels-last, "
        f"{c['precision']} as measured faster, SDPA attention; the head {c['head_speed_vs_fp32']:.2f}x "
        f"its fp32 speed), bf16 autocast over fp32 weights {c['unet_bf16_autocast_gflops']:.1f}, "
        f"fp32 {c['unet_fp32_gflops']:.1f}, "
        f"fp32 contiguous {c['unet_contiguous_gflops']:.1f}, "
        f"fp32 explicit attention {c['unet_explicit_attention_gflops']:.1f}, "
        f"plain (contiguous, explicit) {c['unet_plain_gflops']:.1f}; "
        + ", ".join(
            f"{k} slices per call {c[f'unet_{k}_slices_gflops']:.1f}" for k in (2, 4) if f"unet_{k}_slices_gflops" in c
        )
    )
    print(
        f"training GFLOP/s: contiguous {c['train_contiguous_gflops']:.1f}, "
        f"channels-last {c['train_channels_last_gflops']:.1f}, "
        f"explicit attention {c['train_explicit_attention_gflops']:.1f}, "
        f"bf16 autocast channels-last {c['train_bf16_autocast_gflops']:.1f} (not used); "
        f"bf16 UNet speed vs fp32 "
        f"{c['bf16_unet_speed_vs_fp32']:.2f}x, its Dice vs fp32 {c['bf16_dice_vs_fp32']:.3f} (one map)"
    )
    print(
        f"refine: segment {refine['segment_seconds']:.1f} s ({refine['slices_run']} slices, "
        f"cache {refine['feature_cache_mib']:.0f} MiB), refine {refine['refine_seconds']:.1f} s "
        f"(training {refine['refine_train_seconds']:.1f} s, re-applying {refine['refine_reapply_seconds']:.1f} s) "
        f"on corrected slices {refine['corrected_slices']}"
    )
    print(f"per workload: speedup {speedups}, memory {memory}, dice {dices}")
    print("\n| measure | value | goal | |\n|---|---|---|---|")
    for key, value in results.items():
        comparison, goal = GOALS[key]
        met = value >= goal if comparison == ">=" else value <= goal
        print(f"| {key} | {value:.3f} | {comparison} {goal} | {'met' if met else 'NOT met'} |")
    print(
        f"\n{time.perf_counter() - started:.0f} s in all; load average {load_before[0]:.1f} -> {load_after[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    if args.json:
        args.json.write_text(json.dumps({**results, "details": details}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
