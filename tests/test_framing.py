"""Boxes in a slice (tedm_core.preprocessing.framing): dark border bands cropped before the model
sees a radiograph, and the result pasted back exactly where it came from
(ModelBundle.crop_dark_borders); the foreground box, outside which a slice holds background alone."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import synthetic_disc_images

from tedm_core.bundle import load_bundle, save_bundle
from tedm_core.model.checkpoint import load_backbone
from tedm_core.pipelines.fit import _prepare, fit_bundle
from tedm_core.pipelines.segment import Segmenter
from tedm_core.preprocessing.framing import (
    EMPTY_BOX,
    WINDOW_LENGTHS_PER_SIDE,
    content_box,
    crop_to_content,
    fill_outside,
    foreground_box,
    full_box,
    grown_to_few_lengths,
    is_empty_box,
    uncrop,
    union_box,
)
from tedm_core.preprocessing.intensity import MULTIMODAL_MRI, RADIOGRAPH


def banded(images: np.ndarray, masks: np.ndarray, band_rows: int, side_columns: int = 0):
    """The images shrunk into the top of the frame above a black band of ``band_rows`` (and
    black columns at the sides), as issue 10's user test framed them; the masks alike."""
    n, c, h, w = images.shape
    inner_h, inner_w = h - band_rows, w - 2 * side_columns
    x = torch.nn.functional.interpolate(torch.from_numpy(images), size=(inner_h, inner_w), mode="bilinear")
    y = torch.nn.functional.interpolate(torch.from_numpy(masks[:, None]).float(), size=(inner_h, inner_w))
    out_x = np.full_like(images, -1.0)
    out_y = np.zeros_like(masks)
    out_x[:, :, :inner_h, side_columns : side_columns + inner_w] = x.numpy()
    out_y[:, :inner_h, side_columns : side_columns + inner_w] = y[:, 0].numpy().astype(masks.dtype)
    return out_x, out_y


def test_content_box_finds_the_dark_bands_and_ignores_thin_ones_and_burnt_in_letters():
    images, masks = synthetic_disc_images(1, size=100, seed=3)
    assert content_box(images[0]) == (0, 100, 0, 100)  # no band: the whole image
    framed, _ = banded(images, masks, band_rows=20, side_columns=10)
    framed[0, 0, 86:94, 40:46] = 1.0  # a marker letter in the band
    assert content_box(framed[0]) == (0, 80, 10, 90)
    thin = images.copy()
    thin[0, 0, -1:] = -1.0  # one dark row: below MIN_BAND, left alone
    assert content_box(thin[0]) == (0, 100, 0, 100)
    black = np.full((1, 100, 100), -1.0, np.float32)
    black[0, 40:60, 40:60] = 0.5  # content under half of each side: not trusted as the image
    assert content_box(black) == (0, 100, 0, 100)


def test_crop_then_uncrop_lands_every_label_on_its_own_pixels():
    images, masks = synthetic_disc_images(3, size=64, seed=5)
    framed, framed_masks = banded(images, masks, band_rows=16, side_columns=6)
    cropped, cropped_masks, boxes = crop_to_content(framed, RADIOGRAPH, framed_masks)
    assert boxes == [(0, 48, 6, 58)] * 3
    assert cropped.shape == framed.shape and cropped.min() >= -1 and cropped.max() <= 1
    # The content fills the frame again: the labels stretched alike, nearest-neighbour.
    assert cropped_masks.shape == framed_masks.shape and set(np.unique(cropped_masks)) <= {0, 1}
    one_hot = torch.from_numpy(np.stack([1 - cropped_masks, cropped_masks], axis=1).astype(np.float32))
    back = uncrop(one_hot, boxes, [1.0, 0.0]).argmax(dim=1).numpy()
    outside = np.ones_like(back, bool)
    outside[:, :48, 6:58] = False
    assert not back[outside].any()  # certain background in the band
    # Inside the box, back where they were, up to the two nearest-neighbour resamplings' edge pixels.
    agree = (back == framed_masks).mean()
    assert agree > 0.99, agree


