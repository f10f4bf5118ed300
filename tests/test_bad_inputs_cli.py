"""The bad-input corpus, through the faces: ``tedm`` and ``scripts/batch_segment.py`` as a user
types them. Each case asserts the exit status, one line on stderr naming the option or file and
the problem, and that nothing was lost or half-written."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
from PIL import Image

nib = pytest.importorskip("nibabel")

from conftest import REPO, synthetic_disc_images  # noqa: E402

from tedm_core.bundle import save_bundle  # noqa: E402
from tedm_core.cli import main as tedm_main  # noqa: E402
from tedm_core.io.outputs import PROVENANCE_FILE  # noqa: E402
from tedm_core.model.checkpoint import load_backbone  # noqa: E402
from tedm_core.pipelines.fit import fit_bundle  # noqa: E402

SCRIPT = REPO / "scripts" / "batch_segment.py"


def _batch_main():
    spec = importlib.util.spec_from_file_location("batch_segment_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(face: str, argv: List[str], capsys) -> Tuple[int, List[str]]:
    """Exit status and the stderr lines of one command (argparse exits are caught)."""
    capsys.readouterr()
    try:
        code = (tedm_main if face == "tedm" else _batch_main())(argv)
    except SystemExit as stop:
        code = stop.code
    return int(code), [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _one_error_line(lines: List[str]) -> str:
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, lines
    return errors[0]


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: compared before and after, to prove nothing changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pngs(folder: Path, n: int = 2, prefix: str = "img", seed: int = 0, masks: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic_disc_images(n, size=32, seed=seed)
    for i in range(n):
        array = labels[i] * 255 if masks else (images[i, 0] + 1) * 127.5
        Image.fromarray(array.astype(np.uint8)).save(folder / f"{prefix}{i}.png")
    return folder


# --- usage errors: refused when parsed, exit 2, one line naming the option -------------------

USAGE = {
    "fit_steps_negative": ("tedm", ["fit", "--steps", "-5"], "--steps", "at least 1"),
    "fit_steps_zero": ("tedm", ["fit", "--steps", "0"], "--steps", "at least 1"),
    "fit_lr_nan": ("tedm", ["fit", "--lr", "nan"], "--lr", "finite"),
    "fit_lr_negative": ("tedm", ["fit", "--lr", "-0.1"], "--lr", "finite"),
    "fit_n_zero": ("tedm", ["fit", "--n", "0"], "--n", "at least 1"),
    "fit_slices_per_case_negative": ("tedm", ["fit", "--slices-per-case", "-1"], "--slices-per-case", "at least 1"),
    "fit_slices_negative": ("tedm", ["fit", "--slices", "3", "-2"], "--slices", "at least 0"),
    "fit_timesteps_beyond_schedule": ("tedm", ["fit", "--timesteps", "25", "5000"], "--timesteps", "0 to 999"),
    "fit_label_value_negative": ("tedm", ["fit", "--label-values", "0", "-1"], "--label-values", "0 to 65535"),
    "fit_method_unknown": ("tedm", ["fit", "--method", "magic"], "--method", "invalid choice"),
    "fit_seed_not_a_number": ("tedm", ["fit", "--seed", "x"], "--seed", "whole number"),
    "pretrain_steps_zero": ("tedm", ["pretrain", "--steps", "0"], "--steps", "at least 1"),
    "pretrain_lr_inf": ("tedm", ["pretrain", "--lr", "inf"], "--lr", "finite"),
    "pretrain_checkpoint_every_zero": ("tedm", ["pretrain", "--checkpoint-every", "0"], "--checkpoint-every", "least"),
    "pretrain_keep_negative": ("tedm", ["pretrain", "--keep-checkpoints", "-1"], "--keep-checkpoints", "at least 0"),
    "pretrain_batch_zero": ("tedm", ["pretrain", "--batch-size", "0"], "--batch-size", "at least 1"),
    "pretrain_ema_above_one": ("tedm", ["pretrain", "--ema", "1.5"], "--ema", "(0, 1)"),
    "pretrain_shift_negative": ("tedm", ["pretrain", "--shift", "-1"], "--shift", "at least 0"),
    "pretrain_device_unknown": ("tedm", ["pretrain", "--device", "gpu"], "--device", "auto, cpu, cuda"),
    "pretrain_image_size_zero": ("tedm", ["pretrain", "--image-size", "0"], "--image-size", "at least 1"),
    "segment_timesteps_beyond_schedule": ("tedm", ["segment", "--timesteps", "5000"], "--timesteps", "0 to 999"),
    "segment_batch_zero": ("tedm", ["segment", "--batch-size", "0"], "--batch-size", "at least 1"),
    "evaluate_label_value_too_large": ("tedm", ["evaluate", "--label-values", "0", "70000"], "--label-values", "65535"),
    "batch_shard_beyond": ("batch", ["--shard", "5/4"], "--shard", "K from 1 to N"),
    "batch_batch_size_negative": ("batch", ["--batch-size", "-3"], "--batch-size", "at least 1"),
    "batch_device_unknown": ("batch", ["--device", "cuda:x"], "--device", "auto, cpu, cuda"),
    "batch_axis_unknown": ("batch", ["--axis", "diagonal"], "--axis", "invalid choice"),
}
_REQUIRED = {
    "fit": ["--backbone", "B", "--images", "I", "--masks", "M", "--out", "O"],
    "pretrain": ["--images", "I", "--out", "O"],
    "segment": ["--model", "B", "--input", "I", "--output", "O"],
    "evaluate": ["--pred", "P", "--truth", "T"],
}


@pytest.mark.parametrize("name", sorted(USAGE))
def test_usage_error_is_one_line_naming_the_option_exit_2(name, tmp_path, capsys, monkeypatch):
    face, argv, flag, problem = USAGE[name]
    monkeypatch.chdir(tmp_path)
    if face == "tedm":
        argv = argv[:1] + _REQUIRED[argv[0]] + argv[1:]
    else:
        argv = ["--model", "B", "--input", "I", "--output", "O", *argv]
    code, lines = _run(face, argv, capsys)
    line = _one_error_line(lines)
    assert code == 2 and len(lines) == 1, lines
    assert flag in line and problem in line, line
    assert list(tmp_path.iterdir()) == []  # nothing was made


# --- setting errors found before any work (after parsing, before loading anything) -----------


def _cuda_missing() -> bool:
    import torch

    return not torch.cuda.is_available()


SETTINGS = {
    "pretrain_image_size_not_halvable": (
        ["pretrain", "--images", "I", "--out", "O", "--preset", "tiny", "--image-size", "30"],
        "--image-size",
        "multiple of 4",
    ),
    "pretrain_resume_and_overwrite": (
        ["pretrain", "--images", "I", "--out", "O", "--resume", "--overwrite"],
        "--resume",
        "give one of them",
    ),
    "pretrain_channel_twice": (
        ["pretrain", "--images", "I", "--out", "O", "--channels", "T1", "t1"],
        "--channels",
        "given twice",
    ),
    "fit_class_twice": (
        ["fit", *_REQUIRED["fit"], "--classes", "lung", "lung"],
        "--classes",
        "given twice",
    ),
    "fit_label_value_twice": (
        ["fit", *_REQUIRED["fit"], "--classes", "a", "b", "--label-values", "0", "1", "1"],
        "--label-values",
        "given twice",
    ),
    "pretrain_seed_beyond_the_generators": (
        ["pretrain", "--images", "I", "--out", "O", "--seed", "9223372036854775808"],
        "--seed",
        "at most 4294967295",
    ),
    "fit_steps_beyond_any_run": (
        ["fit", *_REQUIRED["fit"], "--steps", "9223372036854775808"],
        "--steps",
        "at most 2147483647",
    ),
    "fit_baseline_members": (
        ["fit", *_REQUIRED["fit"], "--method", "baseline", "--members", "3"],
        "--members",
        "does not use it",
    ),
    "fit_timestep_twice": (
        ["fit", *_REQUIRED["fit"], "--timesteps", "25", "25"],
        "--timesteps",
        "given twice",
    ),
    "fit_label_values_count": (
        ["fit", *_REQUIRED["fit"], "--classes", "a", "b", "--label-values", "0", "1"],
        "--label-values",
        "2 values for 3 classes",
    ),
    "evaluate_label_values_repeat": (
        ["evaluate", *_REQUIRED["evaluate"], "--label-values", "0", "0"],
        "--label-values",
        "distinct",
    ),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_setting_error_is_found_before_the_work(name, tmp_path, capsys, monkeypatch):
    argv, flag, problem = SETTINGS[name]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "I").mkdir()
    code, lines = _run("tedm", argv, capsys)
    line = _one_error_line(lines)
    assert code == 2 and f"argument {flag}" in line and problem in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["I"]  # no output folder made


@pytest.mark.skipif(not _cuda_missing(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("face", ["pretrain", "fit", "segment", "batch"])
def test_cuda_without_a_gpu_is_one_line_before_the_work(face, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "I").mkdir()
    if face == "batch":
        code, lines = _run("batch", ["--model", "B", "--input", "I", "--output", "O", "--device", "cuda"], capsys)
    else:
        code, lines = _run("tedm", [face, *_REQUIRED[face], "--device", "cuda"], capsys)
    line = _one_error_line(lines)
    assert code == 2 and "argument --device" in line and "no CUDA device" in line, line
    assert not (tmp_path / "O").exists()


# --- an input, label or model folder is never an output -------------------------------------


@pytest.fixture
def cohort(tmp_path):
    """Two radiographs, their 0/255 masks (the ground truth), and a tiny bundle copy."""
    images = _pngs(tmp_path / "images", 2, seed=3)
    truth = _pngs(tmp_path / "truth", 2, seed=3, masks=True)
    return images, truth


@pytest.mark.parametrize("where", ["labels", "inside_labels", "input", "parent_of_input", "model"])
def test_batch_output_overlapping_an_input_is_refused_and_nothing_changes(where, cohort, tiny_bundle_dir, capsys):
    images, truth = cohort
    root = images.parent
    output = {
        "labels": truth,
        "inside_labels": truth / "pred",
        "input": images,
        "parent_of_input": root,
        "model": tiny_bundle_dir,
    }[where]
    before = {folder: _snapshot(folder) for folder in (images, truth, tiny_bundle_dir)}
    argv = ["--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(output)]
    code, lines = _run("batch", [*argv, "--labels", str(truth), "--overwrite", "--no-progress"], capsys)
    line = _one_error_line(lines)
    assert code == 2 and str(output) in line and "the output folder" in line, line
    assert {folder: _snapshot(folder) for folder in before} == before


@pytest.mark.parametrize("where", ["input", "model", "inside_input"])
def test_segment_output_overlapping_an_input_is_refused(where, cohort, tiny_bundle_dir, capsys):
    images, _ = cohort
    output = {"input": images, "model": tiny_bundle_dir, "inside_input": images / "results"}[where]
    before = _snapshot(images)
    code, lines = _run(
        "tedm", ["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(output)], capsys
    )
    line = _one_error_line(lines)
    assert code == 2 and "the output folder" in line and str(output) in line, line
    assert _snapshot(images) == before


def test_output_through_a_link_to_the_input_is_refused(cohort, tiny_bundle_dir, capsys, tmp_path):
    images, _ = cohort
    link = tmp_path / "link_to_images"
    link.symlink_to(images)
    code, lines = _run(
        "tedm", ["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(link)], capsys
    )
    assert code == 2 and "is the input folder" in _one_error_line(lines)


@pytest.mark.parametrize("face", ["tedm", "batch"])
def test_output_that_is_a_file_is_refused_before_the_work(face, cohort, tiny_bundle_dir, capsys, tmp_path):
    images, _ = cohort
    target = tmp_path / "results.png"
    target.write_bytes(b"keep me")
    argv = ["--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(target)]
    code, lines = _run(face, ["segment", *argv] if face == "tedm" else argv, capsys)
    line = _one_error_line(lines)
    assert code == 2 and str(target) in line and "is a file" in line, line
    assert target.read_bytes() == b"keep me"


def test_output_that_cannot_be_created_is_refused_before_the_work(cohort, tiny_bundle_dir, capsys, tmp_path):
    images, _ = cohort
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder would have to be")
    output = blocker / "out"
    code, lines = _run(
        "tedm", ["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(output)], capsys
    )
    line = _one_error_line(lines)
    assert code == 2 and str(output) in line and "cannot be written" in line, line


@pytest.mark.parametrize("where", ["images", "masks", "plain_folder"])
def test_fit_never_replaces_data_with_a_bundle(where, tiny_backbone_dir, tmp_path, capsys):
    images = _pngs(tmp_path / "images", 2, seed=5)
    masks = _pngs(tmp_path / "masks", 2, seed=5, masks=True)
    plain = tmp_path / "notes"
    plain.mkdir()
    (plain / "keep.txt").write_text("precious")
    out = {"images": images, "masks": masks, "plain_folder": plain}[where]
    before = {p: _snapshot(p) for p in (images, masks, plain)}
    code, lines = _run(
        "tedm",
        ["fit", "--backbone", str(tiny_backbone_dir), "--images", str(images), "--masks", str(masks)]
        + ["--out", str(out), "--overwrite", "--steps", "2", "--device", "cpu"],
        capsys,
    )
    line = _one_error_line(lines)
    assert code == 2 and str(out) in line, line
    assert ("the output folder" in line) if where != "plain_folder" else ("not a model bundle" in line)
    assert {p: _snapshot(p) for p in before} == before


@pytest.mark.parametrize("where", ["images_folder", "a_file"])
def test_pretrain_output_that_is_an_input_or_a_file_is_refused(where, tmp_path, capsys):
    images = _pngs(tmp_path / "images", 2)
    out = images if where == "images_folder" else tmp_path / "ckpt"
    if where == "a_file":
        out.write_text("not a folder")
    before = _snapshot(tmp_path)
    code, lines = _run(
        "tedm", ["pretrain", "--images", str(images), "--out", str(out), "--preset", "tiny", "--steps", "1"], capsys
    )
    line = _one_error_line(lines)
    assert code == 2 and str(out) in line, line
    assert _snapshot(tmp_path) == before


# --- outputs record the model that made them --------------------------------------------------


@pytest.fixture
def other_bundle(tiny_bundle_dir, tmp_path):
    """The same model with one head weight changed: another model, the same description."""
    from safetensors.torch import load_file, save_file

    other = shutil.copytree(tiny_bundle_dir, tmp_path / "other_bundle")
    weights = load_file(str(other / "head.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1.0
    save_file(weights, str(other / "head.safetensors"))
    return other


@pytest.mark.parametrize("face", ["tedm", "batch"])
def test_outputs_of_another_model_are_never_taken_for_this_ones(face, cohort, tiny_bundle_dir, other_bundle, capsys):
    images, _ = cohort
    out = images.parent / "pred"

    def segment(model: Path, *extra: str):
        argv = ["--model", str(model), "--input", str(images), "--output", str(out), *extra]
        return _run(face, ["segment", *argv] if face == "tedm" else [*argv, "--no-progress"], capsys)

    assert segment(tiny_bundle_dir)[0] == 0
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["model"] == str(tiny_bundle_dir) and len(record["model_sha256"]) == 64
    assert segment(tiny_bundle_dir)[0] == 0  # the same model: skipped as done
    assert "exists" in (out / "summary.csv").read_text()
    before = _snapshot(out)
    code, lines = segment(other_bundle)
    line = _one_error_line(lines)
    assert code == 2 and str(out) in line and "holds outputs made by" in line and "model_sha256" in line, line
    assert _snapshot(out) == before
    assert segment(other_bundle, "--overwrite")[0] == 0
    assert json.loads((out / PROVENANCE_FILE).read_text())["model"] == str(other_bundle)


@pytest.mark.parametrize("face", ["tedm", "batch"])
def test_a_resumed_run_in_another_precision_keeps_the_earlier_runs_on_record(face, cohort, tiny_bundle_dir, capsys):
    """Precision changes only rounding, so a resumed batch may differ in it (``auto`` is timed in
    each process); the folder's record then names both, never only the last run's."""
    images, _ = cohort
    out = images.parent / "pred"

    def segment(*extra: str):
        argv = ["--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(out), *extra]
        return _run(face, ["segment", *argv] if face == "tedm" else [*argv, "--no-progress"], capsys)

    assert segment("--precision", "fp32")[0] == 0
    assert "earlier_runs" not in json.loads((out / PROVENANCE_FILE).read_text())
    assert segment("--precision", "fp32")[0] == 0  # the same settings: nothing to add
    assert "earlier_runs" not in json.loads((out / PROVENANCE_FILE).read_text())
    assert segment("--precision", "bf16")[0] == 0
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["precision"] == "bf16"
    assert [(run["device"], run["precision"]) for run in record["earlier_runs"]] == [("cpu", "fp32")]
    assert segment("--precision", "bf16", "--overwrite")[0] == 0  # every output replaced: one run again
    assert "earlier_runs" not in json.loads((out / PROVENANCE_FILE).read_text())


def test_other_timesteps_are_other_settings(cohort, tiny_bundle_dir, capsys):
    images, _ = cohort
    out = images.parent / "pred"
    argv = ["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(out)]
    assert _run("tedm", argv, capsys)[0] == 0
    code, lines = _run("tedm", [*argv, "--timesteps", "25"], capsys)
    assert code == 2 and "timesteps" in _one_error_line(lines)


def test_outputs_no_record_accounts_for_are_refused(cohort, tiny_bundle_dir, capsys):
    images, _ = cohort
    out = images.parent / "pred"
    out.mkdir()
    (out / "img0.png").write_bytes((images / "img0.png").read_bytes())  # someone's file, same name
    before = _snapshot(out)
    code, lines = _run(
        "tedm", ["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(out)], capsys
    )
    line = _one_error_line(lines)
    assert code == 2 and "img0.png" in line and PROVENANCE_FILE in line, line
    assert _snapshot(out) == before


# --- two inputs, one output name ---------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ("scan.png", "scan.jpg"),
        ("p01.png", "p01_uncertainty.png"),
        ("p01.png", "p01_prob.png"),
        ("p01.png", "p01_prob_lung.png"),
        ("Scan.png", "scan.png"),
        ("scan.png", "scan.tif"),
    ],
)
def test_two_inputs_writing_one_file_are_refused_up_front_naming_both(names, tiny_bundle_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    source = _pngs(tmp_path / "src", 1)
    for name in names:
        Image.open(source / "img0.png").convert("L").save(images / name)
    out = tmp_path / "pred"
    code, lines = _run(
        "tedm", ["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(out)], capsys
    )
    line = _one_error_line(lines)
    assert code == 2 and all(name in line for name in names), line
    assert not any(p.suffix == ".png" for p in out.rglob("*"))  # nothing segmented


# --- one pipeline for images: subfolders, blank images, options honoured ---------------------


def test_segment_png_folder_with_subfolders_keeps_the_image_convention(tiny_bundle_dir, tmp_path, capsys):
    images = _pngs(tmp_path / "images", 2)
    (images / ".ipynb_checkpoints").mkdir()
    (images / ".ipynb_checkpoints" / "img0-checkpoint.png").write_bytes((images / "img0.png").read_bytes())
    old = images / "old_results"
    old.mkdir()
    (old / "img0.png").write_bytes((images / "img0.png").read_bytes())
    (old / PROVENANCE_FILE).write_text("{}")
    out = tmp_path / "pred"
    code, _ = _run(
        "tedm",
        ["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(out), "--probabilities"],
        capsys,
    )
    assert code == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["img0.png", "img0_prob.png", "img1.png", "img1_prob.png"]  # no old results segmented
    assert set(np.unique(np.asarray(Image.open(out / "img0.png")))) <= {0, 255}
    assert np.asarray(Image.open(out / "img0_prob.png")).dtype == np.uint16


@pytest.mark.parametrize("face", ["tedm", "batch"])
def test_a_blank_image_fails_alike_in_every_face(face, tiny_bundle_dir, tmp_path, capsys):
    images = _pngs(tmp_path / "images", 1)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(images / "blank.png")
    out = tmp_path / "pred"
    argv = ["--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(out)]
    code, lines = _run(face, ["segment", *argv] if face == "tedm" else [*argv, "--no-progress"], capsys)
    blank_lines = [line for line in lines if "blank.png" in line]
    assert code == 1 and len(blank_lines) == 1 and "every voxel is 0" in blank_lines[0], lines
    assert (out / "img0.png").is_file() and not (out / "blank.png").exists()


def test_probabilities_are_honoured_for_volumes(tiny_bundle_dir, tmp_path, capsys):
    images, _ = synthetic_disc_images(3, size=32, seed=9)
    volume = ((images[:, 0] + 1) * 50).transpose(2, 1, 0)  # (I, J, K) for nibabel
    inp = tmp_path / "in"
    inp.mkdir()
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), str(inp / "vol.nii.gz"))
    out = tmp_path / "pred"
    argv = ["segment", "--model", str(tiny_bundle_dir), "--input", str(inp), "--output", str(out)]
    assert _run("tedm", [*argv, "--probabilities", "--uncertainty"], capsys)[0] == 0
    probability = nib.load(str(out / "vol_prob.nii.gz"))
    assert probability.shape == volume.shape and probability.get_data_dtype() == np.float32
    values = np.asarray(probability.dataobj)
    assert values.min() >= 0 and values.max() <= 1 and (out / "vol_uncertainty.nii.gz").is_file()


# --- files we do not read are named, not dropped -----------------------------------------------


def _gif(path: Path) -> None:
    Image.fromarray(np.full((32, 32), 120, np.uint8)).save(path, format="GIF")


def _multipage_tiff(path: Path) -> None:
    pages = [Image.fromarray(np.full((32, 32), v, np.uint8)) for v in (50, 150)]
    pages[0].save(path, save_all=True, append_images=pages[1:])


def _analyze(path: Path) -> None:
    nib.save(nib.AnalyzeImage(np.ones((8, 8, 4), np.float32), np.eye(4)), str(path.with_suffix(".hdr")))


@pytest.mark.parametrize(
    "name, make, problem",
    [
        ("anim.gif", _gif, "GIF images are not supported"),
        ("stack.tif", _multipage_tiff, "holds 2 pages"),
        ("brain.hdr", _analyze, "Analyze 7.5"),
    ],
)
def test_unsupported_files_fail_with_a_word(name, make, problem, tiny_bundle_dir, tmp_path, capsys):
    images = _pngs(tmp_path / "images", 1)
    make(images / name)
    out = tmp_path / "pred"
    code, lines = _run(
        "tedm", ["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(out)], capsys
    )
    named = [line for line in lines if Path(name).stem in line]
    assert code == 1 and len(named) == 1 and problem in named[0], lines
    assert (out / "img0.png").is_file()
    summary = (out / "summary.csv").read_text()
    assert problem in summary and "brain.img" not in summary  # an Analyze pair is one case


def test_pretraining_names_the_files_it_does_not_read(tmp_path, caplog):
    from tedm_core.data import discover_files

    images = _pngs(tmp_path / "images", 1)
    _gif(images / "anim.gif")
    with caplog.at_level("WARNING"):
        files = discover_files([images])
    assert [p.name for p in files] == ["img0.png"]
    assert any("anim.gif" in r.getMessage() and "GIF" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("face", ["tedm", "batch"])
def test_a_decompression_bomb_is_one_failed_case(face, tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    from PIL import Image as PILImage

    images = _pngs(tmp_path / "images", 1)
    Image.fromarray(np.full((200, 200), 90, np.uint8)).save(images / "bomb.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)  # 200x200 is over twice this limit
    out = tmp_path / "pred"
    argv = ["--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(out)]
    code, lines = _run(face, ["segment", *argv] if face == "tedm" else [*argv, "--no-progress"], capsys)
    bomb = [line for line in lines if "bomb.png" in line]
    assert code == 1 and len(bomb) == 1 and "too large to decode safely" in bomb[0], lines
    assert (out / "img0.png").is_file()


def test_a_pretraining_bomb_is_skipped_with_its_name(tmp_path, caplog, monkeypatch):
    from PIL import Image as PILImage

    from tedm_core.data import load_pretraining_slices
    from tedm_core.preprocessing.intensity import RADIOGRAPH

    images = _pngs(tmp_path / "images", 1)
    Image.fromarray(np.full((200, 200), 90, np.uint8)).save(images / "bomb.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)
    with caplog.at_level("WARNING"):
        slices = load_pretraining_slices([images], 32, RADIOGRAPH, show_progress=False)
    assert slices.shape[0] == 1
    assert any("bomb.png" in r.getMessage() and "too large" in r.getMessage() for r in caplog.records)


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_csv_on_a_folder_is_one_line(tmp_path, capsys):
    truth = _pngs(tmp_path / "truth", 2, masks=True)
    folder = tmp_path / "metrics"
    folder.mkdir()
    pred = _pngs(tmp_path / "pred", 2, masks=True)
    code, lines = _run("tedm", ["evaluate", "--pred", str(pred), "--truth", str(truth), "--csv", str(folder)], capsys)
    line = _one_error_line(lines)
    assert code == 2 and "argument --csv" in line and "not a .csv file" in line and list(folder.iterdir()) == []


def test_evaluate_csv_over_a_ground_truth_image_is_refused(tmp_path, capsys):
    truth = _pngs(tmp_path / "truth", 2, masks=True)
    before = _snapshot(truth)
    argv = ["evaluate", "--pred", str(truth / ".."), "--truth", str(truth), "--csv", str(truth / "img0.png")]
    code, lines = _run("tedm", argv, capsys)
    assert code == 2 and "argument --csv" in _one_error_line(lines) and _snapshot(truth) == before


@pytest.mark.parametrize(
    "mask_values, problem",
    [((0, 1, 2), "3 different"), ((0, 128, 255), "2 different")],
)
def test_a_label_map_given_as_a_one_structure_mask_is_refused(mask_values, problem, tmp_path, capsys):
    truth = tmp_path / "truth"
    truth.mkdir()
    mask = np.zeros((16, 16), np.uint8)
    for i, value in enumerate(mask_values[1:]):
        mask[2 + 4 * i : 5 + 4 * i, 2:10] = value
    if len(mask_values) == 3 and mask_values[1] == 1:
        mask[14, 14] = 3
    Image.fromarray(mask).save(truth / "m.png")
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(pred / "m.png")
    code, lines = _run("tedm", ["evaluate", "--pred", str(pred), "--truth", str(truth)], capsys)
    line = _one_error_line(lines)
    assert code == 2 and "m.png" in line and problem in line and "one structure" in line, line


def test_evaluate_refuses_a_jpeg_prediction(tmp_path, capsys):
    truth = _pngs(tmp_path / "truth", 1, masks=True)
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.open(truth / "img0.png").save(pred / "img0.jpg")
    (truth / "img0.jpg").write_bytes((truth / "img0.png").read_bytes())
    code, lines = _run("tedm", ["evaluate", "--pred", str(pred), "--truth", str(truth)], capsys)
    line = _one_error_line(lines)
    assert code == 2 and "img0.jpg" in line and "JPEG" in line, line


# --- every option honoured or refused ----------------------------------------------------------


def test_options_that_would_be_ignored_are_refused(
    tiny_backbone_dir, tiny_bundle_dir, tmp_path, tmp_path_factory, capsys
):
    images = _pngs(tmp_path / "images", 2, seed=5)
    masks = _pngs(tmp_path / "masks", 2, seed=5, masks=True)
    # One head on one timestep makes one prediction per pixel: no spread to write (the
    # fixture's three heads have one even on a single step).
    one_head = save_bundle(
        fit_bundle(
            load_backbone(tiny_backbone_dir),
            *synthetic_disc_images(2, size=32, seed=5),
            steps=2,
            device="cpu",
            members=1,
        ),
        tmp_path_factory.mktemp("one_head") / "model",
    )
    fit = ["fit", "--backbone", str(tiny_backbone_dir), "--images", str(images), "--masks", str(masks)]
    cases = [
        ("tedm", [*fit, "--out", str(tmp_path / "b1"), "--method", "baseline", "--timesteps", "25"], "--timesteps"),
        ("tedm", [*fit, "--out", str(tmp_path / "b2"), "--slices", "3"], "--slices"),
        ("tedm", [*fit, "--out", str(tmp_path / "b3"), "--slices-per-case", "2"], "--slices-per-case"),
        ("tedm", ["evaluate", "--pred", str(masks), "--truth", str(masks)], "--pred"),
        (
            "tedm",
            ["segment", "--model", str(one_head), "--input", str(images), "--output", str(tmp_path / "o1")]
            + ["--timesteps", "25", "--uncertainty"],
            "--uncertainty",
        ),
        (
            "batch",
            ["--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(tmp_path / "o2")]
            + ["--label-name", "GT.nii.gz"],
            "--label-name",
        ),
    ]
    for face, argv, flag in cases:
        code, lines = _run(face, argv, capsys)
        line = _one_error_line(lines)
        assert code == 2 and f"argument {flag}" in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "masks"]  # nothing made


@pytest.mark.parametrize("face", ["tedm", "batch", "pretrain"])
def test_a_missing_input_leaves_no_output_folder_behind(face, tiny_bundle_dir, tmp_path, capsys):
    missing, out = tmp_path / "no_such_folder", tmp_path / "out"
    if face == "pretrain":
        argv = ["pretrain", "--images", str(missing), "--out", str(out), "--preset", "tiny", "--steps", "2"]
        code, lines = _run("tedm", argv, capsys)
    else:
        argv = ["--model", str(tiny_bundle_dir), "--input", str(missing), "--output", str(out)]
        code, lines = _run(face, ["segment", *argv] if face == "tedm" else argv, capsys)
    line = _one_error_line(lines)
    assert code == 2 and str(missing) in line and "not found" in line, line
    assert not out.exists()


@pytest.mark.parametrize("names", [("scan.nrrd", "scan.nii.gz"), ("scan.nii", "scan.nii.gz"), ("scan", "scan.nii.gz")])
def test_two_volumes_of_one_case_id_are_refused_naming_both(names, tmp_path):
    import SimpleITK as sitk

    from tedm_core.errors import InputError
    from tedm_core.io.cases import discover_cases

    inp = tmp_path / "in"
    inp.mkdir()
    array = np.random.default_rng(0).uniform(1, 9, (4, 6, 6)).astype(np.float32)
    for name in names:
        if "." not in name:  # a DICOM series folder
            (inp / name).mkdir()
            (inp / name / "IM0.dcm").write_bytes(b"")
        else:
            sitk.WriteImage(sitk.GetImageFromArray(array), str(inp / name))
    with pytest.raises(InputError) as caught:
        discover_cases(inp, tmp_path / "out", ["image"])
    assert all(name in str(caught.value) for name in names) and "\n" not in str(caught.value)
