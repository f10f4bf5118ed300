"""Volumes in, label volumes out, with the input's geometry kept exactly.

One in-memory convention for every format:

* ``Volume.array`` is float32 ``(C, K, J, I)``: channels first, then the numpy order that
  SimpleITK's ``GetArrayFromImage`` and Slicer's ``arrayFromVolume`` give (I varies fastest).
* ``Volume.ijk_to_ras`` is the 4x4 float64 matrix taking voxel indices ``(i, j, k, 1)`` to
  RAS millimetres, like nibabel's ``affine`` and Slicer's ``IJKToRAS``.

Formats: NIfTI (``.nii``, ``.nii.gz``; nibabel, so sform/qform and their codes survive),
NRRD/MHA/MHD (SimpleITK; ITK's LPS origin and direction converted to RAS exactly), DICOM series
folders (SimpleITK's GDCM series reader) and PNG/JPG radiographs (one-slice volumes, unit
spacing, the geometry ITK gives a PNG).

Writers copy the reference's *native* geometry (the NIfTI header, or ITK's spacing, origin and
direction doubles) rather than recomputing it from ``ijk_to_ras``: recomputation would round
through float32 quaternions and change the affine in the last bits. Every failure is an
:class:`~tedm_core.errors.InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError
from .atomic import atomic_path
from .images import IMAGE_SUFFIXES, is_image_file, read_grey

PathLike = Union[str, "os.PathLike[str]"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
DICOM_SUFFIXES = (".dcm", ".ima")

# ITK (and DICOM) world coordinates are LPS; RAS = LPS with x and y negated.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Geometry tolerances for "the same grid" (label volume vs image, modalities of one case). Files
# written by other tools often carry float32-rounded affines, so exact equality is too strict.
GEOMETRY_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


# Image formats found beside medical data that we do not read: each is refused with a word (a
# failing case) rather than silently left out of a cohort.
_ANALYZE = "Analyze 7.5 (.hdr/.img) is not supported: its orientation is ambiguous; convert it to NIfTI (.nii.gz)"
UNSUPPORTED_FORMATS = {
    ".gif": "GIF images are not supported (palette colours, often several frames); convert it to PNG",
    ".webp": "WebP images are not supported; convert it to PNG",
    ".jp2": "JPEG 2000 images are not supported; convert it to PNG",
    ".hdr": _ANALYZE,
    ".img": _ANALYZE,
}


def unsupported_format(path: PathLike) -> Optional[str]:
    """Why ``path`` (a format we know of but do not read) cannot be used; ``"skip"`` for the
    ``.img`` half of an Analyze pair (its ``.hdr`` carries the message); ``None`` otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in UNSUPPORTED_FORMATS or path.name.startswith("."):
        return None
    if suffix == ".img" and any(path.with_suffix(s).exists() for s in (".hdr", ".HDR")):
        return "skip"
    return UNSUPPORTED_FORMATS[suffix]


def volume_suffix(path: PathLike) -> str:
    """The format suffix of ``path`` in lower case (``.nii.gz`` counts as one), or ``""``."""
    name = Path(path).name.lower()
    for suffix in (".nii.gz",) + tuple(s for s in VOLUME_SUFFIXES + IMAGE_SUFFIXES if s != ".nii.gz"):
        if name.endswith(suffix):
            return suffix
    return ""


