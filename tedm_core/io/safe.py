"""Loading model files without executing code: JSON and safetensors only, with clear refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import BundleError, TrainingDiverged
from .atomic import atomic_path

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
# A model's description is a few KiB; anything far larger is not one (and is not read into memory).
MAX_JSON_BYTES = 16 * 2**20


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4)
    return any(head.startswith(magic) for magic in _PICKLE_MAGIC)


def read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise BundleError(path, "missing file")
    if _looks_like_pickle(path):
        raise BundleError(path, "is a pickle/zip file, not JSON; refusing to load it (pickles can run code)")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise BundleError(path, f"is {size / 2**20:.0f} MiB; a model description is a few KiB, so this is not one")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(path, f"is not valid JSON ({error})") from None
    except RecursionError:
        raise BundleError(path, "is nested too deeply to be a model description") from None
    if not isinstance(data, dict):
        raise BundleError(path, "JSON must hold an object")
    return data


def write_json(path: Path, data: Dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise BundleError(path, "missing file")
    if _looks_like_pickle(path):
        raise BundleError(path, "is a pickle, not safetensors; refusing to load it (pickles can run code)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BundleError(path, f"is not a readable safetensors file ({error})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BundleError(
                path, f"holds {bad} NaN or infinite weights (first in {name}): the training that wrote it diverged"
            )
    return tensors


def write_tensors(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    """Save weights as safetensors, atomically; NaN or infinite weights are never written (a
    diverged model saved over a good one would lose it)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingDiverged(f"{path}: not saved: {name} holds NaN or infinite values (the training diverged)")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
