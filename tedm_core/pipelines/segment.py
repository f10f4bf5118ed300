"""Segment slices with a bundle: model grid -> decoder features -> head -> probabilities on the original grid.

The unit of work is a stack of normalised 2D slices ``(N, C, H, W)``: a radiograph is one slice,
a volume is sliced by ``tedm_core.slicing`` and reassembled after. Probabilities are resized
back to the original grid before the label decision (argmax), never the labels.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..bundle import ModelBundle, model_fingerprint
from ..errors import Cancelled, SettingError
from ..features import (
    DecoderFeatureExtractor,
    LevelFeatures,
    in_weights_precision,
    measured_pass_precision,
    unet_for_passes,
    weights_dtype,
)
from ..heads import (
    CPU_PREDICT_MAPS_PER_CHUNK,
    class_labels,
    class_probabilities,
    in_head_order,
    prediction_timesteps_problem,
)
from ..preprocessing.framing import (
    Box,
    crop_to_content,
    fill_outside,
    foreground_box,
    full_box,
    grown_to_few_lengths,
    is_empty_box,
    uncrop,
    union_box,
)
from ..preprocessing.spatial import GridTransform, from_model_grid, model_grid_window, to_model_grid
from ..runtime import (
    autocast,
    describe_device,
    map_in_chunks,
    module_on,
    plan_batch_size,
    resolve_device,
    resolve_memory_format,
    tensor_of,
)

log = logging.getLogger(__name__)

# Planning the batch from free GPU memory: one slice costs, per timestep copy, about this many
# float32 maps of the UNet's first-level width at the model resolution (the skip connections the
# encoder keeps for the decoder, plus a residual block's transient maps). An allowance, not a
# measurement; a CUDA out-of-memory error halves the batch anyway (runtime.map_in_chunks).
UNET_MAPS_PER_COPY = 24
# On the CPU one slice (its |S| = 8 timestep copies) per UNet call: measured on the project's
# 2-core machines as fast as 2 or 4 slices per call (fp32, session 4), and again with bf16 passes
# (session 28: `run_batch` of the benchmark's BraTS volume with `batch_size` 1 and 2, medians of
# 3 interleaved runs: 28.4 against 28.3 s on one thread, 17.5 against 17.5 s on two, labels
# identical), while the live peak grows with the maps (3.5 MiB per bf16 map at 64 px,
# benchmarks/maps_per_call.py: MONAI's blocks keep un-fused norm/activation copies).
CPU_SLICES_PER_CALL = 1
Progress = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


def cache_dtype(dtype: torch.dtype) -> torch.dtype:
    """The two-byte dtype features of ``dtype`` are cached in: bf16 as is, anything else float16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def join_maps(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chunks of (n, S, C, h, w) features joined along the slices, each (slice, timestep) map
    channels-last, so that the head's (n * S, C, h, w) view of a few slices needs no copy.

    ``torch.cat`` would return them contiguous, and re-applying a refined head to a BraTS
    volume's cache then spent a fifth of its time converting them back (one thread:
    ``benchmarks/benchmark.py --refine-only --profile-refine``; docs/results/PERFORMANCE.md,
    session 17)."""
    _, s, c, h, w = parts[0].shape
    total = sum(p.shape[0] for p in parts)
    joined = torch.empty((total, s, h, w, c), dtype=parts[0].dtype, device=parts[0].device).permute(0, 1, 4, 2, 3)
    start = 0
    for part in parts:
        joined[start : start + part.shape[0]].copy_(part)
        start += part.shape[0]
    return joined


def certain_background(num_classes: int) -> List[float]:
    """The class probabilities of a pixel that is background for certain (outside a slice's
    content or foreground box)."""
    return [1.0] + [0.0] * (num_classes - 1)


# What a chunk of slices leaves for the cache: its features, the dark-border crop boxes they were
# taken from, and the slices' foreground boxes.
Kept = Tuple[LevelFeatures, List[Box], List[Box]]


@dataclass
class FeatureCache:
    """Decoder features of segmented slices (on the CPU, two bytes a value), kept so that a
    refined head can be re-applied without running the UNet again.

    bf16 passes' features are kept as they came (bf16: exact), fp32 passes' as float16; each
    (slice, timestep) map channels-last, as the UNet gave it and the head reads it: re-applying
    a head then converts nothing (:func:`cache_dtype`, :func:`join_maps`)."""

    levels: LevelFeatures  # per level (N, S, C_l, h_l, w_l), bfloat16 or float16
    transform: GridTransform
    # The same for the left-right mirrored slices, when the segmenter predicted with test-time
    # flipping: re-applying a head then averages both, as the first prediction did.
    flipped: Optional[LevelFeatures] = None
    # Per slice, the content box its features were taken from when dark borders were cropped
    # (preprocessing.framing), of the mirrored slices too; None: the whole slice.
    boxes: Optional[List[Box]] = None
    flipped_boxes: Optional[List[Box]] = None
    # Per slice (after any cropping), the box of its voxels above background, where the head is
    # applied (framing.foreground_box), of the mirrored slices too; None: the whole slice.
    foreground: Optional[List[Box]] = None
    flipped_foreground: Optional[List[Box]] = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.levels + (self.flipped or []))

    def select(self, indices: Sequence[int]) -> FeatureCache:
        """These slices' features."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        pick = lambda levels: [t.index_select(0, index) for t in levels]  # noqa: E731
        pick_boxes = lambda boxes: None if boxes is None else [boxes[i] for i in index.tolist()]  # noqa: E731
        return FeatureCache(
            pick(self.levels),
            self.transform,
            pick(self.flipped) if self.flipped else None,
            pick_boxes(self.boxes),
            pick_boxes(self.flipped_boxes),
            pick_boxes(self.foreground),
            pick_boxes(self.flipped_foreground),
        )

    def select_timesteps(self, positions: Sequence[int]) -> FeatureCache:
        """These timesteps' features (positions in the cached timesteps), for every slice."""
        index = torch.as_tensor(list(positions), dtype=torch.long)
        pick = lambda levels: [t.index_select(1, index) for t in levels]  # noqa: E731
        return FeatureCache(
            pick(self.levels),
            self.transform,
            pick(self.flipped) if self.flipped else None,
            self.boxes,
            self.flipped_boxes,
            self.foreground,
            self.flipped_foreground,
        )


