"""Interactive segmentation of one volume: segment, fit from labelled slices, refine from
corrections, and rank the slices the model is least sure of.

An :class:`InteractiveSession` remembers what it last produced for its volume: the model, the
normalised slices, the decoder features of every slice that went through the UNet (two bytes a value,
on the CPU), the labels it returned and the training slices. A user's corrections are found by
comparing an edited label volume with those labels slice by slice; the corrected slices join
the training slices, the head is fine-tuned warm-started on the cached features (with a few
uncorrected slices' previous result as anchors against forgetting) and re-applied to the
cached features of every other slice, with no UNet pass. That is why a Refine costs a fraction
of a full segmentation. Labelled and corrected slices are returned exactly as the user drew them.

The worker process (``tedm serve``), the Slicer module through it, ``tedm refine`` and the
benchmarks all use this one object.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch

from ..bundle import ModelBundle, save_bundle
from ..choices import AUTO, AXES, DEVICES, HEAD_METHODS
from ..errors import Cancelled, InputError
from ..io.volumes import Volume
from ..model.checkpoint import Backbone
from ..runtime import describe_device, free_device_memory, resolve_device
from ..slicing import SliceLayout, extract_slices, reassemble, slice_layout, to_slices
from .fit import choose_anchor_slices, fit_bundle, refine_bundle
from .segment import FeatureCache, Segmenter
from .volume import (
    as_anatomy,
    check_channels,
    is_whole_2d_image,
    nonempty_slice_mask,
    normalise_volume,
    resolve_axis,
)

log = logging.getLogger(__name__)

# Decoder features are cached (two bytes a value, on the CPU) only while they take at most this share of
# the installed memory, and never more than the cap; beyond it Refine runs the UNet again.
FEATURE_CACHE_MEMORY_SHARE = 0.25
FEATURE_CACHE_CAP_BYTES = 16 * 2**30
# Below this much free GPU memory, say so before long work: the segmenter then works in small
# batches (and halves them on out-of-memory), which is slow but does not fail.
LOW_GPU_MEMORY_BYTES = 3 * 2**30


class SessionError(InputError):
    """Something the user can fix (nothing drawn, nothing corrected, no result yet...)."""

    def __init__(self, problem: str) -> None:
        super().__init__(None, problem)


# Labels drawn in a view across the slicing plane (a sagittal view of an axial session) lie in a
# few planes of another axis yet touch many of the session's slices, each of which would then be
# learnt whole, unlabelled parts as background. "A few": the 1-3 slices a user labels or corrects.
FEW_PLANES = 3


@dataclass
class AcrossThePlane:
    """Touched voxels that lie in ``planes`` slices of ``plane`` (not the session's) and touch
    ``session_slices`` of the session's (:func:`drawn_across_the_plane`)."""

    plane: str
    planes: int
    session_plane: str
    session_slices: int

    @property
    def clearly(self) -> bool:
        """More than twice the 1-3 slices a user labels: no longer a small structure painted slice
        by slice in the session's plane, but a drawing across it (each structure's whole extent)."""
        return self.session_slices > 2 * FEW_PLANES

    def __str__(self) -> str:
        return (
            f"drawn on {self.planes} {self.plane} slice(s), they touch {self.session_slices} {self.session_plane} "
            "slices, each of which would count as labelled whole"
        )


def drawn_across_the_plane(
    touched: np.ndarray, layout: SliceLayout, ijk_to_ras: np.ndarray
) -> Optional[AcrossThePlane]:
    """Where the touched voxels (K, J, I) were drawn, when it is not the session's plane: they lie
    in at most ``FEW_PLANES`` slices of another plane and touch more of the session's slices. None
    otherwise (drawn in the session's plane, or in 3D). Small or thin structures labelled in the
    session's plane can look the same (a 3x3 lesion on 4 slices): see ``AcrossThePlane.clearly``."""
    touched = np.asarray(touched, dtype=bool)
    planes = [int(touched.any(axis=tuple(d for d in range(3) if d != dim)).sum()) for dim in range(3)]
    along_session = planes[layout.slice_dim]
    if along_session <= FEW_PLANES:
        return None
    for dim in (d for d in range(3) if d != layout.slice_dim):
        if 0 < planes[dim] <= FEW_PLANES:
            names = [a for a in AXES[:3] if slice_layout(ijk_to_ras, layout.grid, a).slice_dim == dim]
            plane = names[0] if names else f"voxel axis {'KJI'[dim]}"
            return AcrossThePlane(plane, planes[dim], layout.plane, along_session)
    return None


@dataclass
class Reporter:
    """How long work reports progress and log lines, and learns that the user cancelled."""

    progress: Callable[[float, str], None] = lambda fraction, message: None
    log: Callable[[str], None] = lambda message: None
    cancelled: Callable[[], bool] = lambda: False

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled("cancelled")

    def stage(self, start: float, end: float, what: str) -> Callable[..., None]:
        """The core's ``progress(done, total[, loss])`` mapped onto ``[start, end]`` of the job."""

        def report(done: int, total: int, loss: Optional[float] = None) -> None:
            fraction = start + (end - start) * (float(done) / max(1, int(total)))
            suffix = f", loss {loss:.4f}" if loss is not None else ""
            self.progress(fraction, f"{what} {done}/{total}{suffix}")

        return report


@dataclass
class SessionResult:
    """What one operation produced, on the volume's own grid."""

    operation: str  # segment, fit or refine
    labels: np.ndarray  # (K, J, I) uint8 class indices, 0 = background
    class_names: List[str]
    class_colours: List[Tuple[int, int, int]]  # 0-255 RGB per class, background first
    axis: str
    slices_run: int
    training_slices: List[int]
    changed_slices: List[int] = field(default_factory=list)
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)


