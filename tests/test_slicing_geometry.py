"""Slicing along anatomical axes, the display orientation rule, exact reassembly, and world positions."""

from __future__ import annotations

from itertools import permutations, product

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
from conftest import ThresholdSegmenter, affine_zoo, require_shared_data, sphere_volume_array, world_centroid  # noqa: E402
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform  # noqa: E402

from tedm_core.io.volumes import read_volume, volume_from_array, write_label_volume  # noqa: E402
from tedm_core.pipelines.volume import segment_volume  # noqa: E402
from tedm_core.slicing import extract_slices, labelled_slice_indices, reassemble, slice_layout, to_slices  # noqa: E402

AFFINES = affine_zoo()
ALL_AXCODES = [
    "".join(pair[f] for pair, f in zip(perm, flips))
    for perm in permutations(["RL", "AP", "SI"])
    for flips in product([0, 1], repeat=3)
]


def _reoriented(data_ijk: np.ndarray, affine: np.ndarray, codes: str):
    """The same physical image stored with axis codes ``codes`` (nibabel does the bookkeeping)."""
    transform = ornt_transform(nib.io_orientation(affine), axcodes2ornt(codes))
    return apply_orientation(data_ijk, transform), affine @ inv_ornt_aff(transform, data_ijk.shape)


@pytest.fixture(scope="module")
def ras_volume():
    data_ijk = np.random.default_rng(0).random((7, 8, 9)).astype(np.float32)  # distinct sizes per axis
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [5.0, 6.0, 7.0]
    return data_ijk, affine


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_all_48_storage_orientations_give_the_same_slices(ras_volume, axis):
    data_ijk, affine = ras_volume
    reference, ref_layout = extract_slices(volume_from_array(data_ijk.transpose(2, 1, 0), affine), axis)
    for codes in ALL_AXCODES:
        stored, stored_affine = _reoriented(data_ijk, affine, codes)
        assert "".join(nib.aff2axcodes(stored_affine)) == codes
        slices, layout = extract_slices(volume_from_array(stored.transpose(2, 1, 0), stored_affine), axis)
        assert layout.plane == axis
        # The in-plane picture is identical; the slice order is the file's (reversed when stored I->S etc.).
        assert np.array_equal(slices, reference) or np.array_equal(slices, reference[::-1]), codes


def test_display_rule_axial_has_anterior_up_and_patient_left_on_the_right():
    # RAS grid: i -> R, j -> A. A marker at high R and high A.
    data_ijk = np.zeros((6, 5, 4), np.float32)
    data_ijk[5, 4, 2] = 1.0  # most right, most anterior
    slices, layout = extract_slices(volume_from_array(data_ijk.transpose(2, 1, 0), np.eye(4)), "axial")
    row, col = np.argwhere(slices[2, 0])[0]
    assert (row, col) == (0, 0)  # anterior at the top, patient right at the screen's left (radiological)
    assert layout.flip_rows and layout.flip_cols


def test_png_geometry_is_left_untouched():
    pixels = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    from tedm_core.io.volumes import ItkGeometry

    volume = volume_from_array(pixels, ItkGeometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), 2).ijk_to_ras())
    for axis in ("k", "axial"):
        slices, layout = extract_slices(volume, axis)
        assert np.array_equal(slices[0, 0], pixels[0]) and layout.plane == "axial"


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal", "k"])
def test_reassemble_is_the_exact_inverse(name, axis):
    array = np.random.default_rng(1).random((3, 5, 6, 7)).astype(np.float32)  # (C, K, J, I)
    volume = volume_from_array(array, AFFINES[name])
    slices, layout = extract_slices(volume, axis)
    assert slices.shape[1] == 3 and slices.shape[0] == layout.num_slices
    assert np.array_equal(reassemble(slices, layout), array)  # (N, C, H, W) -> (C, K, J, I)
    assert np.array_equal(reassemble(slices[:, 0], layout), array[0])  # (N, H, W) -> (K, J, I)


def test_axis_is_resolved_from_the_direction_matrix_not_the_last_axis():
    layout = slice_layout(AFFINES["permuted"], (5, 6, 7), "axial")  # here i -> P, j -> I, k -> R
    assert layout.slice_dim == 1  # the J dimension of (K, J, I)
    assert slice_layout(AFFINES["permuted"], (5, 6, 7), "sagittal").slice_dim == 0
    k_layout = slice_layout(AFFINES["permuted"], (5, 6, 7), "k")
    assert k_layout.slice_dim == 0 and k_layout.plane == "sagittal"
    oblique = slice_layout(AFFINES["oblique"], (5, 6, 7), "axial")
    assert oblique.slice_dim == 0  # 31 degrees off still closest to k


def test_labelled_slice_indices_in_file_order():
    labels = np.zeros((6, 5, 4), np.uint8)  # (K, J, I)
    labels[1, 2, 2] = 1
    labels[4, 0, 0] = 2
    layout = slice_layout(np.diag([-1.0, -1.0, 1.0, 1.0]), labels.shape, "axial")
    assert labelled_slice_indices(labels, layout) == [1, 4]
    assert to_slices(labels, layout).shape == (6, 5, 4)


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal", "k"])
def test_sphere_lands_at_its_world_position(tmp_path, name, axis):
    affine = AFFINES[name]
    shape = (14, 16, 18)  # (K, J, I)
    centre = (affine @ np.array([9.0, 7.0, 6.0, 1.0]))[:3] + np.array([0.3, -0.2, 0.1])  # off-grid
    raw = sphere_volume_array(shape, affine, centre, radius_mm=5.0)
    raw[:2] = 0.0  # a couple of empty slices along K: skipped without the model
    volume = volume_from_array(raw, affine)
    segmenter = ThresholdSegmenter()
    result = segment_volume(segmenter, volume, axis=axis)
    assert result.labels.shape == shape and result.probabilities.shape == (2,) + shape
    assert np.array_equal(result.labels, (raw > 50).astype(np.uint8))
    if axis in ("k", "axial") and name not in ("permuted",):
        assert result.slices_skipped >= 2 and segmenter.slices_seen == result.slices_run
    write_label_volume(tmp_path / "seg.nii.gz", result.labels, volume)
    written = nib.load(str(tmp_path / "seg.nii.gz"))
    labels_back = np.asarray(written.dataobj).transpose(2, 1, 0)
    np.testing.assert_allclose(world_centroid(labels_back, written.affine), centre, atol=0.6)


