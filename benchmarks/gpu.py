#!/usr/bin/env python
"""TEDM on a CUDA GPU: what runs there, how fast, and against the card's own peak.

    python benchmarks/gpu.py --bundle BUNDLE --cases FOLDER [--json FILE] [--out FOLDER]

``benchmark.py`` measures the product on the CPUs this project runs on; this script runs the
product's own objects on a GPU, in one process, and checks the GPU code paths that no CPU test
can run for real (on an H200 in session 27 the sections up to the training steps took 35 s):

* the card, and its matrix-product peak measured here: bf16, TF32 and true fp32 (TF32 off),
  8192^3 products, best of five (PyTorch's default for convolutions on CUDA is TF32);
* the UNet passes over every slice of the first case, in the Segmenter's own batches, in each
  precision and memory layout: seconds, achieved TFLOP/s (ptflops MACs x 2 / time) and that over
  the peak of the same precision; ``auto``'s choice among them; the share of the GPU's kernel
  time per kind of operation (torch.profiler: convolution, normalisation, attention...); with
  ``--compile``, ``torch.compile`` of the UNet against eager (default mode, and CUDA graphs);
* the whole case file to file through ``run_batch`` (as ``tedm segment --device cuda``): seconds,
  over its passes alone (``pipeline_over_unet``), and the agreement of its labels with the fp32
  run on the GPU (``dice_vs_fp32``) and with the ground truth (``GT*`` beside the images), the
  labels kept in ``--out`` to compare with a CPU run;
* Refine after two corrected slices through ``InteractiveSession`` on the GPU (``refine_fraction``);
* DDPM training steps (forward + backward + Adam) at pretraining's batch (16) and at 64, in fp32
  (TF32 convolutions: pretraining's ``auto``), true fp32 and bf16 autocast;
* out of memory, for real: with this process held to a small share of the card
  (``torch.cuda.set_per_process_memory_fraction``), a Segmenter asked for more slices per call
  than fit halves its batch until it fits, keeps the smaller size, and gives the labels of the
  unlimited run;
* the worker process (``python -m tedm_core.serve``, the Slicer module's path) segmenting the case
  on the GPU: its ``hello`` names the card and its labels are the in-process session's.

A section that no later one needs reports its error and the run goes on (exit code 1 names the
failed ones). ``--device cpu`` runs the same on the CPU (with ``--slices`` and ``--quick`` to keep
it short): a check of this script where no GPU is lent, not a measurement of anything.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import _OneStep, _timed_function, dice, gmac, profile_unet

from tedm_core.bundle import ModelBundle, load_bundle
from tedm_core.io.cases import discover_cases
from tedm_core.io.volumes import read_case, read_volume
from tedm_core.pipelines import batch
from tedm_core.pipelines.interactive import InteractiveSession, Reporter
from tedm_core.pipelines.segment import Segmenter
from tedm_core.pipelines.volume import label_array_to_classes, normalise_volume, resolve_axis
from tedm_core.preprocessing.spatial import to_model_grid
from tedm_core.runtime import autocast, resolve_device
from tedm_core.slicing import extract_slices, reassemble, to_slices

REPO = Path(__file__).resolve().parents[1]
MATRIX_SIZE = 8192
# A share of the card small enough that a whole volume's passes cannot fit in one call
# (about 1.6 MiB per bf16 map at 64 px, 8 maps per slice: 155 slices want ~2 GiB).
OOM_LIMIT_BYTES = 768 * 2**20
OOM_ASKED_BATCH = 256


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(functions: Dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> Dict[str, float]:
    """Each function's best time over ``repeats`` interleaved rounds after one warm-up (cuDNN
    chooses its algorithms there), the device synchronised around each call."""
    best = {name: float("inf") for name in functions}
    for fn in functions.values():
        fn()
    for _ in range(repeats):
        for name, fn in functions.items():
            synchronize(device)
            tic = time.perf_counter()
            fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - tic)
    return best


def matrix_peaks(device: torch.device, repeats: int = 5) -> Dict[str, float]:
    """TFLOP/s of square matrix products in bf16, TF32 and true fp32 (TF32 off)."""
    n = MATRIX_SIZE if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()
    allowed = torch.backends.cuda.matmul.allow_tf32

    def fp32(tf32: bool) -> Callable[[], Any]:
        def run() -> Any:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                return torch.mm(a, b)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = allowed

        return run

    best = best_seconds({"bf16": lambda: torch.mm(a16, b16), "tf32": fp32(True), "fp32": fp32(False)}, repeats, device)
    return {name: 2 * n**3 / seconds / 1e12 for name, seconds in best.items()}


def first_case(cases: Path, out: Path, bundle: ModelBundle, truth_file: Optional[Path]):
    """The first case's volume and its ground truth: ``truth_file``, else a ``GT*`` file in the
    case's folder when the model is multi-channel (a single-channel model's case is every file)."""
    case = discover_cases(cases, out, bundle.backbone.channel_names)[0]
    volume = read_case(case.inputs, channel_names=bundle.backbone.channel_names)
    if truth_file is None and case.is_folder:
        truth_file = next(iter(sorted(Path(case.inputs[0]).parent.glob("GT*"))), None)
    truth = read_volume(truth_file, allow_constant=True) if truth_file else None
    return case, volume, truth


def unet_gmac(bundle: ModelBundle, shape: Sequence[int], full: bool) -> float:
    """GMACs of one map's pass (``full``: the whole UNet, as in training; else the pipeline's
    truncated pass), counted by ptflops on a CPU copy."""
    extractor = Segmenter(bundle, device="cpu", precision="fp32", memory_format="contiguous").extractor
    return gmac(_OneStep(extractor, full=full), shape)


def measure_passes(
    bundle: ModelBundle, slices: np.ndarray, device: torch.device, peaks: Dict[str, float], repeats: int = 3
):
    """The UNet passes of every slice, in the Segmenter's batches, per precision and layout."""
    grid, _ = to_model_grid(torch.from_numpy(slices), bundle.image_size)
    segmenters = {
        f"{precision}_{layout}": Segmenter(bundle, device=str(device), precision=precision, memory_format=layout)
        for precision in ("bf16", "fp32")
        for layout in ("contiguous", "channels_last")
    }
    default = Segmenter(bundle, device=str(device))
    chosen = f"{default.precision}_{'channels_last' if default.memory_format == torch.channels_last else 'contiguous'}"

    def passes(segmenter: Segmenter) -> Callable[[], Any]:
        step = segmenter.batch_size
        return lambda: [segmenter._features(grid[i : i + step]) for i in range(0, len(grid), step)]

    seconds = best_seconds({name: passes(s) for name, s in segmenters.items()}, repeats, device)
    per_map = unet_gmac(bundle, grid.shape[1:], full=False)
    maps = len(grid) * len(default.timesteps)
    result: Dict[str, Any] = {
        "slices": len(grid),
        "maps": maps,
        "gmac_per_map": per_map,
        "batch_slices": default.batch_size,
        "default": chosen,
    }
    for name, s in seconds.items():
        tflops = 2 * per_map * 1e9 * maps / s / 1e12
        peak = peaks["bf16"] if name.startswith("bf16") else peaks["tf32"]  # fp32 convolutions run TF32 by default
        result[name] = {"seconds": s, "tflops": tflops, "fraction_of_peak": tflops / peak}
    return result, default


