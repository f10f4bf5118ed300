"""The default :class:`~TEDMSlicerLib.protocols.SegmentationBackend`: ``tedm_core``, imported lazily.

Nothing here imports ``torch`` or ``tedm_core`` at module import time, so the Slicer module
loads (and can offer to install its dependencies) before they are present.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

# Below this much free GPU memory, say so before long work: the backend then works in small
# batches (and halves them on out-of-memory), which is slow but does not fail.
LOW_GPU_MEMORY_BYTES = 3 * 2**30


def model_kind(path: str) -> str:
    """``bundle`` (a fitted model), ``backbone`` (a pretrained DDPM only) or ``unknown``."""
    folder = Path(path)
    if (folder / "bundle.json").is_file():
        return "bundle"
    if (folder / "backbone.json").is_file():
        return "backbone"
    return "unknown"


class TEDMCoreBackend:
    """Adapts ``tedm_core`` to the interface the Slicer logic is written against."""

    def load_model(self, path: str) -> Any:
        kind = model_kind(path)
        if kind == "backbone":
            from tedm_core.model.checkpoint import load_backbone

            return load_backbone(path)
        from tedm_core.bundle import load_bundle

        return load_bundle(path)  # raises a one-line BundleError naming the problem otherwise

    def save_bundle(self, bundle: Any, path: str, overwrite: bool = False) -> str:
        from tedm_core.bundle import save_bundle

        return str(save_bundle(bundle, path, overwrite=overwrite))

    def make_volume(self, array: np.ndarray, ijk_to_ras: np.ndarray, channel_names: Sequence[str], path: Optional[str] = None) -> Any:
        from tedm_core.io.volumes import Volume

        return Volume(array=np.asarray(array, dtype=np.float32), ijk_to_ras=np.asarray(ijk_to_ras, dtype=np.float64), path=path, channel_names=list(channel_names))

    def normalised_slices(self, volume: Any, intensity: Any, axis: str) -> Tuple[np.ndarray, Any]:
        # The same order as tedm_core's own volume pipeline: normalise the whole volume (one
        # intensity mapping for all its slices), then cut it into slices.
        from tedm_core.preprocessing.intensity import normalise_intensity
        from tedm_core.slicing import extract_slices

        normalised = volume.with_array(normalise_intensity(volume.array, intensity))
        slices, layout = extract_slices(normalised, axis)
        return np.asarray(slices, dtype=np.float32), layout

    def slice_arrays(self, array_kji: np.ndarray, like: Any, axis: str) -> np.ndarray:
        # Cutting a label or index volume with the very function that cut the image guarantees
        # that slice n of both is the same set of voxels, whatever flips the slicing applies.
        from tedm_core.slicing import extract_slices

        slices, _layout = extract_slices(like.with_array(np.asarray(array_kji, dtype=np.float32)[None]), axis)
        return np.asarray(slices)[:, 0]

    def reassemble(self, per_slice: np.ndarray, layout: Any) -> np.ndarray:
        from tedm_core.slicing import reassemble

        return np.asarray(reassemble(per_slice, layout))

    def make_segmenter(self, bundle: Any, device: str) -> Any:
        from tedm_core.pipelines.segment import Segmenter

        return Segmenter(bundle, device=device)

    def fit_bundle(self, backbone: Any, slices: np.ndarray, labels: np.ndarray, **kwargs: Any) -> Any:
        from tedm_core.pipelines.fit import fit_bundle

        return fit_bundle(backbone, slices, labels, show_progress=False, **kwargs)

    def refine_bundle(self, bundle: Any, slices: np.ndarray, labels: np.ndarray, **kwargs: Any) -> Any:
        from tedm_core.pipelines.fit import refine_bundle

        return refine_bundle(bundle, slices, labels, show_progress=False, **kwargs)

    def device_notes(self, device: str) -> List[str]:
        import torch

        from tedm_core.runtime import describe_device, free_device_memory, resolve_device

        resolved = resolve_device(device)
        notes = [f"Running on {describe_device(resolved)}."]
        if resolved.type == "cpu" and torch.cuda.is_available() is False and device != "cpu":
            notes.append("No CUDA GPU is visible to PyTorch (CPU build of torch, or no NVIDIA driver): running on the CPU.")
        free = free_device_memory(resolved)
        if free is not None and free < LOW_GPU_MEMORY_BYTES:
            notes.append(
                f"GPU memory is short ({free / 2**30:.1f} GiB free): slices go through in small batches. "
                "Close other GPU programs, or choose CPU if it fails."
            )
        return notes


def physical_memory_bytes() -> Optional[int]:
    """Installed RAM, where the OS tells (Linux, macOS); None elsewhere."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None
