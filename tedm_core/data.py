"""Training data: unlabelled slices for DDPM pretraining, collected from image files and volumes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import InputError
from .io.images import is_image_file, read_grey
from .io.volumes import is_volume_file, unsupported_format
from .preprocessing.intensity import IntensityConfig, normalise_intensity
from .preprocessing.spatial import to_model_grid

log = logging.getLogger(__name__)

# Pretraining learns from slices showing anatomy: a slice is used when at least this fraction
# of it is above the normalised background (stricter than segmentation's rule, which runs the
# model on any slice holding anything: pipelines.volume.nonempty_slice_mask).
MIN_FOREGROUND_FRACTION = 0.02


def discover_files(inputs: Sequence[Union[str, Path]]) -> List[Path]:
    """Image and volume files in the given files or folders (recursively), sorted, de-duplicated.

    Files of an image format we do not read (GIF, Analyze ...) are named in a warning, not
    skipped silently.
    """
    found: List[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_file():
            found.append(item)
        elif item.is_dir():
            for p in sorted(item.rglob("*")):
                if not p.is_file():
                    continue
                if is_image_file(p) or is_volume_file(p):
                    found.append(p)
                elif unsupported_format(p) not in (None, "skip"):
                    log.warning("skipped %s: %s", p, unsupported_format(p))
        else:
            raise InputError(item, "not found")
    unique = sorted(set(found))
    if not unique:
        raise InputError(", ".join(str(i) for i in inputs), "no image or volume files found")
    return unique


def slices_with_enough_foreground(slices: np.ndarray) -> np.ndarray:
    """Indices of the ``(N, C, H, W)`` normalised slices at least ``MIN_FOREGROUND_FRACTION`` foreground."""
    foreground = (slices > -0.98).mean(axis=(1, 2, 3))
    return np.flatnonzero(foreground >= MIN_FOREGROUND_FRACTION)


def training_slices(
    paths: Sequence[Path],
    intensity: IntensityConfig,
    axis: str = "axial",
    channel_names: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """Normalised ``(N, C, H, W)`` slices of one image (N = 1), one volume, or a multi-modal case
    (one file per channel, same geometry); empty volume slices are dropped."""
    if len(paths) == 1 and is_image_file(paths[0]):
        return normalise_intensity(read_grey(paths[0]), intensity)[None]
    from .io.volumes import read_case, read_volume
    from .slicing import extract_slices

    volume = read_volume(paths[0]) if len(paths) == 1 else read_case(paths, channel_names)
    slices, _layout = extract_slices(volume.with_array(normalise_intensity(volume.array, intensity)), axis)
    return slices[slices_with_enough_foreground(slices)]


def _multichannel_cases(inputs: Sequence[Union[str, Path]], channel_names: Sequence[str]) -> List[List[Path]]:
    """Case folders holding one file per channel name (e.g. FLAIR.nii.gz, T1.nii.gz), grouped as the batch
    script groups them."""
    from .io.cases import discover_cases  # one grouping rule for pretraining and segmentation

    units: List[List[Path]] = []
    for item in inputs:
        for case in discover_cases(Path(item), Path(item) / ".unused", channel_names):
            if case.problem:
                log.warning("skipped %s: %s", case.case_id, case.problem)
            else:
                units.append(list(case.inputs))
    return units


def load_pretraining_slices(
    inputs: Sequence[Union[str, Path]],
    image_size: int,
    intensity: IntensityConfig,
    axis: str = "axial",
    in_channels: int = 1,
    channel_names: Optional[Sequence[str]] = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """All usable slices of the inputs on the model grid: float32 ``(N, C, size, size)`` in [-1, 1].

    An unreadable file is reported and skipped: one broken file never stops pretraining.
    """
    if channel_names and len(channel_names) > 1:
        units = _multichannel_cases(inputs, channel_names)
    else:
        units = [[p] for p in discover_files(inputs)]
    batches: List[torch.Tensor] = []
    skipped = 0
    for paths in tqdm(units, desc="reading images", unit="case", disable=not show_progress):
        path = paths[0]
        try:
            slices = training_slices(paths, intensity, axis, channel_names)
        except (InputError, ValueError) as error:
            log.warning("skipped %s", error if isinstance(error, InputError) else f"{path}: {error}")
            skipped += 1
            continue
        if slices.shape[1] != in_channels:
            log.warning("skipped %s: %d channels, the model takes %d", path, slices.shape[1], in_channels)
            skipped += 1
            continue
        if len(slices):
            batches.append(to_model_grid(torch.from_numpy(slices), image_size)[0])
    if not batches:
        raise InputError(", ".join(str(i) for i in inputs), f"no usable training slices ({skipped} files skipped)")
    return torch.cat(batches)
