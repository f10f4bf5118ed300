"""Labelled training data for ``fit``: 2D image/mask pairs, or volumes (single- or multi-modal).

- 2D images: ``images/NAME.png`` pairs with ``masks/NAME.png`` (any image suffix).
- Volumes: cases are found with the batch script's rule (one file per case, or for a
  multi-modal model one folder per case holding a file per channel, e.g. ``FLAIR.nii.gz``);
  each case's label volume is ``masks/<case>.nii.gz`` or, with ``label_name``, a file of that
  name inside the case folder (BraTS keeps ``GT_W.nii.gz`` beside the images).
Only the slices that carry labels are learned from (a clinician labels a few), unless
``slices`` names them; ``slices_per_case`` keeps that many of them, spread evenly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError, SettingError
from ..io.cases import (
    discover_cases,
    find_label_file,
    refuse_another_label_file,
    single_file_cases_per_folder,
    without_label_files,
)
from ..io.images import IMAGE_SUFFIXES, is_image_file, read_grey, read_label_image
from ..io.volumes import is_volume_file, strip_suffix, value_problem
from ..preprocessing.intensity import IntensityConfig, normalise_intensity
from .fit import LabelSet, SliceSet
from .volume import read_labelled_case


def match_image_pairs(images: Path, masks: Path) -> List[Tuple[Path, Path]]:
    """(image, mask) pairs of 2D images whose names match (suffixes ignored), sorted by image name."""
    for folder in (images, masks):
        if not folder.is_dir():
            raise InputError(folder, "folder not found" if not folder.exists() else "is not a folder")
    if images.resolve() == masks.resolve():
        raise InputError(masks, "is the images folder too: each image would be taken for its own mask")
    masks_by_stem: Dict[str, List[Path]] = {}
    for p in sorted(masks.iterdir()):
        if p.is_file() and is_image_file(p):
            masks_by_stem.setdefault(strip_suffix(p), []).append(p)
    mask_by_stem = {stem: found[0] for stem, found in masks_by_stem.items()}
    image_files = [p for p in sorted(images.iterdir()) if p.is_file() and is_image_file(p)]
    for image in image_files:
        found = masks_by_stem.get(strip_suffix(image), [])
        if len(found) > 1:  # which one is the truth is the user's to say, not the sort order's
            raise InputError(found[1], f"and {found[0].name} are both masks of {image.name}: keep one")
    unmatched = [p for p in image_files if strip_suffix(p) not in mask_by_stem]
    volume_masks = {strip_suffix(p): p for p in sorted(masks.iterdir()) if p.is_file() and is_volume_file(p)}
    for image in unmatched:
        if strip_suffix(image) in volume_masks:
            # Named as its mask but a volume (e.g. NIfTI): "no mask" would send the user looking
            # for a missing file rather than converting this one.
            raise InputError(
                volume_masks[strip_suffix(image)],
                f"is a volume, but {image.name} is a 2D image: masks of 2D images must be 2D images "
                f"({', '.join(IMAGE_SUFFIXES)}) of the same name",
            )
    if len(unmatched) == len(image_files):
        raise InputError(images, f"no image has a mask of the same name in {masks}")
    if unmatched:
        # Dropping them would change what n counts and what the model learns, unseen.
        raise InputError(
            unmatched[0],
            f"has no mask of the same name in {masks} ({len(unmatched)} of {len(image_files)} images have none); "
            "every labelled image needs its mask",
        )
    return [(p, mask_by_stem[strip_suffix(p)]) for p in image_files]


def spread_evenly(count: int, keep: int) -> List[int]:
    """``keep`` positions out of ``count``, evenly spread and including both ends; one alone is
    the middle one (a clinician labelling one slice takes it through the structure, not at its
    edge, where the first labelled slice of a BraTS tumour holds a few voxels)."""
    if keep >= count:
        return list(range(count))
    if keep == 1:
        return [(count - 1) // 2]
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, keep)})


def holds_only_2d_images(folder: Path) -> bool:
    """True for a folder holding 2D images (radiographs) directly and no volume file; subfolders
    (a notebook's checkpoints, an earlier run's results) do not change what the folder is."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return any(is_image_file(p) for p in files) and not any(is_volume_file(p) for p in files)


