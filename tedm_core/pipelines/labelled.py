"""Labelled training data for ``fit``: image/mask pairs matched by file name, or volume pairs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..data import is_volume_file
from ..errors import InputError
from ..io.images import is_image_file, read_grey, read_label_image
from ..preprocessing.intensity import IntensityConfig, normalise_intensity


def _strip_suffixes(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def match_pairs(images: Path, masks: Path) -> List[Tuple[Path, Path]]:
    """(image, mask) pairs whose names match (suffixes ignored), sorted by image name."""
    for folder in (images, masks):
        if not folder.is_dir():
            raise InputError(folder, "folder not found" if not folder.exists() else "is not a folder")
    def usable(p: Path) -> bool:
        return p.is_file() and (is_image_file(p) or is_volume_file(p))
    mask_by_stem = {_strip_suffixes(p): p for p in sorted(masks.iterdir()) if usable(p)}
    pairs = [(p, mask_by_stem[_strip_suffixes(p)]) for p in sorted(images.iterdir()) if usable(p) and _strip_suffixes(p) in mask_by_stem]
    if not pairs:
        raise InputError(images, f"no image has a mask of the same name in {masks}")
    return pairs


def load_labelled_images(
    images: Path,
    masks: Path,
    intensity: IntensityConfig,
    label_values: Sequence[int],
    n: Optional[int] = None,
    slices: Optional[Sequence[int]] = None,
    axis: str = "axial",
) -> Tuple[np.ndarray, np.ndarray, List[Path]]:
    """Normalised slices (N, C, H, W), class-index labels (N, H, W) and the image files used.

    2D images give one slice each and must share a size. Volumes give their labelled slices
    (or ``slices``). ``n`` keeps the first n pairs in sorted name order (the paper's few-shot
    subsets).
    """
    pairs = match_pairs(Path(images), Path(masks))
    if n is not None:
        if n < 1:
            raise InputError(images, f"--n must be at least 1, got {n}")
        if n > len(pairs):
            raise InputError(images, f"--n {n} asks for more labelled items than the {len(pairs)} found")
        pairs = pairs[:n]
    all_slices, all_labels = [], []
    for image_path, mask_path in pairs:
        if is_volume_file(image_path):
            from .volume import labelled_slices_from_volumes  # the volume layer, only when volumes are given

            s, l = labelled_slices_from_volumes(image_path, mask_path, intensity, label_values, axis=axis, slices=slices)
        else:
            image = read_grey(image_path)
            s = normalise_intensity(image, intensity)[None]
            l = read_label_image(mask_path, label_values)[None]
            if l.shape[1:] != s.shape[2:]:
                raise InputError(mask_path, f"mask size {l.shape[1:]} differs from its image's {s.shape[2:]}")
        all_slices.append(s)
        all_labels.append(l)
    slices_out, labels_out = _pad_to_common_size(all_slices, all_labels)
    return slices_out, labels_out, [image for image, _ in pairs]


def _pad_to_common_size(slices: List[np.ndarray], labels: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Stack slices of different sizes by padding with background (-1 intensity, class 0)."""
    h = max(s.shape[2] for s in slices)
    w = max(s.shape[3] for s in slices)
    padded_slices = [np.pad(s, ((0, 0), (0, 0), (0, h - s.shape[2]), (0, w - s.shape[3])), constant_values=-1.0) for s in slices]
    padded_labels = [np.pad(l, ((0, 0), (0, h - l.shape[1]), (0, w - l.shape[2]))) for l in labels]
    return np.concatenate(padded_slices).astype(np.float32), np.concatenate(padded_labels).astype(np.int64)
