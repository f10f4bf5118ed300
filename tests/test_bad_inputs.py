"""A corpus of broken inputs: each gives one line naming the file and the problem, and a batch
holding them completes the good cases without overwriting or half-writing anything."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

nib = pytest.importorskip("nibabel")

from conftest import ThresholdSegmenter, sphere_volume_array  # noqa: E402

from tedm_core.errors import InputError  # noqa: E402
from tedm_core.io.volumes import read_case, read_volume  # noqa: E402
from tedm_core.pipelines.batch import BatchOptions, check_output_folder, discover_cases, run_batch  # noqa: E402
from tedm_core.pipelines.volume import labelled_slices_from_volumes, segment_volume  # noqa: E402
from tedm_core.preprocessing.intensity import IntensityConfig  # noqa: E402

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _nifti(path: Path, data_ijk: np.ndarray, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data_ijk), affine), str(path))
    return path


def _good(shape=(12, 10, 6)) -> np.ndarray:
    return np.random.default_rng(0).uniform(1, 100, shape).astype(np.float32)


# Each builder makes a broken input in a folder and returns (the path the message must name,
# a callable that must raise, a fragment of the expected problem).
Builder = Callable[[Path], Tuple[Path, Callable[[], object], str]]


def _truncated_gz(d: Path):
    good = _nifti(d / "good.nii.gz", _good((40, 40, 20)))
    bad = d / "truncated.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return bad, lambda: read_volume(bad), "truncated or corrupt"


def _four_d(d: Path):
    p = _nifti(d / "fmri.nii.gz", np.random.default_rng(0).random((6, 6, 4, 3)).astype(np.float32))
    return p, lambda: read_volume(p), "4D image"


def _two_d(d: Path):
    p = _nifti(d / "flat.nii.gz", _good((12, 10)))
    return p, lambda: read_volume(p, require_3d=True), "where a 3D volume is expected"


def _nan(d: Path):
    data = _good()
    data[3, 3, 3] = np.nan
    p = _nifti(d / "nan.nii.gz", data)
    return p, lambda: read_volume(p), "NaN or infinite"


def _inf(d: Path):
    data = _good()
    data[1, 2, 3] = np.inf
    p = _nifti(d / "inf.nii", data)
    return p, lambda: read_volume(p), "NaN or infinite"


def _all_zero(d: Path):
    p = _nifti(d / "zeros.nii.gz", np.zeros((8, 8, 4), np.float32))
    return p, lambda: read_volume(p), "every voxel is 0"


def _text_as_nifti(d: Path):
    p = d / "notes.nii.gz"
    p.write_text("this is a text file\nwith two lines\n")
    return p, lambda: read_volume(p), "cannot be read as NIfTI"


def _gzipped_text_as_nifti(d: Path):
    p = d / "gzipped_text.nii.gz"
    p.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    return p, lambda: read_volume(p), "cannot be read as NIfTI"


def _empty_file(d: Path):
    p = d / "empty.nii"
    p.write_bytes(b"")
    return p, lambda: read_volume(p), "cannot be read"


def _text_as_nrrd(d: Path):
    p = d / "scan.nrrd"
    p.write_text("hello\n")
    return p, lambda: read_volume(p), "cannot be read"


def _corrupt_png(d: Path):
    p = d / "cxr.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    return p, lambda: read_volume(p), "cannot be read as an image"


def _unreadable_folder_named_like_a_file(d: Path):
    p = d / "scan.nii.gz"
    p.mkdir()
    return p, lambda: read_volume(p), "is a folder, not a file"


def _broken_link(d: Path):
    p = d / "link.nii.gz"
    p.symlink_to(d / "does_not_exist.nii.gz")
    return p, lambda: read_volume(p), "broken link"


def _missing(d: Path):
    p = d / "missing.nii.gz"
    return p, lambda: read_volume(p), "file not found"


def _unsupported(d: Path):
    p = d / "report.docx"
    p.write_bytes(b"PK\x03\x04 not really")
    return p, lambda: read_volume(p), "unsupported file type"


def _single_dicom_file(d: Path):
    p = d / "IM0001.dcm"
    p.write_bytes(b"\x00" * 200)
    return p, lambda: read_volume(p), "single DICOM file"


def _empty_folder_as_dicom(d: Path):
    p = d / "series"
    p.mkdir()
    return p, lambda: read_volume(p), "empty folder"


def _empty_input_folder(d: Path):
    p = d / "cohort"
    p.mkdir()
    return p, lambda: discover_cases(p, d / "out", ["image"]), "no image or volume files found"


def _rgb_mha(d: Path):
    p = d / "colour.mha"
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(p))
    return p, lambda: read_volume(p), "components per voxel"


def _wrong_number_of_modalities(d: Path):
    p = _nifti(d / "FLAIR.nii.gz", _good())
    segmenter = ThresholdSegmenter(channel_names=("FLAIR", "T1"))
    return p, lambda: segment_volume(segmenter, read_volume(p)), "the model expects 2 (FLAIR, T1)"


def _modalities_on_different_grids(d: Path):
    flair = _nifti(d / "FLAIR.nii.gz", _good())
    t1 = _nifti(d / "T1.nii.gz", _good((12, 10, 7)))
    return t1, lambda: read_case([flair, t1]), "does not match"


def _label_of_another_shape(d: Path):
    image = _nifti(d / "image.nii.gz", _good())
    label = _nifti(d / "label.nii.gz", np.ones((12, 10, 5), np.uint8))
    return (
        label,
        lambda: labelled_slices_from_volumes(
            read_volume(image), read_volume(label, allow_constant=True), IntensityConfig(), [0, 1]
        ),
        "label volume does not match",
    )


def _label_of_another_geometry(d: Path):
    image = _nifti(d / "image.nii.gz", _good())
    shifted = AFFINE.copy()
    shifted[:3, 3] = [0.0, 5.0, 0.0]
    label = _nifti(d / "label_shifted.nii.gz", (_good() > 50).astype(np.uint8), shifted)
    return (
        label,
        lambda: labelled_slices_from_volumes(read_volume(image), read_volume(label), IntensityConfig(), [0, 1]),
        "origin",
    )


def _label_with_unknown_values(d: Path):
    image = _nifti(d / "image.nii.gz", _good())
    label = _nifti(d / "label_values.nii.gz", np.full((12, 10, 6), 7, np.uint8))
    return (
        label,
        lambda: labelled_slices_from_volumes(
            read_volume(image), read_volume(label, allow_constant=True), IntensityConfig(), [0, 1, 2]
        ),
        "label values [7]",
    )


def _output_inside_input(d: Path):
    (d / "in").mkdir()
    return d / "in" / "results", lambda: check_output_folder(d / "in", d / "in" / "results"), "inside the input folder"


CORPUS: Dict[str, Builder] = {
    f.__name__.lstrip("_"): f
    for f in (
        _truncated_gz,
        _four_d,
        _two_d,
        _nan,
        _inf,
        _all_zero,
        _text_as_nifti,
        _gzipped_text_as_nifti,
        _empty_file,
        _text_as_nrrd,
        _corrupt_png,
        _unreadable_folder_named_like_a_file,
        _broken_link,
        _missing,
        _unsupported,
        _single_dicom_file,
        _empty_folder_as_dicom,
        _empty_input_folder,
        _rgb_mha,
        _wrong_number_of_modalities,
        _modalities_on_different_grids,
        _label_of_another_shape,
        _label_of_another_geometry,
        _label_with_unknown_values,
        _output_inside_input,
    )
}


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 15


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_broken_input_gives_one_line_naming_the_file(tmp_path, name):
    path, action, problem = CORPUS[name](tmp_path)
    with pytest.raises(InputError) as caught:
        action()
    message = str(caught.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert problem in message, message


@pytest.mark.parametrize(
    "name", ["bundle_missing_file", "bundle_other_version", "pickle_as_bundle", "pickle_as_weights"]
)
def test_broken_bundles_are_refused_in_one_line(tmp_path, tiny_bundle_dir, name):
    import json
    import shutil

    from tedm_core.bundle import load_bundle
    from tedm_core.errors import BundleError

    bundle = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    if name == "bundle_missing_file":
        target = bundle / "head.safetensors"
        target.unlink()
        expected = "missing file"
    elif name == "bundle_other_version":
        target = bundle / "bundle.json"
        meta = json.loads(target.read_text())
        meta["format"] = 99
        target.write_text(json.dumps(meta))
        expected = "format 99 is not supported"
    elif name == "pickle_as_bundle":
        target = tmp_path / "model.tedm"
        target.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
        bundle = target
        expected = "pickle"
    else:
        target = bundle / "backbone.safetensors"
        target.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
        expected = "pickle"
    with pytest.raises(BundleError) as caught:
        load_bundle(bundle)
    message = str(caught.value)
    assert "\n" not in message and str(target) in message and expected in message, message


def test_batch_with_broken_cases_completes_the_rest_and_overwrites_nothing(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    good_raw = sphere_volume_array((6, 16, 16), AFFINE, (8.0, 8.0, 6.0), 4.0)
    for name in ("good1", "good2", "good3"):
        _nifti(inp / f"{name}.nii.gz", good_raw.transpose(2, 1, 0))
    # A sample of the corpus placed inside the cohort.
    for builder in (_truncated_gz, _four_d, _nan, _all_zero, _text_as_nifti, _empty_file, _corrupt_png, _text_as_nrrd):
        builder(inp)
    (inp / "good.nii.gz").unlink()  # the truncated-gz builder's helper file
    # A finished output of an earlier run of the same model must survive untouched (no --overwrite).
    run_batch(ThresholdSegmenter(), inp, out, BatchOptions(include="good3*", show_progress=False))
    existing = out / "good3.nii.gz"
    before = existing.read_bytes()

    report = run_batch(ThresholdSegmenter(), inp, out, BatchOptions(show_progress=False))
    statuses = {r.case_id: r.status for r in report.results}
    assert statuses["good1"] == statuses["good2"] == "ok" and statuses["good3"] == "exists"
    failed = report.failed
    assert len(failed) == 8
    for result in failed:
        assert "\n" not in result.error and str(inp) in result.error
    assert existing.read_bytes() == before
    written = sorted(p.name for p in out.iterdir())
    assert written == [".tedm_outputs.json", "good1.nii.gz", "good2.nii.gz", "good3.nii.gz", "summary.csv"]  # no .part
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + len(report.results)
