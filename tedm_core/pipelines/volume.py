"""Volumes through the slice-wise model: normalise the whole volume, slice, segment, reassemble.

Also the reverse direction for fitting: the labelled slices of image + label volumes (a
clinician labels one to three slices; only those are learnt from).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import InputError
from ..heads import class_labels
from ..io.images import binary_foreground
from ..io.volumes import Volume, geometry_mismatch, read_case, read_volume
from ..preprocessing.intensity import IntensityConfig, above_background, normalise_intensity
from ..slicing import SliceLayout, extract_slices, labelled_slice_indices, plane_across, reassemble, to_slices

Progress = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
PathLike = Union[str, Path]


@dataclass
class VolumeSegmentation:
    """A volume's segmentation on its own grid.

    labels: ``(K, J, I)`` uint8 class indices (0 = background; map to file values with
        :meth:`label_values`). probabilities: ``(classes, K, J, I)`` float32 or ``None``.
    uncertainty: ``(K, J, I)`` float32 spread of the per-timestep probabilities.
    """

    labels: np.ndarray
    probabilities: Optional[np.ndarray]
    uncertainty: np.ndarray
    layout: SliceLayout
    slices_run: int = 0
    slices_skipped: int = 0

    def label_values(self, values: Sequence[int]) -> np.ndarray:
        """Labels as the bundle's file values (``values[k]`` for class k), uint8 or uint16."""
        return classes_to_label_values(self.labels, values)

    def voxels_per_class(self, num_classes: int) -> List[int]:
        return np.bincount(self.labels.ravel(), minlength=num_classes)[:num_classes].tolist()


