"""Boxes in a slice: the dark border bands of a radiograph, cropped before the model sees it
(and the crop undone after); and the box of a slice's voxels above background, outside which
there is nothing to segment.

Detector edges and collimation leave black bands at a radiograph's borders; issue 10's user
test met a hospital whose black band fills the bottom fifth, so the chest sits higher and
smaller than in the radiographs the head was fitted on, and the head painted lungs into the
neck and the band. Cropping the bands and stretching the content back to the frame (the
project's radiographs are themselves stretched to a square) shows the model the chest as it
was framed in training; the probabilities are resized back into the content box, background
outside it. Chosen on validation (docs/results/INFERENCE_LEVERS.md).

Per slice, so only for bundles of 2D images (``ModelBundle.crop_dark_borders``): a volume's
slices must keep one common geometry.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import tensor_of
from .intensity import IntensityConfig, above_background, normalise_intensity

# A border row or column is dark when nine tenths of it (its DARK_SHARE percentile: burnt-in
# letters and markers do not count) sit at the dark end of the normalised [-1, 1] range.
DARK_LEVEL = -0.9
DARK_SHARE = 90
# Bands thinner than this share of the side are left alone (resampling a whole image for a
# line or two of dark pixels would change it more than the band does).
MIN_BAND = 0.02
# Content smaller than this share of a side is not trusted as the image (an almost black image).
MIN_CONTENT = 0.5

Box = Tuple[int, int, int, int]  # top, bottom, left, right: rows top:bottom, columns left:right


def _inner_run(dark: np.ndarray) -> Tuple[int, int]:
    """The range between the dark runs at both ends of ``dark`` (bands below MIN_BAND ignored)."""
    n = len(dark)
    if dark.all():
        return 0, n
    start = int(np.argmin(dark))
    stop = n - int(np.argmin(dark[::-1]))
    start = start if start >= MIN_BAND * n else 0
    stop = stop if n - stop >= MIN_BAND * n else n
    return (start, stop) if stop - start >= MIN_CONTENT * n else (0, n)


def content_box(image: np.ndarray) -> Box:
    """The box of ``image`` ((C, H, W), normalised to [-1, 1]) inside its dark border bands."""
    grey = np.asarray(image, dtype=np.float32).max(axis=0)
    top, bottom = _inner_run(np.percentile(grey, DARK_SHARE, axis=1) < DARK_LEVEL)
    left, right = _inner_run(np.percentile(grey, DARK_SHARE, axis=0) < DARK_LEVEL)
    return top, bottom, left, right


def full_box(shape: Sequence[int]) -> Box:
    return 0, int(shape[-2]), 0, int(shape[-1])


EMPTY_BOX: Box = (0, 0, 0, 0)


def is_empty_box(box: Box) -> bool:
    top, bottom, left, right = box
    return bottom <= top or right <= left


def foreground_box(image: np.ndarray) -> Box:
    """The smallest box of ``image`` ((C, H, W), normalised) holding every voxel above background
    (``intensity.above_background``, any channel); :data:`EMPTY_BOX` when none is.

    Outside it a slice holds background alone, as a slice skipped whole does
    (``pipelines.volume.nonempty_slice_mask``): the head is applied inside it only, and the
    outside is certain background. About a quarter of a skull-stripped BraTS slice's area on
    average (0.22-0.26 over six FLAIR volumes' non-empty axial slices)."""
    signal = above_background(image).any(axis=0)
    rows, columns = np.flatnonzero(signal.any(axis=1)), np.flatnonzero(signal.any(axis=0))
    if not len(rows):
        return EMPTY_BOX
    return int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1


def union_box(boxes: Sequence[Box]) -> Box:
    """The smallest box holding every non-empty one of ``boxes`` (:data:`EMPTY_BOX` if none is)."""
    boxes = [box for box in boxes if not is_empty_box(box)]
    if not boxes:
        return EMPTY_BOX
    tops, bottoms, lefts, rights = zip(*boxes)
    return min(tops), max(bottoms), min(lefts), max(rights)


# A head's windows (the model-grid boxes it computes in) come in at most this many lengths per side:
# oneDNN compiles and caches kernels for every shape it meets, ~1 MiB each. Re-applying a head to a
# BraTS volume's cache (64 px grid, one thread, session 25; docs/results/PERFORMANCE.md) with
# windows in steps of 1 / 4 / 8 / 16 px took 1.27 / 1.33 / 1.35 / 1.52 s (whole slices 2.04-2.26 s);
# segmenting the volume twice left the process 143 / 98 / 62 / 44 MiB larger (whole slices 5), its
# peak 244 / 198 / 162 / 144 MiB above the start (whole slices 106): kernel caches, gone with
# oneDNN's and ideep's cache capacities set to 8.
WINDOW_LENGTHS_PER_SIDE = 8


def grown_to_few_lengths(box: Box, size: int) -> Box:
    """``box`` of a ``size`` x ``size`` grid grown to a multiple of ``size / WINDOW_LENGTHS_PER_SIDE``
    rows and columns, within the grid: it holds the box, in one of few shapes."""
    if is_empty_box(box):
        return box
    top, bottom, left, right = box
    step = -(-size // WINDOW_LENGTHS_PER_SIDE)

    def grown(start: int, stop: int) -> Tuple[int, int]:
        length = min(size, -(-(stop - start) // step) * step)
        stop = min(size, start + length)
        return stop - length, stop

    return grown(top, bottom) + grown(left, right)


def fill_outside(maps: torch.Tensor, boxes: Sequence[Box], outside: Sequence[float]) -> torch.Tensor:
    """``maps`` (N, K, H, W) with channel k set to ``outside[k]`` around each map's box, in place."""
    fill = torch.as_tensor(list(outside), dtype=maps.dtype, device=maps.device)[:, None, None]
    for image, (top, bottom, left, right) in zip(maps, boxes):
        bottom, right = max(top, bottom), max(left, right)  # an empty box: all of it outside
        for band in (image[:, :top], image[:, bottom:], image[:, top:bottom, :left], image[:, top:bottom, right:]):
            band.copy_(fill.expand_as(band))
    return maps


def crop_to_content(
    slices: np.ndarray, intensity: IntensityConfig, labels: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, Optional[np.ndarray], List[Box]]:
    """``slices`` (N, C, H, W) with each slice's dark bands cropped and its content stretched back
    to (H, W) and renormalised with ``intensity`` (the bands no longer pull its percentiles);
    ``labels`` (N, H, W), when given, cropped and stretched alike (nearest). Also each slice's box."""
    slices = np.asarray(slices, dtype=np.float32)
    out = slices.copy()
    out_labels = None if labels is None else np.array(labels, copy=True)
    boxes = [content_box(image) for image in slices]
    h, w = slices.shape[-2:]
    for i, box in enumerate(boxes):
        if box == full_box(slices.shape):
            continue
        top, bottom, left, right = box
        crop = tensor_of(slices[i : i + 1, :, top:bottom, left:right])
        stretched = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        out[i] = normalise_intensity(stretched.numpy(), intensity)
        if out_labels is not None:
            label = tensor_of(labels[i, top:bottom, left:right])[None, None].float()
            out_labels[i] = F.interpolate(label, size=(h, w), mode="nearest-exact")[0, 0].numpy().astype(labels.dtype)
    return out, out_labels, boxes


def uncrop(maps: torch.Tensor, boxes: Sequence[Box], outside: Sequence[float]) -> torch.Tensor:
    """``maps`` (N, K, H, W) predicted on cropped slices -> the same on the original slices: each
    resized (bilinear) into its box, channel k set to ``outside[k]`` around it (for probabilities,
    certain background)."""
    out = maps.clone()
    h, w = maps.shape[-2:]
    for i, (top, bottom, left, right) in enumerate(boxes):
        if (top, bottom, left, right) != (0, h, 0, w):
            out[i, :, top:bottom, left:right] = F.interpolate(
                maps[i : i + 1], size=(bottom - top, right - left), mode="bilinear", align_corners=False
            )[0]
    return fill_outside(out, boxes, outside)
