"""Pixel-wise heads on decoder features: TEDM, LEDM, LEDMe, single-step and the logistic probe.

Every head is one :class:`PixelMLP` (C -> 128 -> ReLU -> BN -> 32 -> ReLU -> BN -> K as 1x1
convolutions; no hidden layers gives the logistic probe). What differs is how timesteps reach it:

- ``shared`` (TEDM, single-step, probe): the MLP sees each timestep's features on its own; the
  training loss is the mean over timesteps, the prediction the mean of per-step probabilities,
  and their spread is a free uncertainty map.
- ``concat`` (LEDM, LEDMe): the MLP sees the timesteps' features concatenated.

A head may hold several such MLPs (``HeadConfig.members``), fitted with different seeds on the
same labelled images; their per-step probabilities are averaged with the timesteps' (an ensemble).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .choices import HEAD_METHODS, canonical_method
from .features import LEDM_TIMESTEPS, TEDM_TIMESTEPS, LevelFeatures
from .runtime import active_autocast_dtype

# (top, bottom, left, right): rows top:bottom and columns left:right of the output grid. A head
# given a window computes its outputs there alone; every pixel is its own, so they equal the same
# pixels of the whole grid's outputs (up to float rounding of differently sized kernels).
Window = Tuple[int, int, int, int]

HEAD_DESIGNS: Dict[str, Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = {
    # method: (how timesteps reach the MLP, default timesteps, hidden widths)
    "tedm": ("shared", TEDM_TIMESTEPS, (128, 32)),
    "ledm": ("concat", LEDM_TIMESTEPS, (128, 32)),
    "ledme": ("concat", TEDM_TIMESTEPS, (128, 32)),
    "probe": ("shared", (25,), ()),  # the paper's Fig. 2 step-wise logistic probe (once named "step")
}
assert tuple(HEAD_DESIGNS) == HEAD_METHODS


# On the CPU the head is applied to this many (image, timestep) maps at a time: the 128-channel
# hidden map of one 64 px map is 2 MiB, so a few of them stay in the CPU cache, and measured on
# the project's 2-core machines this is ~10x faster than one pass over a whole batch of slices
# (which streams hundreds of MiB through memory several times).
CPU_MAPS_PER_CHUNK = 2


# Prediction (no autograd) goes through more maps at a time: on the shared 2-core machines,
# under load (load average ~10), the head's prediction took 257 ms per map with chunks of 2
# maps and 84 ms with chunks of 8 at 2 threads (15 ms vs 33 ms at 1 thread): every operation
# is a parallel region whose threads must all be scheduled, so fewer, larger operations wait
# less. 32 maps was no better (62 ms), and its hidden maps leave the cache.
CPU_PREDICT_MAPS_PER_CHUNK = 8


def maps_per_chunk(device: torch.device, dtype: torch.dtype = torch.float32) -> Optional[int]:
    """How many maps to push through the head at once under autograd: a few on the CPU, all of
    them on a GPU. On the CPU the same bytes of hidden maps whatever the dtype, so twice the maps
    in bf16: a Refine's bf16 training took 1.58-1.65 s with chunks of 4 maps against 1.86-1.88 s
    with chunks of 2 (``benchmarks/refine_training.py``, one thread, AMX CPU, session 24)."""
    if device.type != "cpu":
        return None
    return CPU_MAPS_PER_CHUNK * max(1, 32 // torch.finfo(dtype).bits)


def _in_layout(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``features`` in ``dtype`` with exactly channels-last strides: one copy does both the dtype
    change (float16 caches) and the layout change; none when they come so from the UNet already.

    Exactly: oneDNN's fused convolution reads the strides themselves, and ``is_contiguous``
    ignores the batch's stride of a single map (e.g. (H, W, N, C) memory), which sent the fused
    sum to an ATen fallback that has no bf16 kernel (a bf16 segmenter's one-slice prediction)."""
    n, c, h, w = features.shape
    if features.dtype == dtype and features.stride() == (c * h * w, 1, w * c, c):
        return features
    return torch.empty(features.shape, dtype=dtype, device=features.device, memory_format=torch.channels_last).copy_(
        features
    )