def strip_suffix(path: PathLike) -> str:
    """The file name without its format suffix (``case.nii.gz`` -> ``case``)."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else Path(name).stem


def is_volume_file(path: PathLike) -> bool:
    name = Path(path).name
    return not name.startswith(".") and volume_suffix(name) in VOLUME_SUFFIXES


def is_dicom_folder(path: PathLike) -> bool:
    """A folder holding ``.dcm``/``.ima`` files directly (one series; sub-folders are not looked into)."""
    path = Path(path)
    return path.is_dir() and any(p.suffix.lower() in DICOM_SUFFIXES and p.is_file() for p in path.iterdir())


@dataclass
class Volume:
    """An image on a 3D voxel grid with its geometry.

    Attributes:
        array: float32 ``(C, K, J, I)``.
        ijk_to_ras: float64 ``(4, 4)`` voxel-to-RAS-mm matrix.
        path: the file (or DICOM folder) it came from; ``None`` for synthetic volumes.
        channel_names: one name per channel (the modality, e.g. ``FLAIR``).
        source_format: ``nifti``, ``itk``, ``dicom``, ``image2d`` or ``array``.
        native: the reader's own geometry record (a nibabel header, or ITK's spacing, origin,
            direction and dimension), used by the writers to reproduce the geometry bit for bit.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    path: Optional[Path] = None
    channel_names: List[str] = field(default_factory=lambda: ["image"])
    source_format: str = "array"
    native: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if self.array.ndim != 4:
            raise ValueError(f"Volume.array must be (C, K, J, I), got shape {self.array.shape}")
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError(f"Volume.ijk_to_ras must be 4x4, got shape {self.ijk_to_ras.shape}")
        if len(self.channel_names) != self.array.shape[0]:
            raise ValueError(f"{len(self.channel_names)} channel names for {self.array.shape[0]} channels")

    @property
    def shape(self) -> Tuple[int, int, int]:
        """The grid shape ``(K, J, I)``."""
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size in mm along ``(i, j, k)``."""
        return tuple(float(s) for s in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<array>"

    def with_array(self, array: np.ndarray, channel_names: Optional[Sequence[str]] = None) -> Volume:
        """The same grid and geometry with new voxel values (e.g. the normalised intensities).

        ``array`` may be ``(K, J, I)`` (one channel) or ``(C, K, J, I)``.
        """
        array = np.asarray(array)
        if array.ndim == 3:
            array = array[None]
        if tuple(array.shape[1:]) != self.shape:
            raise ValueError(f"new array grid {array.shape[1:]} differs from the volume's {self.shape}")
        if channel_names is None:
            channel_names = (
                self.channel_names
                if array.shape[0] == self.array.shape[0]
                else [f"channel{c}" for c in range(array.shape[0])]
            )
        return replace(self, array=array, channel_names=list(channel_names))


# ---------------------------------------------------------------------------------------------
# Reading


def read_volume(path: PathLike, require_3d: bool = False, allow_constant: bool = False) -> Volume:
    """Read one image file or DICOM series folder as a :class:`Volume` (one channel).

    Args:
        path: ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd``, a folder holding one
            DICOM series, or a PNG/JPG/BMP/TIFF radiograph.
        require_3d: refuse images with a single slice (a 2D file where a volume is expected).
        allow_constant: accept a volume whose voxels all have one value (a label volume with
            nothing labelled); images are refused, as normalising them is meaningless.

    Raises:
        InputError: for anything that cannot be used, with a one-line reason.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found" if not path.is_symlink() else "broken link: its target does not exist")
    suffix = volume_suffix(path)
    if path.is_dir():
        if suffix:
            raise InputError(path, "is a folder, not a file")
        volume = _read_dicom_folder(path)
    elif suffix in NIFTI_SUFFIXES:
        volume = _read_nifti(path)
    elif suffix in ITK_SUFFIXES:
        volume = _read_itk(path)
    elif is_image_file(path):
        volume = _read_image2d(path)
    elif path.suffix.lower() in DICOM_SUFFIXES:
        raise InputError(path, "a single DICOM file; pass the folder holding the whole series")
    elif unsupported_format(path):
        raise InputError(path, UNSUPPORTED_FORMATS[path.suffix.lower()])
    else:
        raise InputError(
            path,
            f"unsupported file type; expected one of {', '.join(VOLUME_SUFFIXES + IMAGE_SUFFIXES)} or a DICOM folder",
        )
    _check_values(volume, allow_constant)
    if require_3d and min(volume.shape) == 1:
        raise InputError(path, f"is a 2D image (grid {volume.shape[::-1]}) where a 3D volume is expected")
    return volume