@dataclass
class SlicePrediction:
    probabilities: np.ndarray  # (N, K, H, W) float32, background first
    uncertainty: np.ndarray  # (N, H, W) float32: spread of the per-timestep probabilities
    features: Optional[FeatureCache] = None

    @property
    def labels(self) -> np.ndarray:
        return class_labels(torch.from_numpy(self.probabilities)).numpy()


class Segmenter:
    """Applies a :class:`ModelBundle` to slices, on the GPU or CPU, in memory-aware chunks.

    Args:
        bundle: the model.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: slices per UNet call (each slice is run once per timestep); default: what
            half of the free GPU memory holds, or ``CPU_SLICES_PER_CALL`` on the CPU. Halved automatically
            on CUDA OOM.
        precision: ``auto`` (bf16 on CUDA cards with native bf16, compute capability 8.0+; on a CPU measured, see
            :func:`~tedm_core.runtime.resolve_inference_precision`), ``fp32`` or ``bf16``.
        timesteps: predict with a subset of the head's timesteps (single-step ablations).
        memory_format: ``auto`` (channels-last on the CPU, where it measured faster), ``channels_last``
            or ``contiguous`` (the UNet as stored). Channels-last runs a private copy of the UNet, so
            the bundle's own weights, shared with fitting and refining, are never changed.
        test_time_flip: also predict every slice mirrored left-right and average the two
            (default: what the bundle records, ``ModelBundle.test_time_flip``). Twice the work.
        crop_dark_borders: crop each slice's dark border bands first and paste its result back
            (default: what the bundle records, ``ModelBundle.crop_dark_borders``).
        postprocess: False: no anatomy post-processing of whole 2D images' labels (default: the
            bundle's ``ModelBundle.component_rule``, kept as ``component_rule``; applied by
            ``pipelines.volume.segment_volume``, never to raw probabilities).
    """

    def __init__(
        self,
        bundle: ModelBundle,
        device: str = "auto",
        batch_size: Optional[int] = None,
        precision: str = "auto",
        timesteps: Optional[Sequence[int]] = None,
        memory_format: str = "auto",
        test_time_flip: Optional[bool] = None,
        crop_dark_borders: Optional[bool] = None,
        postprocess: Optional[bool] = None,
    ) -> None:
        self.bundle = bundle
        self.postprocess = postprocess
        self.component_rule = None if postprocess is False else bundle.component_rule
        self.test_time_flip = bool(bundle.test_time_flip if test_time_flip is None else test_time_flip)
        self.crop_dark_borders = bool(bundle.crop_dark_borders if crop_dark_borders is None else crop_dark_borders)
        self.device = resolve_device(device)
        self.memory_format = resolve_memory_format(memory_format, self.device)
        self.timesteps = tuple(int(t) for t in timesteps) if timesteps else bundle.prediction_timesteps
        if timesteps and bundle.head is None:
            raise SettingError("timesteps", "the supervised baseline has no timesteps to choose")
        if bundle.head is not None:
            bundle.backbone.noise_schedule.validate_timesteps(self.timesteps)
            problem = prediction_timesteps_problem(self.timesteps, bundle.head.config)
            if problem:
                raise SettingError("timesteps", problem)
            self.timesteps = in_head_order(self.timesteps, bundle.head.config)
        # On another device than the bundle's modules, this segmenter's own copies there: they are
        # shared (the worker's model cache serves every session) and never moved. On their device
        # (a CPU segmenter of a loaded bundle) the bundle's own, not a copy: memory counts there.
        unet = module_on(bundle.backbone.unet, self.device).eval()
        if self.memory_format == torch.channels_last:
            # Changing the layout changes the weights: only ever of a private copy.
            unet = (copy.deepcopy(unet) if unet is bundle.backbone.unet else unet).to(memory_format=torch.channels_last)
        if bundle.head is not None:
            self.head = module_on(bundle.head, self.device).eval()
            self.extractor = DecoderFeatureExtractor(unet, bundle.backbone.noise_schedule, bundle.head.config.levels)
        else:
            self.head, self.extractor = None, None
        self.unet = unet
        self.closed = False
        size = bundle.image_size
        self.precision = self._pass_precision(precision)
        # bf16 passes run a bf16 copy of the UNet (features.unet_for_passes), one for the extractor
        # and the baseline alike; the fp32 private copy, if one was made, goes.
        self.unet = unet_for_passes(unet, self.precision)
        if self.extractor is not None:
            self.extractor = DecoderFeatureExtractor(
                self.unet, bundle.backbone.noise_schedule, bundle.head.config.levels
            )
        per_slice = (
            max(1, len(self.timesteps)) * size * size * bundle.backbone.config.channels[0] * 4 * UNET_MAPS_PER_COPY
        )
        self.batch_size = plan_batch_size(batch_size, per_slice, self.device, cpu_default=CPU_SLICES_PER_CALL)
        log.info(
            "segmenting on %s, %s, %d slices per batch", describe_device(self.device), self.precision, self.batch_size
        )

    def serves_head_of(self, bundle: ModelBundle) -> bool:
        """Whether ``bundle`` differs from this open segmenter's model in its head's weights alone
        (a Refine's result: the same backbone object, a head of the same design, the same timesteps
        and settings), so that :meth:`with_head_of` can serve it."""
        mine = self.bundle
        return (
            not self.closed
            and bundle.backbone is mine.backbone
            and bundle.head is not None
            and mine.head is not None
            and bundle.head.config == mine.head.config
            and bundle.prediction_timesteps == mine.prediction_timesteps
            and (bundle.test_time_flip, bundle.crop_dark_borders) == (mine.test_time_flip, mine.crop_dark_borders)
        )

    def with_head_of(self, bundle: ModelBundle) -> Segmenter:
        """A segmenter of ``bundle`` (see :meth:`serves_head_of`) with this one's settings, sharing
        its UNet copies and measured precision instead of making them again: a new Segmenter
        took 0.11 s of each Refine (deep copies of the UNet; cProfile, session 22). Closing either leaves the other
        working: closing drops references, and the UNet's memory goes when neither holds it."""
        if not self.serves_head_of(bundle):
            raise ValueError("with_head_of takes a model that differs from this open segmenter's in its head alone")
        refined = copy.copy(self)
        refined.bundle = bundle
        refined.head = module_on(bundle.head, self.device).eval()
        refined.component_rule = None if self.postprocess is False else bundle.component_rule
        return refined

    def _pass_precision(self, precision: str) -> str:
        """``auto``: measured on this machine, for passes shaped as this segmenter's (one slice
        per timing: the CPU runs one per call, and the choice does not depend on the batch)."""
        size = self.bundle.image_size
        if self.extractor is not None:
            return self.extractor.pass_precision(
                precision, self.device, size, self.timesteps, memory_format=self.memory_format
            )
        return measured_pass_precision(
            self.unet, self._baseline_logits, precision, self.device, size, self.memory_format
        )

    @property
    def gives_uncertainty(self) -> bool:
        """Whether predictions come from several maps whose spread is the uncertainty (a shared
        head over two or more timesteps, or several heads); otherwise the spread would be zero
        everywhere."""
        return self.head is not None and self.head.maps_per_prediction(len(self.timesteps)) > 1

    def provenance(self) -> Dict[str, object]:
        """What decides this segmenter's outputs (the model's content and the timesteps used),
        for the record an output folder keeps; device and precision change only float rounding."""
        return {
            "model": str(self.bundle.source)
            if self.bundle.source is not None
            else f"an unsaved {self.bundle.method} model",
            "model_sha256": model_fingerprint(self.bundle),
            "timesteps": list(self.timesteps),
            "device": str(self.device),
            "precision": self.precision,
            "test_time_flip": self.test_time_flip,
            "crop_dark_borders": self.crop_dark_borders,
            # The model's own settings are in its content hash; these are this segmenter's
            # departures from them, which change the outputs as much (None: none).
            "prediction_overrides": {
                name: value
                for name, value in (
                    ("test_time_flip", self.test_time_flip),
                    ("crop_dark_borders", self.crop_dark_borders),
                )
                if value != bool(getattr(self.bundle, name))
            }
            or None,
            "postprocess": self.component_rule.to_dict() if self.component_rule is not None else None,
        }

    def close(self) -> None:
        """Let go of this segmenter's model: its own copies on a GPU are freed at once, and the
        GPU's cached memory goes back to the driver (other programs, or the next segmenter). The
        bundle's modules, which others may share, stay as they are. Nothing can be predicted after."""
        self.unet = self.head = self.extractor = None
        self.closed = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this segmenter was closed; make a new one to predict")

    def _to_device(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.to(self.device).contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def _features(self, grid: torch.Tensor, cancel: Optional[CancelCheck] = None) -> LevelFeatures:
        # No autocast: in bf16 the extractor runs its own bf16 copy of the UNet (unet_for_passes).
        return self.extractor(self._to_device(grid), self.timesteps, cancel=cancel)

    @torch.inference_mode()
    def _head_predict(
        self, levels: LevelFeatures, transform: GridTransform, foreground: Optional[Sequence[Box]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, uncertainty) on the slices' grid of the head on ``levels`` (N slices),
        applied in each slice's ``foreground`` box alone (default: everywhere): outside it certain
        background, without disagreement, as in a slice skipped whole.

        The head computes the model-grid window that resizing back reads for the box
        (``spatial.model_grid_window``), so the box's values are those of the whole grid's; the
        box is a quarter of a BraTS slice's area on average (docs/results/PERFORMANCE.md,
        session 25)."""
        n, size, n_classes = levels[0].shape[0], transform.size, self.bundle.num_classes
        foreground = list(foreground) if foreground is not None else [full_box((transform.height, transform.width))] * n
        probabilities = torch.zeros((n, n_classes, size, size), device=self.device)
        probabilities[:, 0] = 1.0
        uncertainty = torch.zeros((n, size, size), device=self.device)
        for start, stop in self._head_groups(n):
            window = grown_to_few_lengths(
                union_box([model_grid_window(box, transform) for box in foreground[start:stop]]), size
            )
            if is_empty_box(window):
                continue
            top, bottom, left, right = window
            # Features stay in their dtype (two bytes when cached): the head converts a few maps at a
            # time, which saves a full-size float32 copy of the chunk. The head runs in the precision
            # measured for the UNet: bf16 halves the bytes its bilinear upsampling moves, and its 1x1
            # convolutions go to oneDNN (fp32 ones with few maps go to an MKL matrix product, which
            # runs AVX2 code on AMD CPUs); benchmarks/benchmark.py prints the head's speed against fp32.
            with autocast(self.device, self.precision):
                mean, spread = self.head.predict([f[start:stop].to(self.device) for f in levels], (size, size), window)
            probabilities[start:stop, :, top:bottom, left:right] = mean
            uncertainty[start:stop, top:bottom, left:right] = spread
        return (
            fill_outside(from_model_grid(probabilities, transform), foreground, certain_background(n_classes)),
            fill_outside(from_model_grid(uncertainty[:, None], transform), foreground, [0.0])[:, 0],
        )

    def _head_groups(self, n: int) -> List[Tuple[int, int]]:
        """The runs of slices the head takes at once, each in the union of their windows: on the
        CPU as many as fill its chunk of maps (one slice of TEDM's eight timesteps, eight of
        LEDM's), so that each slice keeps a window of its own; on a GPU all of them."""
        if self.device.type != "cpu":
            return [(0, n)]
        maps_per_slice = len(self.timesteps) if self.head.config.mode == "shared" else 1
        step = max(1, CPU_PREDICT_MAPS_PER_CHUNK // maps_per_slice)
        return [(start, min(n, start + step)) for start in range(0, n, step)]

    def _baseline_logits(self, unet: torch.nn.Module, grid: torch.Tensor) -> torch.Tensor:
        step = torch.zeros(grid.shape[0], dtype=torch.long, device=self.device)
        with in_weights_precision(unet, self.device):
            return unet(grid.to(weights_dtype(unet)), step)

    @torch.no_grad()
    def _baseline_predict(self, grid: torch.Tensor, transform: GridTransform, foreground: Sequence[Box]):
        """The supervised baseline's (probabilities, zero uncertainty), certain background outside
        the slices' ``foreground`` boxes, as TEDM's head gives."""
        grid = self._to_device(grid)
        logits = self._baseline_logits(self.unet, grid).float()
        probabilities = from_model_grid(class_probabilities(logits), transform)
        background = certain_background(probabilities.shape[1])
        return fill_outside(probabilities, foreground, background), torch.zeros_like(probabilities[:, 0])

    def predict(
        self,
        slices: np.ndarray,
        progress: Optional[Progress] = None,
        cancel: Optional[CancelCheck] = None,
        keep_features: bool = False,
        crop_dark_borders: Optional[bool] = None,
    ) -> SlicePrediction:
        """``slices`` (N, C, H, W) float32, normalised with the bundle's intensity config.

        ``crop_dark_borders`` overrides the segmenter's for this call (False for the slices of a
        volume, which keep one common geometry: see ``pipelines.volume.is_whole_2d_image``)."""
        crop = self._crops(crop_dark_borders)
        slices = self._check_slices(slices)
        probabilities, uncertainty = self._outputs(len(slices), slices.shape[-2:])
        # Per chunk: what it leaves for the cache, then its mirror's when flipping.
        kept: List[Kept] = []

        def write(start: int, stop: int, result: Tuple[torch.Tensor, torch.Tensor]) -> None:
            probabilities[start:stop], uncertainty[start:stop] = (r.cpu().numpy() for r in result)

        transform = self._run(slices, None, write, progress, cancel, kept if keep_features else None, crop)
        cache = None
        if kept:
            step = 2 if self.test_time_flip else 1
            joined = lambda chunks: [join_maps(level) for level in zip(*[levels for levels, _, _ in chunks])]  # noqa: E731
            boxes = lambda chunks, i: [box for chunk in chunks for box in chunk[i]]  # noqa: E731
            crops = lambda chunks: boxes(chunks, 1) if crop else None  # noqa: E731
            cache = FeatureCache(
                joined(kept[0::step]),
                transform,
                joined(kept[1::2]) if step == 2 else None,
                crops(kept[0::step]),
                crops(kept[1::2]) if step == 2 else None,
                boxes(kept[0::step], 2),
                boxes(kept[1::2], 2) if step == 2 else None,
            )
        return SlicePrediction(probabilities, uncertainty, cache)

    def predict_into(
        self,
        slices: np.ndarray,
        rows: np.ndarray,
        labels: np.ndarray,
        uncertainty: np.ndarray,
        progress: Optional[Progress] = None,
        cancel: Optional[CancelCheck] = None,
        crop_dark_borders: Optional[bool] = None,
    ) -> None:
        """Segment ``slices[rows]`` and write ``labels[rows]`` (class indices) and
        ``uncertainty[rows]``, chunk by chunk.

        What a whole-volume segmentation needs and no more: no copy of the selected slices, no
        float probabilities of the volume, no int64 argmax of them; each chunk's probabilities
        live only until its labels are taken (``benchmarks/benchmark.py`` measures the peak).
        """
        slices = self._check_slices(slices)
        rows = np.asarray(rows, dtype=np.int64)

        def write(start: int, stop: int, result: Tuple[torch.Tensor, torch.Tensor]) -> None:
            probabilities, spread = result
            labels[rows[start:stop]] = class_labels(probabilities).cpu().numpy()
            uncertainty[rows[start:stop]] = spread.cpu().numpy()

        self._run(slices, rows, write, progress, cancel, None, self._crops(crop_dark_borders))

    def _crops(self, override: Optional[bool]) -> bool:
        return self.crop_dark_borders if override is None else bool(override)

    def _check_slices(self, slices: np.ndarray) -> np.ndarray:
        slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim != 4 or slices.shape[1] != self.bundle.backbone.config.in_channels:
            raise ValueError(
                f"expected (N, {self.bundle.backbone.config.in_channels}, H, W) slices, got shape {slices.shape}"
            )
        return slices

    def _run(
        self,
        slices: np.ndarray,
        rows: Optional[np.ndarray],
        write: Callable[[int, int, Tuple[torch.Tensor, torch.Tensor]], None],
        progress: Optional[Progress],
        cancel: Optional[CancelCheck],
        kept: Optional[List[Kept]],
        crop: bool,
    ) -> GridTransform:
        """Every chunk of ``slices`` (or of ``slices[rows]``) through the model, its
        (probabilities, uncertainty) handed to ``write(start, stop, result)``.

        Each chunk is brought to the model grid on its own: padding and resizing are per slice,
        so the result is the same as for the whole stack at once, without a padded copy of it."""
        self._check_open()
        total = len(slices) if rows is None else len(rows)
        transform = to_model_grid(torch.from_numpy(slices[:1]), self.bundle.image_size)[1]

        def run(start: int, stop: int) -> None:
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            chunk = slices[start:stop] if rows is None else slices[rows[start:stop]]
            # The chunk's features reach ``kept`` only once its result is written: an out-of-memory
            # error anywhere in the chunk makes map_in_chunks retry it, and features kept before
            # that would be kept twice, shifting every later cache row off its slice.
            features: Optional[List[Kept]] = None if kept is None else []
            result = self._predict_chunk(chunk, transform, cancel, features, crop)
            if self.test_time_flip:
                # Mirrored in the image's own grid (not the padded model grid, whose padding
                # need not be symmetric), so the mirrored result maps back voxel for voxel.
                mirrored = self._predict_chunk(chunk[..., ::-1], transform, cancel, features, crop)
                result = tuple((a + b.flip(-1)) / 2 for a, b in zip(result, mirrored))
            write(start, stop, result)
            if kept is not None:
                kept.extend(features)
            if progress is not None:
                progress(stop, total)

        for _ in map_in_chunks(run, total, self.batch_size, on_oom=self._remember_batch_size):
            pass
        return transform

    def _remember_batch_size(self, size: int) -> None:
        """Keep a batch halved after out-of-memory for every later call (the next volume of a
        batch, the next Segment of a session), which would otherwise fail at the planned size
        again, a wasted partial pass each time. Never raised: the head's chunks may be larger."""
        self.batch_size = min(self.batch_size, size)

    def _predict_chunk(
        self,
        chunk: np.ndarray,
        transform: GridTransform,
        cancel: Optional[CancelCheck],
        kept: Optional[List[Kept]],
        crop: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, uncertainty) of a chunk of slices in their own grid; its features
        (with the boxes they were taken from, and the slices' foreground boxes) appended to
        ``kept`` when given."""
        boxes = [full_box(chunk.shape)] * len(chunk)
        if crop:
            chunk, _, boxes = crop_to_content(chunk, self.bundle.intensity)
        foreground = [foreground_box(image) for image in chunk]
        grid = to_model_grid(tensor_of(chunk), self.bundle.image_size)[0]
        if self.head is None:
            return self._uncrop(self._baseline_predict(grid, transform, foreground), boxes)
        levels = self._features(grid, cancel)
        if kept is not None:
            kept.append(([f.to("cpu", cache_dtype(f.dtype)) for f in levels], boxes, foreground))
        return self._uncrop(self._head_predict(levels, transform, foreground), boxes)

    def _uncrop(
        self, result: Tuple[torch.Tensor, torch.Tensor], boxes: Optional[Sequence[Box]]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, uncertainty) of cropped slices pasted back into the slices: certain
        background, without disagreement, outside their content boxes."""
        if boxes is None or all(box == full_box(result[0].shape) for box in boxes):
            return result
        probabilities, spread = result
        return uncrop(probabilities, boxes, certain_background(probabilities.shape[1])), uncrop(
            spread[:, None], boxes, [0.0]
        )[:, 0]

    def _outputs(self, n: int, shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """Float32 probability and uncertainty arrays that every chunk writes into: no list of
        chunks concatenated and converted at the end, which held three copies of a volume's
        probabilities at once (``benchmarks/benchmark.py`` measures the peak memory)."""
        h, w = (int(d) for d in shape)
        return np.empty((n, self.bundle.num_classes, h, w), np.float32), np.empty((n, h, w), np.float32)

    def predict_from_features(self, cache: FeatureCache, progress: Optional[Progress] = None) -> SlicePrediction:
        """Re-apply the (possibly refined) head to cached features: no UNet pass. Both
        orientations are averaged when the cache holds the mirrored slices' features too."""
        self._check_open()
        if self.head is None:
            raise ValueError("the supervised baseline has no features to re-use")
        total = cache.levels[0].shape[0]
        transform = cache.transform
        probabilities, uncertainty = self._outputs(total, (transform.height, transform.width))

        def run(start: int, stop: int) -> None:
            part = lambda boxes: None if boxes is None else boxes[start:stop]  # noqa: E731
            result = self._uncrop(
                self._head_predict([level[start:stop] for level in cache.levels], transform, part(cache.foreground)),
                part(cache.boxes),
            )
            if cache.flipped is not None:
                mirrored = self._uncrop(
                    self._head_predict(
                        [level[start:stop] for level in cache.flipped], transform, part(cache.flipped_foreground)
                    ),
                    part(cache.flipped_boxes),
                )
                result = tuple((a + b.flip(-1)) / 2 for a, b in zip(result, mirrored))
            probabilities[start:stop], uncertainty[start:stop] = (r.cpu().numpy() for r in result)
            if progress is not None:
                progress(stop, total)

        for _ in map_in_chunks(run, total, max(self.batch_size, 16), on_oom=self._remember_batch_size):
            pass
        return SlicePrediction(probabilities, uncertainty, cache)
