"""MRML nodes <-> numpy arrays, with the geometry kept exactly.

Qt-free: only ``vtk`` and the MRML classes of ``slicer`` are used, so this module runs inside
the Slicer application and in plain pytest with the ``slicer-core`` wheel alike.

Array convention (the one ``slicer.util.arrayFromVolume`` uses, and ``tedm_core.io.volumes``):
a volume is a numpy array indexed ``[k, j, i]``; its ``ijk_to_ras`` 4x4 matrix maps the
homogeneous voxel index ``(i, j, k, 1)`` to RAS millimetres. Multi-channel inputs are stacked
in front: ``(C, K, J, I)``.

Segmentations are written as one segment per foreground class, in the grid of the input volume
(the segmentation's reference geometry is that volume), and read back by resampling every
segment into that same grid: the Segment Editor may have cropped or shared the internal
labelmaps, so reading the internal representation directly would give another extent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from . import terminology

# Geometry agreement needed before two volumes are stacked as channels of one input (mm).
GEOMETRY_TOLERANCE_MM = 1e-3
# Node attribute holding the segment ID of each foreground class, so that a user's renaming
# or reordering of segments does not change which class a segment trains.
CLASS_SEGMENT_IDS_ATTRIBUTE = "TEDMSlicer.ClassSegmentIDs"
CLASS_NAMES_ATTRIBUTE = "TEDMSlicer.ClassNames"


class GeometryError(ValueError):
    """Input volumes or segmentations that cannot be brought into one voxel grid."""


# --------------------------------------------------------------------------------------------
# matrices
# --------------------------------------------------------------------------------------------
def numpy_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix_from_numpy(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras_of(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """From the index ``(i, j, k)`` of the node's voxel array (from 0, as numpy reads it:
    :func:`array_from_volume_node`) to RAS, by the node's own IJK-to-RAS (parent transforms not
    applied: results share the parent).

    MRML's IJK indices are the image data's extent, which need not start at 0 (a volume cropped
    or built by a script): its first voxel is then IJK ``(i0, j0, k0)``, and the array's indices
    are shifted by that much. Slicer's readers always start at 0, where the two are the same."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = numpy_from_vtk_matrix(matrix)
    image = volume_node.GetImageData()
    if image is not None:
        start = np.array(image.GetExtent()[::2], dtype=np.float64)
        ijk_to_ras[:3, 3] += ijk_to_ras[:3, :3] @ start
    return ijk_to_ras


def world_from_ijk(volume_node: slicer.vtkMRMLVolumeNode, ijk: Sequence[float]) -> Tuple[float, float, float]:
    """The world (RAS) position of the voxel index ``(i, j, k)``: the node's IJK-to-RAS, then every
    transform above it. Slice views and markups live in world coordinates, so a point taken from
    the volume's own IJK-to-RAS alone lands elsewhere as soon as the volume sits under a
    transform (the "next uncertain slice" of a registered volume)."""
    local = ijk_to_ras_of(volume_node) @ np.array([float(ijk[0]), float(ijk[1]), float(ijk[2]), 1.0])
    point = [float(v) for v in local[:3]]
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return (point[0], point[1], point[2])
    to_world = vtk.vtkGeneralTransform()
    # Non-linear transforms included: the general transform applies the whole chain.
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, to_world)
    world = to_world.TransformPoint(point)
    return (float(world[0]), float(world[1]), float(world[2]))


# --------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------
# ITU-R BT.601 luma weights (R, G, B): what DICOM's YBR_FULL colour space and Pillow's
# ``convert("L")`` use, so a colour radiograph becomes the same grey image the models were trained
# on when the same PNG is read by ``tedm_core`` (Pillow) from the command line.
LUMA_BT601 = (0.299, 0.587, 0.114)