def load_labelled_data(
    images: Path,
    masks: Optional[Path],
    intensity: IntensityConfig,
    label_values: Sequence[int],
    channel_names: Sequence[str] = ("image",),
    n: Optional[int] = None,
    slices: Optional[Sequence[int]] = None,
    slices_per_case: Optional[int] = None,
    axis: str = "axial",
    label_name: Optional[str] = None,
) -> Tuple[SliceSet, LabelSet, List[str]]:
    """Normalised slices (N, C, H, W), class-index labels (N, H, W) and a description of each slice's source;
    when the slices differ in size, lists of (C, H, W) slices and (H, W) labels instead (see :func:`_stack_slices`).

    ``n`` keeps the first n items (2D pairs or cases) in sorted name order, the paper's few-shot subsets.
    """
    images = Path(images)
    if slices_per_case is not None and slices_per_case < 1:
        raise SettingError("slices_per_case", f"must be at least 1, got {slices_per_case}")
    if slices is not None and any(int(i) < 0 for i in slices):
        raise SettingError("slices", f"slice indices count from 0, got {sorted(slices)[:3]}")
    if not images.is_dir():
        raise InputError(images, "folder not found" if not images.exists() else "is not a folder")
    if masks is None and label_name is None:
        raise SettingError("masks", "give a masks folder, or the label file name inside each case folder (label_name)")
    if masks is not None and len(channel_names) == 1 and holds_only_2d_images(images):
        for setting, value in (("slices", slices), ("slices_per_case", slices_per_case), ("label_name", label_name)):
            if value is not None:
                raise SettingError(setting, f"applies to volumes only, and {images} holds 2D images")
        slices_out, labels_out, sources = _load_image_pairs(images, Path(masks), intensity, label_values, n)
        _check_every_class_labelled(labels_out, label_values, Path(masks))
        return slices_out, labels_out, sources
    cases = without_label_files(discover_cases(images, images / ".unused", channel_names), label_name)
    cases_per_folder = single_file_cases_per_folder(cases)
    if n is not None:
        cases = _first(cases, n, images)
    all_slices, all_labels, sources = [], [], []
    for case in cases:
        if case.problem:
            raise InputError(case.inputs[0] if case.inputs else images, case.problem)
        label_path = find_label_file(case, Path(masks) if masks is not None else images, label_name, cases_per_folder)
        if label_path is None and label_name and masks is None and case.is_folder and len(cases) == 1:
            # --images is one subject's folder: its label file is in it, not in a folder of its name.
            inside = images / label_name
            label_path = inside if inside.is_file() else None
        if label_path is None:
            raise InputError(
                images / case.case_id,
                f"no label volume found for this case ({'named ' + label_name if label_name else 'in ' + str(masks)})",
            )
        refuse_another_label_file(case, Path(masks) if masks is not None else images, label_path)
        labelled = read_labelled_case(
            case.inputs, label_path, intensity, label_values, axis=axis, slices=slices, channel_names=channel_names
        )
        keep = (
            spread_evenly(len(labelled.slices), slices_per_case)
            if slices_per_case
            else list(range(len(labelled.slices)))
        )
        all_slices.append(labelled.slices[keep])
        all_labels.append(labelled.labels[keep])
        sources += [f"{path}#slice{index}" for path, index in (labelled.sources[i] for i in keep)]
    slices_out, labels_out = _stack_slices(all_slices, all_labels)
    _check_every_class_labelled(labels_out, label_values, Path(masks) if masks is not None else images)
    return slices_out, labels_out, sources


def _check_every_class_labelled(labels: LabelSet, label_values: Sequence[int], where: Path) -> None:
    """A class no labelled pixel holds would be fitted as one the model never predicts, without a
    word: far more often a wrong label value or a class too many than a wish."""
    present = set().union(*(np.unique(label).tolist() for label in labels))
    missing = [k for k in range(1, len(label_values)) if k not in present]
    if missing:
        shown = ", ".join(f"class {k} (label value {label_values[k]})" for k in missing[:5])
        raise InputError(
            where,
            f"no labelled pixel of {shown} in the masks learnt from; every class needs examples: check its "
            "label value, or leave the class out",
        )


def _first(items: list, n: int, where: Path) -> list:
    if n < 1:
        raise SettingError("n", f"must be at least 1, got {n}")
    if n > len(items):
        raise SettingError("n", f"{n} asks for more labelled items than the {len(items)} found in {where}")
    return items[:n]


def _load_image_pairs(
    images: Path, masks: Path, intensity: IntensityConfig, label_values: Sequence[int], n: Optional[int]
):
    pairs = match_image_pairs(images, masks)
    if n is not None:
        pairs = _first(pairs, n, images)
    all_slices, all_labels = [], []
    for image_path, mask_path in pairs:
        grey = read_grey(image_path)
        problem = value_problem(grey)  # as segment refuses it: a blank image would teach "the structure is here"
        if problem:
            raise InputError(image_path, problem)
        image = normalise_intensity(grey, intensity)[None]
        label = read_label_image(mask_path, label_values)[None]
        if label.shape[1:] != image.shape[2:]:
            raise InputError(mask_path, f"mask size {label.shape[1:]} differs from its image's {image.shape[2:]}")
        if not label.any():
            # As for label volumes: an empty mask is far more often a wrong file or value than a
            # deliberate "nothing here", and would teach the model to find nothing.
            raise InputError(mask_path, f"holds no labelled pixels (every pixel is background {label_values[0]})")
        all_slices.append(image)
        all_labels.append(label)
    slices_out, labels_out = _stack_slices(all_slices, all_labels)
    return slices_out, labels_out, [str(image) for image, _ in pairs]


def _stack_slices(slices: List[np.ndarray], labels: List[np.ndarray]) -> Tuple[SliceSet, LabelSet]:
    """Blocks of (n, C, H, W) slices and (n, H, W) labels as one (N, C, H, W) / (N, H, W) stack when
    all slices share a size; otherwise as lists of (C, H, W) slices and (H, W) labels, which
    fitting frames one by one on the model grid, as segmenting frames each image (padding them to
    a common size would teach a smaller image at another scale and position than segment shows it)."""
    if len({s.shape[2:] for s in slices}) == 1:
        return np.concatenate(slices).astype(np.float32), np.concatenate(labels).astype(np.int64)
    return (
        [s.astype(np.float32) for block in slices for s in block],
        [lab.astype(np.int64) for block in labels for lab in block],
    )
