"""2D images (PNG, JPG, BMP, TIFF): radiographs in, masks and maps out."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from .atomic import atomic_path
from .walk import walk_following_links

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera or phone sets for display: 1 = as stored
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


def list_images_under(folder: PathLike, exclude: Sequence[PathLike] = ()) -> List[Path]:
    """Image files under ``folder`` and its subfolders (as ``tedm segment`` mirrors an input tree),
    sorted; hidden files and folders, and the folders in ``exclude`` (compared after resolving
    links), left out. Links to folders are followed, each real folder once."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "folder not found" if not folder.exists() else "is not a folder")
    skip = {os.path.realpath(p) for p in exclude}
    files = [
        top / name
        for top, names in walk_following_links(folder, lambda path: os.path.realpath(path) not in skip)
        for name in names
        if is_image_file(top / name)
    ]
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise InputError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or its subfolders")
    return files


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            # A multi-page TIFF or an animated PNG: reading the first page would drop the rest unseen.
            raise InputError(
                path, f"holds {frames} pages/frames; expected one image (split it, or use a volume format)"
            )
        image.load()
        return image
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Image.DecompressionBombError as error:
        raise InputError(path, f"is too large to decode safely ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
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
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation not in (0, 1):
        # Labels are written on the stored pixels (they must land where they came from), so the
        # image is not turned; but the model then sees it as stored, which may be on its side.
        log.warning(
            "%s: its EXIF orientation (%s) asks viewers to turn or mirror it; it is segmented as stored, "
            "which may be on its side for the model; save it upright without the tag for best results",
            path,
            orientation,
        )
    return array[None]


def read_label_image(path: PathLike, label_values: Sequence[int]) -> np.ndarray:
    """A mask or label image as int64 class indices ``(H, W)``.

    ``label_values[k]`` is the pixel value of class k. A binary mask may be stored as 0/1 or
    0/255: for two classes any non-zero pixel is foreground.
    """
    path = Path(path)
    image = _open(path)
    if image.format == "JPEG":
        raise InputError(path, "is a JPEG: lossy compression changes label values at every edge; save masks as PNG")
    array = _label_array(path, image).astype(np.int64)
    if len(label_values) == 2:
        # A 2D mask may always be 0/1 or 0/255 (segment writes one-structure images as 0/255).
        return binary_foreground(path, array, label_values[0], label_values[1], image_mask=True)
    lookup = {int(v): k for k, v in enumerate(label_values)}
    unknown = sorted(set(np.unique(array).tolist()) - set(lookup))
    if unknown:
        raise InputError(path, f"label values {unknown[:5]} are not among the classes' values {list(label_values)}")
    out = np.zeros(array.shape, dtype=np.int64)
    for value, index in lookup.items():
        out[array == value] = index
    return out


# The values a one-structure mask is stored with, whichever of them the model's classes name.
MASK_CONVENTION_VALUES = (1, 255)


def binary_foreground(
    path: Optional[PathLike],
    values: np.ndarray,
    background: int,
    structure: Optional[int] = None,
    image_mask: bool = False,
) -> np.ndarray:
    """A one-structure mask as 0/1. Several different non-background values are refused: merging
    them would silently turn a label map of several structures, or a resized mask's blurred edge,
    into one. The structure's value is ``structure``; a structure valued 1 or 255, or any
    structure in a 2D mask image (``image_mask``), is also found as 1 or 255 (masks come as 0/1 or
    0/255), any other value only as itself: a label volume holding only BraTS value 2 is not the
    structure valued 4 (None: any one value)."""
    foreground = values != background
    present = np.unique(values[foreground])
    if len(present) > 1:
        shown = ", ".join(str(int(v)) for v in present[:4]) + (", ..." if len(present) > 4 else "")
        raise InputError(
            path,
            f"holds {len(present)} different non-background values ({shown}) where one structure is expected; "
            "give each structure a class and its label value, or threshold the mask",
        )
    if len(present) and structure is not None and int(present[0]) != int(structure):
        conventional = image_mask or int(structure) in MASK_CONVENTION_VALUES
        accepted = MASK_CONVENTION_VALUES + (int(structure),) if conventional else (int(structure),)
        if int(present[0]) not in accepted:
            raise InputError(
                path,
                f"holds the value {int(present[0])} where the structure's value is {int(structure)}; give the "
                "classes' label values as the file stores them (e.g. --label-values)",
            )
    return foreground.astype(np.int64)


def _label_array(path: Path, image: Image.Image) -> np.ndarray:
    """The label values of a mask; refuse masks whose content a channel we would drop carries."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "L", "1"):
        return np.asarray(image)
    rgba = np.asarray(image.convert("RGBA"))
    if rgba[..., 3].min() != rgba[..., 3].max():
        raise InputError(
            path, "holds its mask in the alpha (transparency) channel; save it as an opaque grey-level PNG"
        )
    if image.mode == "P":
        return np.asarray(image)  # palette indices are the label values (VOC-style label maps)
    red, green, blue = rgba[..., 0], rgba[..., 1], rgba[..., 2]
    if not (np.array_equal(red, green) and np.array_equal(red, blue)):
        raise InputError(path, "is a colour image; a mask or label map must hold grey-level label values")
    return red


def write_png(path: PathLike, array: np.ndarray) -> None:
    """Write a 2D uint8/uint16 array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
