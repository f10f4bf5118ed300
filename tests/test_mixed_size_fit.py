"""fit on labelled images of different sizes: each slice is framed on the model grid on its own,
as segment frames each image, and same-size inputs are prepared exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import synthetic_disc_images
from PIL import Image

from tedm_core.pipelines.fit import _prepare
from tedm_core.pipelines.labelled import load_labelled_data
from tedm_core.preprocessing.framing import crop_to_content
from tedm_core.preprocessing.intensity import RADIOGRAPH
from tedm_core.preprocessing.spatial import labels_to_model_grid, to_model_grid


def _write_pairs(root: Path, sizes) -> Path:
    """One disc image/mask PNG pair per size (img_00 ...), with dark bands for the cropping to find."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (h, w) in enumerate(sizes):
        images, masks = synthetic_disc_images(1, size=max(h, w), seed=10 + i)
        image = ((images[0, 0, :h, :w] + 1) * 127.5).astype(np.uint8)
        image[:3] = 0  # a dark band at the top, which crop_dark_borders removes
        mask = (masks[0, :h, :w] > 0).astype(np.uint8) * 255
        mask[:3] = 0
        Image.fromarray(image).save(root / "images" / f"img_{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"img_{i:02d}.png")
    return root


def _old_prepare(slices, labels, image_size, crop_with):
    """The preparation before the fix: slices padded at the bottom-right to the largest size
    (a no-op for same-size slices), then cropped and framed as one stack."""
    h = max(s.shape[2] for s in slices)
    w = max(s.shape[3] for s in slices)
    stack = np.concatenate(
        [np.pad(s, ((0, 0), (0, 0), (0, h - s.shape[2]), (0, w - s.shape[3])), constant_values=-1.0) for s in slices]
    ).astype(np.float32)
    masks = np.concatenate([np.pad(m, ((0, 0), (0, h - m.shape[1]), (0, w - m.shape[2]))) for m in labels])
    if crop_with is not None:
        stack, masks, _ = crop_to_content(stack, crop_with, masks)
    grid, transform = to_model_grid(torch.from_numpy(stack), image_size)
    return grid, labels_to_model_grid(torch.from_numpy(masks.astype(np.int64)), transform)


def _as_segment_frames_it(slice_, crop_with, image_size):
    """One slice (C, H, W) on the model grid as Segmenter._predict_chunk frames an image on its own."""
    chunk = slice_[None]
    if crop_with is not None:
        chunk, _, _ = crop_to_content(chunk, crop_with)
    return to_model_grid(torch.from_numpy(np.ascontiguousarray(chunk)), image_size)[0][0]


def test_same_size_images_are_prepared_bit_identically_to_before(tmp_path):
    root = _write_pairs(tmp_path, [(40, 40)] * 3)
    slices, labels, _ = load_labelled_data(root / "images", root / "masks", RADIOGRAPH, [0, 255])
    assert isinstance(slices, np.ndarray) and slices.shape == (3, 1, 40, 40)
    for crop_with in (RADIOGRAPH, None):
        grid, targets = _prepare(slices, labels, 32, 2, crop_with)
        old_grid, old_targets = _old_prepare([s[None] for s in slices], [m[None] for m in labels], 32, crop_with)
        assert torch.equal(grid, old_grid) and torch.equal(targets, old_targets)


def test_a_smaller_image_is_framed_exactly_as_segment_frames_it(tmp_path):
    root = _write_pairs(tmp_path, [(48, 48), (24, 32), (48, 48)])
    slices, labels, _ = load_labelled_data(root / "images", root / "masks", RADIOGRAPH, [0, 255])
    assert [s.shape for s in slices] == [(1, 48, 48), (1, 24, 32), (1, 48, 48)]
    grid, targets = _prepare(slices, labels, 32, 2, RADIOGRAPH)
    assert grid.shape == (3, 1, 32, 32) and targets.shape == (3, 32, 32)
    for i, slice_ in enumerate(slices):
        assert torch.equal(grid[i], _as_segment_frames_it(slice_, RADIOGRAPH, 32))
        cropped, cropped_labels, _ = crop_to_content(slice_[None], RADIOGRAPH, labels[i][None])
        _, transform = to_model_grid(torch.from_numpy(cropped), 32)
        assert torch.equal(targets[i], labels_to_model_grid(torch.from_numpy(cropped_labels), transform)[0])
    # Before the fix the 24x32 image was padded to 48x48 at the bottom-right: another scale and place.
    old_grid, _ = _old_prepare([s[None] for s in slices], [m[None] for m in labels], 32, RADIOGRAPH)
    assert not torch.equal(old_grid[1], grid[1])
