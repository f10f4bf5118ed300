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


try:
    import slicer

    HAVE_SLICER = hasattr(slicer, "vtkMRMLScene")
except ImportError:  # the test modules using it are skipped by SLICER_TEST_MARKS
    slicer = None
    HAVE_SLICER = False

# The marks of every test module that needs Slicer's MRML libraries (the slicer-core wheel).
SLICER_TEST_MARKS = [
    pytest.mark.slicer,
    pytest.mark.skipif(
        not HAVE_SLICER,
        reason="slicer-core is not installed (`pip install slicer-core`): the MRML tests need Slicer's MRML libraries",
    ),
]


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


class ScriptedEvent:
    """An event shaped like ``tedm_core.serve.client.WorkerEvent``."""

    def __init__(self, kind, request_id, fields=None, arrays=None) -> None:
        self.kind = kind
        self.request_id = request_id
        self.fields = dict(fields or {})
        self.arrays = dict(arrays or {})

    def __repr__(self) -> str:
        return f"ScriptedEvent({self.kind!r}, {self.request_id!r}, {sorted(self.fields)})"


class ScriptedWorkerClient:
    """A worker client with the API of ``tedm_core.serve.client.WorkerClient`` whose "model"
    thresholds the volume (label 1 where the first channel is above its mean), so that tests
    control exactly when a job's result arrives (after ``job_polls`` polls): a scene closed, a
    node deleted or a segmentation edited between a request and its result. The lifecycle cases
    against a real worker process are in ``tests/test_slicer_worker.py``.

    ``uncertain_slices`` answers with slice k of the volume (axis ``k``) and its centre in
    voxel indices, as the worker does. ``cancel`` (the method, or a submitted ``cancel`` request
    naming its ``target``) makes the target's answer a ``cancelled`` error. Like the real client,
    it starts its worker when made; ``kill`` makes that worker die, ``hang`` makes it stop
    answering anything (a deadlock, a hung driver), and ``close`` stops it.
    """

    JOBS = ("segment", "fit", "refine", "save_model", "pretrain")

    def __init__(self, job_polls: int = 2, class_names=("background", "tumour")) -> None:
        self.job_polls = job_polls
        self.class_names = list(class_names)
        self.generation = 0
        self._alive = False
        self._ids = 0
        self.sessions = {}  # session -> (volume (C,K,J,I), ijk_to_ras)
        self.last_labels = {}
        self.requests = []  # (op, fields, arrays) in the order submitted
        self._queue = []  # [polls left, request id, on_event, events]
        self.fail_next = {}  # op -> (kind, message): the next such request fails
        self.closed = False
        self.close_calls = []  # the grace_s of each close()
        self.hung = False
        self.held_bytes = 0
        self._start()

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def pending(self):
        """Requests sent and not yet answered (as ``WorkerClient.pending``)."""
        return [entry[1] for entry in self._queue]

    @property
    def unsent_bytes(self) -> int:
        """0, or what a test sets in ``held_bytes`` (an upload the worker has not read)."""
        return self.held_bytes

    def _start(self) -> None:
        if not self._alive:
            self._alive = True
            self.closed = False
            self.hung = False
            self.generation += 1
            self.sessions = {}

    def submit(self, op, fields, arrays=None, on_event=None) -> str:
        self._start()
        self._ids += 1
        request_id = f"r{self._ids}"
        self.requests.append((op, dict(fields), dict(arrays or {})))
        if op == "cancel" and not self.hung:
            self.cancel(fields.get("target"))
        events = self._answer(op, dict(fields), dict(arrays or {}), request_id)
        polls = self.job_polls if op in self.JOBS else 0
        self._queue.append([polls, request_id, on_event, events])
        return request_id

    def _answer(self, op, fields, arrays, request_id):
        if op in self.fail_next:
            kind, message = self.fail_next.pop(op)
            return [ScriptedEvent("error", request_id, {"kind": kind, "message": message})]
        if op == "open_session":
            self.sessions[fields["session"]] = (np.asarray(arrays["volume"]), np.asarray(fields["ijk_to_ras"]))
            return [ScriptedEvent("result", request_id, {"result": {"session": fields["session"]}})]
        if op == "close_session":
            self.sessions.pop(fields["session"], None)
            return [ScriptedEvent("result", request_id, {"result": {}})]
        if fields.get("session") not in self.sessions and op not in ("cancel", "status", "hello"):
            return [ScriptedEvent("error", request_id, {"kind": "user", "message": "unknown session"})]
        if op in ("segment", "fit", "refine"):
            volume = self.sessions[fields["session"]][0][0].astype(np.float32)
            labels = (volume > volume.mean()).astype(np.uint8)
            # Several structures: the foreground of slice k is structure 1 + k mod (structures).
            structures = np.arange(len(labels)) % (len(self.class_names) - 1) + 1
            labels *= structures.astype(np.uint8)[:, None, None]
            colours = [[0, 0, 0]] + [[200, 40 * n, 40] for n in range(1, len(self.class_names))]
            result = {"class_names": self.class_names, "class_colours": colours, "axis": "k"}
            if op == "fit":
                drawn = np.asarray(arrays["labels"])
                labelled = [int(k) for k in np.flatnonzero(drawn.reshape(len(drawn), -1).any(axis=1))]
                labels[labelled] = drawn[labelled]
                result.update(
                    training_slices=labelled,
                    class_names=list(fields["class_names"]),
                    class_colours=list(fields["class_colours"]),
                )
            if op == "refine":
                edited = np.asarray(arrays["labels"])
                last = self.last_labels[fields["session"]]
                changed = [int(k) for k in np.flatnonzero((edited != last).reshape(len(edited), -1).any(axis=1))]
                labels[changed] = edited[changed]
                result.update(changed_slices=changed, training_slices=changed)
            self.last_labels[fields["session"]] = labels
            return [
                ScriptedEvent("progress", request_id, {"fraction": 0.5, "message": "slice 1/2"}),
                ScriptedEvent("result", request_id, {"result": result}, {"labels": labels}),
            ]
        if op == "uncertain_slices":
            volume = self.sessions[fields["session"]][0][0]
            k, j, i = volume.shape
            slices = [
                {"index": index, "score": 1.0 / (1 + index), "centre_ijk": [(i - 1) / 2, (j - 1) / 2, float(index)]}
                for index in range(k)
            ]
            return [ScriptedEvent("result", request_id, {"result": {"slices": slices}})]
        if op == "save_model":
            return [ScriptedEvent("result", request_id, {"result": {"path": fields["path"]}})]
        return [ScriptedEvent("result", request_id, {"result": {}})]

    def poll(self, max_seconds: float = 0.05, wait_seconds: float = 0.0):
        delivered = []
        if self.hung:
            return delivered  # alive, reads nothing and answers nothing
        for entry in list(self._queue):
            if entry[0] > 0:
                entry[0] -= 1
                continue
            self._queue.remove(entry)
            for event in entry[3]:
                delivered.append(event)
                if entry[2] is not None:
                    entry[2](event)
        return delivered

    def cancel(self, request_id) -> None:
        for entry in self._queue:
            if entry[1] == request_id:
                entry[3] = [ScriptedEvent("error", request_id, {"kind": "cancelled", "message": "cancelled"})]

    def kill(self) -> None:
        """The worker process dies: every pending request gets a ``worker_died`` error."""
        self._alive = False
        for entry in self._queue:
            entry[0] = 0
            entry[3] = [ScriptedEvent("error", entry[1], {"kind": "worker_died", "message": "exit code -9"})]

    def hang(self) -> None:
        """The worker stops reading and answering (alive, silent): only stopping it ends that."""
        self.hung = True

    def close(self, grace_s: float = 5.0) -> None:
        """Stop the worker (the real client asks it, then kills it after ``grace_s``); pending
        requests are forgotten without an answer, as the real client's are."""
        self.close_calls.append(grace_s)
        self.closed = True
        self._alive = False
        self.hung = False
        self._queue.clear()

    def ops(self):
        return [op for op, _, _ in self.requests]
