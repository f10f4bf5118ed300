"""Intensity normalisation and the model grid (pad to square, resize, and back)."""

from .intensity import IntensityConfig, normalise_intensity
from .spatial import GridTransform, from_model_grid, to_model_grid

__all__ = ["IntensityConfig", "normalise_intensity", "GridTransform", "to_model_grid", "from_model_grid"]
