"""2D images (PNG, JPG, BMP, TIFF): radiographs in, masks and maps out."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .atomic import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PathLike = Union[str, Path]


def is_image_file(path: PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES and not Path(path).name.startswith(".")


def list_images(folder: PathLike) -> List[Path]:
    """Image files directly in ``folder``, sorted by name (the order ``--n`` counts in)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "folder not found" if not folder.exists() else "is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise InputError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(path, f"cannot be read as an image ({error})") from None


def read_grey(path: PathLike) -> np.ndarray:
    """A radiograph as float32 ``(1, H, W)`` with its raw intensities (16-bit kept as such)."""
    path = Path(path)
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
    else:
        array = np.asarray(image.convert("L"), dtype=np.float32)
    if array.ndim != 2 or min(array.shape) < 8:
        raise InputError(path, f"expected a 2D image of at least 8x8 pixels, got shape {array.shape}")
    return array[None]


def read_label_image(path: PathLike, label_values: Sequence[int]) -> np.ndarray:
    """A mask or label image as int64 class indices ``(H, W)``.

    ``label_values[k]`` is the pixel value of class k. A binary mask may be stored as 0/1 or
    0/255: for two classes any non-zero pixel is foreground.
    """
    path = Path(path)
    image = _open(path)
    array = np.asarray(image.convert("L") if image.mode not in ("I", "I;16", "L", "P", "1") else image)
    if array.ndim != 2:
        raise InputError(path, f"a label image must be single-channel, got shape {array.shape}")
    array = array.astype(np.int64)
    if len(label_values) == 2:
        return (array != label_values[0]).astype(np.int64)
    lookup = {int(v): k for k, v in enumerate(label_values)}
    unknown = sorted(set(np.unique(array).tolist()) - set(lookup))
    if unknown:
        raise InputError(path, f"label values {unknown[:5]} are not among the classes' values {list(label_values)}")
    out = np.zeros(array.shape, dtype=np.int64)
    for value, index in lookup.items():
        out[array == value] = index
    return out


def write_png(path: PathLike, array: np.ndarray) -> None:
    """Write a 2D uint8/uint16 array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
