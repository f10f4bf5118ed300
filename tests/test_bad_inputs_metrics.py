"""Ground truth given to ``scripts/batch_segment.py --labels``: a mean says over how many cases it
is taken, a case whose ground truth is missing or unusable is named and fails the run, and 2D
ground truth is read by the masks' one reader (as ``tedm fit`` and ``tedm evaluate`` read it)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
from PIL import Image

nib = pytest.importorskip("nibabel")

from conftest import REPO, ThresholdSegmenter, synthetic_disc_images  # noqa: E402

from tedm_core.pipelines.batch import BatchOptions, run_batch  # noqa: E402

SCRIPT = REPO / "scripts" / "batch_segment.py"
AFFINE = np.diag([-1.0, -1.0, 2.0, 1.0])


def _batch(argv: List[str], capsys) -> Tuple[int, List[str], List[str]]:
    spec = importlib.util.spec_from_file_location("batch_segment_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    try:
        code = module.main([*argv, "--no-progress"])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return int(code), captured.out.splitlines(), [line for line in captured.err.splitlines() if line.strip()]


def _read_csv(path: Path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _save(path: Path, array_kji: np.ndarray, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array_kji, dtype=dtype).transpose(2, 1, 0), AFFINE), str(path))


def _radiographs(tmp_path: Path, n: int = 3) -> Tuple[Path, Path, List[np.ndarray]]:
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truth.mkdir()
    pictures, masks = synthetic_disc_images(n, size=32, seed=3)
    for i in range(n):
        Image.fromarray(((pictures[i, 0] + 1) * 127.5).astype(np.uint8)).save(images / f"img{i}.png")
    return images, truth, [m.astype(np.uint8) for m in masks]


def test_the_mean_says_over_which_cases_and_unscored_cases_are_named(tmp_path):
    inp, labels, out = tmp_path / "in", tmp_path / "labels", tmp_path / "out"
    for i in range(5):
        raw = np.full((4, 12, 12), 10.0)
        raw[:, 3:9, 3:9] = 90.0
        _save(inp / f"c{i}.nii.gz", raw)
        if i in (0, 3):
            _save(labels / f"c{i}.nii.gz", (raw > 50).astype(np.uint8), dtype=np.uint8)
    _save(labels / "c2.nii.gz", np.zeros((4, 12, 10)), dtype=np.uint8)  # another grid
    (inp / "c4.nii.gz").write_bytes(b"not a volume")  # fails
    report = run_batch(ThresholdSegmenter(), inp, out, BatchOptions(labels_dir=labels, show_progress=False))
    assert report.dice_line() == (
        "mean Dice over 2 of 5 cases (1 without ground truth, 1 with unusable ground truth, 1 failed): "
        "sphere 100.0 +- 0.0"
    )
    assert [r.case_id for r in report.unscored] == ["c1", "c2"]
    rows = {r["case"]: r for r in _read_csv(out / "summary.csv")}
    assert {case: r["ground_truth"] for case, r in rows.items()} == {
        "c0": "scored",
        "c1": "missing",
        "c2": "unusable",
        "c3": "scored",
        "c4": "",
    }
    assert "no ground truth for case c1" in rows["c1"]["error"] and "grid" in rows["c2"]["error"]
    assert sorted(r["case"] for r in _read_csv(out / "metrics.csv")) == ["c0", "c3"]


def test_the_script_fails_a_run_with_a_case_unscored(tiny_bundle_dir, tmp_path, capsys):
    images, truth, masks = _radiographs(tmp_path)
    for i in (0, 1):  # img2 has no ground truth
        Image.fromarray(masks[i] * 255).save(truth / f"img{i}.png")
    argv = ["--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(tmp_path / "out")]
    code, out, err = _batch([*argv, "--labels", str(truth)], capsys)
    assert code == 1, err
    assert any(line.startswith("mean Dice over 2 of 3 cases (1 without ground truth): disc ") for line in out), out
    assert [line for line in err if line.startswith("NOT SCORED")] == [
        f"NOT SCORED {truth}: no ground truth for case img2 (looked for img2.<suffix>)"
    ]


def test_no_ground_truth_for_any_case_is_one_line_before_the_work(tiny_bundle_dir, tmp_path, capsys):
    images, truth, masks = _radiographs(tmp_path)
    for i in range(3):  # the BraTS layout, its file name not given
        (truth / f"img{i}").mkdir()
        Image.fromarray(masks[i] * 255).save(truth / f"img{i}" / "GT.png")
    out = tmp_path / "out"
    argv = ["--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(out), "--labels", str(truth)]
    code, _, err = _batch(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert str(truth) in err[0] and "no ground truth for any of the 3 cases" in err[0]
    assert not out.exists()
    code, out_lines, err = _batch(
        [*argv[:-2], "--output", str(tmp_path / "out2"), "--labels", str(truth)] + ["--label-name", "GT.png"], capsys
    )
    assert code == 0 and any("mean Dice over 3 of 3 cases: disc" in line for line in out_lines), (out_lines, err)


@pytest.mark.parametrize(
    "mode, problem",
    [
        ("alpha", "alpha (transparency) channel"),
        ("colour", "is a colour image"),
    ],
)
def test_2d_ground_truth_is_read_by_the_masks_reader(mode, problem, tiny_bundle_dir, tmp_path, capsys):
    images, truth, masks = _radiographs(tmp_path, 2)
    Image.fromarray(masks[0] * 255).save(truth / "img0.png")
    mask = masks[1] * 255
    if mode == "alpha":  # the mask in the alpha channel, the colour channels black: read as grey, empty
        rgba = np.zeros(mask.shape + (4,), np.uint8)
        rgba[..., 3] = mask
        Image.fromarray(rgba, "RGBA").save(truth / "img1.png")
    else:
        rgb = np.zeros(mask.shape + (3,), np.uint8)
        rgb[..., 0] = mask
        Image.fromarray(rgb, "RGB").save(truth / "img1.png")
    argv = ["--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(tmp_path / "out")]
    code, out, err = _batch([*argv, "--labels", str(truth)], capsys)
    assert code == 1
    unscored = [line for line in err if line.startswith("NOT SCORED")]
    assert len(unscored) == 1 and "img1.png" in unscored[0] and problem in unscored[0], err
    assert [r["case"] for r in _read_csv(tmp_path / "out" / "metrics.csv")] == ["img0"]


def test_a_palette_ground_truth_scores_as_its_grey_twin(tiny_bundle_dir, tmp_path, capsys):
    images, truth, masks = _radiographs(tmp_path, 1)
    grey, palette = tmp_path / "grey", tmp_path / "palette"
    grey.mkdir()
    palette.mkdir()
    Image.fromarray(masks[0] * 255).save(grey / "img0.png")
    Image.fromarray(masks[0]).convert("P").save(palette / "img0.png")  # VOC-style indices 0/1
    dice = []
    for k, labels in enumerate((grey, palette)):
        argv = ["--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(tmp_path / f"out{k}")]
        assert _batch([*argv, "--labels", str(labels)], capsys)[0] == 0
        dice.append(_read_csv(tmp_path / f"out{k}" / "metrics.csv")[0]["dice"])
    assert dice[0] == dice[1] and float(dice[0]) > 0


def test_a_one_structure_ground_truth_of_another_value_is_refused_not_scored(tmp_path):
    """`--label-values 0 4` (BraTS enhancing tumour) on a ground truth holding only value 2 (edema):
    refused naming the value, where it was scored as the structure; 0/1 and 0/255 masks stay one
    convention for a structure valued 1 or 255."""
    import nibabel as nib

    from tedm_core.errors import InputError
    from tedm_core.io.images import read_label_image
    from tedm_core.io.volumes import read_volume
    from tedm_core.pipelines.volume import label_array_to_classes

    edema = np.zeros((8, 8, 4), np.uint8)
    edema[2:5, 2:5, 1:3] = 2
    nib.save(nib.Nifti1Image(edema, np.eye(4)), tmp_path / "gt.nii.gz")
    volume = read_volume(tmp_path / "gt.nii.gz", allow_constant=True)
    with pytest.raises(InputError, match=r"gt.nii.gz: holds the value 2 where the structure's value is 4"):
        label_array_to_classes(volume, [0, 4])
    assert label_array_to_classes(volume, [0, 2]).sum() == 18
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert read_label_image(tmp_path / "mask.png", [0, 1]).sum() == 9  # 0/255 for a structure valued 1
    # A 2D mask image may be 0/255 whatever the structure's value: segment writes them so (read back by
    # evaluate, batch --labels and refine --corrected of a model whose label values are 0 4).
    assert read_label_image(tmp_path / "mask.png", [0, 4]).sum() == 9
    assert label_array_to_classes(read_volume(tmp_path / "mask.png", allow_constant=True), [0, 4]).sum() == 9
    nib.save(nib.Nifti1Image((edema > 0).astype(np.uint8) * 255, np.eye(4)), tmp_path / "gt255.nii.gz")
    with pytest.raises(InputError, match="holds the value 255 where the structure's value is 4"):
        label_array_to_classes(read_volume(tmp_path / "gt255.nii.gz", allow_constant=True), [0, 4])
