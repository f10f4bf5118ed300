"""Anatomy post-processing of a whole 2D image's labels, learnt from the labelled masks.

nnU-Net keeps only the largest connected region of a structure when that helps on validation.
Here the labelled masks say what the anatomy looks like: each structure keeps at most as many
connected regions as it had in any labelled mask (two lungs merged into one class: two), and
its holes are filled when no labelled mask had one. A region or hole counts when it holds at
least ``SIGNIFICANT_FRACTION`` of its structure's pixels in that mask, so annotation specks do
not: 5 of the 59 Shenzhen lung masks hold a third or fourth region of 1-2 pixels beside two
lungs of 5,000-11,000.

Applied to whole 2D images only (radiographs): a volume's slices cut one 3D structure into
any number of 2D regions. Chosen on validation (issue 10, session 16; see
``pipelines.fit.FitOptions.postprocess``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

SIGNIFICANT_FRACTION = 0.01


@dataclass(frozen=True)
class ComponentRule:
    """Per foreground class (class 1 first): the most connected regions to keep (0: no limit,
    the class was in no labelled mask) and whether to fill its holes."""

    max_regions: Tuple[int, ...]
    fill_holes: Tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.max_regions) != len(self.fill_holes) or not self.max_regions:
            raise ValueError("max_regions and fill_holes need one entry per foreground class")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.max_regions):
            raise ValueError(f"max_regions must be whole numbers >= 0, got {list(self.max_regions)}")
        if any(not isinstance(f, bool) for f in self.fill_holes):
            raise ValueError(f"fill_holes must be true or false, got {list(self.fill_holes)}")

    @classmethod
    def learn(cls, labels: Union[np.ndarray, Sequence[np.ndarray]], num_classes: int) -> ComponentRule:
        """The rule the labelled masks ``labels`` ((N, H, W) class indices) follow."""
        # A sequence of (H, W) masks of different sizes is taken slice by slice.
        if isinstance(labels, (list, tuple)):
            labels = [np.asarray(label) for label in labels]
        else:
            labels = np.asarray(labels)
            if labels.ndim == 2:
                labels = labels[None]
        max_regions, fill = [], []
        for c in range(1, num_classes):
            counts, holes = [], False
            for mask in (label == c for label in labels):
                area = int(mask.sum())
                if not area:
                    continue
                counts.append(len(_significant(*_regions(mask), area)))
                filled = ndimage.binary_fill_holes(mask) & ~mask
                holes = holes or bool(_significant(*_regions(filled), area))
            max_regions.append(max(counts) if counts else 0)
            fill.append(bool(counts) and not holes)
        return cls(tuple(max_regions), tuple(fill))

    def merged(self, other: ComponentRule) -> ComponentRule:
        """A rule both sets of masks follow (the most regions of either; holes filled only if neither had any)."""
        if len(other.max_regions) != len(self.max_regions):
            raise ValueError("rules for different numbers of classes cannot be merged")
        regions = tuple(0 if 0 in (a, b) else max(a, b) for a, b in zip(self.max_regions, other.max_regions))
        return ComponentRule(regions, tuple(a and b for a, b in zip(self.fill_holes, other.fill_holes)))

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` ((H, W) or (N, H, W): independent 2D images) with each class's extra regions
        set to background and, where the rule says so, its holes filled; a new array."""
        labels = np.asarray(labels)
        out = labels.copy()
        for image in out if out.ndim == 3 else out[None]:
            for c, (keep, fill) in enumerate(zip(self.max_regions, self.fill_holes), start=1):
                mask = image == c
                if not mask.any():
                    continue
                regions, count = _regions(mask)
                if keep and count > keep:
                    sizes = ndimage.sum(mask, regions, index=np.arange(1, count + 1))
                    # Largest first; equal sizes keep the region met first in raster order.
                    kept = np.argsort(-sizes, kind="stable")[:keep] + 1
                    mask = np.isin(regions, kept)
                    image[(image == c) & ~mask] = 0
                if fill:
                    # Only background is filled: a hole may hold another structure (a lesion in
                    # an organ), which filling over once erased.
                    image[ndimage.binary_fill_holes(mask) & (image == 0)] = c
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"max_regions": list(self.max_regions), "fill_holes": list(self.fill_holes)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> ComponentRule:
        if not isinstance(data, dict) or set(data) != {"max_regions", "fill_holes"}:
            raise ValueError(f"expected an object with max_regions and fill_holes, got {data!r}")
        if not isinstance(data["max_regions"], list) or not isinstance(data["fill_holes"], list):
            raise ValueError("max_regions and fill_holes must be lists")
        return cls(tuple(data["max_regions"]), tuple(data["fill_holes"]))

    def describe(self, class_names) -> str:
        """One line for logs and reports, e.g. ``lungs: at most 2 regions, holes filled``."""
        parts = []
        for name, keep, fill in zip(list(class_names)[1:], self.max_regions, self.fill_holes):
            regions = f"at most {keep} region{'s' if keep != 1 else ''}" if keep else "any number of regions"
            parts.append(f"{name}: {regions}{', holes filled' if fill else ''}")
        return "; ".join(parts)


def _regions(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """Connected regions of ``mask`` (4-connected: scipy's default)."""
    return ndimage.label(mask)


def _significant(regions: np.ndarray, count: int, area: int) -> list:
    """The regions holding at least SIGNIFICANT_FRACTION of ``area`` pixels."""
    if not count:
        return []
    sizes = ndimage.sum(regions > 0, regions, index=np.arange(1, count + 1))
    return [i for i, s in enumerate(sizes) if s >= SIGNIFICANT_FRACTION * area]