def test_segmenter_crops_each_slice_and_pastes_its_result_back(tiny_bundle_dir):
    """Segmenting a banded radiograph with cropping is segmenting its cropped content and pasting
    the probabilities back into the box: the same through predict, predict_into and the feature
    cache, with the test-time flip (each mirrored slice has its own, mirrored, box)."""
    bundle = load_bundle(tiny_bundle_dir)
    images, masks = synthetic_disc_images(3, size=40, seed=9)
    framed, _ = banded(images, masks, band_rows=10, side_columns=3)
    framed[1] = images[1]  # one slice without a band: untouched
    cropping = Segmenter(bundle, device="cpu", crop_dark_borders=True)
    result = cropping.predict(framed, keep_features=True)
    cropped, _, boxes = crop_to_content(framed, bundle.intensity)
    assert boxes[1] == full_box(framed.shape) and boxes[0] == (0, 30, 3, 37)
    plain = Segmenter(bundle, device="cpu", crop_dark_borders=False).predict(cropped)
    background = [1.0, 0.0]
    expected = uncrop(torch.from_numpy(plain.probabilities), boxes, background).numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(
        result.uncertainty, uncrop(torch.from_numpy(plain.uncertainty[:, None]), boxes, [0.0])[:, 0].numpy(), atol=1e-6
    )
    assert not result.labels[[0, 2]][:, 30:].any() and not result.labels[[0, 2]][..., :3].any()  # the bands
    labels, spread = np.zeros((3, 40, 40), np.uint8), np.zeros((3, 40, 40), np.float32)
    cropping.predict_into(framed, np.arange(3), labels, spread)
    assert np.array_equal(labels, result.labels)
    assert result.features.boxes == boxes and len(result.features.flipped_boxes) == 3
    again = cropping.predict_from_features(result.features)
    np.testing.assert_allclose(again.probabilities, result.probabilities, atol=2e-3)
    one = cropping.predict_from_features(result.features.select([2]))
    np.testing.assert_allclose(one.probabilities, result.probabilities[2:], atol=2e-3)