def read_case(
    paths: Sequence[PathLike], channel_names: Optional[Sequence[str]] = None, require_3d: bool = False
) -> Volume:
    """Read several files of one case (e.g. FLAIR and T1) as the channels of one volume.

    Every file must have the first file's grid shape and geometry (within
    ``GEOMETRY_ATOL_MM``/``DIRECTION_ATOL``): modalities are stacked voxel by voxel, so
    they must already be co-registered and resampled (BraTS files are).
    """
    if not paths:
        raise InputError(None, "a case needs at least one file")
    names = list(channel_names) if channel_names is not None else [strip_suffix(p) for p in paths]
    if len(names) != len(paths):
        raise InputError(paths[0], f"{len(paths)} files for {len(names)} channel names {names}")
    volumes = [read_volume(p, require_3d=require_3d) for p in paths]
    first = volumes[0]
    for other in volumes[1:]:
        problem = geometry_mismatch(first, other)
        if problem:
            raise InputError(other.path, f"does not match {first.path}: {problem}")
    array = np.concatenate([v.array for v in volumes])
    return replace(first, array=array, channel_names=names)


def geometry_mismatch(reference: Volume, other: Volume) -> Optional[str]:
    """A one-line description of how ``other``'s grid differs from ``reference``'s, or ``None``."""
    if other.shape != reference.shape:
        return f"grid {other.shape[::-1]} (I, J, K) differs from {reference.shape[::-1]}"
    a, b = reference.ijk_to_ras, other.ijk_to_ras
    spacing_a, spacing_b = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(spacing_a, spacing_b, atol=GEOMETRY_ATOL_MM, rtol=0):
        return f"voxel size {np.round(spacing_b, 4).tolist()} mm differs from {np.round(spacing_a, 4).tolist()} mm"
    if not np.allclose(a[:3, :3] / spacing_a, b[:3, :3] / spacing_b, atol=DIRECTION_ATOL, rtol=0):
        return "orientation (direction matrix) differs"
    if not np.allclose(a[:3, 3], b[:3, 3], atol=GEOMETRY_ATOL_MM, rtol=0):
        return f"origin {np.round(b[:3, 3], 3).tolist()} differs from {np.round(a[:3, 3], 3).tolist()} (RAS mm)"
    return None


def value_problem(array: np.ndarray, allow_constant: bool = False) -> Optional[str]:
    """What makes an image's values unusable (NaN or infinite values; one value everywhere,
    unless ``allow_constant``: a label volume may be all background), or None."""
    finite = np.isfinite(array)
    if not finite.all():
        return f"contains {int(array.size - np.count_nonzero(finite))} NaN or infinite voxel values"
    lo, hi = float(array.min()), float(array.max())
    if lo == hi and not allow_constant:
        return f"every voxel is {lo:g}: the image is empty"
    return None


def _check_values(volume: Volume, allow_constant: bool = False) -> None:
    array = volume.array
    if array.size == 0 or min(array.shape) == 0:
        raise InputError(volume.path, f"is empty (grid {array.shape[1:][::-1]})")
    problem = value_problem(array, allow_constant)
    if problem:
        raise InputError(volume.path, problem)
    if not np.isfinite(volume.ijk_to_ras).all() or abs(np.linalg.det(volume.ijk_to_ras[:3, :3])) < 1e-12:
        raise InputError(volume.path, "has an invalid (singular or non-finite) voxel-to-world matrix")