def array_from_volume_node(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """A copy of the voxels as ``(K, J, I)``, like ``slicer.util.arrayFromVolume``.

    Scalar volumes keep their own dtype (the worker normalises intensities itself, and an int16
    CT or MRI volume crosses the pipe at half the size of float32). Colour volumes
    (``vtkMRMLVectorVolumeNode``: RGB or RGBA, as Slicer loads most PNG/JPG radiographs) become
    one float32 grey channel, the BT.601 luminance of R, G, B (alpha ignored); two-component or
    other non-colour vector volumes are refused rather than guessed at.
    """
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "(none)"
        raise ValueError(f"volume '{name}' has no voxel data")
    shape = tuple(reversed(image.GetDimensions()))
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    components = image.GetNumberOfScalarComponents()
    if components == 1:
        return np.array(scalars.reshape(shape), copy=True)  # copy: VTK owns the original buffer
    if not volume_node.IsA("vtkMRMLVectorVolumeNode"):
        # A scalar volume node with several components is a series (MultiVolumeExplorer keeps one
        # frame per component): three frames must not be read as the colours of one image.
        raise ValueError(
            f"volume '{volume_node.GetName()}' holds {components} frames per voxel (a 4D series): choose one frame "
            "(e.g. with the Sequences or Vector to Scalar Volume module) and segment that"
        )
    if components not in (3, 4):
        raise ValueError(
            f"volume '{volume_node.GetName()}' has {components} components per voxel: only grey, RGB and RGBA images "
            "can be segmented (extract one component with the Vector to Scalar Volume module)"
        )
    rgb = scalars.reshape(shape + (components,))[..., :3].astype(np.float32)
    return (rgb @ np.asarray(LUMA_BT601, dtype=np.float32)).astype(np.float32)


@dataclass
class VolumeArrays:
    """Input channels in one grid, ready to become a ``tedm_core.io.volumes.Volume``."""

    array: np.ndarray  # (C, K, J, I), the volumes' own dtype (float32 for colour volumes)
    ijk_to_ras: np.ndarray  # (4, 4) float64
    channel_names: List[str]
    reference_node_id: str


def volume_arrays_from_nodes(volume_nodes: Sequence[slicer.vtkMRMLVolumeNode]) -> VolumeArrays:
    """Stack several volume nodes (modalities) as channels; they must share one voxel grid."""
    nodes = [n for n in volume_nodes if n is not None]
    if not nodes:
        raise ValueError("select an input volume")
    reference = nodes[0]
    ijk_to_ras = ijk_to_ras_of(reference)
    channels = [array_from_volume_node(reference)]
    for node in nodes[1:]:
        array = array_from_volume_node(node)
        if array.shape != channels[0].shape:
            raise GeometryError(
                f"volume '{node.GetName()}' has {array.shape[::-1]} voxels (IJK) but '{reference.GetName()}' has "
                f"{channels[0].shape[::-1]}: resample it onto the first volume "
                "(module 'Resample Scalar/Vector/DWI Volume')"
            )
        difference = np.abs(ijk_to_ras_of(node) - ijk_to_ras).max()
        if difference > GEOMETRY_TOLERANCE_MM:
            raise GeometryError(
                f"volume '{node.GetName()}' is not in the voxel grid of '{reference.GetName()}' (IJK-to-RAS differs by "
                f"{difference:.3g}): resample it onto the first volume first"
            )
        if node.GetTransformNodeID() != reference.GetTransformNodeID():
            raise GeometryError(
                f"volumes '{node.GetName()}' and '{reference.GetName()}' are under different transforms: "
                "harden them first"
            )
        channels.append(array)
    # One channel: a view, not a second copy of the volume (hundreds of MB on the GUI thread).
    stacked = channels[0][None] if len(channels) == 1 else np.stack(channels)
    return VolumeArrays(stacked, ijk_to_ras, [n.GetName() for n in nodes], reference.GetID() or "")


def oriented_image_from_array(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> slicer.vtkOrientedImageData:
    """A ``vtkOrientedImageData`` (unsigned char) holding ``array_kji`` in the grid of ``ijk_to_ras``."""
    array_kji = np.ascontiguousarray(array_kji, dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    k, j, i = array_kji.shape
    image.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    image.SetImageToWorldMatrix(vtk_matrix_from_numpy(ijk_to_ras))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    target = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    target[:] = array_kji.reshape(-1)  # VTK's x-fastest order is numpy's C order of [k, j, i]
    image.Modified()
    return image


def nonzero_bounds(mask_kji: np.ndarray) -> Optional[Tuple[slice, slice, slice]]:
    """The smallest ``(k, j, i)`` box of slices holding every non-zero voxel; None if there is none.

    Each axis is found on the box narrowed so far, so only the first pass reads the whole volume."""
    ks = np.flatnonzero(mask_kji.any(axis=(1, 2)))
    if ks.size == 0:
        return None
    k = slice(int(ks[0]), int(ks[-1]) + 1)
    js = np.flatnonzero(mask_kji[k].any(axis=(0, 2)))
    j = slice(int(js[0]), int(js[-1]) + 1)
    is_ = np.flatnonzero(mask_kji[k, j].any(axis=(0, 1)))
    return (k, j, slice(int(is_[0]), int(is_[-1]) + 1))


def cropped_oriented_image_from_mask(mask_kji: np.ndarray, ijk_to_ras: np.ndarray) -> slicer.vtkOrientedImageData:
    """``mask_kji`` (non-zero = inside) as a ``vtkOrientedImageData`` (unsigned char, 0/1) whose
    extent covers only the mask's bounding box, in the grid of ``ijk_to_ras``: the extent's
    indices are the full grid's own IJK indices, so the voxels land exactly where the full image's
    would. An empty mask gives one zero voxel at the grid's origin.

    ``SetBinaryLabelmapToSegment`` copies the image and scans it for its effective extent, so its
    cost follows the image's size: a tumour's box is a few % of a brain volume (a full-volume
    segment took 30-250 ms on the GUI thread, its box a few ms). MODE_REPLACE makes the segment
    exactly this image (zero outside it), whether or not it shares a layer with other segments.
    """
    bounds = nonzero_bounds(mask_kji)
    if bounds is None:
        bounds = (slice(0, 1), slice(0, 1), slice(0, 1))
        box = np.zeros((1, 1, 1), dtype=np.uint8)
    else:
        box = (mask_kji[bounds] != 0).astype(np.uint8)
    k, j, i = bounds
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i.start, i.stop - 1, j.start, j.stop - 1, k.start, k.stop - 1)
    image.SetImageToWorldMatrix(vtk_matrix_from_numpy(ijk_to_ras))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    target = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    target[:] = box.reshape(-1)  # x-fastest within the extent, as for the full image
    image.Modified()
    return image


def geometry_image_of(volume_node: slicer.vtkMRMLVolumeNode) -> slicer.vtkOrientedImageData:
    """An empty oriented image in the volume's voxel grid, indexed as its voxel array is (from 0,
    :func:`ijk_to_ras_of`): a grid to resample into."""
    image = slicer.vtkOrientedImageData()
    i, j, k = volume_node.GetImageData().GetDimensions()
    image.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    image.SetImageToWorldMatrix(vtk_matrix_from_numpy(ijk_to_ras_of(volume_node)))
    return image


# --------------------------------------------------------------------------------------------
# segmentations
# --------------------------------------------------------------------------------------------
_converter_rules_registered = False


def ensure_segmentation_converters() -> None:
    """Register the labelmap <-> surface converter rules if nobody has (the Slicer application
    does it at start-up; a bare ``slicer-core`` process does not, and then segments cannot hold
    binary labelmaps)."""
    global _converter_rules_registered
    if _converter_rules_registered:
        return
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules() is None or len(factory.GetConverterRules()) == 0:
        for rule in (
            "vtkBinaryLabelmapToClosedSurfaceConversionRule",
            "vtkClosedSurfaceToBinaryLabelmapConversionRule",
            "vtkClosedSurfaceToFractionalLabelmapConversionRule",
            "vtkFractionalLabelmapToClosedSurfaceConversionRule",
        ):
            rule_class = getattr(slicer, rule, None)
            if rule_class is not None:
                factory.RegisterConverterRule(rule_class())
    _converter_rules_registered = True


def normalised_colour(colour: Sequence[float]) -> Tuple[float, float, float]:
    """RGB in [0, 1] whether given in [0, 1] or [0, 255]."""
    rgb = [float(c) for c in list(colour)[:3]]
    if max(rgb) > 1.0:
        rgb = [c / 255.0 for c in rgb]
    return (rgb[0], rgb[1], rgb[2])


# A readable palette for classes without a colour (Slicer's generic anatomy colours).
DEFAULT_COLOURS = [
    (0.5, 0.68, 0.5),
    (0.95, 0.84, 0.57),
    (0.69, 0.48, 0.4),
    (0.44, 0.71, 0.86),
    (0.85, 0.4, 0.4),
    (0.56, 0.49, 0.75),
]


def class_segment_ids(segmentation_node: slicer.vtkMRMLSegmentationNode) -> List[str]:
    """Segment ID of each foreground class (class k is entry k - 1).

    The IDs recorded when TEDMSlicer wrote the segmentation if present and still valid,
    otherwise the segments in display order (a segmentation the user made to fit a model).
    """
    existing = all_segment_ids(segmentation_node)
    ids = _recorded_list(segmentation_node, CLASS_SEGMENT_IDS_ATTRIBUTE)
    if ids and all(segment_id in existing for segment_id in ids):
        return ids
    return existing


def all_segment_ids(segmentation_node: slicer.vtkMRMLSegmentationNode) -> List[str]:
    """Every segment of the node, in display order (the Segment Editor's list)."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def _recorded_list(segmentation_node: slicer.vtkMRMLSegmentationNode, attribute: str) -> List[str]:
    recorded = segmentation_node.GetAttribute(attribute)
    if not recorded:
        return []
    try:
        return [str(s) for s in json.loads(recorded)]
    except (TypeError, ValueError):
        return []


def recorded_class_segments(segmentation_node: slicer.vtkMRMLSegmentationNode) -> Dict[str, str]:
    """``{class name: segment ID}`` of the segments TEDMSlicer created or wrote in this node, for
    those that still exist (the user may have deleted some)."""
    segmentation = segmentation_node.GetSegmentation()
    ids = _recorded_list(segmentation_node, CLASS_SEGMENT_IDS_ATTRIBUTE)
    names = _recorded_list(segmentation_node, CLASS_NAMES_ATTRIBUTE)[1:]
    if len(names) != len(ids):
        return {}  # an attribute from another version, or edited by hand: trust neither
    return {name: sid for name, sid in zip(names, ids) if segmentation.GetSegment(sid) is not None}


def class_names_of(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    background_name: str = "background",
    segment_ids: Optional[Sequence[str]] = None,
) -> List[str]:
    """Class names, background first, from the segment names in class order (``segment_ids``,
    default :func:`class_segment_ids`)."""
    segmentation = segmentation_node.GetSegmentation()
    ids = class_segment_ids(segmentation_node) if segment_ids is None else segment_ids
    return [background_name] + [segmentation.GetSegment(s).GetName() for s in ids]


def class_colours_of(
    segmentation_node: slicer.vtkMRMLSegmentationNode, segment_ids: Optional[Sequence[str]] = None
) -> List[Tuple[float, float, float]]:
    """Segment colours (RGB in [0, 1]) in class order, background (black) first."""
    segmentation = segmentation_node.GetSegmentation()
    colours: List[Tuple[float, float, float]] = [(0.0, 0.0, 0.0)]
    for segment_id in class_segment_ids(segmentation_node) if segment_ids is None else segment_ids:
        colours.append(tuple(segmentation.GetSegment(segment_id).GetColor()))  # type: ignore[arg-type]
    return colours


def prepare_segmentation_node(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
    class_names: Sequence[str],
    class_colours: Optional[Sequence[Sequence[float]]] = None,
    segment_ids: Optional[Sequence[str]] = None,
) -> List[str]:
    """Make ``segmentation_node`` hold one segment per foreground class, in the volume's grid.

    The segment of each class is, in this order: ``segment_ids[k - 1]`` if given and present (Fit:
    the very segments the classes were read from); the segment TEDMSlicer recorded for that class
    name, if the user has not deleted it; a segment named like the class (a segmentation the user
    made for this model); else a new segment. A segment is never taken for a class by its position
    alone, so segments of other classes (the user's own notes) are left alone. Segments that
    already exist keep the name, colour and terminology the user gave them; new ones get the
    class's name, colour and standard terminology. Returns the class segment IDs.
    """
    ensure_segmentation_converters()
    if segmentation_node.GetDisplayNode() is None and segmentation_node.GetScene() is not None:
        # Some segmentation exports crash without a display node; Slicer creates one anyway.
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    # The results live in the volume's own coordinates: share its parent transform.
    segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    segmentation = segmentation_node.GetSegmentation()
    recorded = recorded_class_segments(segmentation_node)
    # A recorded segment of one class is never matched by name to another (the user may have
    # renamed it to another class's name).
    reserved = set(recorded.values()) | {s for s in (segment_ids or []) if s}
    ids: List[str] = []
    for index, name in enumerate(class_names[1:], start=1):
        name = str(name)
        colour = (
            normalised_colour(class_colours[index])
            if class_colours and len(class_colours) > index
            else DEFAULT_COLOURS[(index - 1) % len(DEFAULT_COLOURS)]
        )
        candidates = []
        if segment_ids is not None and index - 1 < len(segment_ids):
            candidates.append(segment_ids[index - 1])
        candidates.append(recorded.get(name, ""))
        by_name = segmentation.GetSegmentIdBySegmentName(name) or ""
        candidates.append("" if by_name in reserved else by_name)
        segment_id = next((s for s in candidates if s and s not in ids and segmentation.GetSegment(s) is not None), "")
        if not segment_id:
            segment_id = segmentation.AddEmptySegment("", name, list(colour))
            segment = segmentation.GetSegment(segment_id)
            segment.SetName(name)
            segment.SetColor(*colour)
            terminology.tag_segment(segment, name, use_recommended_colour=True)
        else:
            if segment_id not in recorded.values():
                # A segment the user made for this class, written by TEDM for the first time: the
                # standard term, their colour kept. Later writes leave what the user set since.
                terminology.tag_segment(segmentation.GetSegment(segment_id), name, use_recommended_colour=False)
        ids.append(segment_id)
    segmentation_node.SetAttribute(CLASS_SEGMENT_IDS_ATTRIBUTE, json.dumps(ids))
    segmentation_node.SetAttribute(CLASS_NAMES_ATTRIBUTE, json.dumps([str(n) for n in class_names]))
    return ids


@dataclass
class SegmentationSnapshot:
    """A segmentation node's segments (deep-copied: every layer, representation and tag) and
    TEDMSlicer's attributes on it, to put the node back exactly as it was."""

    segmentation: slicer.vtkSegmentation
    attributes: Dict[str, Optional[str]]


def snapshot_segmentation(segmentation_node: slicer.vtkMRMLSegmentationNode) -> SegmentationSnapshot:
    """A copy of what :func:`prepare_segmentation_node` and segment writes change in the node.
    A memory copy of its labelmaps (a byte a voxel per layer): milliseconds for a brain volume."""
    copy = slicer.vtkSegmentation()
    copy.DeepCopy(segmentation_node.GetSegmentation())
    names = (CLASS_SEGMENT_IDS_ATTRIBUTE, CLASS_NAMES_ATTRIBUTE)
    return SegmentationSnapshot(copy, {name: segmentation_node.GetAttribute(name) for name in names})


def restore_segmentation(segmentation_node: slicer.vtkMRMLSegmentationNode, snapshot: SegmentationSnapshot) -> None:
    """Put the node's segments and attributes back as ``snapshot`` holds them."""
    segmentation_node.GetSegmentation().DeepCopy(snapshot.segmentation)
    for name, value in snapshot.attributes.items():
        if value is None:
            segmentation_node.RemoveAttribute(name)
        else:
            segmentation_node.SetAttribute(name, value)
    segmentation_node.Modified()


def write_class_labels(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
    labels_kji: np.ndarray,
    class_names: Sequence[str],
    class_colours: Optional[Sequence[Sequence[float]]] = None,
) -> List[str]:
    """Write class indices ``labels_kji`` (0 = background) as one segment per foreground class.

    ``labels_kji`` is in the grid of ``reference_volume_node``. Every class segment is replaced
    completely, so what the node holds afterwards equals ``labels_kji`` voxel for voxel.
    """
    expected = tuple(reversed(reference_volume_node.GetImageData().GetDimensions()))
    if tuple(labels_kji.shape) != expected:
        raise GeometryError(f"labels of shape {labels_kji.shape} do not match the volume's {expected} (KJI)")
    ids = prepare_segmentation_node(segmentation_node, reference_volume_node, class_names, class_colours)
    ijk_to_ras = ijk_to_ras_of(reference_volume_node)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    was_modifying = segmentation_node.StartModify()
    try:
        for index, segment_id in enumerate(ids, start=1):
            mask = cropped_oriented_image_from_mask(labels_kji == index, ijk_to_ras)
            if not logic.SetBinaryLabelmapToSegment(mask, segmentation_node, segment_id, logic.MODE_REPLACE):
                raise RuntimeError(
                    f"could not write segment '{class_names[index]}' into '{segmentation_node.GetName()}'"
                )
    finally:
        segmentation_node.EndModify(was_modifying)
    return ids


def read_class_labels(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
    segment_ids: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """The segmentation as class indices ``(K, J, I)`` uint8 in the grid of the reference volume.

    Class k is ``segment_ids[k - 1]`` (default: :func:`class_segment_ids`). Segments are
    resampled into the volume's grid, whatever extent or shared layers the Segment Editor left.
    Where segments overlap, the later class wins.
    """
    ensure_segmentation_converters()
    if segmentation_node.GetTransformNodeID() != reference_volume_node.GetTransformNodeID():
        raise GeometryError(
            f"segmentation '{segmentation_node.GetName()}' and volume '{reference_volume_node.GetName()}' "
            "are under different transforms: put the segmentation under the volume's transform (Data module) "
            "first; hardening a transform changes the volume's geometry, which TEDM then has to segment again"
        )
    ids = list(segment_ids) if segment_ids is not None else class_segment_ids(segmentation_node)
    shape = tuple(reversed(reference_volume_node.GetImageData().GetDimensions()))
    if not ids:
        return np.zeros(shape, dtype=np.uint8)
    if len(ids) > 255:
        raise ValueError("at most 255 classes are supported")
    segment_id_array = vtk.vtkStringArray()
    label_values = vtk.vtkIntArray()
    for index, segment_id in enumerate(ids, start=1):
        segment_id_array.InsertNextValue(segment_id)
        label_values.InsertNextValue(index)
    merged = slicer.vtkOrientedImageData()
    grid = geometry_image_of(reference_volume_node)
    ok = segmentation_node.GenerateMergedLabelmapForAllSegments(
        merged,
        slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
        grid,
        segment_id_array,
        label_values,
    )
    if not ok:
        raise RuntimeError(
            f"could not read segmentation '{segmentation_node.GetName()}' "
            f"in the grid of '{reference_volume_node.GetName()}'"
        )
    if tuple(merged.GetExtent()) != tuple(grid.GetExtent()):
        raise GeometryError(f"segmentation read back with extent {merged.GetExtent()}, expected {grid.GetExtent()}")
    scalars = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars())
    return np.array(scalars.reshape(shape), dtype=np.uint8, copy=True)


def require_voxel_source(segmentation_node: slicer.vtkMRMLSegmentationNode) -> None:
    """TEDM reads and writes voxels: a segmentation whose source representation is a closed
    surface or planar contours (an STL/OBJ import, a DICOM RT structure set) is refused, before any
    work, rather than converted behind the user's back."""
    segmentation = segmentation_node.GetSegmentation()
    source_of = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    source = source_of()
    if source != slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName():
        raise ValueError(
            f"segmentation '{segmentation_node.GetName()}' stores its segments as {source.lower()}s, and TEDM works "
            "on voxels: make 'Binary labelmap' its source representation first (Segmentations module > "
            "Representations), or choose another segmentation"
        )


def segments_signature(segmentation_node: slicer.vtkMRMLSegmentationNode) -> Tuple:
    """The segment IDs and the modified time of each one's binary labelmap: it changes with every
    edit (the Segment Editor's included), so comparing two signatures tells whether anyone wrote
    into the segmentation in between, without reading a voxel."""
    segmentation = segmentation_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    signature = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        representation = segment.GetRepresentation(name)
        modified = -1 if representation is None else representation.GetMTime()
        signature.append((segmentation.GetNthSegmentID(n), segment.GetMTime(), modified))
    return tuple(signature)