def measure_compile(segmenter: Segmenter, slices: np.ndarray, repeats: int) -> Dict[str, Any]:
    """``torch.compile`` of the UNet the passes run (its whole forward in the passes' precision,
    one call of the Segmenter's batch: the best case, as the extractor's hooks and early stop
    would break the graph), against eager: the compile seconds and the steady speed, in
    inductor's default mode and, on CUDA, with CUDA graphs (``reduce-overhead``)."""
    device = segmenter.device
    grid, _ = to_model_grid(torch.from_numpy(slices[: segmenter.batch_size]), segmenter.bundle.image_size)
    unet, steps = segmenter.unet, len(segmenter.timesteps)
    x = segmenter._to_device(grid).repeat_interleave(steps, dim=0).to(next(unet.parameters()).dtype)
    t = torch.as_tensor(list(segmenter.timesteps), device=x.device).repeat(len(grid))
    modes = ("default", "reduce-overhead") if device.type == "cuda" else ("default",)
    result: Dict[str, Any] = {"maps_per_call": int(x.shape[0])}
    with torch.no_grad():
        for mode in modes:  # one mode at a time: two compiled wrappers of one module share its caches
            torch._dynamo.reset()
            compiled = torch.compile(unet, mode=mode)
            synchronize(device)
            tic = time.perf_counter()
            compiled(x, t)
            synchronize(device)
            compile_seconds = time.perf_counter() - tic
            best = best_seconds(
                {"eager": lambda: unet(x, t), "compiled": lambda compiled=compiled: compiled(x, t)}, repeats, device
            )
            result[mode] = {
                "compile_seconds": compile_seconds,
                **best,
                "speed_vs_eager": best["eager"] / best["compiled"],
            }
    return result