def _one_line_error(error: BaseException) -> str:
    """A short, single-line reason from a reader's (often multi-line) exception."""
    text = str(error) or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # ITK: "ITK ERROR: ImageFileReader(0x...): <reason>" is the informative line.
    for line in lines:
        if "ITK ERROR" in line or "ERROR:" in line:
            text = line.split("):", 1)[-1].strip() if "):" in line else line
            break
    else:
        text = lines[0] if lines else type(error).__name__
    return " ".join(text.split())[:200]


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``, else the physical
    memory), or ``None`` where neither can be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_declared_size(path: Path, shape: Sequence[int], components: int = 1) -> None:
    """Refuse, from its header alone, a volume whose voxels would not fit in memory: reading it
    would otherwise allocate until the machine swaps or the process is killed."""
    voxels = int(np.prod([int(s) for s in shape], dtype=object)) * max(1, int(components))
    needed = 2 * 4 * voxels  # float32, and the reader's own copy while converting
    available = available_memory()
    if available is not None and needed > available:
        grid = "x".join(str(int(s)) for s in shape)
        raise InputError(
            path,
            f"declares a {grid} grid ({needed / 2**30:.1f} GiB to read as float32), more than the "
            f"{available / 2**30:.1f} GiB of memory available; crop or resample it first",
        )


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(path, f"is not a NIfTI image (nibabel read it as {type(image).__name__})")
        shape = image.shape
        check_declared_size(path, shape)
        if len(shape) > 3:
            extra = shape[3:]
            if any(s != 1 for s in extra):
                raise InputError(
                    path,
                    f"is a {len(shape)}D image {tuple(shape)}; expected a 3D volume "
                    "(split time series or vector images first)",
                )
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except InputError:
        raise
    except MemoryError:
        raise InputError(path, "does not fit in the memory available; crop or resample it first") from None
    except (EOFError, zlib.error) as error:
        raise InputError(path, f"is truncated or corrupt ({_one_line_error(error)})") from None
    except Exception as error:  # nibabel raises many types (ImageFileError, OSError, ValueError...)
        raise InputError(path, f"cannot be read as NIfTI ({_one_line_error(error)})") from None
    data = data.reshape(data.shape[: max(2, min(3, data.ndim))]) if data.ndim > 3 else data
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise InputError(path, f"has {data.ndim} dimensions; expected a 3D volume")
    # nibabel's array is (I, J, K); ours is (K, J, I).
    array = np.ascontiguousarray(data.transpose(2, 1, 0))[None]
    return Volume(
        array, np.array(image.affine, dtype=np.float64), path, [strip_suffix(path)], "nifti", image.header.copy()
    )


@dataclass(frozen=True)
class ItkGeometry:
    """ITK's own description of a grid (LPS), kept so that writers reproduce it bit for bit."""

    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]
    dimension: int

    @classmethod
    def from_image(cls, image: Any) -> ItkGeometry:
        return cls(
            tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()), int(image.GetDimension())
        )

    def apply(self, image: Any) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def ijk_to_ras(self) -> np.ndarray:
        d = self.dimension
        direction = np.eye(3)
        direction[:d, :d] = np.asarray(self.direction, dtype=np.float64).reshape(d, d)
        spacing = np.ones(3)
        spacing[:d] = self.spacing
        origin = np.zeros(3)
        origin[:d] = self.origin
        lps = np.eye(4)
        lps[:3, :3] = direction * spacing[None, :]  # column m = direction of index axis m times its spacing
        lps[:3, 3] = origin
        return LPS_TO_RAS @ lps


def itk_geometry_from_ras(ijk_to_ras: np.ndarray, dimension: int = 3) -> ItkGeometry:
    """The ITK (LPS) spacing/origin/direction of a RAS voxel-to-world matrix."""
    lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    d = dimension
    return ItkGeometry(
        tuple(spacing[:d].tolist()), tuple(lps[:d, 3].tolist()), tuple(direction[:d, :d].ravel().tolist()), d
    )