def test_cropping_is_the_default_for_radiograph_models_recorded_and_off_for_old_bundles(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    assert bundle.intensity.kind == RADIOGRAPH.kind and bundle.crop_dark_borders
    assert Segmenter(bundle, device="cpu").crop_dark_borders
    images, masks = synthetic_disc_images(2, size=32, seed=4)
    off = fit_bundle(bundle.backbone, images, masks, steps=2, device="cpu", crop_dark_borders=False)
    assert not load_bundle(save_bundle(off, tmp_path / "off")).crop_dark_borders
    mri = fit_bundle(
        replace(bundle.backbone, intensity=MULTIMODAL_MRI),
        images,
        masks,
        steps=2,
        device="cpu",
    )
    assert not mri.crop_dark_borders  # volumes' slices keep one geometry
    old = shutil.copytree(tiny_bundle_dir, tmp_path / "old")
    meta = json.loads((old / "bundle.json").read_text())
    del meta["crop_dark_borders"]
    (old / "bundle.json").write_text(json.dumps(meta))
    assert not load_bundle(old).crop_dark_borders


def test_fitting_and_refining_see_the_labelled_slices_cropped_as_the_segmenter_does():
    images, masks = synthetic_disc_images(2, size=48, seed=6)
    framed, framed_masks = banded(images, masks, band_rows=12)
    grid, targets = _prepare(framed, framed_masks, 32, 2, RADIOGRAPH)
    cropped, cropped_masks, _ = crop_to_content(framed, RADIOGRAPH, framed_masks)
    same_grid, same_targets = _prepare(cropped, cropped_masks, 32, 2)
    assert torch.equal(grid, same_grid) and torch.equal(targets, same_targets)


def test_the_slices_of_a_volume_are_never_cropped_a_whole_radiograph_is(tiny_bundle_dir):
    """A volume's slices keep one geometry: with a cropping model, segmenting a 3-slice volume
    whose slices show dark bands gives what the same model gives without cropping; a one-slice
    image (a radiograph) is cropped. The interactive session (the Slicer module's) follows the
    same rule for its segmenter, its fits and its refines."""
    from tedm_core.io.volumes import Volume
    from tedm_core.pipelines.interactive import InteractiveSession
    from tedm_core.pipelines.volume import segment_volume

    bundle = load_bundle(tiny_bundle_dir)
    assert bundle.crop_dark_borders
    images, masks = synthetic_disc_images(3, size=32, seed=8)
    framed, _ = banded(images, masks, band_rows=8, side_columns=2)
    raw = (framed[:, 0] + 1) * 50  # raw intensities; the percentile normalisation maps them back

    def volume(slices: np.ndarray) -> Volume:
        return Volume(slices[None].astype(np.float32), np.eye(4))

    cropping, plain = Segmenter(bundle, device="cpu"), Segmenter(bundle, device="cpu", crop_dark_borders=False)
    stack = volume(raw)
    assert np.array_equal(segment_volume(cropping, stack, "k").labels, segment_volume(plain, stack, "k").labels)
    single = volume(raw[:1])
    cropped = segment_volume(cropping, single, "k").labels
    assert not cropped[..., 24:, :].any()  # nothing in the band
    assert not np.array_equal(cropped, segment_volume(plain, single, "k").labels)
    session = InteractiveSession(stack)
    session.segment(bundle, axis="k", device="cpu")
    assert not session._segmenter.crop_dark_borders and session.features.boxes is None
    session = InteractiveSession(single)
    session.segment(bundle, axis="k", device="cpu")
    # (the slice is shown with its rows flipped, so the band sits at the top of the slice)
    assert session._segmenter.crop_dark_borders and session.features.boxes == [(8, 32, 2, 30)]


# --- the foreground box: where a slice holds anything above background ---------------------------


def test_the_foreground_box_bounds_every_voxel_above_background_in_any_channel():
    image = np.full((2, 20, 30), -1.0, np.float32)
    assert foreground_box(image) == EMPTY_BOX and is_empty_box(EMPTY_BOX)
    image[0, 4, 7] = -0.5
    image[1, 12, 25] = 0.3  # the second channel alone
    image[0, 15, 10] = -1.0 + 1e-7  # within the tolerance: background
    assert foreground_box(image) == (4, 13, 7, 26)
    maps = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    filled = fill_outside(maps.clone(), [(1, 3, 2, 4), EMPTY_BOX], [1.0, 0.0, 0.0])
    assert torch.equal(filled[0, :, 1:3, 2:4], maps[0, :, 1:3, 2:4])
    outside = torch.ones(4, 5, dtype=torch.bool)
    outside[1:3, 2:4] = False
    assert torch.all(filled[0, 0][outside] == 1) and torch.all(filled[0, 1:][:, outside] == 0)
    assert torch.all(filled[1, 0] == 1) and torch.all(filled[1, 1:] == 0)  # an empty box: all outside


def _fitted(method: str, tiny_backbone_dir, tiny_bundle_dir):
    if method == "tedm":
        return load_bundle(tiny_bundle_dir)
    images, masks = synthetic_disc_images(3, size=32, seed=2)
    labels = ["background", "disc"]
    return fit_bundle(
        load_backbone(tiny_backbone_dir),
        images,
        masks,
        method,
        labels,
        [0, 1],
        steps=20,
        device="cpu",
        show_progress=False,
    )


@pytest.mark.parametrize("method", ["tedm", "ledm", "probe", "baseline"])
def test_the_model_is_applied_in_each_slices_foreground_box_alone(
    method, tiny_backbone_dir, tiny_bundle_dir, monkeypatch
):
    """Inside a slice's foreground box the probabilities are those of the whole slice's (the head
    computes the model-grid window that resizing back reads); outside it certain background with
    no disagreement, as in a slice of background alone; through predict, the feature cache and
    the test-time flip (each mirrored slice has its own box), for every kind of head."""
    import tedm_core.pipelines.segment as segment

    bundle = _fitted(method, tiny_backbone_dir, tiny_bundle_dir)
    images, _ = synthetic_disc_images(4, size=40, seed=31)
    images[0, :, :9] = images[0, :, :, 27:] = -1.0  # background above and to the right
    images[1, :, :, :5] = -1.0
    images[2] = -1.0  # background alone
    boxes = [foreground_box(image) for image in images]
    assert boxes[0] == (9, 40, 0, 27) and boxes[1] == (0, 40, 5, 40) and boxes[2] == EMPTY_BOX
    windows = []
    if bundle.head is not None:
        real = bundle.head.predict
        bundle.head.predict = lambda features, size, window=None: windows.append(window) or real(features, size, window)
    segmenter = Segmenter(bundle, device="cpu", test_time_flip=True, crop_dark_borders=False)
    result = segmenter.predict(images, keep_features=bundle.head is not None)
    predicted_in = list(windows)  # the windows of this prediction
    with monkeypatch.context() as patch:
        patch.setattr(segment, "foreground_box", lambda image: full_box(image.shape))
        whole = Segmenter(bundle, device="cpu", test_time_flip=True, crop_dark_borders=False).predict(images)
    for i, (top, bottom, left, right) in enumerate(boxes):
        inside = np.zeros((40, 40), bool)
        inside[top:bottom, left:right] = True
        np.testing.assert_allclose(
            result.probabilities[i][:, inside], whole.probabilities[i][:, inside], atol=1e-6, err_msg=f"slice {i}"
        )
        np.testing.assert_allclose(result.uncertainty[i][inside], whole.uncertainty[i][inside], atol=1e-6)
        assert np.all(result.probabilities[i, 0][~inside] == 1) and np.all(result.uncertainty[i][~inside] == 0)
    if bundle.head is None:
        return
    if method == "tedm":  # one slice per run of the head on the CPU, each in its own window
        assert len(predicted_in) == 2 * 3 and (0, 0, 0, 0) not in predicted_in  # nothing for slice 2
        assert any(w[1] - w[0] < bundle.image_size or w[3] - w[2] < bundle.image_size for w in predicted_in)
    cache = result.features
    assert cache.foreground == boxes and cache.flipped_foreground == [foreground_box(i[..., ::-1]) for i in images]
    again = segmenter.predict_from_features(cache)
    np.testing.assert_allclose(again.probabilities, result.probabilities, atol=2e-3)
    assert np.all(again.probabilities[2, 0] == 1)
    one = segmenter.predict_from_features(cache.select([0]))
    np.testing.assert_allclose(one.probabilities, result.probabilities[:1], atol=2e-3)


def test_the_heads_windows_grow_to_a_few_lengths_holding_the_pixels_they_must():
    """Each distinct window shape costs compiled kernels: a window grows to one of at most
    ``WINDOW_LENGTHS_PER_SIDE`` lengths per side, within the grid, and holds the window it grew from."""
    for size in (32, 64, 100):
        lengths = set()
        for top in range(size):
            for bottom in range(top + 1, size + 1):
                grown_top, grown_bottom, left, right = grown_to_few_lengths((top, bottom, 3, 4), size)
                assert 0 <= grown_top <= top < bottom <= grown_bottom <= size and left <= 3 < 4 <= right
                lengths.add(grown_bottom - grown_top)
        assert len(lengths) <= WINDOW_LENGTHS_PER_SIDE and size in lengths
    assert grown_to_few_lengths(EMPTY_BOX, 64) == EMPTY_BOX
    assert union_box([(2, 5, 3, 9), EMPTY_BOX, (4, 8, 1, 6)]) == (2, 8, 1, 9) and union_box([EMPTY_BOX]) == EMPTY_BOX


def test_slices_run_together_share_the_union_of_their_windows_with_the_same_result(tiny_bundle_dir, monkeypatch):
    """On a GPU the head takes a batch of slices at once, in the union of their windows: each
    slice's probabilities are those it gets in its own window (the CPU's way), background outside
    its own box."""
    bundle = load_bundle(tiny_bundle_dir)
    images, _ = synthetic_disc_images(3, size=40, seed=33)
    images[0, :, :12] = -1.0
    images[1, :, :, 30:] = -1.0
    images[2] = -1.0
    steps = bundle.head.config.timesteps  # TEDM's 8: a slice per run of the head on the CPU
    segmenter = Segmenter(bundle, device="cpu", timesteps=steps, test_time_flip=False, crop_dark_borders=False)
    alone = segmenter.predict(images, keep_features=True)
    assert len(steps) == 8 and segmenter._head_groups(3) == [(0, 1), (1, 2), (2, 3)]
    monkeypatch.setattr(Segmenter, "_head_groups", lambda self, n: [(0, n)])  # a GPU's grouping
    together = segmenter.predict_from_features(alone.features)
    np.testing.assert_allclose(together.probabilities, alone.probabilities, atol=2e-3)
    np.testing.assert_allclose(together.uncertainty, alone.uncertainty, atol=2e-3)
    assert np.all(together.probabilities[0, 0, :12] == 1) and np.all(together.probabilities[1, 0, :, 30:] == 1)
    assert np.all(together.probabilities[2, 0] == 1) and np.all(together.uncertainty[2] == 0)


def test_a_volume_one_voxel_wide_along_the_slices_is_segmented(tiny_bundle_dir):
    """A 1 x 1 x 48 volume cut along K: each slice is a flipped view with an axis of length 1,
    whose negative stride numpy keeps in an array it calls contiguous and torch refuses (the case
    failed with torch's "negative strides are not supported")."""
    from tedm_core.io.volumes import volume_from_array
    from tedm_core.pipelines.volume import segment_volume
    from tedm_core.runtime import tensor_of

    flipped = np.arange(6, dtype=np.float32).reshape(1, 1, 6)[::-1, ::-1]
    assert flipped.flags.c_contiguous and min(flipped.strides) < 0
    assert torch.equal(tensor_of(flipped), torch.from_numpy(flipped.copy()))
    array = np.random.default_rng(0).normal(100, 20, (48, 1, 1)).astype(np.float32)  # (K, J, I)
    volume = volume_from_array(array, np.diag([-1.0, -1.0, 1.0, 1.0]))
    result = segment_volume(Segmenter(load_bundle(tiny_bundle_dir), device="cpu"), volume)
    assert result.labels.shape == array.shape