def classes_to_label_values(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Class indices -> the label file values (``values[k]`` for class k), uint8 or uint16."""
    lookup = np.asarray(values, dtype=np.uint16 if max(values) > 255 else np.uint8)
    return lookup[labels]


def check_channels(volume: Volume, channel_names: Sequence[str]) -> None:
    if volume.array.shape[0] != len(channel_names):
        raise InputError(
            volume.path,
            f"has {volume.array.shape[0]} channel(s) ({', '.join(volume.channel_names)}); "
            f"the model expects {len(channel_names)} ({', '.join(channel_names)})",
        )


def normalise_volume(volume: Volume, intensity: IntensityConfig) -> Volume:
    """The whole volume normalised with one mapping per channel (never per slice)."""
    try:
        return volume.with_array(normalise_intensity(volume.array, intensity))
    except ValueError as error:
        raise InputError(volume.path, f"cannot be normalised ({error})") from None


def resolve_axis(volume: Volume, axis: str) -> str:
    """A single-slice image is always cut across its one slice, whichever axis holds it: K for a
    radiograph or a 2D file, J or I for one coronal or sagittal slice saved from a volume (cut
    along ``axis`` it would become one-voxel-thin strips, each resized to the model's grid)."""
    singleton = [dim for dim in range(3) if volume.shape[dim] == 1]
    if not singleton:
        return axis
    try:
        return plane_across(volume.ijk_to_ras, singleton[0])
    except ValueError as error:
        raise InputError(volume.path, str(error)) from None


def nonempty_slice_mask(slices: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` normalised slices -> bool ``(N,)``: which hold any voxel above background
    (the model runs on those; pretraining's stricter rule is ``data.slices_with_enough_foreground``).

    A slice of background alone holds nothing to segment, so the UNet is not run on it (typically
    a tenth of a skull-stripped brain MRI's axial slices); inside a slice, the head is applied in
    the box of its voxels above background alone (``Segmenter``, ``framing.foreground_box``)."""
    return above_background(slices.reshape(slices.shape[0], -1)).any(axis=1)


def is_whole_2d_image(num_slices: int) -> bool:
    """Whether an image with ``num_slices`` slices along its axis is one whole 2D image (a
    radiograph), the only kind whose slice may be cropped of dark borders
    (``ModelBundle.crop_dark_borders``: a volume's slices keep one common geometry) and
    post-processed as anatomy (``ModelBundle.component_rule``: a volume's slices cut a 3D
    structure into any number of 2D regions)."""
    return num_slices == 1


def as_anatomy(labels: np.ndarray, segmenter, num_slices: int) -> np.ndarray:
    """``labels`` (N, H, W) of an image with ``num_slices`` slices, post-processed by the
    segmenter's anatomy rule (``Segmenter.component_rule``) when the image is one whole 2D image;
    a volume's slices as they are."""
    rule = getattr(segmenter, "component_rule", None)
    return rule.apply(labels) if rule is not None and is_whole_2d_image(num_slices) else labels


def segment_volume(
    segmenter,
    volume: Volume,
    axis: Optional[str] = None,
    progress: Optional[Progress] = None,
    cancel: Optional[CancelCheck] = None,
    keep_probabilities: bool = True,
) -> VolumeSegmentation:
    """Segment ``volume`` (raw intensities) slice by slice with ``segmenter``.

    Args:
        segmenter: a :class:`~tedm_core.pipelines.segment.Segmenter` (anything with ``.bundle``,
            ``.predict(slices, progress=, cancel=)`` returning probabilities/uncertainty and
            ``.predict_into(slices, rows, labels, uncertainty, progress=, cancel=)``).
        axis: ``axial``, ``coronal``, ``sagittal`` or ``k``; default the bundle's.
        progress: called with (slices done, slices to run).
        keep_probabilities: return the ``(classes, K, J, I)`` probabilities (memory: 4 bytes
            per voxel and class).

    Background-only slices get label 0, background probability 1 and uncertainty 0 without
    running the model.
    """
    bundle = segmenter.bundle
    check_channels(volume, bundle.channel_names)
    slices, layout = extract_slices(
        normalise_volume(volume, bundle.intensity), resolve_axis(volume, axis or bundle.axis or "axial")
    )
    keep = np.flatnonzero(nonempty_slice_mask(slices))
    n, (h, w) = layout.num_slices, layout.slice_shape
    # A volume's slices keep one geometry: dark borders are cropped only from whole 2D images.
    cropping = getattr(segmenter, "crop_dark_borders", False)
    per_call = {"crop_dark_borders": False} if cropping and not is_whole_2d_image(layout.num_slices) else {}
    if progress is not None:
        progress(0, len(keep))
    uncertainty = np.zeros((n, h, w), dtype=np.float32)
    probabilities = None
    if keep_probabilities:
        probabilities = np.zeros((n, len(bundle.class_names), h, w), dtype=np.float32)
        probabilities[:, 0] = 1.0
        if len(keep):
            prediction = segmenter.predict(slices[keep], progress=progress, cancel=cancel, **per_call)
            probabilities[keep] = prediction.probabilities
            uncertainty[keep] = prediction.uncertainty
        labels = class_labels(torch.from_numpy(probabilities)).numpy()
    else:
        # Labels straight from each chunk (uint8), no float probabilities of the volume: the
        # batch pipeline's usual case, and a third of the memory of the above.
        labels = np.zeros((n, h, w), dtype=np.uint8)
        if len(keep):
            segmenter.predict_into(slices, keep, labels, uncertainty, progress=progress, cancel=cancel, **per_call)
    labels = as_anatomy(labels, segmenter, n)
    del slices  # the normalised volume: not needed for reassembly
    return VolumeSegmentation(
        labels=reassemble(labels, layout),
        probabilities=reassemble(probabilities, layout) if keep_probabilities else None,
        uncertainty=reassemble(uncertainty, layout),
        layout=layout,
        slices_run=int(len(keep)),
        slices_skipped=int(n - len(keep)),
    )


# ---------------------------------------------------------------------------------------------
# Fitting from volumes


def label_array_to_classes(label_volume: Volume, label_values: Sequence[int]) -> np.ndarray:
    """A label volume's voxel values -> int64 class indices ``(K, J, I)``.

    Two classes: any value other than the background's is foreground (masks stored as 0/1,
    0/255 ...). More classes: each value must be one of ``label_values``.
    """
    array = label_volume.array[0]
    values = np.rint(array)
    fractional = values != array  # NaN too
    if fractional.any():
        # A soft or interpolated mask (0.45 at an edge) rounded to class values would pass as a
        # different ground truth, or as an empty one, without a word.
        raise InputError(
            label_volume.path,
            f"holds label values that are not whole numbers ({int(fractional.sum())} voxels, e.g. "
            f"{float(array[fractional][0]):g}): a label file holds class values; threshold a soft or resampled mask "
            "first (nearest-neighbour when resampling)",
        )
    values = values.astype(np.int64)
    if len(label_values) == 2:
        # A 2D image may be a 0/1 or 0/255 mask whatever the structure's value (segment writes 0/255 PNGs).
        image_mask = getattr(label_volume, "source_format", "") == "image2d"
        return binary_foreground(
            label_volume.path, values, int(label_values[0]), int(label_values[1]), image_mask=image_mask
        )
    lookup = {int(v): k for k, v in enumerate(label_values)}
    present = np.unique(values)
    unknown = sorted(set(present.tolist()) - set(lookup))
    if unknown:
        raise InputError(
            label_volume.path, f"label values {unknown[:5]} are not among the classes' values {list(label_values)}"
        )
    out = np.zeros(values.shape, dtype=np.int64)
    for value in present.tolist():
        out[values == value] = lookup[value]
    return out


@dataclass
class LabelledSlices:
    """Training pairs cut from volumes: ``slices`` (N, C, H, W) normalised float32,
    ``labels`` (N, H, W) int64 class indices, and where each came from."""

    slices: np.ndarray
    labels: np.ndarray
    sources: List[Tuple[str, int]] = field(default_factory=list)  # (image path, slice index)


def labelled_slices_from_volumes(
    images: Union[Volume, Sequence[Volume]],
    labels: Union[Volume, Sequence[Volume]],
    intensity: IntensityConfig,
    label_values: Sequence[int],
    axis: str = "axial",
    slices: Optional[Sequence[int]] = None,
    channel_names: Optional[Sequence[str]] = None,
) -> LabelledSlices:
    """The slices of image volumes that carry labels, with their labels, ready for ``fit_bundle``.

    Args:
        images, labels: one volume each, or equal-length sequences (one pair per case). Each
            label volume must be on its image's grid (shape and geometry, checked).
        intensity: the backbone's normalisation (applied to each whole volume).
        label_values: the file value of each class, background first.
        axis: slicing axis (as for segmentation: use the bundle's).
        slices: explicit slice indices (file order along ``axis``) to learn from, applied to
            every case; default: every slice holding a non-background label.
        channel_names: when given, each image must have this many channels.

    Slices of different cases must share one in-plane shape (they are stacked).
    """
    image_list = [images] if isinstance(images, Volume) else list(images)
    label_list = [labels] if isinstance(labels, Volume) else list(labels)
    if len(image_list) != len(label_list):
        raise ValueError(f"{len(image_list)} image volumes but {len(label_list)} label volumes")
    out_slices: List[np.ndarray] = []
    out_labels: List[np.ndarray] = []
    sources: List[Tuple[str, int]] = []
    for image, label in zip(image_list, label_list):
        if channel_names is not None:
            check_channels(image, channel_names)
        problem = geometry_mismatch(image, label)
        if problem:
            raise InputError(label.path, f"label volume does not match its image {image.name}: {problem}")
        if label.array.shape[0] != 1:
            raise InputError(label.path, f"a label volume must have one channel, not {label.array.shape[0]}")
        classes = label_array_to_classes(label, label_values)
        normalised = normalise_volume(image, intensity)
        image_slices, layout = extract_slices(normalised, resolve_axis(image, axis))
        if slices is None:
            chosen = labelled_slice_indices(classes, layout)
            if not chosen:
                raise InputError(label.path, f"holds no labelled voxels; nothing to learn from ({layout.plane} slices)")
        else:
            chosen = sorted({int(s) for s in slices})
            bad = [s for s in chosen if not 0 <= s < layout.num_slices]
            if bad:
                raise InputError(
                    image.path,
                    f"slice indices {bad[:5]} are outside 0..{layout.num_slices - 1} along the {layout.plane} axis",
                )
        label_slices = to_slices(classes, layout)
        out_slices.append(image_slices[chosen])
        out_labels.append(np.ascontiguousarray(label_slices[chosen]))
        sources.extend((image.name, int(s)) for s in chosen)
    shapes = {s.shape[-2:] for s in out_slices}
    if len(shapes) > 1:
        raise InputError(
            None,
            f"labelled slices of different cases have different shapes {sorted(shapes)}; fit on cases of one grid size",
        )
    return LabelledSlices(
        np.concatenate(out_slices).astype(np.float32), np.concatenate(out_labels).astype(np.int64), sources
    )


def read_labelled_case(
    image_paths: Sequence[PathLike],
    label_path: PathLike,
    intensity: IntensityConfig,
    label_values: Sequence[int],
    axis: str = "axial",
    slices: Optional[Sequence[int]] = None,
    channel_names: Optional[Sequence[str]] = None,
) -> LabelledSlices:
    """:func:`labelled_slices_from_volumes` from files: one case's modality files and its label file."""
    image = read_case(
        list(image_paths),
        channel_names=channel_names if channel_names and len(channel_names) == len(image_paths) else None,
    )
    label = read_volume(label_path, allow_constant=True)
    return labelled_slices_from_volumes(
        image, label, intensity, label_values, axis=axis, slices=slices, channel_names=channel_names
    )