def segment_file_to_file(
    bundle: ModelBundle, cases: Path, out: Path, device: torch.device, runs: int = 1, **settings: Any
) -> Dict[str, float]:
    """``run_batch`` over ``cases`` as ``tedm segment`` runs it, ``runs`` times with one
    Segmenter (the last run counts: the first pays cuDNN's choices for new shapes); its seconds,
    split into reading, UNet passes, head, writing and the rest (the device synchronised
    around the passes and the head, so their kernels count where they run)."""
    segmenter = Segmenter(bundle, device=str(device), **settings)
    totals: Dict[str, float] = {}
    # On the segmenter itself, instance attributes (Segmenter.predict calls them); on batch, put back after.
    _timed_function(segmenter, "_features", totals, "unet", lambda: synchronize(device))
    _timed_function(segmenter, "_head_predict", totals, "head", lambda: synchronize(device))
    files = (("read_case", "read"), ("write_float_volume", "write"), ("write_label_volume", "write"))
    originals = {name: _timed_function(batch, name, totals, key) for name, key in files}
    try:
        for _ in range(runs):
            totals.clear()
            if out.exists():
                shutil.rmtree(out)
            tic = time.perf_counter()
            report = batch.run_batch(segmenter, cases, out, batch.BatchOptions(uncertainty=True, show_progress=False))
            seconds = time.perf_counter() - tic
            if report.failed:
                raise RuntimeError(f"segmentation failed: {[r.error for r in report.failed]}")
    finally:
        for name, function in originals.items():
            setattr(batch, name, function)
    segmenter.close()
    return {"seconds": seconds, **totals, "rest": seconds - sum(totals.values())}


def measure_whole_case(bundle: ModelBundle, cases: Path, out: Path, device: torch.device, truth: Any) -> Dict[str, Any]:
    """The case file to file in the default precision and in fp32, and their labels' agreement."""
    timings = segment_file_to_file(bundle, cases, out / "labels_default", device, runs=2)
    fp32_timings = segment_file_to_file(bundle, cases, out / "labels_fp32", device, runs=2, precision="fp32")
    labels = read_volume(label_file(out / "labels_default"), allow_constant=True).array
    labels_fp32 = read_volume(label_file(out / "labels_fp32"), allow_constant=True).array
    whole = {
        **timings,
        "pipeline_over_unet": timings["seconds"] / timings["unet"],
        "fp32": fp32_timings,
        "dice_vs_fp32": dice(labels, labels_fp32),
    }
    if truth is not None:
        whole["dice_vs_truth"] = dice(labels, truth.array)
        whole["dice_vs_truth_fp32"] = dice(labels_fp32, truth.array)
    return whole


def label_file(out: Path) -> Path:
    return next(p for p in sorted(out.rglob("*.nii.gz")) if "_uncertainty" not in p.name)


def measure_refine(bundle: ModelBundle, volume: Any, truth: Any, device: torch.device) -> Dict[str, Any]:
    """Segment, then Refine after the two tumour slices segmented worst are corrected (twice:
    the first Refine of a process pays one-off set-up)."""
    session = InteractiveSession(volume)
    synchronize(device)
    tic = time.perf_counter()
    segmented = session.segment(bundle, device=str(device))
    synchronize(device)
    segment_seconds = time.perf_counter() - tic
    layout = session.layout
    current = to_slices(segmented.labels, layout)
    truth_slices = to_slices(label_array_to_classes(truth, bundle.label_values).astype(np.uint8), layout)
    refines: List[float] = []
    trainings: List[float] = []
    for _ in range(2):
        wrong = [n for n in range(len(truth_slices)) if truth_slices[n].any() and (truth_slices[n] != current[n]).any()]
        if len(wrong) < 2:
            return {"skipped": "fewer than two tumour slices segmented wrong, to correct"}
        corrected = sorted(sorted(wrong, key=lambda n: dice(current[n], truth_slices[n]))[:2])
        edited = current.copy()
        edited[corrected] = truth_slices[corrected]
        trained_at: List[float] = []  # the head's training ends at the last "refine step" report

        def note(fraction: float, message: str, trained_at: List[float] = trained_at) -> None:
            if message.startswith("refine step") and fraction >= 0.8:
                trained_at.append(time.perf_counter())

        tic = time.perf_counter()
        refined = session.refine(reassemble(edited, layout), reporter=Reporter(progress=note))
        synchronize(device)
        refines.append(time.perf_counter() - tic)
        trainings.append(trained_at[0] - tic if trained_at else float("nan"))
        current = to_slices(refined.labels, layout)
    session.close()
    return {
        "segment_seconds": segment_seconds,
        "refine_seconds": refines,
        "refine_train_seconds": trainings,
        "refine_fraction": refines[0] / segment_seconds,
        "refine_fraction_second": refines[1] / segment_seconds,
    }


