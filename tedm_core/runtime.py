"""Where and how tensors are computed: device choice, autocast, memory-aware chunking, OOM fallback."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from typing import Callable, Dict, Hashable, Iterator, Optional, TypeVar

import numpy as np
import torch

from .choices import MEMORY_FORMATS, PRECISIONS
from .errors import SettingError, TrainingDiverged

log = logging.getLogger(__name__)
T = TypeVar("T")


def tensor_of(array: np.ndarray) -> torch.Tensor:
    """``array`` as a contiguous tensor, sharing its memory where torch can. torch refuses any
    negative stride, and numpy keeps one on a flipped axis of length 1 in an array it calls
    contiguous (``np.ascontiguousarray`` then copies nothing): a one-voxel-wide volume stopped there."""
    array = np.ascontiguousarray(array)
    if any(stride < 0 for stride in array.strides):
        array = array.copy()
    return torch.from_numpy(array)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device if one works, else the CPU.

    Raises :class:`SettingError` for a device that is not there (``cuda`` on a machine or a torch
    build without CUDA, ``cuda:3`` on a one-GPU machine) or not a device name at all.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingError("device", f"{device!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(
                "device", f"{device} was asked for, but PyTorch sees no CUDA device (is this a CPU build of torch?)"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise SettingError("device", f"{device}: PyTorch sees {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise SettingError("device", f"{device!r} is not supported; expected auto, cpu, cuda or cuda:N")
    return resolved


def module_on(module: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """``module`` itself when its weights are all on ``device`` (and, given ``dtype``, its
    floating-point weights in it) already, else a copy there, in ``dtype``.

    ``module`` is never moved or cast: a bundle's UNet and head may be shared (the worker's model
    cache serves every session; fitting, refining and other segmenters use them), and moving them in
    place moved the weights under another user on another device. The copy is made tensor by
    tensor straight onto ``device``, never a second copy where ``module`` is (a deepcopy, then
    ``.to``, would double the CPU's peak); with nothing to change nothing is copied at all.
    """
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # where "cuda" puts tensors

    def target(tensor: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device == device and t.dtype == target(t) for t in tensors):
        return module
    # deepcopy takes what the memo holds for an object instead of copying it: each weight's copy on
    # the device (copy=True: one already there is not shared with the original either). ``to``
    # keeps each tensor's memory layout (channels-last stays channels-last).
    memo = {id(b): b.detach().to(device, target(b), copy=True) for b in module.buffers()}
    for weight in module.parameters():
        memo[id(weight)] = torch.nn.Parameter(
            weight.detach().to(device, target(weight), copy=True), weight.requires_grad
        )
    return copy.deepcopy(module, memo)


def check_finite_loss(loss: float, step: int, what: str, before_raising: Optional[Callable[[], None]] = None) -> None:
    """Stop a training run whose loss became NaN or infinite, rather than go on and save garbage.

    ``before_raising``: e.g. a progress bar's ``close``, so that the error starts its own line.
    """
    if not math.isfinite(loss):
        if before_raising is not None:
            before_raising()
        raise TrainingDiverged(
            f"{what} diverged: the loss is {loss} at step {step}; nothing from this step on was saved "
            "(a smaller learning rate usually helps)"
        )


def count_non_finite(tensors) -> int:
    """How many values of the given tensors are NaN or infinite."""
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA cards with native bf16 (compute capability 8.0, Ampere, or newer), fp32 elsewhere.

    fp32 on CPU by default, for training: bf16 autocast of MONAI's UNet measured 5-30x *slower*
    than fp32 on this project's CPUs for training, although it is valid; on CPUs without
    AVX512-BF16/AMX (AVX2 only) bf16 is emulated and even a plain bf16 matrix product measured
    ~50x slower than fp32 (``benchmarks/benchmark.py`` measures both on the machine it runs on).
    Gradient-free passes choose by measuring: :func:`resolve_inference_precision`; pretraining
    stays fp32: :func:`resolve_pretraining_precision`. On an H200 bf16 passes ran 1.53x faster
    than fp32/TF32 (63 against 96 ms for a BraTS volume's; ``benchmarks/gpu.py``, session 27).
    """
    if precision not in PRECISIONS:
        raise SettingError("precision", f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device.type == "cuda" and cuda_has_native_bf16(device):
        return "bf16"
    return "fp32"


def resolve_pretraining_precision(precision: str, device: torch.device) -> str:
    """DDPM pretraining: ``auto`` -> fp32 on every device (on CUDA its convolutions run TF32,
    PyTorch's default); ``bf16`` (autocast) when asked for.

    Every backbone this project validated was pretrained in fp32, and bf16 did not pay where it
    was measured with the default settings: on an H200, a `small` training step at batch 16 took
    42.7 ms in bf16 autocast against 35.8 ms in fp32/TF32 (launch-bound at 1 % of the card's peak;
    ``benchmarks/gpu.py``, session 27). On CPUs with native bf16 it ran 1.26-1.67x faster, for a
    backbone never validated (docs/results/PERFORMANCE.md).
    """
    if precision == "auto":
        return "fp32"
    return resolve_precision(precision, device)


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA card ``device`` (not the current one: ``cuda:1`` may be another model)
    computes bf16 in its tensor cores: compute capability 8.0 (Ampere) or newer.

    Not ``torch.cuda.is_bf16_supported()``: by default it counts emulation, so it says yes on
    a T4 or V100 (sm 7.x), where bf16 autocast runs without tensor cores, slower than fp32."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX). Elsewhere
    bf16 is emulated: a bf16 matrix product measured ~50x slower than fp32 on AVX2-only CPUs."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# Per process: the precision measured fastest for one kind of UNet pass (see below).
_MEASURED_PRECISION: Dict[Hashable, str] = {}
# bf16 must beat fp32 by this much to be chosen: its outputs differ from fp32's in the last
# digits (Dice ~0.999), which is worth a clear gain, not a tie decided by timing noise.
BF16_MIN_GAIN = 1.2


def resolve_inference_precision(
    precision: str, device: torch.device, timed_pass: Callable[[str], None], key: Hashable
) -> str:
    """The precision of gradient-free UNet passes (segmenting, extracting features to fit on).

    ``auto``: bf16 on CUDA cards with native bf16 (:func:`cuda_has_native_bf16`). On a CPU with native bf16 the two are
    *measured*, not assumed: ``timed_pass(precision)`` (one representative pass as it would run
    in that precision: ``features.unet_for_passes``) runs in fp32 and in bf16, and bf16 is kept
    only if it is at least ``BF16_MIN_GAIN`` x faster.
    On this project's AVX512-BF16 machine bf16 autocast ran the `small` UNet 1.56x faster than
    fp32 (``benchmarks/benchmark.py``: 215.9 against 138.8 GFLOP/s), yet on AMX machines it measured 0.76-0.83x (issue
    11), so no rule by CPU flags holds for both; on session 21's AMX machine bf16 weights ran it
    at 2.6x fp32's speed (326.5 against 127.3 GFLOP/s). The answer is kept per ``key`` (the model's
    shape, input size, layout, threads) for the life of the process, so a session or batch
    measures once (about a second) and every later call agrees with the first.
    """
    if precision != "auto" or device.type != "cpu":
        return resolve_precision(precision, device)
    if not cpu_has_native_bf16():
        return "fp32"
    key = (key, torch.get_num_threads())
    if key not in _MEASURED_PRECISION:
        _MEASURED_PRECISION[key] = _faster_precision(timed_pass)
        log.info("UNet passes on this CPU: %s measured faster", _MEASURED_PRECISION[key])
    return _MEASURED_PRECISION[key]


def _faster_precision(timed_pass: Callable[[str], None], repeats: int = 3) -> str:
    best = {}
    for precision in ("fp32", "bf16"):
        timed_pass(precision)  # warm-up: oneDNN creates its kernels for the new shapes and types
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            timed_pass(precision)
            times.append(time.perf_counter() - tic)
        best[precision] = min(times)
    return "bf16" if best["fp32"] >= BF16_MIN_GAIN * best["bf16"] else "fp32"


def resolve_memory_format(memory_format: str, device: torch.device) -> torch.memory_format:
    """``auto`` -> channels-last on the CPU, the stored (contiguous) layout on CUDA.

    On the CPU, oneDNN's channels-last convolutions ran the `small` UNet 1.15-1.35x faster than
    the default layout with identical outputs (``benchmarks/benchmark.py``). On CUDA it ran
    slower: on an H200 a BraTS volume's passes (1,240 maps at 64 px) took 81 against 63 ms in
    bf16 and 114 against 96 ms in fp32/TF32 (``benchmarks/gpu.py``, session 27), so ``auto``
    keeps the stored layout there; ``channels_last`` asks for it.
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {memory_format!r}; expected one of {MEMORY_FORMATS}")
    if memory_format == "channels_last" or (memory_format == "auto" and device.type == "cpu"):
        return torch.channels_last
    return torch.contiguous_format


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU or CUDA; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def active_autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``device_type`` right now, or ``None`` outside autocast."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    elif device_type == "cpu":
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    else:
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return dtype if enabled else None


def free_device_memory(device: torch.device) -> Optional[int]:
    """Free bytes on a CUDA device, ``None`` on the CPU (no useful limit to plan with)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def plan_batch_size(
    requested: Optional[int], bytes_per_item: int, device: torch.device, cpu_default: int = 8, safety: float = 0.5
) -> int:
    """A batch size that fits: ``requested`` if given, else what ``safety`` of free GPU memory holds."""
    if requested:
        return max(1, int(requested))
    free = free_device_memory(device)
    if free is None:
        return cpu_default
    return max(1, min(256, int(free * safety) // max(1, bytes_per_item)))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out: a CUDA out-of-memory error, torch's CPU allocator
    failing (a ``RuntimeError`` "DefaultCPUAllocator: can't allocate memory", not a
    ``MemoryError``), or Python's ``MemoryError``."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    # The CPU allocator says "can't allocate memory" on POSIX, "not enough memory" on Windows.
    text = str(error).lower()
    return any(words in text for words in ("out of memory", "can't allocate memory", "not enough memory"))


def out_of_memory_on_gpu(error: BaseException) -> bool:
    """Whether an out-of-memory ``error`` (:func:`is_out_of_memory`) is the GPU's, not main memory's."""
    text = str(error).lower()
    # The caching allocator says "CUDA out of memory"; the driver's own failures (a cuBLAS or
    # cuDNN workspace, the context) say "CUDA error: out of memory".
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(
        words in text for words in ("cuda out of memory", "cuda error: out of memory")
    )


def map_in_chunks(
    fn: Callable[[int, int], T], total: int, batch_size: int, on_oom: Optional[Callable[[int], None]] = None
) -> Iterator[T]:
    """Yield ``fn(start, stop)`` over ``[0, total)`` in chunks, halving the chunk on out-of-memory.

    An out-of-memory error (CUDA's, or the CPU allocator's) does not lose work: the failed chunk
    is retried at half the size, down to 1, and the smaller size is kept for the rest of the run
    (``on_oom(size)`` tells the caller, to keep it for later runs too).
    """
    start = 0
    while start < total:
        stop = min(total, start + batch_size)
        try:
            result = fn(start, stop)
        except (RuntimeError, MemoryError, torch.cuda.OutOfMemoryError) as error:
            if not is_out_of_memory(error) or stop - start == 1:
                raise
            # Half of the chunk that failed, which is less than the planned size at the end (one
            # radiograph, planned at 256): halving the plan would retry the same chunk.
            batch_size = max(1, (stop - start) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("out of memory: retrying with batch size %d", batch_size)
            if on_oom is not None:
                on_oom(batch_size)
            continue
        yield result
        start = stop


def describe_device(device: torch.device) -> str:
    """A line for logs and the Slicer status bar."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free = free_device_memory(device) or 0
        return f"GPU {props.name} ({free / 2**30:.1f} of {props.total_memory / 2**30:.1f} GiB free)"
    return f"CPU ({torch.get_num_threads()} threads): expect minutes rather than seconds for large volumes"