def _itk_to_volume(image: Any, path: Path, source_format: str) -> Volume:
    import SimpleITK as sitk

    dimension = image.GetDimension()
    if dimension not in (2, 3):
        raise InputError(path, f"is a {dimension}D image {tuple(image.GetSize())}; expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            path,
            f"has {image.GetNumberOfComponentsPerPixel()} components per voxel (vector/RGB image); "
            "expected a scalar image",
        )
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (K, J, I) or (J, I)
    if array.ndim == 2:
        array = array[None]
    geometry = ItkGeometry.from_image(image)
    return Volume(array[None], geometry.ijk_to_ras(), path, [strip_suffix(path)], source_format, geometry)


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        if reader.GetDimension() > 3:
            size = tuple(reader.GetSize())
            if any(s != 1 for s in size[3:]):
                raise InputError(path, f"is a {reader.GetDimension()}D image {size}; expected a 3D volume")
        check_declared_size(path, reader.GetSize(), reader.GetNumberOfComponents())
        image = reader.Execute()
        if image.GetDimension() > 3:
            image = image[:, :, :, 0]
    except InputError:
        raise
    except RuntimeError as error:
        raise InputError(path, f"cannot be read ({_one_line_error(error)})") from None
    return _itk_to_volume(image, path, "itk")


def _read_dicom_folder(folder: Path) -> Volume:
    import SimpleITK as sitk

    # GDCM prints multi-line warnings to stderr for folders without a series; our own one-line
    # error says it better, so ITK's warning display is off while scanning.
    warnings_were_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as error:
        raise InputError(folder, f"cannot be scanned for DICOM ({_one_line_error(error)})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_were_shown)
    if not series:
        raise InputError(folder, "no DICOM series in this folder" if any(folder.iterdir()) else "empty folder")
    if len(series) > 1:
        raise InputError(folder, f"holds {len(series)} DICOM series; put each series in its own folder")
    try:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
        _check_dicom_slices(folder, files)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(folder, f"DICOM series cannot be read ({_one_line_error(error)})") from None
    return _itk_to_volume(image, folder, "dicom")


# Slice positions may differ from an even spacing by this share of it (scanners round positions).
DICOM_SPACING_TOLERANCE = 0.05


def _check_dicom_slices(folder: Path, files: Sequence[str]) -> None:
    """Refuse a series whose slices ITK would stack on a wrong grid: slices of several orientations
    (stacked as if they were the first's), or unevenly spaced ones (a missing slice: ITK spaces the
    rest evenly, so each lands up to half a slice away from where it was imaged). Single-frame
    slices without position tags are left to ITK."""
    import SimpleITK as sitk

    if len(files) < 3:
        return
    orientations, positions = [], []
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        header.ReadImageInformation()
        if not (header.HasMetaDataKey("0020|0037") and header.HasMetaDataKey("0020|0032")):
            return
        orientations.append([float(v) for v in header.GetMetaData("0020|0037").split("\\")])
        positions.append([float(v) for v in header.GetMetaData("0020|0032").split("\\")])
    orientation, position = np.asarray(orientations), np.asarray(positions)
    if orientation.shape[1] != 6 or position.shape[1] != 3:
        return
    differs = np.abs(orientation - orientation[0]).max(axis=1) > 1e-3
    if differs.any():
        raise InputError(
            folder,
            f"its slices lie in different orientations ({Path(files[int(np.argmax(differs))]).name} is not in the "
            f"plane of {Path(files[0]).name}): put each acquisition in its own folder",
        )
    normal = np.cross(orientation[0, :3], orientation[0, 3:])
    depth = np.sort(position @ normal)
    gaps = np.diff(depth)
    typical = float(np.median(gaps))
    if typical <= 0 or np.abs(gaps - typical).max() > DICOM_SPACING_TOLERANCE * typical:
        widest = int(np.argmax(np.abs(gaps - typical)))
        raise InputError(
            folder,
            f"its slices are not evenly spaced ({gaps[widest]:.3g} mm between two of them, {typical:.3g} mm "
            "elsewhere): a slice is missing or repeated, or the folder mixes acquisitions",
        )


def _read_image2d(path: Path) -> Volume:
    """A radiograph: ITK's geometry for a PNG (unit spacing, origin 0, identity LPS direction).

    So column i points to patient Left and row j to Posterior, which :mod:`tedm_core.slicing`'s
    display rule leaves untouched: the model sees the picture exactly as stored.
    """
    grey = read_grey(path)  # (1, H, W), raises InputError
    geometry = ItkGeometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), 2)
    return Volume(grey[:, None], geometry.ijk_to_ras(), path, [strip_suffix(path)], "image2d", geometry)


