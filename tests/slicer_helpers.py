"""Helpers for testing TEDMSlicer's logic against real MRML (the ``slicer-core`` wheel, no Qt).

Nothing here mocks MRML: volumes are read by Slicer's own storage nodes, segmentations are
written and exported by Slicer's segmentation logic, and a user's corrections go through
``vtkSlicerSegmentEditorLogic`` as the Segment Editor's effects do.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "TEDMSlicer"


def import_slicer_or_skip():
    """``slicer`` from the slicer-core wheel, or skip (another package is also called ``slicer``)."""
    try:
        import slicer
    except ImportError as error:
        pytest.skip(f"slicer-core is not installed ({error}); `pip install slicer-core` to run the MRML tests")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed `slicer` package is not slicer-core (no vtkMRMLScene); `pip install slicer-core`")
    return slicer


def import_module_lib():
    """The module's Qt-free package, imported as Slicer imports it (from the module folder)."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    import TEDMSlicerLib

    return TEDMSlicerLib


def load_volume_node(scene, path: Path, name: str = ""):
    """Read a volume file exactly as Slicer's Add Data does: a scalar volume node and an archetype storage node."""
    import slicer

    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name or Path(path).name.split(".")[0])
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    if not storage.ReadData(node):
        raise RuntimeError(f"Slicer could not read {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def new_segmentation(scene, segments: Sequence[Tuple[str, Tuple[float, float, float]]], name: str = "Segmentation"):
    """An empty segmentation with named, coloured segments, as a user makes one in the Segment Editor."""
    import slicer

    from TEDMSlicerLib import mrml_io

    mrml_io.ensure_segmentation_converters()
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    ids = [node.GetSegmentation().AddEmptySegment("", segment_name, list(colour)) for segment_name, colour in segments]
    return node, ids


class SegmentEditor:
    """Paints through ``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap``, the call the
    Segment Editor's effects end in, so overwrite rules and shared layers behave as for a user."""

    def __init__(self, scene, segmentation_node, source_volume_node) -> None:
        import slicer

        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.editor_node = slicer.vtkMRMLSegmentEditorNode()
        scene.AddNode(self.editor_node)
        self.logic.SetSegmentEditorNode(self.editor_node)
        self.logic.SetSegmentationNode(segmentation_node)
        self.logic.SetSourceVolumeNode(source_volume_node)
        self.segmentation_node = segmentation_node
        self.volume_node = source_volume_node

    def _modifier(self, mask_kji: np.ndarray):
        from TEDMSlicerLib import mrml_io

        return mrml_io.oriented_image_from_array(mask_kji.astype(np.uint8), mrml_io.ijk_to_ras_of(self.volume_node))

    def add(self, segment_id: str, mask_kji: np.ndarray) -> None:
        self.logic.ModifySegmentByLabelmap(
            self.segmentation_node, segment_id, self._modifier(mask_kji), self.logic.ModificationModeAdd, False, True
        )

    def erase(self, segment_id: str, mask_kji: np.ndarray) -> None:
        self.logic.ModifySegmentByLabelmap(
            self.segmentation_node, segment_id, self._modifier(mask_kji), self.logic.ModificationModeRemove, False, True
        )

    def correct(
        self, segment_ids: Sequence[str], current_kji: np.ndarray, wanted_kji: np.ndarray, where_kji: np.ndarray
    ) -> None:
        """Make the voxels in ``where_kji`` show ``wanted_kji`` (class indices; class k is segment_ids[k-1])."""
        for index, segment_id in enumerate(segment_ids, start=1):
            wrong = where_kji & (current_kji == index) & (wanted_kji != index)
            missing = where_kji & (wanted_kji == index) & (current_kji != index)
            if wrong.any():
                self.erase(segment_id, wrong)
            if missing.any():
                self.add(segment_id, missing)


def export_labelmap(scene, segmentation_node, reference_volume_node):
    """The segmentation exported by Slicer's own logic to a labelmap node in the volume's grid:
    (voxels (K, J, I), IJK-to-RAS). Independent of TEDMSlicer's reader."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    ids = vtk.vtkStringArray()
    segmentation = segmentation_node.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(n))
    if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, reference_volume_node
    ):
        raise RuntimeError("export failed")
    image = labelmap.GetImageData()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        tuple(reversed(image.GetDimensions()))
    )
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(matrix)
    return np.array(voxels), np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