def measure_training(
    bundle: ModelBundle,
    slices: np.ndarray,
    device: torch.device,
    peaks: Dict[str, float],
    repeats: int = 3,
    steps: int = 10,
):
    """DDPM training steps (forward, backward, Adam) as ``pipelines.pretrain`` runs them, at its
    default batch (16) and at 64: fp32 with TF32 convolutions (PyTorch's default on CUDA, and
    pretraining's ``auto``), true fp32 (TF32 off) and bf16 autocast."""
    grid, _ = to_model_grid(torch.from_numpy(slices), bundle.image_size)
    schedule = bundle.backbone.noise_schedule
    per_image = unet_gmac(bundle, grid.shape[1:], full=True)

    def step_fn(batch_size: int, precision: str, tf32: bool) -> Callable[[], None]:
        x0 = grid[torch.arange(batch_size) % len(grid)].to(device)
        model = copy.deepcopy(bundle.backbone.unet).to(device).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
        generator = torch.Generator(device=device).manual_seed(0)

        def step() -> None:
            allowed = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                noise = torch.randn(x0.shape, generator=generator, device=device)
                t = torch.randint(0, 1000, (batch_size,), generator=generator, device=device)
                with autocast(device, precision):
                    prediction = model(schedule.add_noise(x0, noise, t), t)
                loss = F.l1_loss(prediction.float(), noise)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            finally:
                torch.backends.cudnn.allow_tf32 = allowed

        return lambda: [step() for _ in range(steps)]

    variants = {"tf32": ("fp32", True), "fp32": ("fp32", False), "bf16_autocast": ("bf16", True)}
    functions = {f"{name}_batch{b}": step_fn(b, *variant) for b in (16, 64) for name, variant in variants.items()}
    seconds = best_seconds(functions, repeats, device)
    result: Dict[str, Any] = {"gmac_per_image_full_pass": per_image}
    for name, s in seconds.items():
        batch_size = int(name.rsplit("batch", 1)[1])
        tflops = 3 * 2 * per_image * 1e9 * batch_size * steps / s / 1e12
        peak = peaks["bf16"] if name.startswith("bf16") else peaks[name.split("_")[0]]
        result[name] = {"seconds_per_step": s / steps, "tflops": tflops, "fraction_of_peak": tflops / peak}
    return result