# ---------------------------------------------------------------------------------------------
# Writing


def write_label_volume(path: PathLike, labels: np.ndarray, reference: Volume) -> Path:
    """Write integer labels ``(K, J, I)`` on ``reference``'s grid, atomically.

    The format follows ``path``'s suffix. The geometry is the reference's, copied from its
    native record when there is one (so a NIfTI keeps its sform/qform and codes, an ITK file
    its spacing/origin/direction doubles). Values are written as given (uint8, or uint16 when
    a value exceeds 255).
    """
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[None]
    _check_grid(path, labels, reference)
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError("label values must be within 0..65535")
    dtype = np.uint8 if (labels.size == 0 or labels.max() < 256) else np.uint16
    return _write(Path(path), labels.astype(dtype), reference, is_label=True)


def write_float_volume(path: PathLike, values: np.ndarray, reference: Volume) -> Path:
    """Write a float map ``(K, J, I)`` (probability, uncertainty) on ``reference``'s grid, atomically.

    As float32 for volume formats. A 2D PNG target gets a 16-bit image of ``values * 65535``
    clipped to [0, 1] (probabilities and spreads lie there); TIFF keeps float32.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 2:
        values = values[None]
    _check_grid(path, values, reference)
    return _write(Path(path), values, reference, is_label=False)


def _check_grid(path: PathLike, data: np.ndarray, reference: Volume) -> None:
    if tuple(data.shape) != reference.shape:
        raise ValueError(f"{path}: data grid {data.shape} differs from the reference grid {reference.shape}")


def _write(path: Path, data: np.ndarray, reference: Volume, is_label: bool) -> Path:
    suffix = volume_suffix(path)
    with atomic_path(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(tmp, data, reference)
        elif suffix in ITK_SUFFIXES:
            try:
                _write_itk(tmp, data, reference)
            except RuntimeError as error:
                raise _itk_write_error(error, path, tmp, data.nbytes) from None
        elif suffix in IMAGE_SUFFIXES:
            _write_image2d(tmp, path, data, is_label)
        else:
            raise ValueError(f"{path}: unsupported output format; use .nii.gz, .nrrd, .mha or .png")
    return path


# What ITK's messages say when the system refused a write; the NRRD writer often says only
# that it "failed to write" (it reports no errno), so a probe write asks the folder itself.
_ITK_WRITE_REASONS = (
    ("No space left on device", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT),
    ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
)


def _itk_write_error(error: RuntimeError, path: Path, tmp: Path, nbytes: int) -> OSError:
    """An ITK write failure as the ``OSError`` it stands for (disk full, read-only, no
    permission), so a batch stops on what every later case would share as it does for the
    other formats; otherwise an ``OSError`` (EIO) with ITK's reason on one line."""
    text = str(error)
    for words, code in _ITK_WRITE_REASONS:
        if words in text:
            return OSError(code, os.strerror(code), str(path))
    probe = tmp.with_name(f"{tmp.name}.probe")
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * max(4096, min(nbytes, 1 << 20)))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as refused:
        return OSError(refused.errno, refused.strerror, str(path))
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    # ITK's first error line says where, its last (NRRD's "[nrrd] ...") why.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = _one_line_error(error)
    if lines and lines[-1] not in reason:
        reason = f"{reason} {lines[-1]}"
    return OSError(errno.EIO, " ".join(reason.split())[:300], str(path))


