"""Reading volumes of every supported format and writing labels with exactly the input's geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

nib = pytest.importorskip("nibabel")

from conftest import affine_zoo  # noqa: E402

from tedm_core.errors import InputError  # noqa: E402
from tedm_core.io.volumes import (  # noqa: E402
    LPS_TO_RAS,
    read_case,
    read_volume,
    volume_from_array,
    write_float_volume,
    write_label_volume,
)

AFFINES = affine_zoo()
SHAPE_IJK = (11, 9, 7)


def _nifti(path, affine, data_ijk=None, sform_code=1, qform_code=1):
    data = data_ijk if data_ijk is not None else np.random.default_rng(0).uniform(0, 100, SHAPE_IJK).astype(np.float32)
    image = nib.Nifti1Image(data, affine)
    image.header.set_sform(affine, code=sform_code)
    image.header.set_qform(affine, code=qform_code)
    nib.save(image, str(path))
    return data


GEOMETRY_FIELDS = (
    "sform_code",
    "qform_code",
    "srow_x",
    "srow_y",
    "srow_z",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "pixdim",
    "xyzt_units",
)


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("codes", [(1, 1), (2, 0), (0, 1), (4, 2)])
def test_nifti_label_output_keeps_affine_and_codes_exactly(tmp_path, name, codes):
    affine = AFFINES[name]
    data = _nifti(tmp_path / "in.nii.gz", affine, sform_code=codes[0], qform_code=codes[1])
    volume = read_volume(tmp_path / "in.nii.gz")
    assert volume.array.shape == (1,) + SHAPE_IJK[::-1]  # (C, K, J, I)
    np.testing.assert_array_equal(volume.array[0], data.transpose(2, 1, 0))
    labels = (volume.array[0] > 50).astype(np.uint8)
    write_label_volume(tmp_path / "out.nii.gz", labels, volume)
    src, out = nib.load(str(tmp_path / "in.nii.gz")), nib.load(str(tmp_path / "out.nii.gz"))
    assert np.array_equal(out.affine, src.affine)  # bit for bit, not allclose
    for field in GEOMETRY_FIELDS:
        assert np.array_equal(out.header[field], src.header[field]), field
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(out.dataobj), labels.transpose(2, 1, 0))
    assert not list(tmp_path.glob(".*part*"))  # atomic: no temporary left


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
@pytest.mark.parametrize("name", ["lps", "oblique", "anisotropic"])
def test_itk_formats_round_trip_geometry(tmp_path, suffix, name):
    # Written by ITK itself, so the LPS -> RAS conversion is checked against ITK's own geometry.
    lps = LPS_TO_RAS @ AFFINES[name]
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.random.default_rng(1).uniform(0, 9, SHAPE_IJK[::-1]).astype(np.float32))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(image, str(tmp_path / f"in{suffix}"))
    volume = read_volume(tmp_path / f"in{suffix}")
    np.testing.assert_allclose(volume.ijk_to_ras, AFFINES[name], atol=1e-5)  # 1e-5: NIfTI stores float32
    np.testing.assert_array_equal(volume.array[0], sitk.GetArrayFromImage(image))
    write_label_volume(tmp_path / f"out{suffix}", (volume.array[0] > 4).astype(np.uint8), volume)
    again = read_volume(tmp_path / f"out{suffix}", allow_constant=True)
    if suffix == ".nii.gz":
        assert np.array_equal(again.ijk_to_ras, volume.ijk_to_ras)
    else:
        # NRRD/MHA store direction x spacing as decimal text and ITK re-derives both on reading,
        # so an oblique grid can move in the last bit (1e-16); nothing larger is allowed.
        np.testing.assert_allclose(again.ijk_to_ras, volume.ijk_to_ras, rtol=0, atol=1e-12)
    out = sitk.ReadImage(str(tmp_path / f"out{suffix}"))
    np.testing.assert_allclose(out.GetSpacing(), image.GetSpacing(), rtol=0, atol=1e-6)
    assert out.GetPixelID() == sitk.sitkUInt8


def test_nibabel_and_simpleitk_agree_on_ras(tmp_path):
    affine = AFFINES["oblique"]
    _nifti(tmp_path / "a.nii.gz", affine)
    image = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "a.nrrd"))
    np.testing.assert_allclose(
        read_volume(tmp_path / "a.nrrd").ijk_to_ras, read_volume(tmp_path / "a.nii.gz").ijk_to_ras, atol=1e-5
    )


def test_float_map_writer(tmp_path):
    affine = AFFINES["anisotropic"]
    _nifti(tmp_path / "in.nii", affine)
    volume = read_volume(tmp_path / "in.nii")
    values = np.random.default_rng(2).random(volume.shape).astype(np.float32)
    write_float_volume(tmp_path / "u.nii.gz", values, volume)
    out = nib.load(str(tmp_path / "u.nii.gz"))
    assert out.get_data_dtype() == np.float32 and np.array_equal(out.affine, nib.load(str(tmp_path / "in.nii")).affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj).transpose(2, 1, 0), values)


def test_a_2d_nifti_gets_2d_outputs(tmp_path):
    """A 2D NIfTI (dim[0] = 2) is a one-slice volume; its label and uncertainty files are 2D as
    it is, with its affine, so that ITK tools can combine them (a 3D label file of one slice
    made SimpleITK's Mask refuse the pair)."""
    affine = np.diag([-0.5, 0.8, 1.0, 1.0])
    values = np.random.default_rng(3).random((21, 17)).astype(np.float32)  # (I, J)
    nib.save(nib.Nifti1Image(values, affine), str(tmp_path / "in.nii.gz"))
    volume = read_volume(tmp_path / "in.nii.gz")
    assert volume.shape == (1, 17, 21)
    labels = (volume.array[0] > 0.5).astype(np.uint8)
    write_label_volume(tmp_path / "labels.nii.gz", labels, volume)
    write_float_volume(tmp_path / "uncertainty.nii.gz", volume.array[0], volume)
    for name in ("labels", "uncertainty"):
        out = nib.load(str(tmp_path / f"{name}.nii.gz"))
        assert out.shape == (21, 17) and out.header["dim"][0] == 2, name
        assert np.array_equal(out.affine, nib.load(str(tmp_path / "in.nii.gz")).affine), name
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "labels.nii.gz")).dataobj), (values > 0.5) * 1)
    masked = sitk.Mask(sitk.ReadImage(str(tmp_path / "in.nii.gz")), sitk.ReadImage(str(tmp_path / "labels.nii.gz")))
    assert masked.GetDimension() == 2


