"""The core interactive session (segment, fit, refine, uncertain slices on one volume), with the
tiny backbone and bundle trained on the spot, on a synthetic oblique volume."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import affine_zoo


def _sphere_volume():
    from tedm_core.io.volumes import volume_from_array

    k, j, i = np.mgrid[:12, :40, :36]
    sphere = ((k - 6) ** 2 * 4 + (j - 20) ** 2 + (i - 18) ** 2) < 11**2
    array = np.where(sphere, 200.0, 20.0) + np.random.default_rng(0).normal(0, 5, sphere.shape)
    array[:2] = 0.0  # two background-only slices: never run through the model
    sphere[:2] = False
    return volume_from_array(array.astype(np.float32), affine_zoo()["oblique"]), sphere.astype(np.uint8)


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    from tedm_core.model.checkpoint import load_backbone

    return load_backbone(tiny_backbone_dir)


def test_segment_equals_the_batch_pipeline(tiny_bundle_dir):
    from tedm_core.bundle import load_bundle
    from tedm_core.pipelines.interactive import InteractiveSession
    from tedm_core.pipelines.segment import Segmenter
    from tedm_core.pipelines.volume import segment_volume

    volume, _ = _sphere_volume()
    bundle = load_bundle(tiny_bundle_dir)
    result = InteractiveSession(volume).segment(bundle, axis="k", device="cpu")
    expected = segment_volume(Segmenter(bundle, device="cpu"), volume, axis="k").labels
    np.testing.assert_array_equal(result.labels, expected)
    assert result.labels.shape == volume.shape and result.slices_run == 10
    assert result.class_names == ["background", "disc"]


def test_fit_correct_refine_uncertain(backbone):
    from tedm_core.pipelines.interactive import InteractiveSession, Reporter, SessionError

    volume, sphere = _sphere_volume()
    session = InteractiveSession(volume)
    drawn = np.zeros_like(sphere)
    drawn[[4, 8]] = sphere[[4, 8]]
    fitted = session.fit(backbone, drawn, ["background", "sphere"], axis="k", device="cpu", steps=30)
    assert fitted.training_slices == [4, 8]
    np.testing.assert_array_equal(fitted.labels[[4, 8]], sphere[[4, 8]])
    assert not fitted.labels[:2].any()  # background-only slices are label 0
    assert session.feature_cache_nbytes > 0

    with pytest.raises(SessionError, match="no slice differs"):
        session.refine(fitted.labels, steps=5)

    edited = fitted.labels.copy()
    edited[6] = sphere[6]
    edited[6, 0, 0] = 1 - edited[6, 0, 0]  # a certain change, whatever the fit got right
    logged = []
    refined = session.refine(edited, steps=5, reporter=Reporter(log=logged.append))
    assert session.bundle.training["refine_anchor_slices"] > 0  # learnt here: the result is kept
    assert not any("corrections alone" in line for line in logged), logged
    assert refined.changed_slices == [6]
    assert refined.training_slices == [4, 6, 8]
    np.testing.assert_array_equal(refined.labels[[4, 6, 8]], edited[[4, 6, 8]])

    ranked = session.uncertain_slices()
    assert {r.index for r in ranked}.isdisjoint({4, 6, 8})
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    # Slicing along k: slice n's centre is at voxel k = n, mid-plane in i and j.
    assert ranked[0].centre_ijk == pytest.approx((17.5, 19.5, ranked[0].index))
    first, second = session.next_uncertain_slice(), session.next_uncertain_slice()
    assert first.index != second.index


def test_refine_before_any_result_is_refused(backbone):
    from tedm_core.pipelines.interactive import InteractiveSession, SessionError

    volume, sphere = _sphere_volume()
    with pytest.raises(SessionError, match="Segment"):
        InteractiveSession(volume).refine(sphere)


def test_labels_of_another_grid_are_refused(backbone):
    from tedm_core.pipelines.interactive import InteractiveSession, SessionError

    volume, sphere = _sphere_volume()
    with pytest.raises(SessionError, match="label volume"):
        InteractiveSession(volume).fit(backbone, sphere[:, :-1], ["background", "sphere"], axis="k", device="cpu")


def test_cancel_stops_inside_the_unet(tiny_bundle_dir):
    """Cancel is checked before every UNet block, not only between batches of slices."""
    from tedm_core.bundle import load_bundle
    from tedm_core.errors import Cancelled
    from tedm_core.pipelines.interactive import InteractiveSession, Reporter

    volume, _ = _sphere_volume()
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 3  # after three blocks of the first batch's forward pass

    with pytest.raises(Cancelled):
        InteractiveSession(volume).segment(
            load_bundle(tiny_bundle_dir), axis="k", device="cpu", reporter=Reporter(cancelled=cancelled)
        )
    assert len(asked) == 4


def test_tedm_refine_learns_from_the_corrected_slices_of_a_label_file(tiny_bundle_dir, tmp_path, capsys):
    import nibabel as nib

    from tedm_core.bundle import load_bundle
    from tedm_core.cli import main
    from tedm_core.io.volumes import read_volume
    from tedm_core.pipelines.interactive import InteractiveSession

    volume, sphere = _sphere_volume()
    affine = affine_zoo()["oblique"]
    image_path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(volume.array[0]), affine), image_path)
    image = read_volume(image_path)
    first = InteractiveSession(image).segment(load_bundle(tiny_bundle_dir), axis="k", device="cpu")
    corrected = first.labels.copy()
    corrected[5] = sphere[5]
    corrected[5, 0, 0] = 1 - corrected[5, 0, 0]
    corrected_path = tmp_path / "corrected.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(corrected), affine), corrected_path)

    argv = ["refine", "--model", str(tiny_bundle_dir), "--image", str(image_path), "--corrected", str(corrected_path)]
    out = tmp_path / "refined"
    assert (
        main([*argv, "--out", str(out), "--output", str(tmp_path / "seg.nii.gz"), "--axis", "k", "--steps", "5"]) == 0
    )
    assert "refined on slice(s) 5 " in capsys.readouterr().out
    assert (out / "bundle.json").is_file() and load_bundle(out).training["refine_steps"] == 5
    written = np.transpose(np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj))
    np.testing.assert_array_equal(written[5], corrected[5])  # the corrected slice is kept as drawn
    # Never overwrites: the same output again is refused in one line, exit 2.
    assert main([*argv, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_model_from_elsewhere_is_refined_on_the_corrections_alone(tiny_bundle_dir):
    """A loaded model's result on this volume was never confirmed: Refine does not hold it to it,
    and says so in the log (it can make other slices worse); its first Refine, on two slices, is
    held near the loaded weights instead."""
    from tedm_core.bundle import load_bundle
    from tedm_core.pipelines import fit
    from tedm_core.pipelines.interactive import InteractiveSession, Reporter

    volume, sphere = _sphere_volume()
    session = InteractiveSession(volume)
    result = session.segment(load_bundle(tiny_bundle_dir), axis="k", device="cpu")
    edited = result.labels.copy()
    edited[[5, 7]] = sphere[[5, 7]]
    edited[5, 0, 0] = 1 - edited[5, 0, 0]
    edited[7, 0, 0] = 1 - edited[7, 0, 0]
    logged = []
    refined = session.refine(edited, steps=5, reporter=Reporter(log=logged.append))
    assert "refine_anchor_slices" not in session.bundle.training
    assert session.training_slices == [5, 7]
    assert any("learns from your corrections alone" in line for line in logged), logged
    # Two corrected slices alone: the head is held near the loaded weights (L2-SP, session 18).
    assert session.bundle.training["refine_pull_to_start"] == fit.REFINE_PULL_TO_START > 0
    edited = refined.labels.copy()  # a second round still learns from the corrections alone,
    edited[6, 0, 0] = 1 - edited[6, 0, 0]  # and with three slices freely
    session.refine(edited, steps=5)
    assert "refine_anchor_slices" not in session.bundle.training and session.training_slices == [5, 6, 7]
    assert session.bundle.training["refine_pull_to_start"] == 0.0


def test_a_cancelled_or_failed_operation_leaves_the_session_as_it_was(tiny_bundle_dir, backbone):
    """A Fit along another axis, cancelled after it re-cut the volume, must not leave the last
    result beside the new slicing (Refine would compare slices cut along two axes); a Segment
    cancelled after it dropped the feature cache must leave a session that still refines."""
    from tedm_core.bundle import load_bundle
    from tedm_core.errors import Cancelled
    from tedm_core.pipelines.interactive import InteractiveSession, Reporter

    volume, sphere = _sphere_volume()
    bundle = load_bundle(tiny_bundle_dir)
    session = InteractiveSession(volume)
    first = session.segment(bundle, axis="k", device="cpu")
    edited = first.labels.copy()
    edited[6] = 1 - edited[6]
    always = Reporter(cancelled=lambda: True)

    with pytest.raises(Cancelled):
        session.fit(backbone, sphere, ["background", "sphere"], axis="coronal", device="cpu", steps=5, reporter=always)
    assert session.axis == first.axis and session.bundle is bundle
    assert session.changed_slices(edited) == [6]
    assert session.feature_cache_nbytes > 0  # the Fit did not get as far as dropping the cache

    asked = []
    inside_the_unet = Reporter(cancelled=lambda: asked.append(1) or len(asked) > 3)
    with pytest.raises(Cancelled):
        session.segment(load_bundle(tiny_bundle_dir), axis="k", device="cpu", reporter=inside_the_unet)
    assert session.bundle is bundle and session.feature_cache_nbytes == 0
    assert session.changed_slices(edited) == [6]
    refined = session.refine(edited, steps=3)  # the UNet runs again for the slices Refine needs
    assert refined.changed_slices == [6] and refined.training_slices == [6]
    np.testing.assert_array_equal(refined.labels[6], edited[6])
    assert refined.labels.shape == volume.shape


def test_an_operation_that_failed_after_closing_the_segmenter_leaves_one_that_predicts(tiny_bundle_dir, monkeypatch):
    """A new model or device closes the session's segmenter (its GPU copy of the model) before
    the operation runs; when that operation then fails or is cancelled, the session is put back,
    and its next Segment with the first model and device must work, not meet a closed segmenter."""
    import torch

    from tedm_core.bundle import load_bundle
    from tedm_core.errors import Cancelled, SettingError
    from tedm_core.pipelines.interactive import InteractiveSession, Reporter

    volume, _ = _sphere_volume()
    bundle = load_bundle(tiny_bundle_dir)
    session = InteractiveSession(volume)
    first = session.segment(bundle, axis="k", device="cpu")
    with pytest.raises(Cancelled):  # another model, cancelled
        session.segment(load_bundle(tiny_bundle_dir), axis="k", device="cpu", reporter=Reporter(cancelled=lambda: True))
    np.testing.assert_array_equal(session.segment(bundle, axis="k", device="cpu").labels, first.labels)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingError):  # another device, which is not there
        session.segment(bundle, axis="k", device="cuda")
    np.testing.assert_array_equal(session.segment(bundle, axis="k", device="cpu").labels, first.labels)


def test_labels_drawn_across_the_slicing_plane_are_refused_or_flagged(tiny_bundle_dir, backbone):
    """Labels painted on one I-plane (a sagittal-like view of a k session) touch 10 k-slices, each
    of which would be learnt whole: Fit refuses them in one line, Refine says so in its log."""
    from tedm_core.bundle import load_bundle
    from tedm_core.pipelines.interactive import InteractiveSession, Reporter, SessionError

    volume, sphere = _sphere_volume()
    across = np.zeros_like(sphere)
    across[:, :, 18] = sphere[:, :, 18]  # one plane of voxel axis I, through the sphere
    session = InteractiveSession(volume)
    with pytest.raises(SessionError, match=r"drawn on 1 .* slice\(s\), they touch \d+ .* slices"):
        session.fit(backbone, across, ["background", "sphere"], axis="k", device="cpu", steps=5)
    small = np.zeros_like(sphere)
    small[4:8, 19:22, 17:20] = 1  # a 3x3 structure on 4 slices of the session's plane: may be either, so warned
    logged = []
    session.fit(
        backbone, small, ["background", "sphere"], axis="k", device="cpu", steps=2, reporter=Reporter(log=logged.append)
    )
    assert any(line.startswith("Warning: the labels were drawn on 3") for line in logged), logged
    in_plane = np.zeros_like(sphere)
    in_plane[[4, 8]] = sphere[[4, 8]]  # 1-3 slices of the session's own plane: fine
    fitted = session.fit(backbone, in_plane, ["background", "sphere"], axis="k", device="cpu", steps=5)

    corrected = fitted.labels.copy()
    corrected[2:, 5:30, 18] = 1 - corrected[2:, 5:30, 18]  # a correction made in a view across the plane
    logged = []
    session.refine(corrected, steps=2, reporter=Reporter(log=logged.append))
    assert any(line.startswith("Warning: your corrections were drawn on 1") for line in logged), logged
    logged.clear()
    session_loaded = InteractiveSession(volume)
    result = session_loaded.segment(load_bundle(tiny_bundle_dir), axis="k", device="cpu")
    in_view = result.labels.copy()
    in_view[6, :3, :3] = 1 - in_view[6, :3, :3]  # corrected in the session's own plane: no warning
    session_loaded.refine(in_view, steps=2, reporter=Reporter(log=logged.append))
    assert not any("Warning" in line for line in logged), logged


def test_refine_reapplies_its_head_through_the_segmenters_unet_and_segments_as_a_fresh_one(tiny_bundle_dir):
    """Refine re-applies the new head with the previous segmenter's UNet copies (no new copy of
    the model per Refine); the result is what a segmenter made for the refined model gives."""
    from tedm_core.bundle import load_bundle
    from tedm_core.pipelines.interactive import InteractiveSession
    from tedm_core.pipelines.segment import Segmenter
    from tedm_core.pipelines.volume import segment_volume

    volume, sphere = _sphere_volume()
    session = InteractiveSession(volume)
    segmented = session.segment(load_bundle(tiny_bundle_dir), axis="k", device="cpu")
    before = session._segmenter
    edited = segmented.labels.copy()
    edited[6] = 1 - sphere[6]  # certainly a change
    session.refine(edited, steps=3)
    after = session._segmenter
    assert after is not before and after.bundle is session.bundle and after.unet is before.unet
    assert after.extractor.unet is before.extractor.unet and after.head is not before.head
    again = session.segment(session.bundle, axis="k", device="cpu")
    expected = segment_volume(Segmenter(session.bundle, device="cpu"), volume, axis="k").labels
    np.testing.assert_array_equal(again.labels, expected)
    assert session._segmenter is after  # the same model: the same segmenter

    other = load_bundle(tiny_bundle_dir)  # another backbone object: not served by this segmenter
    assert not after.serves_head_of(other) and after.serves_head_of(session.bundle)


def test_refine_trains_in_the_precision_its_segmenters_passes_measured(tiny_bundle_dir, monkeypatch):
    """Where the UNet passes measure bf16 faster, Refine's head trains in bf16 too (its features
    came from those passes, and the bf16 prediction before it built the cached interpolation
    matrices under inference mode); where fp32 wins, in fp32. The refined model records which."""
    from tedm_core import runtime
    from tedm_core.bundle import load_bundle
    from tedm_core.pipelines.interactive import InteractiveSession

    volume, sphere = _sphere_volume()
    for measured in ("bf16", "fp32"):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
        monkeypatch.setattr(runtime, "_MEASURED_PRECISION", {})
        monkeypatch.setattr(runtime, "_faster_precision", lambda _timed, answer=measured: answer)
        session = InteractiveSession(volume)
        segmented = session.segment(load_bundle(tiny_bundle_dir), axis="k", device="cpu")
        assert session._segmenter.precision == measured
        edited = segmented.labels.copy()
        edited[6] = sphere[6]
        edited[5] = 1 - segmented.labels[5]  # certainly a change
        refined = session.refine(edited, steps=5)
        assert session.bundle.training["refine_precision"] == measured
        np.testing.assert_array_equal(refined.labels[5:7], edited[5:7])  # corrected slices stay as drawn
