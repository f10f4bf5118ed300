"""`tedm fit` and `tedm segment` on volumes: learn from the labelled slices of a label volume only."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from conftest import sphere_volume_array

from tedm_core.bundle import load_bundle
from tedm_core.cli import main
from tedm_core.pipelines.evaluate import dice_precision_recall


def _sphere_case(folder, name, centre, affine):
    folder.mkdir(parents=True, exist_ok=True)
    image = sphere_volume_array((24, 32, 32), affine, centre, 7.0, inside=80.0, outside=20.0)  # (K, J, I)
    rng = np.random.default_rng(len(name) + int(centre[0]))
    image = image + rng.normal(0, 3, image.shape).astype(np.float32)
    image[:, :2] = 0  # some background, as a skull-stripped scan has
    labels = (sphere_volume_array((24, 32, 32), affine, centre, 7.0, 1.0, 0.0) > 0).astype(np.uint8)
    (folder / "images").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), folder / "images" / f"{name}.nii.gz")
    return image, labels


def test_fit_on_three_labelled_slices_of_a_volume_then_segment_it(tiny_backbone_dir, tmp_path, capsys):
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    image, labels = _sphere_case(tmp_path / "train", "case_a", (16.0, 16.0, 18.0), affine)
    sparse = np.zeros_like(labels)  # a clinician labelled three axial slices only
    for k in (9, 12, 15):
        sparse[k] = labels[k]
    (tmp_path / "train" / "labels").mkdir()
    nib.save(nib.Nifti1Image(sparse.transpose(2, 1, 0), affine), tmp_path / "train" / "labels" / "case_a.nii.gz")
    bundle = tmp_path / "bundle"
    assert (
        main(
            [
                "fit",
                "--backbone",
                str(tiny_backbone_dir),
                "--images",
                str(tmp_path / "train" / "images"),
                "--masks",
                str(tmp_path / "train" / "labels"),
                "--out",
                str(bundle),
                "--steps",
                "80",
                "--classes",
                "sphere",
                "--axis",
                "axial",
            ]
        )
        == 0
    )
    assert load_bundle(bundle).training["labelled_slices"] == 3
    _sphere_case(tmp_path / "test", "case_b", (15.0, 17.0, 16.0), affine)
    out = tmp_path / "pred"
    assert (
        main(["segment", "--model", str(bundle), "--input", str(tmp_path / "test" / "images"), "--output", str(out)])
        == 0
    )
    result = nib.load(str(out / "case_b.nii.gz"))
    np.testing.assert_array_equal(result.affine, affine)
    truth = sphere_volume_array((24, 32, 32), affine, (15.0, 17.0, 16.0), 7.0, 1.0, 0.0).transpose(2, 1, 0) > 0
    assert dice_precision_recall(np.asarray(result.dataobj) > 0, truth)[0] > 0.7
