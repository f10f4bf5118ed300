"""2D slices of a volume along an anatomical axis, in one display orientation, and back.

Which array axis is "axial" depends on how the file was stored, so it is resolved from the
voxel-to-RAS matrix (nibabel's ``io_orientation``: each voxel axis is assigned the world axis
it is closest to, one to one, so oblique acquisitions work too), never assumed to be the last.

The display rule (radiological convention, the one PACS viewers and Slicer use) fixes how a
slice's rows and columns point, whatever the storage order and flips:

=========  ===========================  ===================================
plane      columns (left -> right)      rows (top -> bottom)
=========  ===========================  ===================================
axial      towards patient Left          towards Posterior  (anterior at top)
coronal    towards patient Left          towards Inferior   (superior at top)
sagittal   towards Posterior             towards Inferior   (superior at top)
=========  ===========================  ===================================

So a model trained on volumes stored one way sees anatomy the same way in a volume stored
another way. In-plane axes are only permuted and flipped (no resampling), so
:func:`reassemble` is an exact inverse and a voxel's value returns to the very same voxel.
The slice order is the file's own index order along the slicing axis (never flipped), so a
slice index means what a viewer showing IJK indices shows.

A PNG radiograph read by :mod:`tedm_core.io.volumes` has ITK's identity LPS geometry, which
this rule leaves untouched: columns stay columns and rows stay rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from .io.volumes import Volume

AXES = ("axial", "coronal", "sagittal", "k")
_PLANE_NORMAL = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS world axis of the plane's normal
_PLANE_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}
# plane normal -> ((row world axis, row sign), (column world axis, column sign)); sign -1 means
# "increasing index goes towards decreasing R/A/S", i.e. towards L, P or I.
_DISPLAY = {2: ((1, -1), (0, -1)), 1: ((2, -1), (0, -1)), 0: ((2, -1), (1, -1))}


@dataclass(frozen=True)
class SliceLayout:
    """How a ``(K, J, I)`` grid was cut into ``(N, H, W)`` slices; enough to undo it exactly.

    ``slice_dim``, ``row_dim`` and ``col_dim`` are dimensions of the ``(K, J, I)`` array
    (0 = K, 1 = J, 2 = I); ``flip_rows``/``flip_cols`` say whether the in-plane axes were reversed.
    """

    grid: Tuple[int, int, int]
    axis: str
    plane: str
    slice_dim: int
    row_dim: int
    col_dim: int
    flip_rows: bool
    flip_cols: bool

    @property
    def num_slices(self) -> int:
        return self.grid[self.slice_dim]

    @property
    def slice_shape(self) -> Tuple[int, int]:
        return self.grid[self.row_dim], self.grid[self.col_dim]


def _voxel_to_dim(voxel_axis: int) -> int:
    """Voxel axis (0 = i, 1 = j, 2 = k) -> dimension of the ``(K, J, I)`` array."""
    return 2 - int(voxel_axis)


def slice_layout(ijk_to_ras: np.ndarray, grid: Tuple[int, int, int], axis: str = "axial") -> SliceLayout:
    """The layout for slicing a ``grid`` = ``(K, J, I)`` volume with this geometry along ``axis``.

    ``axis``: ``axial``, ``coronal``, ``sagittal`` (the array axis closest to S, A or R) or
    ``k`` (the file's own K axis; its plane name and display rule follow the direction K is
    closest to).
    """
    from nibabel.orientations import io_orientation

    axis = str(axis).lower()
    if axis not in AXES:
        raise ValueError(f"unknown slicing axis {axis!r}; expected one of {', '.join(AXES)}")
    ornt = io_orientation(np.asarray(ijk_to_ras, dtype=np.float64))  # per voxel axis: (world axis, +-1)
    if np.isnan(ornt).any():
        raise ValueError("the voxel-to-world matrix is degenerate: cannot tell the anatomical axes apart")
    world_of = {v: int(ornt[v, 0]) for v in range(3)}
    voxel_of = {w: v for v, w in world_of.items()}
    sign_of = {v: int(ornt[v, 1]) for v in range(3)}
    if axis == "k":
        slice_voxel = 2
        normal = world_of[2]
    else:
        normal = _PLANE_NORMAL[axis]
        slice_voxel = voxel_of[normal]
    (row_world, row_sign), (col_world, col_sign) = _DISPLAY[normal]
    row_voxel, col_voxel = voxel_of[row_world], voxel_of[col_world]
    return SliceLayout(
        grid=tuple(int(g) for g in grid),  # type: ignore[arg-type]
        axis=axis,
        plane=_PLANE_NAMES[normal],
        slice_dim=_voxel_to_dim(slice_voxel),
        row_dim=_voxel_to_dim(row_voxel),
        col_dim=_voxel_to_dim(col_voxel),
        flip_rows=sign_of[row_voxel] != row_sign,
        flip_cols=sign_of[col_voxel] != col_sign,
    )


def plane_across(ijk_to_ras: np.ndarray, dim: int) -> str:
    """The ``axis`` that cuts across dimension ``dim`` of a ``(K, J, I)`` array: ``k`` for K,
    else the anatomical plane whose normal that voxel axis is assigned to (``io_orientation`` is
    one to one, so :func:`slice_layout` then cuts exactly that dimension)."""
    from nibabel.orientations import io_orientation

    if dim == 0:
        return "k"
    world = io_orientation(np.asarray(ijk_to_ras, dtype=np.float64))[2 - int(dim), 0]
    if np.isnan(world):
        raise ValueError("the voxel-to-world matrix is degenerate: cannot tell the anatomical axes apart")
    return _PLANE_NAMES[int(world)]


def to_slices(array: np.ndarray, layout: SliceLayout) -> np.ndarray:
    """``(..., K, J, I)`` -> ``(N, ..., H, W)`` following ``layout`` (a view when possible)."""
    array = np.asarray(array)
    lead = array.ndim - 3
    if tuple(array.shape[lead:]) != layout.grid:
        raise ValueError(f"array grid {array.shape[lead:]} differs from the layout's {layout.grid}")
    out = np.moveaxis(
        array, [lead + layout.slice_dim, lead + layout.row_dim, lead + layout.col_dim], [lead, lead + 1, lead + 2]
    )
    out = np.moveaxis(out, lead, 0)  # (N, ..., H, W)
    if layout.flip_rows:
        out = np.flip(out, axis=-2)
    if layout.flip_cols:
        out = np.flip(out, axis=-1)
    return out


def extract_slices(volume: Volume, axis: str = "axial") -> Tuple[np.ndarray, SliceLayout]:
    """All slices of ``volume`` along ``axis``: float32 ``(N, C, H, W)`` in display orientation."""
    layout = slice_layout(volume.ijk_to_ras, volume.shape, axis)
    return np.ascontiguousarray(to_slices(volume.array, layout), dtype=np.float32), layout


def reassemble(per_slice: np.ndarray, layout: SliceLayout) -> np.ndarray:
    """The exact inverse of :func:`to_slices`: ``(N, ..., H, W)`` -> ``(..., K, J, I)``.

    Extra dimensions between N and (H, W) (e.g. classes of a probability map) come first in
    the result, e.g. ``(N, classes, H, W)`` -> ``(classes, K, J, I)``.
    """
    per_slice = np.asarray(per_slice)
    n, h, w = per_slice.shape[0], per_slice.shape[-2], per_slice.shape[-1]
    if (n, h, w) != (layout.num_slices,) + layout.slice_shape:
        raise ValueError(
            f"slices of shape {(n, h, w)} (N, H, W) do not fit the layout's {(layout.num_slices,) + layout.slice_shape}"
        )
    out = per_slice
    if layout.flip_rows:
        out = np.flip(out, axis=-2)
    if layout.flip_cols:
        out = np.flip(out, axis=-1)
    lead = out.ndim - 3
    out = np.moveaxis(out, 0, lead)  # (..., N, H, W)
    out = np.moveaxis(
        out, [lead, lead + 1, lead + 2], [lead + layout.slice_dim, lead + layout.row_dim, lead + layout.col_dim]
    )
    return np.ascontiguousarray(out)


def labelled_slice_indices(labels: np.ndarray, layout: SliceLayout, background: int = 0) -> List[int]:
    """Indices (along the slicing axis, file order) of the slices of a ``(K, J, I)`` label array
    holding at least one non-background voxel: the slices a clinician labelled."""
    per_slice = to_slices(np.asarray(labels), layout)
    carries = (per_slice != background).reshape(per_slice.shape[0], -1).any(axis=1)
    return np.flatnonzero(carries).tolist()