@dataclass
class UncertainSlice:
    index: int  # slice index along the session's axis
    score: float  # mean prediction disagreement in the slice
    centre_ijk: Tuple[float, float, float]  # voxel coordinates of the slice's centre


def physical_memory_bytes() -> Optional[int]:
    """Installed RAM, where the OS tells (Linux, macOS); None elsewhere."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def default_feature_cache_limit() -> int:
    installed = physical_memory_bytes() or 8 * 2**30
    return int(min(FEATURE_CACHE_CAP_BYTES, installed * FEATURE_CACHE_MEMORY_SHARE))


def feature_cache_bytes(bundle: ModelBundle, slice_count: int) -> int:
    """Bytes of the cached (two-byte) decoder features the head reads, for ``slice_count`` slices."""
    config = bundle.backbone.config
    levels = bundle.head.config.levels if bundle.head is not None else None
    levels = range(len(config.channels)) if levels is None else levels
    per_map = sum(config.decoder_channels[i] * (config.image_size // config.decoder_strides[i]) ** 2 for i in levels)
    orientations = 2 if bundle.test_time_flip else 1  # the mirrored slices' features are kept too
    return per_map * max(1, len(bundle.prediction_timesteps)) * 2 * int(slice_count) * orientations


def device_notes(device: str) -> List[str]:
    """Lines to show before long work: where it runs, and whether GPU memory is short."""
    resolved = resolve_device(device)
    notes = [f"Running on {describe_device(resolved)}."]
    if resolved.type == "cpu" and device != "cpu" and not torch.cuda.is_available():
        notes.append("No CUDA GPU is visible to PyTorch (CPU build of torch, or no NVIDIA driver): running on the CPU.")
    free = free_device_memory(resolved)
    if free is not None and free < LOW_GPU_MEMORY_BYTES:
        notes.append(
            f"GPU memory is short ({free / 2**30:.1f} GiB free): slices go through in small batches. "
            "Close other GPU programs, or choose the CPU if it fails."
        )
    return notes


def slice_scores(uncertainty: np.ndarray) -> np.ndarray:
    """(N, H, W) spread of the per-timestep (and per-head) predictions -> (N,) its mean per slice."""
    return np.asarray(uncertainty, dtype=np.float64).reshape(len(uncertainty), -1).mean(axis=1)


Model = Union[ModelBundle, Backbone]
Operation = TypeVar("Operation", bound=Callable[..., "SessionResult"])


def all_or_nothing(operation: Operation) -> Operation:
    """A session operation that, when it fails or is cancelled, leaves the session as it was.

    An operation changes the session step by step (axis, slices, model, features, result), and
    Refine compares the user's labels with the last result cut along the session's axis: a Fit
    cancelled after it re-cut the volume along another axis left the old result beside the new
    slicing, so Refine took unchanged slices for corrections (or failed to broadcast). Everything
    but the feature cache is restored from references (no copy). The cache is dropped before a new
    one is computed, to keep one in memory, not two: when the failed operation had dropped it,
    Refine runs the UNet again for the slices it needs."""

    @functools.wraps(operation)
    def run(session: InteractiveSession, *args, **kwargs):
        saved = {k: v for k, v in vars(session).items() if k not in ("features", "feature_rows")}
        feature_rows = session.feature_rows
        try:
            return operation(session, *args, **kwargs)
        except BaseException:
            features_kept = session._feature_generation == saved["_feature_generation"]
            vars(session).update(saved)
            if session._segmenter is not None and session._segmenter.closed:
                # Closed by the failed operation (a new model, another device) before it failed:
                # a closed segmenter cannot predict, the next operation makes a new one.
                session._segmenter = None
            if features_kept:
                session.feature_rows = feature_rows
            else:
                session.features = None
                session.feature_rows = np.full(0 if session.slices is None else len(session.slices), -1, np.int64)
            raise

    return run  # type: ignore[return-value]


class InteractiveSession:
    """Segment / fit / refine one volume and remember what was produced, for Refine.

    Args:
        volume: the image (raw intensities, every channel of the model, one voxel grid).
        feature_cache_limit_bytes: keep decoder features for Refine up to this size
            (default: a quarter of the installed memory, at most 16 GiB).
    """

    def __init__(self, volume: Volume, feature_cache_limit_bytes: Optional[int] = None) -> None:
        self.volume = volume
        self.feature_cache_limit_bytes = (
            default_feature_cache_limit() if feature_cache_limit_bytes is None else int(feature_cache_limit_bytes)
        )
        self.bundle: Optional[ModelBundle] = None
        self.device = "auto"
        self.axis: Optional[str] = None
        self.slices: Optional[np.ndarray] = None  # (N, C, H, W) normalised model inputs
        self.layout: Optional[SliceLayout] = None
        self.features: Optional[FeatureCache] = None
        self.feature_rows = np.zeros(0, dtype=np.int64)  # row of slice n in features; -1: not cached
        self._feature_generation = 0  # counts the caches dropped (all_or_nothing)
        self.written = np.zeros((0, 0, 0), dtype=np.uint8)  # (N, H, W) the labels last returned
        self.scores = np.zeros(0)  # (N,) mean prediction disagreement per slice
        self.training_slices: List[int] = []
        # Whether the current model was fitted on labels of this volume (fit), rather than
        # loaded from elsewhere (segment): only then does Refine keep its earlier result.
        self.fitted_here = False
        self.visited_uncertain: List[int] = []
        self._segmenter: Optional[Segmenter] = None

    # -- the three operations -------------------------------------------------------------------
    @all_or_nothing
    def segment(
        self, bundle: ModelBundle, axis: str = AUTO, device: str = "auto", reporter: Optional[Reporter] = None
    ) -> SessionResult:
        """Segment every slice with ``bundle``; forgets earlier training slices."""
        reporter = reporter or Reporter()
        tic = time.perf_counter()
        notes = self._start(bundle, axis, device, reporter)
        self._prepare_slices(bundle.intensity)
        reporter.check()
        labels, uncertainty, slices_run = self._predict(reporter, 0.02, 0.98)
        self._remember(labels, uncertainty, [])
        return self._result("segment", tic, slices_run, notes=notes)

    @all_or_nothing
    def fit(
        self,
        model: Model,
        drawn: np.ndarray,
        class_names: Sequence[str],
        method: str = "tedm",
        class_colours: Optional[Sequence[Sequence[int]]] = None,
        axis: str = AUTO,
        device: str = "auto",
        steps: Optional[int] = None,
        seed: int = 0,
        reporter: Optional[Reporter] = None,
    ) -> SessionResult:
        """Fit a new model from the slices labelled in ``drawn`` and segment every other slice.

        ``model`` is a pretrained backbone, or a bundle whose backbone is reused. ``drawn`` is a
        (K, J, I) volume of class indices into ``class_names`` (background first); every slice
        holding any label is learnt from, and comes back exactly as drawn.
        """
        reporter = reporter or Reporter()
        if method not in HEAD_METHODS:
            raise SessionError(f"unknown method {method!r}; expected one of {', '.join(HEAD_METHODS)}")
        backbone = model.backbone if isinstance(model, ModelBundle) else model
        tic = time.perf_counter()
        notes = self._start(model, axis, device, reporter, channel_names=backbone.channel_names)
        self._prepare_slices(backbone.intensity)
        drawn = self._check_labels(drawn, len(class_names))
        drawn_slices = self._cut(drawn)
        labelled = [int(i) for i in np.flatnonzero(drawn_slices.reshape(len(drawn_slices), -1).any(axis=1))]
        if not labelled:
            raise SessionError(f"nothing is labelled: paint every structure on 1-3 {self.axis} slices first")
        across = drawn_across_the_plane(drawn > 0, self.layout, self.volume.ijk_to_ras)
        if across and across.clearly:
            raise SessionError(
                f"the labels were {across}: set the slicing axis to the plane you labelled in, or label 1-3 "
                f"{self.layout.plane} slices"
            )
        if across:
            reporter.log(
                f"Warning: the labels were {across}. If you labelled in a view across the slicing plane, "
                f"label 1-3 {self.layout.plane} slices instead (or set the slicing axis to that plane)."
            )
        reporter.log(f"Fitting {method} on {len(labelled)} labelled slice(s): {', '.join(map(str, labelled))}.")
        self.bundle = fit_bundle(
            backbone,
            self.slices[labelled],
            drawn_slices[labelled],
            method=method,
            class_names=list(class_names),
            label_values=list(range(len(class_names))),
            class_colours=class_colours,
            axis=self.axis,
            steps=steps,
            seed=seed,
            device=self.device,
            progress=reporter.stage(0.02, 0.5, "training step"),
            cancel=reporter.cancelled,
            show_progress=False,
            **self._per_image_options(),
        )
        self.fitted_here = True
        reporter.check()
        labels, uncertainty, slices_run = self._predict(reporter, 0.5, 0.98)
        labels[labelled] = drawn_slices[labelled]  # the user's slices are kept exactly as drawn
        self._remember(labels, uncertainty, labelled)
        return self._result("fit", tic, slices_run, changed=labelled, notes=notes)

    @all_or_nothing
    def refine(
        self,
        edited: np.ndarray,
        steps: Optional[int] = None,
        device: Optional[str] = None,
        reporter: Optional[Reporter] = None,
    ) -> SessionResult:
        """Learn from the slices of ``edited`` (K, J, I) that differ from the last result."""
        reporter = reporter or Reporter()
        bundle = self._require_result()
        if bundle.head is None:
            raise SessionError("the supervised baseline cannot be refined: fit it again with the new labels")
        tic = time.perf_counter()
        if device is not None:
            self._set_device(device)
        edited_slices = self._cut(self._check_labels(edited, len(bundle.class_names)))
        changed = self.changed_slices(edited)
        if not changed:
            raise SessionError("no slice differs from the last result: correct some slices, then Refine")
        training = sorted(set(self.training_slices) | set(changed))
        reporter.log(f"Corrected slices: {', '.join(map(str, changed))}; training on {len(training)} slice(s).")
        touched = reassemble(edited_slices != self.written, self.layout)
        across = drawn_across_the_plane(touched, self.layout, self.volume.ijk_to_ras)
        if across:
            # Not refused: a thin structure corrected slice by slice looks the same from here.
            reporter.log(
                f"Warning: your corrections were {across}. If you corrected in a view across the slicing plane, "
                f"undo, correct in a {self.layout.plane} view and Refine again."
            )
        # The earlier result is kept on a few uncorrected slices (anchors) only when it was learnt
        # from this volume's own labels. A model fitted elsewhere can be far off here, and holding
        # it to its own result held its errors: on two validation BraTS subjects (issue 10,
        # docs/results/REFINE_VALIDATION.md) mean whole-tumour Dice after 3 / 5 rounds of
        # corrections was 75.7 / 75.8 with anchors, 88.6 / 91.0 without. Its first Refine is held
        # near the loaded weights instead (refine_bundle, fit.REFINE_PULL_TO_START: sessions 18, 23).
        anchors = (
            choose_anchor_slices(self.written, self.scores, self._anchor_candidates(training))
            if self.fitted_here
            else []
        )
        if anchors:
            reporter.log(f"Keeping the previous result of slice(s) {', '.join(map(str, anchors))} against forgetting.")
        elif not self.fitted_here:
            # Measured on the demo's model (README, correct-and-refine, session 17): corrections
            # can make a loaded model's other slices worse; the user should know what to do then.
            reporter.log(
                "This model was not fitted on this volume, so Refine learns from your corrections alone "
                "(from the first two, staying near the model); if other slices get worse, Segment again "
                "with the saved model or fit from a few labelled slices."
            )
        self.bundle = refine_bundle(
            bundle,
            self.slices[training],
            edited_slices[training],
            steps=steps,
            device=self.device,
            progress=reporter.stage(0.0, 0.8, "refine step"),
            cancel=reporter.cancelled,
            features=self._cached(training),
            anchor_slices=self.slices[anchors] if anchors else None,
            anchor_labels=self.written[anchors] if anchors else None,
            anchor_features=self._cached(anchors) if anchors else None,
            show_progress=False,
            precision=self._segmenter_for(bundle).precision,  # (bf16 where it paid the passes: fit.refine_bundle)
            **self._per_image_options(),
        )
        reporter.check()
        labels, uncertainty, slices_run = self._reapply_head(reporter, 0.8, 0.98)
        labels[training] = edited_slices[training]  # labelled and corrected slices stay as drawn
        self._remember(labels, uncertainty, training)
        return self._result("refine", tic, slices_run, changed=changed)

    # -- what the user looks at next ------------------------------------------------------------
    def changed_slices(self, edited: np.ndarray) -> List[int]:
        """Slices where ``edited`` (K, J, I) differs from the last result."""
        self._require_result()
        edited_slices = self._cut(np.asarray(edited))
        differs = (edited_slices != self.written).reshape(len(edited_slices), -1).any(axis=1)
        return [int(i) for i in np.flatnonzero(differs)]

    def uncertain_slices(self, count: Optional[int] = None) -> List[UncertainSlice]:
        """Slices ranked by prediction disagreement (most uncertain first), training slices left out."""
        self._require_result()
        centres = self._slice_centres_ijk()
        training = set(self.training_slices)
        ranked = [int(i) for i in np.argsort(-self.scores, kind="stable") if int(i) not in training]
        if count is not None:
            ranked = ranked[: max(0, int(count))]
        return [UncertainSlice(i, float(self.scores[i]), tuple(float(v) for v in centres[i])) for i in ranked]

    def next_uncertain_slice(self) -> Optional[UncertainSlice]:
        """The most uncertain slice not yet offered since the last result (then starts over)."""
        ranked = self.uncertain_slices()
        if not ranked:
            return None
        for candidate in ranked:
            if candidate.index not in self.visited_uncertain:
                self.visited_uncertain.append(candidate.index)
                return candidate
        self.visited_uncertain = [ranked[0].index]
        return ranked[0]

    def save_model(self, path: Union[str, Path], overwrite: bool = False) -> Path:
        """Save the model behind the last result (fitted or refined) as a bundle folder."""
        return save_bundle(self._require_result(), path, overwrite=overwrite)

    @property
    def feature_cache_nbytes(self) -> int:
        return 0 if self.features is None else self.features.nbytes

    def forget_features(self) -> None:
        """Let go of the cached decoder features (memory); the next Refine runs the UNet again."""
        self.features = None

    def close(self) -> None:
        """Let go of the features (they can take gigabytes) and the segmenter."""
        self._release_segmenter()
        self.features = None

    # -- internals --------------------------------------------------------------------------------
    def _start(
        self,
        model: Model,
        axis: str,
        device: str,
        reporter: Reporter,
        channel_names: Optional[Sequence[str]] = None,
    ) -> List[str]:
        check_channels(self.volume, channel_names or model.channel_names)
        self._set_device(device)
        model_axis = model.axis if isinstance(model, ModelBundle) else None
        new_axis = self._resolve_axis(axis, model_axis)
        if new_axis != self.axis:
            self.slices, self.layout = None, None
        self.axis = new_axis
        if isinstance(model, ModelBundle):
            if model is not self.bundle:
                self._release_segmenter()
            self.bundle = model
        self.training_slices, self.visited_uncertain = [], []
        self.fitted_here = False
        notes = device_notes(self.device)
        for note in notes:
            reporter.log(note)
        return notes

    def _set_device(self, device: str) -> None:
        device = (device or "auto").lower()
        if device not in DEVICES and not device.startswith("cuda:"):
            raise SessionError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
        if device != self.device:
            self._release_segmenter()
        self.device = device

    def _resolve_axis(self, axis: str, model_axis: Optional[str]) -> str:
        axis = (axis or AUTO).lower()
        if axis not in AXES + (AUTO,):
            raise SessionError(f"unknown slicing axis {axis!r}; expected {AUTO} or one of {', '.join(AXES)}")
        return resolve_axis(self.volume, (model_axis or "axial") if axis == AUTO else axis)

    def _prepare_slices(self, intensity) -> None:
        # Normalisation depends on the model's intensity convention: recompute for every model.
        self.slices, self.layout = extract_slices(normalise_volume(self.volume, intensity), self.axis)
        self.slices = np.asarray(self.slices, dtype=np.float32)

    def _cut(self, array_kji: np.ndarray) -> np.ndarray:
        """A (K, J, I) array cut into slices exactly like the image (same voxels per slice)."""
        return np.ascontiguousarray(to_slices(np.asarray(array_kji), self.layout))

    def _check_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.shape != tuple(self.volume.shape):
            raise SessionError(f"the label volume is {labels.shape}, the image {tuple(self.volume.shape)}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise SessionError(f"label values must be class indices 0..{num_classes - 1}, found up to {labels.max()}")
        return labels.astype(np.uint8)

    def _require_result(self) -> ModelBundle:
        if self.bundle is None or self.layout is None or not len(self.written):
            raise SessionError("nothing was segmented in this session yet: Segment (or Fit) first")
        return self.bundle

    def _segmenter_for(self, bundle: ModelBundle) -> Segmenter:
        previous = self._segmenter
        if previous is not None and previous.bundle is bundle:
            return previous
        if previous is not None and previous.serves_head_of(bundle):
            self._segmenter = previous.with_head_of(bundle)  # a Refine's head: the UNet shared
        else:
            self._release_segmenter()
            self._segmenter = Segmenter(bundle, device=self.device, **self._per_image_options())
        return self._segmenter

    def _per_image_options(self) -> dict:
        """No dark-border cropping and no anatomy post-processing on the slices of a volume
        (``pipelines.volume.is_whole_2d_image``): the keywords that turn them off for a segmenter,
        a fit or a refine (so a model fitted here on a volume records no rule), else nothing."""
        if is_whole_2d_image(self.layout.num_slices):
            return {}
        return {"crop_dark_borders": False, "postprocess": False}

    def _release_segmenter(self) -> None:
        if self._segmenter is not None:
            self._segmenter.close()  # frees its copy of the model on a GPU; a new segmenter makes its own
        self._segmenter = None

    def _predict(self, reporter: Reporter, start: float, end: float) -> Tuple[np.ndarray, np.ndarray, int]:
        """Every slice that holds image content through the model (background-only slices are
        label 0 with zero disagreement, as in ``segment_volume``), keeping the features."""
        bundle = self.bundle
        run = np.flatnonzero(nonempty_slice_mask(self.slices))
        n, _, height, width = self.slices.shape
        labels = np.zeros((n, height, width), dtype=np.uint8)
        uncertainty = np.zeros((n, height, width), dtype=np.float32)
        self.features, self.feature_rows = None, np.full(n, -1, dtype=np.int64)
        self._feature_generation += 1
        if len(run):
            keep = bundle.head is not None and feature_cache_bytes(bundle, len(run)) <= self.feature_cache_limit_bytes
            if bundle.head is not None and not keep:
                reporter.log(
                    "This volume's decoder features are too large to keep in memory: Refine will run the UNet again."
                )
            prediction = self._segmenter_for(bundle).predict(
                self.slices[run],
                progress=reporter.stage(start, end, "slice"),
                cancel=reporter.cancelled,
                keep_features=keep,
            )
            labels[run], uncertainty[run] = prediction.labels, prediction.uncertainty
            if prediction.features is not None:
                self.features = prediction.features
                self.feature_rows[run] = np.arange(len(run))
        reporter.log(f"{len(run)} of {n} slices hold image content and went through the model.")
        return as_anatomy(labels, self._segmenter_for(bundle), n), uncertainty, int(len(run))

    def _reapply_head(self, reporter: Reporter, start: float, end: float) -> Tuple[np.ndarray, np.ndarray, int]:
        """The refined head on the cached features of every slice: no UNet pass."""
        if self.features is None:
            return self._predict(reporter, start, end)
        prediction = self._segmenter_for(self.bundle).predict_from_features(
            self.features, progress=reporter.stage(start, end, "slice")
        )
        run = np.flatnonzero(self.feature_rows >= 0)
        n, _, height, width = self.slices.shape
        labels = np.zeros((n, height, width), dtype=np.uint8)
        uncertainty = np.zeros((n, height, width), dtype=np.float32)
        labels[run] = prediction.labels[self.feature_rows[run]]
        uncertainty[run] = prediction.uncertainty[self.feature_rows[run]]
        return as_anatomy(labels, self._segmenter_for(self.bundle), n), uncertainty, int(len(run))

    def _cached(self, indices: Sequence[int]):
        """The cached features of these slices (per level), or None when any is not cached."""
        rows = self.feature_rows[list(indices)]
        if self.features is None or not (rows >= 0).all():
            return None
        return self.features.select(rows.tolist()).levels

    def _anchor_candidates(self, training: Sequence[int]) -> List[int]:
        ran = self.feature_rows >= 0 if self.features is not None else nonempty_slice_mask(self.slices)
        excluded = set(training)
        return [int(i) for i in np.flatnonzero(ran) if int(i) not in excluded]

    def _remember(self, labels: np.ndarray, uncertainty: np.ndarray, training: Sequence[int]) -> None:
        self.written = labels
        self.scores = slice_scores(uncertainty)
        self.scores[list(training)] = 0.0
        self.training_slices = sorted(int(i) for i in training)
        self.visited_uncertain = []

    def _result(
        self, operation: str, tic: float, slices_run: int, changed: Sequence[int] = (), notes: Sequence[str] = ()
    ) -> SessionResult:
        bundle = self.bundle
        return SessionResult(
            operation=operation,
            labels=np.asarray(reassemble(self.written, self.layout), dtype=np.uint8),
            class_names=list(bundle.class_names),
            class_colours=[tuple(int(v) for v in c) for c in bundle.class_colours],
            axis=str(self.axis),
            slices_run=slices_run,
            training_slices=list(self.training_slices),
            changed_slices=[int(i) for i in changed],
            seconds=time.perf_counter() - tic,
            notes=list(notes),
        )

    def _slice_centres_ijk(self) -> np.ndarray:
        """(N, 3) voxel coordinates (i, j, k) of every slice's centre: the slicing is applied to
        voxel-index arrays, so it holds for any axis and any flips the display rule applies."""
        shape = self.volume.shape
        centres = []
        for axis_index in (2, 1, 0):  # i, j, k
            index = np.arange(shape[axis_index], dtype=np.float32).reshape(
                [-1 if a == axis_index else 1 for a in range(3)]
            )
            per_slice = self._cut(np.broadcast_to(index, shape))
            centres.append(per_slice.reshape(len(per_slice), -1).mean(axis=1))
        return np.stack(centres, axis=1)
