"""Per-image (or per-volume) intensity normalisation to the [-1, 1] range the DDPM is trained on.

One convention end to end (METHOD.md section 2 warns of the authors' [0, 1] vs [-1, 1] bug): the
same :class:`IntensityConfig` is stored with the backbone checkpoint and copied into every bundle
fitted on it, and every face calls :func:`normalise_intensity` with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import numpy as np

KINDS = ("percentile", "foreground_percentile", "zscore", "fixed")


@dataclass(frozen=True)
class IntensityConfig:
    """How raw intensities become model inputs.

    kind:
        ``percentile``: the ``lower``/``upper`` percentiles of the whole image map to -1/1
        (radiographs: robust to each hospital's windowing).
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
MULTIMODAL_MRI = IntensityConfig("zscore")
# The conventions by the names users choose them with (``tedm pretrain --intensity``, the worker).
INTENSITY_CONVENTIONS = {"radiograph": RADIOGRAPH, "brain": BRAIN_T1, "zscore": MULTIMODAL_MRI}


def foreground_mask(channel: np.ndarray) -> np.ndarray:
    """Voxels that carry signal: non-zero and above the minimum (skull-stripped MRI has 0 background)."""
    return channel > channel.min()


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
    return np.stack([_normalise_channel(c, config) for c in image]).astype(np.float32)


def _normalise_channel(channel: np.ndarray, config: IntensityConfig) -> np.ndarray:
    if config.clip_min is not None or config.clip_max is not None:
        channel = np.clip(channel, config.clip_min, config.clip_max)
    if config.kind == "fixed":
        return _map_to_unit_range(channel, config.lower, config.upper)
    if config.kind == "percentile":
        lo, hi = np.percentile(channel, [config.lower, config.upper])
        return _map_to_unit_range(channel, lo, hi)
    mask = foreground_mask(channel)
    if not mask.any():
        raise ValueError("image is constant: nothing to normalise")
    values = channel[mask]
    if config.kind == "foreground_percentile":
        lo, hi = np.percentile(values, [config.lower, config.upper])
        out = _map_to_unit_range(channel, lo, hi)
    else:  # zscore
        std = float(values.std())
        out = (channel - float(values.mean())) / (std if std > 0 else 1.0) / config.zscore_scale
        out = np.clip(out, -1.0, 1.0)
    return np.where(mask, out, -1.0)


def _map_to_unit_range(channel: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        # A constant image (e.g. an all-zero slice): map everything to the background value.
        return np.full_like(channel, -1.0, dtype=np.float32)
    return np.clip((channel - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0)
