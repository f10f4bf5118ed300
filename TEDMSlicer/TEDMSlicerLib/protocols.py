"""The interfaces the Qt-free logic is written against (structural: any object with these
methods fits, so the widget, scripts and tests inject their own)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

try:  # Python 3.8+: typing.Protocol. Slicer 5.8 and older ship 3.9, newer ones 3.12.
    from typing import Protocol, runtime_checkable
except ImportError:  # pragma: no cover
    from typing_extensions import Protocol, runtime_checkable  # type: ignore

import numpy as np


@runtime_checkable
class TaskCallbacks(Protocol):
    """What long work reports, and how it learns that the user pressed Cancel.

    Called from the worker thread: implementations must not touch Qt or MRML directly.
    """

    def progress(self, fraction: float, message: str = "") -> None:
        """``fraction`` of the whole operation done, in [0, 1]; ``message`` says what runs now."""

    def log(self, message: str) -> None:
        """A line for the status/log display."""

    def cancelled(self) -> bool:
        """True once the user asked to stop; checked between slice batches and training steps."""


@runtime_checkable
class SlicePredictorLike(Protocol):
    """``tedm_core.pipelines.segment.Segmenter`` as this module uses it."""

    def predict(
        self, slices: np.ndarray, progress: Any = None, cancel: Any = None, keep_features: bool = False
    ) -> Any: ...

    def predict_from_features(self, cache: Any, progress: Any = None) -> Any: ...

    def close(self) -> None: ...


@runtime_checkable
class SegmentationBackend(Protocol):
    """The part of ``tedm_core`` the Slicer logic needs. The default implementation,
    :class:`TEDMSlicerLib.backend.TEDMCoreBackend`, imports ``tedm_core`` lazily, so the module
    loads in Slicer before its dependencies are installed."""

    def load_model(self, path: str) -> Any:
        """A ``ModelBundle`` (folder with bundle.json) or a ``Backbone`` (folder with backbone.json)."""

    def save_bundle(self, bundle: Any, path: str, overwrite: bool = False) -> str: ...

    def make_volume(
        self, array: np.ndarray, ijk_to_ras: np.ndarray, channel_names: Sequence[str], path: Optional[str] = None
    ) -> Any: ...

    def normalised_slices(self, volume: Any, intensity: Any, axis: str) -> Tuple[np.ndarray, Any]:
        """The volume normalised as the model was trained, cut into ``(N, C, H, W)`` slices, and the layout."""

    def slice_arrays(self, array_kji: np.ndarray, layout: Any) -> np.ndarray:
        """A (K, J, I) array of the same grid cut into (N, H, W) slices exactly like the image."""

    def reassemble(self, per_slice: np.ndarray, layout: Any) -> np.ndarray: ...

    def nonempty_slices(self, slices: np.ndarray) -> np.ndarray:
        """bool (N,): slices holding anything but background (the others are not run through the model)."""

    def make_segmenter(self, bundle: Any, device: str) -> SlicePredictorLike: ...

    def fit_bundle(self, backbone: Any, slices: np.ndarray, labels: np.ndarray, **kwargs: Any) -> Any: ...

    def refine_bundle(self, bundle: Any, slices: np.ndarray, labels: np.ndarray, **kwargs: Any) -> Any: ...

    def device_notes(self, device: str) -> Sequence[str]:
        """Lines to show before long work: running on the CPU, GPU memory short."""