def test_png_is_a_one_slice_volume_and_writes_back(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(3).integers(0, 255, (20, 30), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cxr.png")
    volume = read_volume(tmp_path / "cxr.png")
    assert volume.array.shape == (1, 1, 20, 30) and volume.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(volume.array[0, 0], pixels)
    write_label_volume(tmp_path / "mask.png", (volume.array[0] > 128).astype(np.uint8) * 255, volume)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "mask.png")), (pixels > 128) * 255)
    write_float_volume(tmp_path / "u.png", np.full(volume.shape, 0.5, np.float32), volume)
    assert np.asarray(Image.open(tmp_path / "u.png")).max() == 32768


def _dicom_series(folder, array, lps, depths=None, turned=()):
    """``array`` (K, J, I) as one DICOM file per slice in ``folder``, on the grid of ``lps``
    (IJK -> LPS); slice k at ``depths[k]`` slices along K (default k), the slices in ``turned``
    written in another plane (their in-plane axes swapped)."""
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        plane = sitk.GetImageFromArray(array[k : k + 1])
        plane.SetSpacing(spacing.tolist())
        origin = lps[:3, 3] + lps[:3, 2] * (k if depths is None else depths[k])
        rows, columns = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
        if k in turned:
            rows, columns = lps[:3, 2] / spacing[2], rows
        for key, value in {
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.2",
            "0008|0060": "MR",
            "0020|0032": "\\".join(f"{v:.6f}" for v in origin),
            "0020|0037": "\\".join(f"{v:.6f}" for v in np.concatenate([rows, columns])),
            "0020|0013": str(k + 1),
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
            "0018|0050": f"{spacing[2]:.6f}",
        }.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)
    return folder


def test_dicom_series_folder(tmp_path):
    lps = LPS_TO_RAS @ AFFINES["anisotropic"]
    array = np.random.default_rng(4).integers(0, 1000, (5, 12, 10)).astype(np.int16)
    volume = read_volume(_dicom_series(tmp_path / "series", array, lps))
    assert volume.source_format == "dicom" and volume.shape == (5, 12, 10)
    np.testing.assert_array_equal(volume.array[0], array)
    np.testing.assert_allclose(volume.ijk_to_ras, AFFINES["anisotropic"], atol=1e-4)
    write_label_volume(tmp_path / "out.nii.gz", (volume.array[0] > 500).astype(np.uint8), volume)
    np.testing.assert_allclose(nib.load(str(tmp_path / "out.nii.gz")).affine, volume.ijk_to_ras, atol=1e-4)