def _write_nifti(tmp: Path, data: np.ndarray, reference: Volume) -> None:
    import nibabel as nib

    array = np.ascontiguousarray(data.transpose(2, 1, 0))  # (K, J, I) -> nibabel's (I, J, K)
    header = reference.native if isinstance(reference.native, nib.Nifti1Header) else None
    if header is not None:
        # Copy the whole header so sform, qform, their codes, pixdim and xyzt units are the
        # input's bit for bit; only the data description changes.
        header = header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"], header["cal_max"] = 0.0, 0.0
        header["intent_code"] = 0
        if len(header.get_data_shape()) == 2 and array.shape[2] == 1:
            # A 2D input (dim[0] = 2) gets 2D outputs: ITK tools refuse to combine a 2D image
            # with a 3D label file of one slice (e.g. SimpleITK's Mask).
            array = array[:, :, 0]
        elif len(header.get_data_shape()) != 3:
            header.set_data_shape(array.shape)
        image = (
            nib.Nifti1Image(array, None, header)
            if not isinstance(header, nib.Nifti2Header)
            else nib.Nifti2Image(array, None, header)
        )
    else:
        image = nib.Nifti1Image(array, reference.ijk_to_ras)
        image.header.set_data_dtype(data.dtype)
        image.header.set_sform(reference.ijk_to_ras, code="scanner")
        image.header.set_qform(reference.ijk_to_ras, code="scanner")
        image.header.set_xyzt_units("mm")
    nib.save(image, str(tmp))


def _write_itk(tmp: Path, data: np.ndarray, reference: Volume) -> None:
    import SimpleITK as sitk

    geometry = (
        reference.native if isinstance(reference.native, ItkGeometry) else itk_geometry_from_ras(reference.ijk_to_ras)
    )
    array = data[0] if geometry.dimension == 2 else data
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply(image)
    sitk.WriteImage(image, str(tmp), useCompression=True)


def _write_image2d(tmp: Path, path: Path, data: np.ndarray, is_label: bool) -> None:
    from PIL import Image

    if data.shape[0] != 1:
        raise ValueError(f"{path}: a 2D image format cannot hold {data.shape[0]} slices; use .nii.gz")
    plane = data[0]
    suffix = volume_suffix(path)
    if is_label:
        if suffix in (".jpg", ".jpeg"):
            raise ValueError(f"{path}: JPEG is lossy and would change label values; use .png")
        image = Image.fromarray(np.ascontiguousarray(plane))
    elif suffix in (".tif", ".tiff"):
        image = Image.fromarray(np.ascontiguousarray(plane.astype(np.float32)), mode="F")
    else:
        image = Image.fromarray(np.ascontiguousarray(np.round(np.clip(plane, 0, 1) * 65535).astype(np.uint16)))
    image.save(tmp, format={".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}.get(suffix, "PNG"))


def volume_from_array(
    array: np.ndarray, ijk_to_ras: np.ndarray, channel_names: Optional[Sequence[str]] = None
) -> Volume:
    """A synthetic volume (tests, Slicer arrays): ``array`` is ``(K, J, I)`` or ``(C, K, J, I)``."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    names = (
        list(channel_names)
        if channel_names is not None
        else (["image"] if array.shape[0] == 1 else [f"channel{c}" for c in range(array.shape[0])])
    )
    return Volume(array, ijk_to_ras, None, names, "array", None)


def describe_geometry(volume: Volume) -> Dict[str, Any]:
    """Grid, spacing and axis codes (e.g. ``('L', 'P', 'S')``) for logs and reports."""
    import nibabel as nib

    return {
        "grid_ijk": volume.shape[::-1],
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "axcodes": "".join(nib.aff2axcodes(volume.ijk_to_ras)),
    }
