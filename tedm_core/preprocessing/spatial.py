"""The model grid: pad a slice to a square, resize it to the model's size, and undo both.

Probabilities, never labels, are resized back (nearest-neighbour labels would shift edges by up
to half a model pixel); the label decision is taken on the original grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from .framing import EMPTY_BOX, Box, is_empty_box


@dataclass(frozen=True)
class GridTransform:
    """What :func:`to_model_grid` did to an ``(H, W)`` slice, so that it can be undone exactly."""

    height: int
    width: int
    size: int
    pad_top: int
    pad_left: int

    @property
    def side(self) -> int:
        return max(self.height, self.width)


def to_model_grid(slices: torch.Tensor, size: int, pad_value: float = -1.0) -> Tuple[torch.Tensor, GridTransform]:
    """``(N, C, H, W)`` -> ``(N, C, size, size)``: centred zero-distortion padding, then bilinear resize.

    ``pad_value`` is the normalised background (-1), so the padding looks like air to the DDPM.
    """
    n, c, h, w = slices.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = F.pad(slices, (left, side - w - left, top, side - h - top), value=pad_value)
    if side != size:
        padded = F.interpolate(padded, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    return padded, GridTransform(h, w, size, top, left)


def from_model_grid(maps: torch.Tensor, transform: GridTransform) -> torch.Tensor:
    """``(N, K, size, size)`` maps (probabilities, uncertainty) -> ``(N, K, H, W)`` on the original grid."""
    side = transform.side
    if maps.shape[-1] != side:
        maps = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
    return maps[
        ...,
        transform.pad_top : transform.pad_top + transform.height,
        transform.pad_left : transform.pad_left + transform.width,
    ]


def _source_range(start: int, stop: int, source: int, target: int) -> Tuple[int, int]:
    """The source samples ``[first, last)`` that bilinear resizing (align_corners False) of
    ``source`` samples to ``target`` reads for target samples ``[start, stop)``, a sample to spare
    either side (PyTorch computes the positions in float)."""
    if source == target:
        return start, stop
    scale = source / target
    position = lambda i: max(0.0, scale * (i + 0.5) - 0.5)  # noqa: E731
    return max(0, math.floor(position(start)) - 1), min(source, math.floor(position(stop - 1)) + 3)


def model_grid_window(box: Box, transform: GridTransform) -> Box:
    """The box (top, bottom, left, right) of the model grid that :func:`from_model_grid` reads to
    give ``box`` of the slice: values there decide the slice's values in ``box``, exactly; an
    empty ``box`` gives an empty window."""
    if is_empty_box(box):
        return EMPTY_BOX
    top, bottom, left, right = box
    rows = _source_range(top + transform.pad_top, bottom + transform.pad_top, transform.size, transform.side)
    columns = _source_range(left + transform.pad_left, right + transform.pad_left, transform.size, transform.side)
    return rows + columns


def labels_to_model_grid(labels: torch.Tensor, transform: GridTransform) -> torch.Tensor:
    """``(N, H, W)`` integer labels -> ``(N, size, size)`` training targets (nearest; padding is background)."""
    side = transform.side
    h, w = labels.shape[-2:]
    padded = F.pad(
        labels,
        (transform.pad_left, side - w - transform.pad_left, transform.pad_top, side - h - transform.pad_top),
        value=0,
    )
    if side != transform.size:
        padded = F.interpolate(padded[:, None].float(), size=(transform.size, transform.size), mode="nearest-exact")[
            :, 0
        ]
    return padded.long()
