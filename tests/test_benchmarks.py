"""Every script in benchmarks/ and scripts/experiments/ must at least import and parse its
arguments: they are run by hand, rarely, so a module they import being renamed or removed would otherwise go unnoticed.

All scripts run with ``--help`` in one fresh interpreter (each as ``__main__``, with its own
``sys.argv``), so torch and MONAI are imported once: a few seconds in all, not one import per script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "scripts" / "experiments").glob("*.py"))

DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
results = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        results[script] = "returned without printing help"
    except SystemExit as stop:
        ok = stop.code in (0, None) and "usage" in out.getvalue().lower()
        results[script] = "ok" if ok else f"exit {stop.code!r}: {out.getvalue()[-500:]}"
    except BaseException:
        results[script] = traceback.format_exc()[-2000:]
print(json.dumps(results))
"""


def _benchmark_module(name: str):
    """A script of the benchmarks folder as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_scripts_print_help() -> None:
    assert any(p.name == "benchmark.py" for p in SCRIPTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {Path(script).name: why for script, why in results.items() if why != "ok"}
    assert not failed, failed
    assert len(results) == len(SCRIPTS)


def test_the_straightforward_way_predicts_what_the_pipeline_predicts(tiny_backbone_dir) -> None:
    """benchmarks/benchmark.py's reference implementation runs the steps the bundle predicts with
    (a radiograph model's step 1 and its three heads, each slice also mirrored): fp32 against fp32,
    the same labels and uncertainty as ``Segmenter``."""

    import numpy as np
    from conftest import synthetic_disc_images

    from tedm_core.model.checkpoint import load_backbone
    from tedm_core.pipelines.fit import fit_bundle
    from tedm_core.pipelines.segment import Segmenter

    images, masks = synthetic_disc_images(3, size=32, seed=2)
    bundle = fit_bundle(load_backbone(tiny_backbone_dir), images, masks, steps=5, device="cpu", crop_dark_borders=False)
    assert bundle.prediction_timesteps == (1,) and bundle.head.config.members == 3 and bundle.test_time_flip
    benchmark = _benchmark_module("benchmark")
    labels, uncertainty = benchmark.Straightforward(bundle).segment_slices(images)
    prediction = Segmenter(bundle, device="cpu", precision="fp32").predict(images)
    np.testing.assert_array_equal(labels, prediction.probabilities.argmax(axis=1))
    np.testing.assert_allclose(uncertainty, prediction.uncertainty, atol=1e-5)


def test_each_way_segments_its_warm_up_input_before_the_measured_run(tiny_bundle_dir, tmp_path) -> None:
    """benchmarks/benchmark.py's children, on a work folder laid out as its ``prepare`` does: each
    way first segments the warm-up radiograph, then the measured ones, and reports the measured
    run alone (a process's first segmentation also builds what the libraries keep for its life,
    which until session 28 counted against the straightforward way only)."""
    import shutil

    from conftest import write_disc_pngs

    benchmark = _benchmark_module("benchmark")
    write_disc_pngs(tmp_path / "cxr_warm", 1, 32, seed=4)
    write_disc_pngs(tmp_path / "cxr", 2, 32, seed=5)
    shutil.copytree(tiny_bundle_dir, tmp_path / "bundle_cxr")
    for way in ("tedm", "straightforward"):
        run = benchmark.run_child(way, "cxr", tmp_path)
        assert sorted(p.name for p in (tmp_path / f"warm_{way}_cxr").glob("*.png")) == [
            "img_00.png",
            "img_00_uncertainty.png",
        ]
        measured = sorted(p.name for p in (tmp_path / f"out_{way}_cxr").glob("*.png"))
        assert measured == ["img_00.png", "img_00_uncertainty.png", "img_01.png", "img_01_uncertainty.png"]
        assert run["warmup"] > 0 and run["first_peak_mib"] >= 0 and run["peak_mib"] >= 0
        # the UNet's time is the measured run's alone, within its wall time
        assert 0 < run["unet"] < run["seconds"]


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning")
def test_the_int8_way_computes_the_convolution() -> None:
    """benchmarks/int8_pass.py's int8 convolution (oneDNN) gives the float convolution's output to
    int8 rounding, in bf16: what it times is the same work."""

    import torch

    int8_pass = _benchmark_module("int8_pass")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, 3, padding=1, stride=2)
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(x)
        got = int8_pass.Int8Conv2d(conv, float(x.abs().max()))(x)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert float((got.float() - expected).norm() / expected.norm()) < 0.03


def test_the_gpu_check_runs_through_on_the_cpu(tiny_bundle_dir, tmp_path, monkeypatch) -> None:
    """benchmarks/gpu.py is run on the rare sessions lent a GPU, where a broken section costs
    device minutes: every section runs here on the CPU, on a small volume with a ground truth
    kept apart from the single-channel case, and a section that fails (here the out-of-memory
    one, which needs CUDA anyway) is reported without stopping the sections after it."""
    import numpy as np
    from conftest import affine_zoo, sphere_volume_array

    from tedm_core.bundle import load_bundle
    from tedm_core.io.volumes import volume_from_array, write_float_volume, write_label_volume

    matrix = affine_zoo()["oblique"]
    array = sphere_volume_array((10, 32, 32), matrix, matrix[:3] @ [16, 16, 5, 1], 9.0)
    volume = volume_from_array(array, matrix)
    (tmp_path / "cases").mkdir()
    write_float_volume(tmp_path / "cases" / "sphere.nii.gz", array, volume)
    write_label_volume(tmp_path / "truth.nii.gz", (array > 40).astype(np.uint8), volume)
    report_file = tmp_path / "report.json"
    argv = [
        "--bundle",
        str(tiny_bundle_dir),
        "--cases",
        str(tmp_path / "cases"),
        "--truth",
        str(tmp_path / "truth.nii.gz"),
    ]
    argv += ["--device", "cpu", "--quick", "--out", str(tmp_path / "out"), "--json", str(report_file)]
    gpu = _benchmark_module("gpu")

    def out_of_memory_breaks(*args, **kwargs):
        raise RuntimeError("a section that breaks")

    monkeypatch.setattr(gpu, "check_out_of_memory", out_of_memory_breaks)
    assert gpu.main(argv) == 1  # the failed section is in the exit code

    report = json.loads(report_file.read_text())
    passes = report["unet_passes"]
    assert passes["maps"] == passes["slices"] * len(load_bundle(tiny_bundle_dir).prediction_timesteps)
    assert all(passes[v]["seconds"] > 0 for v in ("bf16_contiguous", "bf16_channels_last", "fp32_contiguous"))
    whole = report["whole_case"]
    assert whole["seconds"] > whole["unet"] > 0 and whole["dice_vs_fp32"] >= 0.9 and "dice_vs_truth" in whole
    assert len(report["refine"]["refine_seconds"]) == 2 or "skipped" in report["refine"]
    assert {"tf32_batch16", "fp32_batch64", "bf16_autocast_batch64"} <= set(report["training"])
    assert report["out_of_memory"] == {"error": "RuntimeError: a section that breaks"}
    worker = report["worker"]
    assert worker["hello_cuda"] == [] and worker["dice_vs_in_process"] >= 0.98
