"""Per-image (or per-volume) intensity normalisation to the [-1, 1] range the DDPM is trained on.

One convention end to end (docs/method.md, section 2, warns of the authors' [0, 1] vs [-1, 1] bug): the
same :class:`IntensityConfig` is stored with the backbone checkpoint and copied into every bundle
fitted on it, and every face calls :func:`normalise_intensity` with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, TypeVar

import numpy as np

from ..choices import INTENSITIES

KINDS = ("percentile", "equalise", "foreground_percentile", "zscore", "fixed")
# The whole-image kinds meant for radiographs: a model on a backbone with one of them takes the
# radiograph defaults (pipelines.fit: dark-border cropping, the cosine head schedule, the
# inference timesteps).
RADIOGRAPH_KINDS = ("percentile", "equalise")
# Bins of the "equalise" histogram: one per grey level of an 8-bit image.
EQUALISE_BINS = 256


@dataclass(frozen=True)
class IntensityConfig:
    """How raw intensities become model inputs.

    kind:
        ``percentile``: the ``lower``/``upper`` percentiles of the whole image map to -1/1
        (radiographs: robust to each hospital's windowing).
        ``equalise``: histogram equalisation of the whole image (``EQUALISE_BINS`` bins over its
        range, the cumulative histogram rescaled to [-1, 1]; the darkest bin maps to -1): robust
        to each hospital's tone curve too, not only to its window. ``lower``/``upper`` unused.
        ``foreground_percentile``: the same, computed inside the foreground (voxels above
        ``clip_min`` and non-zero), after clipping to [clip_min, clip_max] when given (brain T1,
        as the paper did for UK Biobank).
        ``zscore``: (x - mean) / std over the foreground, then divided by ``zscore_scale`` so
        that most values fall in [-1, 1] (BraTS-like multi-modal MRI).
        ``fixed``: ``lower``/``upper`` are absolute values mapped to -1/1 (e.g. CT windows).
    Background (outside the foreground) is set to -1 for the foreground kinds, so empty
    air looks the same in every volume.
    """

    kind: str = "percentile"
    lower: float = 1.0
    upper: float = 99.0
    clip_min: Optional[float] = None
    clip_max: Optional[float] = None
    zscore_scale: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown intensity normalisation {self.kind!r}; expected one of {KINDS}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> IntensityConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


RADIOGRAPH = IntensityConfig("percentile", 0.5, 99.5)
BRAIN_T1 = IntensityConfig("foreground_percentile", 1.0, 99.0)
# Measured on validation (issue 10, session 13; docs/results/VALIDATION_session13.md): a `small4`
# backbone pretrained on equalised radiographs, against the same pretraining on RADIOGRAPH (both
# at 1,250 steps, TEDM n = 3, seeds 0-2): the pool images -0.43 Dice (p = 0.03), re-framed -0.48
# (p = 0.01), covid_v7 -0.87 (p = 0.002). So RADIOGRAPH stays the default for 2D images; this
# one is offered for radiographs whose tone curves differ more than these hospitals' do.
RADIOGRAPH_EQUALISED = IntensityConfig("equalise")
MULTIMODAL_MRI = IntensityConfig("zscore")
# The conventions a user picks by name (``tedm pretrain --intensity``).
NAMED: Dict[str, IntensityConfig] = {
    "radiograph": RADIOGRAPH,
    "radiograph-equalised": RADIOGRAPH_EQUALISED,
    "brain": BRAIN_T1,
    "zscore": MULTIMODAL_MRI,
}
assert tuple(NAMED) == INTENSITIES


def is_radiograph(config: IntensityConfig) -> bool:
    """Whether ``config`` is one of the whole-image radiograph conventions (``RADIOGRAPH_KINDS``)."""
    return config.kind in RADIOGRAPH_KINDS


# Every kind maps air, and what lies outside the foreground, to exactly -1 (the padding of the
# model grid too): a normalised voxel is background when it rises above -1 by no more than this.
BACKGROUND_LEVEL = -1.0
BACKGROUND_TOLERANCE = 1e-6
Array = TypeVar("Array")  # a numpy array or a torch tensor


def above_background(normalised: Array) -> Array:
    """Which voxels of a normalised image (a numpy array or a torch tensor) rise above the
    background level (bool, the same kind and shape)."""
    return normalised > BACKGROUND_LEVEL + BACKGROUND_TOLERANCE


def foreground_mask(channel: np.ndarray, minimum: Optional[float] = None) -> np.ndarray:
    """Voxels that carry signal: non-zero and above the minimum (skull-stripped MRI has 0
    background). Both: one voxel below zero (interpolation ringing at the brain's edge) must not
    make the whole zero background foreground, which once moved the brain's normalised values by
    0.4-0.7 and left no slice to skip. ``minimum``: the whole channel's, for a part of it."""
    minimum = channel.min() if minimum is None else minimum
    return (channel > minimum) & (channel != 0)


def normalise_intensity(image: np.ndarray, config: IntensityConfig) -> np.ndarray:
    """Normalise each channel of ``image`` (shape ``(C, ...)``) independently; returns float32.

    Statistics are taken over the whole array given, so pass a whole volume, not a slice, for
    3D data: every slice of a volume then shares one mapping.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim < 2:
        raise ValueError(f"expected a (C, ...) array, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or infinite values")
    out = np.empty(image.shape, dtype=np.float32)
    for c, channel in enumerate(image):
        _normalise_channel(channel, config, out[c])
    return out


# The mapping is applied this many voxels at a time: the same elementwise arithmetic as on the
# whole channel (so the same values), with float64 temporaries of a few MiB instead of several
# copies of a whole volume (a 240x240x155 BraTS channel is 36 MB as float32, twice that as float64).
NORMALISE_CHUNK_VOXELS = 1 << 19


def _normalise_channel(channel: np.ndarray, config: IntensityConfig, out: np.ndarray) -> None:
    """Normalise one channel into ``out`` (same shape, float32): statistics over the whole
    channel, then the mapping chunk by chunk along its first axis."""
    if config.clip_min is not None or config.clip_max is not None:
        channel = np.clip(channel, config.clip_min, config.clip_max)
    minimum = channel.min() if config.kind in ("foreground_percentile", "zscore") else None
    if config.kind == "fixed":
        mapping = lambda x: _map_to_unit_range(x, config.lower, config.upper)  # noqa: E731
    elif config.kind == "percentile":
        lo, hi = np.percentile(channel, [config.lower, config.upper])
        mapping = lambda x: _map_to_unit_range(x, lo, hi)  # noqa: E731
    elif config.kind == "equalise":
        mapping = _equalisation(channel)
    else:
        mask = foreground_mask(channel)
        if not mask.any():
            raise ValueError("image is constant: nothing to normalise")
        values = channel[mask]
        del mask
        if config.kind == "foreground_percentile":
            lo, hi = np.percentile(values, [config.lower, config.upper])
            mapping = lambda x: np.where(  # noqa: E731
                foreground_mask(x, minimum), _map_to_unit_range(x, lo, hi), -1.0
            )
        else:  # zscore
            mean, std = float(values.mean()), float(values.std())
            scale = std if std > 0 else 1.0
            mapping = lambda x: np.where(  # noqa: E731
                foreground_mask(x, minimum), np.clip((x - mean) / scale / config.zscore_scale, -1.0, 1.0), -1.0
            )
        del values
    if channel.ndim == 0 or not channel.size:
        out[...] = mapping(channel)
        return
    step = max(1, NORMALISE_CHUNK_VOXELS // max(1, channel[0].size))
    for start in range(0, channel.shape[0], step):
        out[start : start + step] = mapping(channel[start : start + step])


def _equalisation(channel: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The histogram equalisation of ``channel`` as a mapping to [-1, 1], to apply chunk by chunk.

    Written here rather than calling MONAI's ``equalize_hist`` (what ``HistogramNormalize`` runs)
    because that computes and applies in one call over the whole array (float64 copies of a whole
    volume) and bins differently when scikit-image is installed (integer bins for integer input),
    so a model's inputs would depend on the environment. The arithmetic is the same: the
    cumulative histogram rescaled to the output range, interpolated at the bin centres."""
    lo, hi = float(channel.min()), float(channel.max())
    if not hi > lo:
        return lambda x: np.full(np.shape(x), -1.0, dtype=np.float32)
    counts, edges = np.histogram(channel, bins=EQUALISE_BINS, range=(lo, hi))
    cumulative = np.cumsum(counts, dtype=np.float64)
    levels = (cumulative - cumulative[0]) / (cumulative[-1] - cumulative[0]) * 2.0 - 1.0
    centres = (edges[:-1] + edges[1:]) / 2.0
    return lambda x: np.interp(x, centres, levels).astype(np.float32)


def _map_to_unit_range(channel: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        # A constant image (e.g. an all-zero slice): map everything to the background value.
        return np.full_like(channel, -1.0, dtype=np.float32)
    return np.clip((channel - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0)