@lru_cache(maxsize=64)
def _interpolation_matrix(
    source: int, target: int, mode: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(target, source): ``F.interpolate`` along one axis as a matrix (row i: the weights output
    sample i takes of the source samples). Built by interpolating the identity, so the weights are
    PyTorch's own; bilinear and nearest upsampling of a 2D map are this along each axis."""
    # Never an inference tensor, though the first call may come from a prediction under
    # inference mode: Refine's bf16 training differentiates through the same cached matrix.
    with torch.inference_mode(False):
        identity = torch.eye(source, dtype=torch.float64)[:, None, :]
        options = {"mode": "linear", "align_corners": False} if mode == "bilinear" else {"mode": mode}
        matrix = F.interpolate(identity, size=target, **options)[:, 0].T
        return matrix.to(device=device, dtype=dtype).contiguous()


@lru_cache(maxsize=4096)
def _window_interpolation(
    source: int, target: int, mode: str, start: int, stop: int, dtype: torch.dtype, device: torch.device
) -> Tuple[torch.Tensor, int, int]:
    """Rows ``start:stop`` of :func:`_interpolation_matrix` restricted to the source samples they
    weigh, ``[first, last)``: (that block, first, last). The whole matrix for the whole range."""
    whole = _interpolation_matrix(source, target, mode, dtype, device)
    if (start, stop) == (0, target):
        return whole, 0, source
    with torch.inference_mode(False):  # never an inference tensor (see _interpolation_matrix)
        weighed = torch.nonzero(whole[start:stop].any(dim=0))
        first, last = int(weighed[0]), int(weighed[-1]) + 1
        return whole[start:stop, first:last].contiguous(), first, last


def _upsampled_sum(
    maps: Sequence[torch.Tensor], size: Tuple[int, int], mode: str, window: Optional[Window] = None
) -> torch.Tensor:
    """The sum of maps (N, C, h_l, w_l), each upsampled to ``size``, in ``window`` of it, as matrix
    products: each map along its width ((W, w_l) x (w_l, C) per row), then all of them along the
    height in one product whose inner dimension stacks the maps' rows ((H, sum h_l) x (sum h_l, W C)).
    A window takes the rows of the matrices its pixels need, and of each map the samples those
    weigh (:func:`_window_interpolation`): the work follows the window's area.

    Why not ``F.interpolate`` and ``add_``: on the CPU in bf16 those are memory-bound passes over
    the 128-channel full-size map (two written, one re-read and re-written), while these products
    run on the matrix units and write it once: 2.5 against 4.4 ms for 8 maps of 64 px from 16 and
    32 px (one thread, AMX CPU, session 22), rounding errors against float64 no larger. In fp32
    the products were slower (4.1 against 2.7 ms), so only bf16 takes this way on the whole grid
    (prediction, and Refine's bf16 training, whose autograd differentiates the products); a window
    takes it in fp32 too, where ``F.interpolate`` would upsample the whole grid to keep a part:
    one slice's 8 maps in a 40 x 48 window of the 64 px grid took 7.2 ms in fp32 with the products,
    18.6-19.5 ms upsampling the whole grid and keeping the window, 11.2 ms on the whole grid (one
    thread, AMX CPU, session 25; aa39fc6's windowed Refine training: 2.1 against 5.9 s).
    Channels-last maps are read as they are; the sum comes back channels-last."""
    n, channels = maps[0].shape[:2]
    top, bottom, left, right = window or (0, size[0], 0, size[1])
    height, width = bottom - top, right - left
    dtype, device = maps[0].dtype, maps[0].device
    row_blocks = [_window_interpolation(m.shape[-2], size[0], mode, top, bottom, dtype, device) for m in maps]
    column_blocks = [_window_interpolation(m.shape[-1], size[1], mode, left, right, dtype, device) for m in maps]
    # Each map along its width, (N, h_l, W, C), stacked along the rows; the list passed to cat is
    # its only holder, so the parts go as soon as they are stacked (a peak of one copy, not two).
    inner = torch.cat(
        [
            torch.matmul(columns, m[..., first:last, start:stop].permute(0, 2, 3, 1))
            for m, (_, first, last), (columns, start, stop) in zip(maps, row_blocks, column_blocks)
        ],
        dim=1,
    )
    rows = torch.cat([block for block, _, _ in row_blocks], dim=1)
    summed = torch.matmul(rows, inner.reshape(n, -1, width * channels))  # (N, H, W C): channels-last memory
    return summed.view(n, height, width, channels).permute(0, 3, 1, 2)


def _in_window(maps: torch.Tensor, window: Optional[Window]) -> torch.Tensor:
    """``maps`` (..., H, W) in ``window`` (a view; None or the whole grid: ``maps`` itself)."""
    if window is None or window == (0, maps.shape[-2], 0, maps.shape[-1]):
        return maps
    top, bottom, left, right = window
    return maps[..., top:bottom, left:right]


def _fused_convolutions_available() -> bool:
    """Whether this PyTorch has oneDNN's fused CPU convolutions (``torch.ops.mkldnn.
    _convolution_pointwise``, the kernels ``torch.compile`` emits for convolutions followed by
    additions and activations on the CPU).

    Used for the head's prediction: there the bf16 additions and ReLUs over the 128-channel
    hidden maps, unfused, took 40 % of the head's time (torch.profiler, 8 maps of 64 px per
    chunk); fused, ``benchmarks/benchmark.py`` measured the volume's head at 2.64 s against 3.11,
    the radiographs' at 0.15 against 0.25 s and Refine's re-applying at 2.3-2.7 s against 3.4
    (one thread, AMX CPU, session 21), with identical labels."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class PixelMLP(nn.Module):
    """A pixel-wise MLP over multi-resolution features, with its first layer factorised per level.

    The first layer is linear and upsampling is linear per channel, so applying the first layer
    to each level at its native resolution, upsampling the (hidden-width) results and summing
    equals upsampling all levels, concatenating and applying the layer (``forward_dense``), up
    to float rounding, with far less memory (docs/method.md, section 4).

    Hidden maps are kept channels-last: PyTorch's CPU bilinear upsampling is vectorised over
    channels in that layout (measured 20x faster than on NCHW tensors with 128 channels).
    """

    def __init__(
        self,
        level_channels: Sequence[int],
        num_outputs: int,
        hidden: Sequence[int] = (128, 32),
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        self.level_channels = [int(c) for c in level_channels]
        self.upsample = upsample
        widths = list(hidden) + [int(num_outputs)]
        # One bias for the whole first layer: the per-level projections are summed.
        self.first = nn.ModuleList(nn.Conv2d(c, widths[0], 1, bias=(i == 0)) for i, c in enumerate(self.level_channels))
        rest: List[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            rest += [nn.ReLU(inplace=True), nn.BatchNorm2d(w_in), nn.Conv2d(w_in, w_out, 1)]
        self.rest = nn.Sequential(*rest)

    def _resize(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if self.upsample == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def _first_layer(
        self,
        levels: Sequence[torch.Tensor],
        size: Tuple[int, int],
        leave_out: Optional[int] = None,
        window: Optional[Window] = None,
    ) -> Optional[torch.Tensor]:
        """The summed per-level projections at ``size``, in ``window`` of it (default: all of it),
        channels-last (N, hidden, rows, columns), of every level but ``leave_out`` (None when that
        leaves none).

        A level at ``size`` is projected in the window alone; coarser ones whole (any of their
        samples may reach the window), then upsampled. Summed in place, under autograd too:
        neither the upsampling nor the convolution needs its output for its gradient (session 17:
        an out-of-place sum cost a Refine 0.17 s). In bf16, and in a window of the grid, the
        coarser levels are upsampled and summed as matrix products (:func:`_upsampled_sum`), in
        prediction and in Refine's training alike."""
        window = window or (0, size[0], 0, size[1])
        dtype = self._compute_dtype(levels[0])
        # (projection, whether it is at ``size`` already), in the levels' order: fp32 sums them in
        # that order, as before windows existed, so that fits stay reproducible to the bit.
        projections = []
        for index, (conv, features) in enumerate(zip(self.first, levels)):
            if index != leave_out:
                at = tuple(features.shape[-2:]) == tuple(size)
                projections.append((conv(_in_layout(_in_window(features, window) if at else features, dtype)), at))
        coarse = [p for p, at in projections if not at]
        whole_grid = window == (0, size[0], 0, size[1])
        if coarse and (dtype == torch.bfloat16 or not whole_grid):
            summed = _upsampled_sum(coarse, size, self.upsample, window)
            projections = [(p, True) for p, at in projections if at] + [(summed, True)]
        hidden = None
        for projected, at in projections:
            projected = projected if at else self._resize(projected, size)  # (the whole grid)
            hidden = projected if hidden is None else hidden.add_(projected)
        return hidden

    def _compute_dtype(self, features: torch.Tensor) -> torch.dtype:
        # Under autocast the convolutions compute in autocast's dtype (bf16): converting the
        # features straight to it gives them the same values (float16 and bfloat16 values are
        # exact in float32) and writes half the bytes of a float32 copy that autocast would
        # convert again (with the cache below kept channels-last in bf16, a Refine's copies went
        # 1.59 -> 0.33 s: `benchmarks/benchmark.py --refine-only --profile-refine`, session 17).
        return active_autocast_dtype(features.device.type) or self.first[0].weight.dtype

    def forward(
        self, levels: Sequence[torch.Tensor], size: Tuple[int, int], window: Optional[Window] = None
    ) -> torch.Tensor:
        """levels: (N, C_l, h_l, w_l) each -> logits (N, K, *size), or (N, K, rows, columns) of
        ``window`` of that grid alone."""
        if self.training:
            return self.rest(self._first_layer(levels, size, window=window)).contiguous()
        if not torch.is_grad_enabled():
            return self._predict_logits(levels, size, window)
        # Eval mode with gradients (Refine's frozen statistics): BatchNorm is an affine map, so it
        # is folded into the next convolution as at inference, and autograd differentiates the
        # folding. The same gradients up to float rounding, without BatchNorm's passes over the
        # hidden maps, forwards and backwards (0.28 s of a Refine, session 17).
        return self._rest_folded(self._first_layer(levels, size, window=window), self.folded_layers()).contiguous()

    @staticmethod
    def _rest_folded(hidden: torch.Tensor, layers: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        for weight, bias in layers:
            hidden = F.conv2d(hidden.relu_(), weight[:, :, None, None], bias)
        return hidden

    def folded_layers(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The layers after the first as (weight (out, in), bias) pairs, each eval-mode BatchNorm
        folded into the 1x1 convolution after it: conv(W, BN(x)) = (W * s) x + (b + W t) with
        s = gamma / sqrt(var + eps), t = beta - mean * s. Exact up to float rounding, and one
        pass over the 128-channel hidden map fewer."""
        modules = list(self.rest)
        layers = []
        for start in range(0, len(modules), 3):
            norm, conv = modules[start + 1], modules[start + 2]
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias - norm.running_mean * scale
            weight = conv.weight.flatten(1)
            layers.append((weight * scale[None, :], conv.bias + weight @ shift))
        return layers

    def _predict_logits(
        self, levels: Sequence[torch.Tensor], size: Tuple[int, int], window: Optional[Window]
    ) -> torch.Tensor:
        """Inference (eval mode, no autograd): a few maps at a time, BatchNorm folded; on the CPU
        each convolution fused with what follows it (:meth:`_fused_chunk_logits`)."""
        total = levels[0].shape[0]
        on_cpu = levels[0].device.type == "cpu"
        chunk = CPU_PREDICT_MAPS_PER_CHUNK if on_cpu else max(1, total)
        layers = self.folded_layers()
        # (A probe has no hidden layer: its first layer gives the logits, with no ReLU to fuse.)
        fused = on_cpu and bool(layers) and _fused_convolutions_available()
        if fused:
            dtype = self._compute_dtype(levels[0])
            layers = [(weight[:, :, None, None].to(dtype), bias.to(dtype)) for weight, bias in layers]
        outputs = []
        for start in range(0, total, chunk):
            part = [f[start : start + chunk] for f in levels]
            if fused:
                out = self._fused_chunk_logits(part, size, window, layers, dtype)
            else:
                out = self._rest_folded(self._first_layer(part, size, window=window), layers)
            outputs.append(out.contiguous())
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _fused_chunk_logits(
        self,
        levels: Sequence[torch.Tensor],
        size: Tuple[int, int],
        window: Optional[Window],
        layers: Sequence[Tuple[torch.Tensor, torch.Tensor]],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """:meth:`_predict_logits`' chunk through oneDNN's fused convolutions: the level already at
        ``size`` projected, plus the upsampled sum of the others, plus the bias, then the ReLU, in
        one kernel; each hidden layer with its ReLU in one. The same function as the unfused way:
        bf16 results differ by rounding only (a sum rounded once instead of twice)."""
        convolve = torch.ops.mkldnn._convolution_pointwise
        one = ([0, 0], [1, 1], [1, 1], 1)  # padding, stride, dilation, groups of a 1x1 convolution
        at_size = [i for i, f in enumerate(levels) if tuple(f.shape[-2:]) == tuple(size)]
        if at_size:
            finest = at_size[0]
            others = self._first_layer(levels, size, leave_out=finest, window=window)
            conv = self.first[finest]
            weight = conv.weight.to(dtype)
            bias = None if conv.bias is None else conv.bias.to(dtype)
            features = _in_layout(_in_window(levels[finest], window), dtype)
            if others is None:
                hidden = convolve(features, weight, bias, *one, "relu", [], "")
            else:
                others = _in_layout(others, dtype)  # an upsampled single map can come back NCHW
                hidden = convolve.binary(features, others, weight, bias, *one, "add", None, "relu", [], "")
        else:
            hidden = self._first_layer(levels, size, window=window).relu_()
        for weight, bias in layers[:-1]:
            hidden = convolve(hidden, weight, bias, *one, "relu", [], "")
        weight, bias = layers[-1]
        return F.conv2d(hidden, weight, bias)

    def forward_dense(self, levels: Sequence[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        """The straightforward reference: upsample every level, concatenate, apply the MLP."""
        dense = torch.cat([self._resize(f.to(self.first[0].weight.dtype), size) for f in levels], dim=1)
        weight = torch.cat([conv.weight for conv in self.first], dim=1)
        return self.rest(F.conv2d(dense, weight, self.first[0].bias))


@dataclass
class HeadConfig:
    """Everything needed to rebuild a head; stored in the bundle."""

    method: str
    timesteps: Tuple[int, ...]
    level_channels: Tuple[int, ...]
    num_classes: int  # including background; 2 for a single structure
    hidden: Tuple[int, ...] = (128, 32)
    upsample: str = "bilinear"
    levels: Optional[Tuple[int, ...]] = None  # decoder levels tapped; None = all
    members: int = 1  # MLPs averaged (an ensemble of heads fitted with different seeds)

    def __post_init__(self) -> None:
        self.method = canonical_method(self.method)
        if self.method not in HEAD_DESIGNS:
            raise ValueError(f"unknown head method {self.method!r}; expected one of {HEAD_METHODS}")
        if self.num_classes < 2:
            raise ValueError("num_classes counts the background and must be at least 2")
        self.timesteps = tuple(int(t) for t in self.timesteps)
        if len(set(self.timesteps)) != len(self.timesteps):
            # A repeated timestep weighs double in a shared head's mean (and every prediction
            # with the head's timesteps would be refused as repeated).
            raise ValueError(f"timesteps {list(self.timesteps)}: each timestep once")
        self.level_channels = tuple(int(c) for c in self.level_channels)
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.levels is not None:
            self.levels = tuple(int(i) for i in self.levels)
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 1:
            raise ValueError(f"members must be a whole number of at least 1, got {self.members!r}")

    @classmethod
    def for_method(
        cls,
        method: str,
        level_channels: Sequence[int],
        num_classes: int,
        timesteps: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> HeadConfig:
        method = canonical_method(method)
        if method not in HEAD_DESIGNS:
            raise ValueError(f"unknown head method {method!r}; expected one of {HEAD_METHODS}")
        _, default_steps, hidden = HEAD_DESIGNS[method]
        if kwargs.get("hidden") is None:  # not given, or None: the method's design
            kwargs["hidden"] = hidden
        return cls(method, tuple(timesteps or default_steps), tuple(level_channels), num_classes, **kwargs)

    @property
    def mode(self) -> str:
        return HEAD_DESIGNS[self.method][0]

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def num_outputs(self) -> int:
        return 1 if self.binary else self.num_classes

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> HeadConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def prediction_timesteps_problem(timesteps: Sequence[int], config: HeadConfig) -> Optional[str]:
    """Why a head with ``config`` cannot predict from ``timesteps``, or None.

    One rule for a bundle's recorded inference timesteps and segment's ``--timesteps``: a head
    only knows the features of the timesteps it was trained on (others give confident nonsense),
    and a repeated timestep would silently weigh double in the average.
    """
    timesteps = [int(t) for t in timesteps]
    trained = list(config.timesteps)
    repeated = sorted({t for t in timesteps if timesteps.count(t) > 1})
    if repeated:
        return f"{repeated} repeated; give each timestep once, among the head's timesteps {trained}"
    if config.mode == "concat":
        if set(timesteps) != set(trained):
            return f"a {config.method} head needs exactly its timesteps {trained}"
        return None
    untrained = [t for t in timesteps if t not in trained]
    if untrained:
        return f"{untrained} not among the head's timesteps {trained}; choose a subset of them"
    return None


def in_head_order(timesteps: Sequence[int], config: HeadConfig) -> Tuple[int, ...]:
    """``timesteps`` (accepted by :func:`prediction_timesteps_problem`) in the order the head reads
    them: a concat head's first layer weighs its timesteps' features in the order it was trained
    on, so the same set given in another order (``--timesteps 250 50 150``) is put back in it;
    a shared head averages, in any order."""
    if config.mode == "concat":
        return tuple(config.timesteps)
    return tuple(int(t) for t in timesteps)


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of logits ``(B, K', H, W)`` against class indices ``(B, H, W)``: one output
    (a single structure) is a sigmoid with binary cross-entropy, several a softmax with cross-entropy.
    Heads and the supervised baseline share this rule."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], targets.float())
    return F.cross_entropy(logits, targets)


def class_probabilities(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Logits -> probabilities of every class, background included: one output (a single
    structure) becomes the two classes (1 - p, p), several a softmax along ``dim``."""
    if logits.shape[dim] == 1:
        foreground = torch.sigmoid(logits)
        return torch.cat([1 - foreground, foreground], dim=dim)
    return torch.softmax(logits, dim=dim)


def class_labels(probabilities: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, K, H, W) -> the most probable class (N, H, W) as uint8: argmax over
    the classes, a tie to the lower class as argmax gives it (NaN probabilities, which a finite
    model never gives, are not ranked as argmax ranks them).

    One comparison per class: the classes are the strided middle axis, over which the CPU's
    argmax is slow: one 240 x 240 slice of two classes took 4.9 ms in torch and 0.7 ms in numpy
    against 0.3 ms this way, a BraTS volume's 135 slices 713 and 114 against 59 ms (one thread,
    session 22); the labels are the same. The first comparison is the labels themselves (no
    copy of the background's probabilities, no mask filled): the 135 slices of two classes 9.5
    against 64 ms, of four 99 against 146 ms (``runs/s29/labels_bench.py``, one thread, session 29)."""
    if probabilities.shape[1] == 1:
        return torch.zeros(probabilities[:, 0].shape, dtype=torch.uint8, device=probabilities.device)
    first, second = probabilities[:, 0], probabilities[:, 1]
    labels = torch.gt(second, first).view(torch.uint8)  # bool and uint8 share the byte layout
    if probabilities.shape[1] == 2:
        return labels
    best = torch.maximum(first, second)
    for k in range(2, probabilities.shape[1]):
        candidate = probabilities[:, k]
        labels.masked_fill_(candidate > best, k)
        torch.maximum(best, candidate, out=best)
    return labels


class FeatureHead(nn.Module):
    """:class:`PixelMLP` (one per ensemble member) plus the rule for combining timesteps given by
    ``config.mode``.

    The first member is ``mlp`` and the others ``extra_members``, so that a one-member head has
    the same weights' names as before ensembles existed (its bundles load in older versions)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        factor = len(config.timesteps) if config.mode == "concat" else 1

        def member() -> PixelMLP:
            return PixelMLP(
                [c * factor for c in config.level_channels], config.num_outputs, config.hidden, config.upsample
            )

        self.mlp = member()
        self.extra_members = nn.ModuleList(member() for _ in range(config.members - 1))

    @property
    def member_mlps(self) -> List[PixelMLP]:
        return [self.mlp, *self.extra_members]

    def maps_per_prediction(self, timesteps: int) -> int:
        """How many probability maps :meth:`predict` averages (and spreads) on ``timesteps`` steps:
        one per step and member (shared), one per member (concat)."""
        return (timesteps if self.config.mode == "shared" else 1) * self.config.members

    def logits(self, features: LevelFeatures, size: Tuple[int, int], window: Optional[Window] = None) -> torch.Tensor:
        """features: per level (N, S, C_l, h, w) -> logits (N, M x S', K, H, W): S' = S (shared) or 1
        (concat) per member, the M members one after the other; of ``window`` of the (H, W) grid
        alone when given."""
        n, s = features[0].shape[:2]
        if self.config.mode == "concat":
            flat = [f.reshape(n, s * f.shape[2], *f.shape[3:]) for f in features]
            return torch.stack([mlp(flat, size, window) for mlp in self.member_mlps], dim=1)
        flat = [f.reshape(n * s, *f.shape[2:]) for f in features]
        outs = [out.reshape(n, s, *out.shape[1:]) for out in (mlp(flat, size, window) for mlp in self.member_mlps)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def load_members(self, heads: Sequence[FeatureHead]) -> FeatureHead:
        """Take the weights of one-member heads of the same design, one per member, in order."""
        if len(heads) != self.config.members:
            raise ValueError(f"{len(heads)} heads for {self.config.members} members")
        for mine, other in zip(self.member_mlps, heads):
            mine.load_state_dict(other.mlp.state_dict())
        return self

    def loss(self, features: LevelFeatures, targets: torch.Tensor) -> torch.Tensor:
        """Mean over timesteps of the per-step loss. targets: (N, H, W) class indices."""
        return self.loss_from_logits(self.logits(features, tuple(targets.shape[-2:])), targets)

    def loss_from_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` (N, S', K, H, W) against targets (N, H, W): mean over everything."""
        logits = logits.float()
        n, s = logits.shape[:2]
        flat = logits.reshape(n * s, *logits.shape[2:])
        return segmentation_loss(flat, targets.repeat_interleave(s, dim=0))

    def per_step_probabilities(
        self, features: LevelFeatures, size: Tuple[int, int], window: Optional[Window] = None
    ) -> torch.Tensor:
        """(N, S', classes, H, W) class probabilities, background included (of ``window`` alone)."""
        return class_probabilities(self.logits(features, size, window).float(), dim=2)

    def predict(
        self, features: LevelFeatures, size: Tuple[int, int], window: Optional[Window] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean class probabilities (N, classes, H, W) and uncertainty (N, H, W), of ``window`` of
        the (H, W) grid alone when given.

        Uncertainty is the standard deviation over timesteps (and ensemble members) of the
        per-step probabilities, the largest over classes (zero for a one-member concat head,
        which gives one prediction).
        """
        per_step = self.per_step_probabilities(features, size, window)
        mean = per_step.mean(dim=1)
        if per_step.shape[1] > 1:
            # Written out, not Tensor.std: torch's CPU std over this middle dimension took 29 ms
            # for 16 slices x 8 steps of a 64 x 64 two-class head, this 1 ms, the same values to
            # 6e-8 (timed side by side, one thread; a Refine spent 0.39 s in std: `benchmarks/
            # benchmark.py --refine-only --profile-refine`, session 17).
            spread = (per_step - mean[:, None]).square_().mean(dim=1).sqrt_().amax(dim=1)
        else:
            spread = torch.zeros_like(mean[:, 0])
        return mean, spread