def test_real_model_segments_sphere_at_its_world_position(tiny_bundle_dir):
    """The tiny TEDM bundle (fitted on 2D discs) finds a sphere stored obliquely, LPS, anisotropic."""
    from tedm_core.bundle import load_bundle
    from tedm_core.pipelines.segment import Segmenter

    affine = AFFINES["oblique"]
    shape = (12, 26, 28)
    centre = (affine @ np.array([14.0, 13.0, 6.0, 1.0]))[:3]
    raw = sphere_volume_array(shape, affine, centre, radius_mm=7.0, inside=200.0, outside=30.0)
    raw += np.random.default_rng(0).normal(0, 4, raw.shape).astype(np.float32)
    result = segment_volume(
        Segmenter(load_bundle(tiny_bundle_dir), device="cpu"), volume_from_array(raw, affine), axis="axial"
    )
    truth = raw > 115
    assert result.labels.sum() > 0
    dice = 2 * np.logical_and(result.labels > 0, truth).sum() / (result.labels.sum() + truth.sum())
    assert dice > 0.7
    np.testing.assert_allclose(world_centroid(result.labels, affine), centre, atol=1.5)


@pytest.mark.realdata
def test_brats_resaved_in_another_orientation(tmp_path):
    """A real BraTS FLAIR stored LPS is resaved as PIR: same axial slices, outputs on each file's own grid."""
    flair = require_shared_data("brain", "brats", "Brats18_CBICA_AAB_1", "FLAIR.nii.gz")
    original = nib.load(str(flair))
    data = np.asarray(original.dataobj)
    stored, stored_affine = _reoriented(data, original.affine, "PIR")
    resaved = nib.Nifti1Image(stored, stored_affine)
    resaved.header.set_qform(stored_affine, code=1)
    nib.save(resaved, str(tmp_path / "FLAIR_PIR.nii.gz"))

    a, b = read_volume(flair), read_volume(tmp_path / "FLAIR_PIR.nii.gz")
    assert a.shape != b.shape  # really stored differently
    slices_a, layout_a = extract_slices(a, "axial")
    slices_b, layout_b = extract_slices(b, "axial")
    assert layout_a.slice_dim == 0 and layout_b.slice_dim == 1  # axial is K in one file, J in the other
    assert np.array_equal(slices_a, slices_b) or np.array_equal(slices_a, slices_b[::-1])

    threshold = ThresholdSegmenter(threshold=-0.5)
    threshold.bundle.intensity = type(threshold.bundle.intensity)("foreground_percentile", 1.0, 99.0)
    seg_a = segment_volume(threshold, a, axis="axial").labels
    seg_b = segment_volume(threshold, b, axis="axial").labels
    write_label_volume(tmp_path / "seg_b.nii.gz", seg_b, b)
    out_b = nib.load(str(tmp_path / "seg_b.nii.gz"))
    assert np.array_equal(out_b.affine, nib.load(str(tmp_path / "FLAIR_PIR.nii.gz")).affine)
    # The same voxels in the world: map the PIR result back to the original storage order.
    back, _ = _reoriented(np.asarray(out_b.dataobj), out_b.affine, "".join(nib.aff2axcodes(original.affine)))
    assert np.array_equal(back.transpose(2, 1, 0), seg_a)
    np.testing.assert_allclose(world_centroid(seg_a, original.affine), world_centroid(seg_b, out_b.affine), atol=1e-3)


@pytest.mark.parametrize("singleton_dim", [0, 1, 2], ids=["K", "J", "I"])
@pytest.mark.parametrize("name", ["oblique", "lps"])
def test_a_single_slice_is_one_image_whichever_axis_holds_it(tiny_bundle_dir, name, singleton_dim):
    """One coronal or sagittal slice saved from a volume (J or I of length 1) is one 2D image, as
    a radiograph (K of length 1) is: cut along the model's axis it became one-voxel-thin strips."""
    from tedm_core.bundle import load_bundle
    from tedm_core.pipelines.interactive import InteractiveSession

    shape = [20, 18, 16]
    shape[singleton_dim] = 1
    rng = np.random.default_rng(singleton_dim)
    raw = rng.uniform(0, 100, size=shape).astype(np.float32)
    volume = volume_from_array(raw, AFFINES[name])
    segmenter = ThresholdSegmenter()
    result = segment_volume(segmenter, volume, axis="axial")
    assert result.layout.num_slices == 1 and result.layout.slice_dim == singleton_dim
    assert segmenter.slices_seen == 1
    assert np.array_equal(result.labels, (raw > 50).astype(np.uint8))  # every voxel back on itself
    session = InteractiveSession(volume)  # the Slicer worker's path: it refused J or I before
    segmented = session.segment(load_bundle(tiny_bundle_dir), device="cpu")
    assert segmented.slices_run == 1 and segmented.labels.shape == volume.shape
    assert session.layout.slice_dim == singleton_dim