def check_out_of_memory(bundle: ModelBundle, slices: np.ndarray, device: torch.device, expected: np.ndarray):
    """A Segmenter asked for ``OOM_ASKED_BATCH`` slices per call in a process held to
    ``OOM_LIMIT_BYTES`` of the card: how it halves, what it keeps, whether the labels agree."""
    if device.type != "cuda":
        return {"skipped": "needs CUDA (the CPU has no per-process memory limit to set)"}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    total = torch.cuda.get_device_properties(device).total_memory
    warnings: List[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger("tedm_core").addHandler(handler)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(OOM_LIMIT_BYTES / total, index)
    try:
        segmenter = Segmenter(bundle, device=str(device), batch_size=OOM_ASKED_BATCH)
        first = segmenter.predict(slices).labels
        kept, warned = segmenter.batch_size, len(warnings)
        again = segmenter.predict(slices).labels
        peak = torch.cuda.max_memory_allocated(device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        logging.getLogger("tedm_core").removeHandler(handler)
    return {
        "limit_mib": OOM_LIMIT_BYTES / 2**20,
        "asked_batch": OOM_ASKED_BATCH,
        "kept_batch": kept,
        "warnings": warnings,
        "labels_equal_unlimited": bool(np.array_equal(first, expected)),
        "second_call_equal": bool(np.array_equal(again, first)),
        "second_call_warnings": len(warnings) - warned,
        "peak_allocated_mib_since_reset": peak / 2**20,
    }


def check_worker(bundle_path: Path, volume: Any, device: torch.device, expected: np.ndarray, log: Path):
    """Segment through a worker process as the Slicer module does; its labels against ``expected``."""
    from tedm_core.serve.client import WorkerClient

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    client = WorkerClient.start_local(log_path=log, env=env)
    try:
        tic = time.perf_counter()
        hello = client.hello()
        started = time.perf_counter() - tic
        client.request(
            "open_session", {"session": "s", "ijk_to_ras": volume.ijk_to_ras.tolist()}, {"volume": volume.array}, 600
        )
        seconds, logs = [], []
        for _ in range(2):  # the second finds the model in the worker's cache
            tic = time.perf_counter()
            event = client.request(
                "segment",
                {"session": "s", "model": str(bundle_path), "device": str(device)},
                None,
                600,
                lambda e: logs.append(e.message) if e.kind == "log" else None,
            )
            seconds.append(time.perf_counter() - tic)
        labels = event.arrays["labels"]
        return {
            "hello_cuda": hello.get("cuda"),
            "torch": hello.get("torch"),
            "start_seconds": started,
            "segment_seconds": seconds,
            "worker_logs": logs[:6],
            "voxels_differing_from_in_process": int((labels != expected).sum()),
            "dice_vs_in_process": dice(labels, expected),
        }
    finally:
        client.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a model bundle (its weights do not change timings)")
    parser.add_argument("--cases", type=Path, required=True, help="a folder of cases; the first is measured")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--truth", type=Path, help="the first case's ground truth (default: GT* in its folder)")
    parser.add_argument("--slices", type=int, help="keep this many central slices of the case (a quick check)")
    parser.add_argument(
        "--quick", action="store_true", help="one timed repeat, 2 training steps (a check, not a measurement)"
    )
    parser.add_argument("--compile", action="store_true", help="also torch.compile the UNet (minutes of compiling)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/tedm_gpu"), help="scratch and label outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bundle = load_bundle(args.bundle)
    cases = args.cases
    case, volume, truth = first_case(cases, args.out / "labels_default", bundle, args.truth)
    if args.slices:  # a shorter copy of the case, written where the batch run reads it
        from dataclasses import replace

        from tedm_core.io.volumes import write_float_volume

        k = volume.array.shape[1]  # centred on the truth's largest slice, where there is one
        centre = int(np.argmax((truth.array[0] > 0).sum(axis=(1, 2)))) if truth is not None else k // 2
        start = min(max(0, centre - args.slices // 2), max(0, k - args.slices))
        keep = slice(start, start + args.slices)
        volume = replace(volume, array=volume.array[:, keep])
        truth = replace(truth, array=truth.array[:, keep]) if truth is not None else None
        cases = args.out / "cases"
        shutil.rmtree(cases, ignore_errors=True)
        folder = cases / Path(case.inputs[0]).parent.name
        folder.mkdir(parents=True)
        for c, name in enumerate(bundle.backbone.channel_names or ["image"]):
            write_float_volume(folder / f"{name}.nii.gz", volume.array[c], volume)
    report: Dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "volume_kji": list(volume.array.shape[1:]),
    }
    print(json.dumps(report), flush=True)

    def section(name: str, value: Any) -> None:
        report[name] = value
        print(f"{name}: {json.dumps(value, default=float)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=float))

    repeats = 1 if args.quick else 3
    failed: List[str] = []

    def guarded(name: str, measure: Callable[[], Any]) -> None:
        """A section no later one needs: if it fails, its error is reported and the run goes on
        (device time is scarce: one broken section must not cost the others)."""
        try:
            section(name, measure())
        except Exception as error:  # reported here and in the exit code
            traceback.print_exc()
            failed.append(name)
            section(name, {"error": f"{type(error).__name__}: {error}"})

    peaks = matrix_peaks(device, repeats + 2)
    section("peak_tflops", peaks)
    slices, _layout = extract_slices(normalise_volume(volume, bundle.intensity), resolve_axis(volume, bundle.axis))
    passes, default = measure_passes(bundle, slices, device, peaks, repeats)
    section("unet_passes", passes)
    guarded("unet_time_by_kind", lambda: profile_unet(bundle, slices, str(device)))
    if args.compile:
        guarded("compile", lambda: measure_compile(default, slices, repeats))

    guarded("whole_case", lambda: measure_whole_case(bundle, cases, args.out, device, truth))
    if truth is not None:
        guarded("refine", lambda: measure_refine(bundle, volume, truth, device))
    guarded("training", lambda: measure_training(bundle, slices, device, peaks, repeats, 2 if args.quick else 10))
    unlimited = Segmenter(bundle, device=str(device)).predict(slices).labels
    guarded("out_of_memory", lambda: check_out_of_memory(bundle, slices, device, unlimited))
    in_process = InteractiveSession(volume).segment(bundle, device=str(device)).labels
    guarded("worker", lambda: check_worker(args.bundle, volume, device, in_process, args.out / "worker.log"))
    section("seconds_total", time.perf_counter() - started)
    if failed:
        print(f"sections that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
