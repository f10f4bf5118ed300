"""The model grid: pad a slice to a square, resize it to the model's size, and undo both.

Probabilities, never labels, are resized back (nearest-neighbour labels would shift edges by up
to half a model pixel); the label decision is taken on the original grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F


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