def test_a_dicom_series_with_a_missing_slice_or_a_turned_one_is_refused(tmp_path):
    """ITK stacks what it is given: a series with a slice missing came back evenly spaced (each
    slice up to half a slice from where it was imaged), one with slices of another plane stacked
    as the first's, both without a word. Each is refused in one line naming the folder."""
    lps = LPS_TO_RAS @ AFFINES["anisotropic"]
    array = np.random.default_rng(5).integers(0, 1000, (5, 12, 12)).astype(np.int16)
    missing = _dicom_series(tmp_path / "missing", array, lps, depths=[0, 1, 2, 4, 5])
    with pytest.raises(InputError, match=r"missing: its slices are not evenly spaced"):
        read_volume(missing)
    turned = _dicom_series(tmp_path / "turned", array, lps, turned=(3,))
    with pytest.raises(InputError, match=r"turned: its slices lie in different orientations \(slice003\.dcm"):
        read_volume(turned)


def test_read_case_stacks_modalities_and_checks_geometry(tmp_path):
    affine = AFFINES["lps"]
    _nifti(tmp_path / "FLAIR.nii.gz", affine)
    _nifti(tmp_path / "T1.nii.gz", affine)
    case = read_case([tmp_path / "FLAIR.nii.gz", tmp_path / "T1.nii.gz"])
    assert case.array.shape == (2,) + SHAPE_IJK[::-1] and case.channel_names == ["FLAIR", "T1"]
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    _nifti(tmp_path / "T2.nii.gz", shifted)
    with pytest.raises(InputError, match=r"T2\.nii\.gz: does not match .*FLAIR.*origin"):
        read_case([tmp_path / "FLAIR.nii.gz", tmp_path / "T2.nii.gz"])


def test_volume_from_array_and_with_array():
    volume = volume_from_array(np.ones((3, 4, 5)), np.eye(4))
    assert volume.shape == (3, 4, 5)
    other = volume.with_array(np.zeros((2, 3, 4, 5)))
    assert other.array.shape == (2, 3, 4, 5) and np.array_equal(other.ijk_to_ras, volume.ijk_to_ras)
    with pytest.raises(ValueError):
        volume.with_array(np.zeros((3, 4, 6)))


def test_a_label_volume_of_fractional_values_is_refused_not_rounded(tmp_path):
    """A soft or interpolated mask (0/0.45 rounds to empty, a blurred edge of 0.3/0.7 to a
    thresholded one) is refused naming the file; whole numbers stored as floats are read as they are."""
    from tedm_core.io.volumes import read_volume, volume_from_array
    from tedm_core.pipelines.volume import label_array_to_classes

    mask = np.zeros((4, 6, 5), np.float32)
    mask[1:3, 2:4, 1:4] = 1.0
    whole = volume_from_array(mask, affine_zoo()["oblique"])
    assert label_array_to_classes(whole, [0, 1]).sum() == mask.sum()
    nib.save(nib.Nifti1Image((mask * 0.45).transpose(2, 1, 0), affine_zoo()["oblique"]), tmp_path / "soft.nii.gz")
    soft = read_volume(tmp_path / "soft.nii.gz", allow_constant=True)
    with pytest.raises(InputError, match=r"soft\.nii\.gz.*not whole numbers \(12 voxels, e\.g\. 0\.45\)"):
        label_array_to_classes(soft, [0, 1])


def test_a_photo_with_an_exif_turn_is_segmented_as_stored_and_said_so(tmp_path, caplog):
    """EXIF orientation turns the image in viewers only: the pixels (and so the labels written on
    them) stay as stored, and the user is told that the model saw them that way."""
    from PIL import Image

    from tedm_core.io.volumes import read_volume

    pixels = (np.arange(40 * 30).reshape(30, 40) % 251).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    Image.fromarray(pixels).save(tmp_path / "plain.jpg", quality=100)
    with caplog.at_level("WARNING"):
        turned = read_volume(tmp_path / "turned.jpg")
    assert "turned.jpg" in caplog.text and "EXIF orientation (6)" in caplog.text
    assert turned.shape == (1, 30, 40)  # as stored
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_volume(tmp_path / "plain.jpg")
    assert "EXIF" not in caplog.text
