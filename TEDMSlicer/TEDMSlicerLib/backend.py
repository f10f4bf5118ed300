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

    def make_volume(
        self, array: np.ndarray, ijk_to_ras: np.ndarray, channel_names: Sequence[str], path: Optional[str] = None
    ) -> Any:
        from tedm_core.io.volumes import volume_from_array

        return volume_from_array(array, ijk_to_ras, list(channel_names))

    def normalised_slices(self, volume: Any, intensity: Any, axis: str) -> Tuple[np.ndarray, Any]:
        # The very steps of tedm_core's own volume pipeline (segment_volume): normalise the whole
        # volume with one mapping per channel, then cut it into display-oriented slices.
        from tedm_core.pipelines.volume import normalise_volume
        from tedm_core.slicing import extract_slices

        slices, layout = extract_slices(normalise_volume(volume, intensity), axis)
        return np.asarray(slices, dtype=np.float32), layout

    def slice_arrays(self, array_kji: np.ndarray, layout: Any) -> np.ndarray:
        # Cutting a label or index array with the image's layout guarantees that slice n of both
        # is the same set of voxels, whatever permutation and flips the display rule applied.
        from tedm_core.slicing import to_slices

        return np.ascontiguousarray(to_slices(np.asarray(array_kji), layout))

    def reassemble(self, per_slice: np.ndarray, layout: Any) -> np.ndarray:
        from tedm_core.slicing import reassemble

        return np.asarray(reassemble(per_slice, layout))

    def nonempty_slices(self, slices: np.ndarray) -> np.ndarray:
        from tedm_core.pipelines.volume import nonempty_slice_mask

        return np.asarray(nonempty_slice_mask(slices), dtype=bool)

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
            notes.append(
                "No CUDA GPU is visible to PyTorch (CPU build of torch, or no NVIDIA driver): running on the CPU."
            )
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
