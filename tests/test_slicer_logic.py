"""TEDMSlicer's logic against real MRML (the ``slicer-core`` wheel, plain pytest), driven by a
scripted worker client with the API of ``tedm_core.serve.client.WorkerClient``.

The scripted client decides when a result arrives, so these tests pin the lifecycle exactly: the
output node appears only with a result; a scene closed, a node deleted or a segmentation edited
between a request and its result; a worker that dies mid-job; next uncertain slice under a
parent transform; colour volumes; standard terminology. The same flows against a real worker
process (and real models) are in ``tests/test_slicer_worker.py``.

The tests poll the logic exactly as the widget's QTimer does (``logic.poll()``), never sleep.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import affine_zoo, sphere_volume_array
from slicer_helpers import (
    SLICER_TEST_MARKS,
    ScriptedWorkerClient,
    SegmentEditor,
    export_labelmap,
    import_module_lib,
    load_volume_node,
    new_segmentation,
    slicer,
)

pytestmark = SLICER_TEST_MARKS


@pytest.fixture(scope="module")
def lib():
    return import_module_lib()


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def client():
    return ScriptedWorkerClient()


@pytest.fixture
def logic(lib, client):
    return lib.TEDMWorkerLogic(lambda: client)


def _sphere_node(scene, tmp_path, affine_name="oblique", name="sphere"):
    import nibabel as nib

    affine = affine_zoo()[affine_name]
    centre = (affine @ np.array([12.0, 10.0, 6.0, 1.0]))[:3]
    array = sphere_volume_array((12, 20, 24), affine, centre, 5.0).astype(np.int16)
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(array.T, affine), path)
    return load_volume_node(scene, path, name), array


def _segmentations(scene):
    return [
        scene.GetNthNodeByClass(n, "vtkMRMLSegmentationNode")
        for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))
    ]


def _terminology(segment) -> str:
    import vtk

    value = vtk.reference("")
    segment.GetTag("TerminologyEntry", value)
    return str(value)


def _run(logic, polls=50):
    """Poll as the widget's timer does until the running operation ends."""
    for _ in range(polls):
        if not logic.busy:
            break
        logic.poll()
    assert not logic.busy
    return logic.listener.finished_operations[-1]


# --------------------------------------------------------------------------------------------
# Segment: the node appears with the result, in the volume's exact grid
# --------------------------------------------------------------------------------------------
def test_segment_creates_the_node_only_when_the_result_arrives(lib, logic, client, scene, tmp_path):
    volume, array = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], str(tmp_path / "model"), None, axis="axial", device="cpu")
    assert logic.busy and _segmentations(scene) == [], "no empty node while the job runs"
    op, fields, arrays = client.requests[0]
    assert op == "open_session"
    assert arrays["volume"].dtype == np.int16 and arrays["volume"].shape == (1,) + array.shape
    assert np.allclose(fields["ijk_to_ras"], lib.mrml_io.ijk_to_ras_of(volume))
    finished = _run(logic)
    assert finished.status == lib.DONE, finished.message
    assert client.ops() == ["open_session", "segment"]
    assert client.requests[1][1]["axis"] == "axial" and client.requests[1][1]["device"] == "cpu"
    (node,) = _segmentations(scene)
    assert finished.segmentation_node is node
    voxels, ijk_to_ras = export_labelmap(scene, node, volume)
    assert np.array_equal(voxels, (array > array.mean()).astype(np.uint8))
    assert np.allclose(ijk_to_ras, lib.mrml_io.ijk_to_ras_of(volume), atol=1e-9)
    assert logic.has_result(node)


def test_failed_or_cancelled_jobs_leave_no_node(lib, logic, client, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    client.fail_next["segment"] = ("user", "bundle.json not found in /nowhere")
    logic.begin_segment([volume], "/nowhere", None)
    finished = _run(logic)
    assert finished.status == lib.FAILED and "bundle.json not found" in finished.message
    assert _segmentations(scene) == []

    logic.begin_segment([volume], "/model", None)
    logic.poll()  # open_session answered, the segment job sent
    logic.cancel()
    finished = _run(logic)
    assert finished.status == lib.CANCELLED and "nothing was changed" in finished.message
    assert _segmentations(scene) == []


# --------------------------------------------------------------------------------------------
# Lifecycle: scene closed, nodes deleted, worker died, edits during a job
# --------------------------------------------------------------------------------------------
def test_scene_closed_mid_job_drops_the_result(lib, logic, client, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    segmentation, _ = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    logic.begin_segment([volume], "/model", segmentation)
    _run(logic)
    old_session = client.requests[0][1]["session"]
    logic.begin_segment([volume], "/model", segmentation)  # the same volume: the session is reused
    assert client.ops()[-1] == "segment"

    # File > Close scene while the job runs, in Slicer's order: StartCloseEvent (the widget calls
    # on_scene_closed), the nodes go (no NodeRemovedEvent reaches on_node_removed), EndCloseEvent.
    logic.on_scene_closed()
    scene.Clear(0)
    # The new scene reuses node IDs: a node now answers to the old segmentation's ID.
    reused, _ = new_segmentation(scene, [("other", (0.0, 1.0, 0.0))], name="new scene")
    assert reused.GetID() == segmentation.GetID()
    finished = _run(logic)
    assert finished.status in (lib.DROPPED, lib.CANCELLED)
    assert "scene was closed" in finished.message and "nothing was written" in finished.message
    assert ("close_session", {"session": old_session}, {}) in client.requests
    assert reused.GetSegmentation().GetNumberOfSegments() == 1
    assert np.count_nonzero(export_labelmap(scene, reused, _sphere_node(scene, tmp_path, name="v2")[0])[0]) == 0
    assert not logic.records


def test_result_for_a_reused_node_id_is_dropped_even_without_the_close_event(lib, logic, scene, tmp_path):
    """A script that closes the scene without telling the logic: identity, not the ID, decides."""
    volume, _ = _sphere_node(scene, tmp_path)
    segmentation, _ = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    logic.begin_segment([volume], "/model", segmentation)
    scene.Clear(0)
    new_volume, _ = _sphere_node(scene, tmp_path, name="again")
    new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    assert new_volume.GetID() == volume.GetID()
    finished = _run(logic)
    assert finished.status == lib.DROPPED and "no longer in the scene" in finished.message
    assert all(s.GetSegmentation().GetNumberOfSegments() == 1 for s in _segmentations(scene))


@pytest.mark.parametrize("deleted", ["segmentation", "volume"])
def test_node_deleted_mid_job(lib, logic, client, scene, tmp_path, deleted):
    volume, _ = _sphere_node(scene, tmp_path)
    segmentation, _ = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    logic.begin_segment([volume], "/model", segmentation)
    node = segmentation if deleted == "segmentation" else volume
    scene.RemoveNode(node)
    logic.on_node_removed(node)
    finished = _run(logic)
    assert finished.status in (lib.DROPPED, lib.CANCELLED)
    assert f"'{node.GetName()}' was deleted" in finished.message
    if deleted == "volume":
        assert segmentation.GetSegmentation().GetNumberOfSegments() == 1  # untouched
    assert not logic.records
    # The worker session opened for the dropped job was closed.
    opened = client.requests[0][1]["session"]
    assert opened not in client.sessions


def test_worker_killed_mid_job(lib, logic, client, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    _run(logic)
    (segmentation,) = _segmentations(scene)
    before, _ = export_labelmap(scene, segmentation, volume)
    logic.begin_refine(segmentation, volume)
    client.kill()
    finished = _run(logic)
    assert finished.status == lib.WORKER_DIED
    assert finished.message.count("\n") == 0 and "restarts with the next request" in finished.message
    assert np.array_equal(export_labelmap(scene, segmentation, volume)[0], before), "scene unchanged"
    # Its sessions died with it: Refine asks for a new Segment, which restarts the worker.
    with pytest.raises(lib.UserInputError, match="restarted"):
        logic.begin_refine(segmentation, volume)
    generation = client.generation
    logic.begin_segment([volume], "/model", segmentation)
    assert client.generation == generation + 1 and client.ops()[-1] == "open_session"
    assert _run(logic).status == lib.DONE


def test_edits_during_a_job_are_not_overwritten(lib, logic, client, scene, tmp_path):
    volume, array = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    _run(logic)
    (segmentation,) = _segmentations(scene)
    record = logic.record_for(segmentation)
    editor = SegmentEditor(scene, segmentation, volume)
    current, _ = export_labelmap(scene, segmentation, volume)
    wanted = current.copy()
    wanted[6] = 0  # the user erases slice 6, then refines
    editor.correct(record.segment_ids, current, wanted, np.ones_like(current, dtype=bool))
    logic.begin_refine(segmentation, volume, steps=10)
    assert client.requests[-1][1]["steps"] == 10
    # While Refine runs, the user paints slice 2.
    painted = np.zeros_like(current, dtype=bool)
    painted[2, :3, :3] = True
    editor.add(record.segment_ids[0], painted)
    edited, _ = export_labelmap(scene, segmentation, volume)
    finished = _run(logic)
    assert finished.status == lib.DONE and finished.written_to_new_node
    assert "edited while" in finished.message
    assert np.array_equal(export_labelmap(scene, segmentation, volume)[0], edited), "the user's edits are kept"
    result_node = finished.segmentation_node
    assert result_node is not segmentation and len(_segmentations(scene)) == 2
    assert finished.changed_slices == [6]
    assert logic.has_result(result_node) and not logic.has_result(segmentation)


def test_a_result_diverted_from_a_node_leaves_it_its_own_session(lib, logic, client, scene, tmp_path):
    """Segment another volume into a TEDM segmentation, edited while that job runs: the result
    goes to a new node, and the edited node keeps the session of its own result (Refine on it
    still works, without a Segment first)."""
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    (segmentation,) = [_run(logic).segmentation_node]
    own = logic.record_for(segmentation)
    other, _ = _sphere_node(scene, tmp_path, "anisotropic", name="other")
    logic.begin_segment([other], "/model", segmentation)
    painted = np.zeros(lib.mrml_io.read_class_labels(segmentation, volume).shape, dtype=bool)
    painted[2, :3, :3] = True
    SegmentEditor(scene, segmentation, volume).add(own.segment_ids[0], painted)
    finished = _run(logic)
    assert finished.status == lib.DONE and finished.written_to_new_node
    assert logic.record_for(segmentation) is own and logic.has_result(finished.segmentation_node)
    assert own.session_id in client.sessions, "its worker session was not closed"
    assert [op for op, fields, _ in client.requests if op == "close_session"] == []


@pytest.mark.parametrize("affine_name", ["oblique", "left_handed"])  # left-handed: Slicer stores K reversed
def test_refine_sends_the_edited_labels_and_writes_the_result(lib, logic, client, scene, tmp_path, affine_name):
    volume, array = _sphere_node(scene, tmp_path, affine_name)
    logic.begin_segment([volume], "/model", None)
    _run(logic)
    (segmentation,) = _segmentations(scene)
    record = logic.record_for(segmentation)
    current, _ = export_labelmap(scene, segmentation, volume)
    wanted = current.copy()
    wanted[5] = 0
    wanted[7, 2:5, 2:5] = 1
    SegmentEditor(scene, segmentation, volume).correct(
        record.segment_ids, current, wanted, np.ones_like(current, dtype=bool)
    )
    logic.begin_refine(segmentation, volume)
    op, fields, arrays = client.requests[-1]
    assert op == "refine" and np.array_equal(arrays["labels"], wanted)
    from tedm_core.choices import DEFAULT_REFINE_STEPS

    assert fields["steps"] == DEFAULT_REFINE_STEPS
    finished = _run(logic)
    assert finished.status == lib.DONE and not finished.written_to_new_node
    assert finished.changed_slices == [5, 7]
    assert np.array_equal(export_labelmap(scene, segmentation, volume)[0], wanted)


def test_fit_sends_the_drawn_slices_and_class_names(lib, logic, client, scene, tmp_path):
    volume, array = _sphere_node(scene, tmp_path)
    segmentation, (tumour_id,) = new_segmentation(scene, [("tumour", (0.9, 0.1, 0.1))])
    drawn = np.zeros(array.shape, dtype=np.uint8)
    drawn[6] = array[6] > array.mean()
    SegmentEditor(scene, segmentation, volume).add(tumour_id, drawn > 0)
    logic.begin_fit([volume], "/backbone", segmentation, method="ledm", steps=25)
    finished = _run(logic)
    op, fields, arrays = client.requests[-1]
    assert op == "fit" and fields["method"] == "ledm" and fields["steps"] == 25
    assert fields["class_names"] == ["background", "tumour"]
    assert fields["class_colours"][1] == [230, 26, 26]
    assert np.array_equal(arrays["labels"], drawn)
    assert finished.status == lib.DONE and finished.training_slices == [6]
    assert finished.segmentation_node is segmentation
    # The user's segment keeps its ID and colour, and carries the standard term of a tumour.
    segment = segmentation.GetSegmentation().GetSegment(tumour_id)
    assert np.allclose(segment.GetColor(), (0.9, 0.1, 0.1), atol=1 / 255)
    assert "SCT^108369006^Neoplasm" in _terminology(segment)


def test_fit_refuses_an_unlabelled_segmentation(lib, logic, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    segmentation, _ = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    with pytest.raises(lib.UserInputError, match="nothing is painted"):
        logic.begin_fit([volume], "/backbone", segmentation)
    assert not logic.busy


def test_refine_needs_a_previous_result(lib, logic, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    segmentation, _ = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    with pytest.raises(lib.UserInputError, match="press Segment"):
        logic.begin_refine(segmentation, volume)


def test_one_operation_at_a_time(lib, logic, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    with pytest.raises(lib.UserInputError, match="still running"):
        logic.begin_segment([volume], "/model", None)
    _run(logic)


def test_shutdown_closes_the_worker(lib, logic, client, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    logic.shutdown()
    assert client.closed and not logic.busy and logic.client is None


# --------------------------------------------------------------------------------------------
# Next uncertain slice: world coordinates, parent transforms included
# --------------------------------------------------------------------------------------------
def test_next_uncertain_slice_under_a_parent_transform(lib, logic, client, scene, tmp_path):
    import vtk

    volume, array = _sphere_node(scene, tmp_path)
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    matrix = vtk.vtkMatrix4x4()
    rotation = vtk.vtkTransform()
    rotation.RotateZ(30)
    rotation.Translate(40.0, -15.0, 7.5)
    matrix.DeepCopy(rotation.GetMatrix())
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())

    logic.begin_segment([volume], "/model", None)
    _run(logic)
    (segmentation,) = _segmentations(scene)
    assert segmentation.GetTransformNodeID() == transform.GetID(), "the result shares the volume's transform"

    logic.begin_next_uncertain_slice(segmentation)
    first = _run(logic).uncertain_slice
    assert first.index == 0  # the scripted worker ranks slice 0 first
    k, j, i = array.shape
    local = lib.mrml_io.ijk_to_ras_of(volume) @ np.array([(i - 1) / 2, (j - 1) / 2, 0.0, 1.0])
    expected = (np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]) @ local)[:3]
    assert np.allclose(first.centre_world, expected, atol=1e-6)
    assert not np.allclose(first.centre_world, local[:3], atol=1.0), "the parent transform moved the point"
    logic.begin_next_uncertain_slice(segmentation)
    assert _run(logic).uncertain_slice.index == 1, "the next press offers the next slice"


def test_a_volume_whose_extent_does_not_start_at_zero(lib, logic, client, scene):
    """MRML's IJK indices are the image data's extent, which a cropped or scripted volume may
    start elsewhere than at 0: the segmentation still lands on the voxels it came from, in RAS
    (compared through Slicer's own export), reads back as written, and the next uncertain
    slice's centre is that slice's (it was shifted by the extent's start once)."""
    import vtk
    from vtk.util import numpy_support

    start = (5, 2, 1)  # (i0, j0, k0)
    shape = (6, 9, 12)  # (K, J, I)
    image = vtk.vtkImageData()
    image.SetExtent(
        start[0], start[0] + shape[2] - 1, start[1], start[1] + shape[1] - 1, start[2], start[2] + shape[0] - 1
    )
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    array = np.zeros(shape, dtype=np.float32)
    array[1:3, 2:5, 3:7] = 1000.0  # a blob away from every border: the scripted worker's foreground
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.reshape(-1)
    volume = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(volume)
    volume.SetAndObserveImageData(image)
    rotation = vtk.vtkTransform()
    rotation.RotateY(25)
    rotation.RotateZ(-10)
    rotation.Scale(0.8, 1.2, 2.5)
    node_ijk_to_ras = np.array([[rotation.GetMatrix().GetElement(r, c) for c in range(4)] for r in range(4)])
    node_ijk_to_ras[:3, 3] = (-30.0, 12.0, 4.0)
    volume.SetIJKToRASMatrix(lib.mrml_io.vtk_matrix_from_numpy(node_ijk_to_ras))

    def ras_of(ijk_to_ras, kji_indices):
        ijk = np.stack([kji_indices[2], kji_indices[1], kji_indices[0], np.ones(len(kji_indices[0]))])
        return (ijk_to_ras @ ijk)[:3].T

    # The blob's voxels in RAS, by the node's own matrix and its true IJK indices.
    blob = np.nonzero(array > 500)
    expected_ras = ras_of(node_ijk_to_ras, (blob[0] + start[2], blob[1] + start[1], blob[2] + start[0]))

    logic.begin_segment([volume], "/model", None)
    _run(logic)
    (segmentation,) = _segmentations(scene)
    assert np.array_equal(lib.mrml_io.read_class_labels(segmentation, volume) > 0, array > 500)
    voxels, exported_ijk_to_ras = export_labelmap(scene, segmentation, volume)
    assert voxels.sum() == len(blob[0]), "Slicer's export holds every voxel written, in the volume"
    found = np.nonzero(voxels)
    # The exported labelmap's array starts at its own extent's first voxel, like the volume's.
    exported_start = np.array(
        scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetItemAsObject(0).GetImageData().GetExtent()[::2]
    )
    found_ras = ras_of(
        exported_ijk_to_ras, (found[0] + exported_start[2], found[1] + exported_start[1], found[2] + exported_start[0])
    )
    assert np.allclose(np.sort(found_ras, axis=0), np.sort(expected_ras, axis=0), atol=1e-6)

    logic.begin_next_uncertain_slice(segmentation)
    first = _run(logic).uncertain_slice  # slice 0 of the array: the volume's IJK k = k0
    k, j, i = shape
    centre = node_ijk_to_ras @ np.array([(i - 1) / 2 + start[0], (j - 1) / 2 + start[1], start[2], 1.0])
    assert np.allclose(first.centre_world, centre[:3], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Colour radiographs, terminology
# --------------------------------------------------------------------------------------------
def test_rgb_vector_volume_becomes_bt601_luminance(lib, scene):
    from vtk.util import numpy_support

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(1, 6, 5, 3), dtype=np.uint8)
    node = slicer.vtkMRMLVectorVolumeNode()
    scene.AddNode(node)
    import vtk

    image = vtk.vtkImageData()
    image.SetDimensions(5, 6, 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = rgb.reshape(-1, 3)
    node.SetAndObserveImageData(image)
    grey = lib.mrml_io.array_from_volume_node(node)
    assert grey.shape == (1, 6, 5) and grey.dtype == np.float32
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert np.allclose(grey, expected, atol=1e-4)
    # Pillow's "L" conversion (what tedm_core does with a colour PNG) is the same rule, rounded.
    from PIL import Image

    pillow = np.asarray(Image.fromarray(rgb[0], "RGB").convert("L"), dtype=np.float32)
    assert np.abs(grey[0] - pillow).max() <= 1.0
    arrays = lib.mrml_io.volume_arrays_from_nodes([node])
    assert arrays.array.shape == (1, 1, 6, 5)


def test_terminology_codes_are_slicers(lib):
    """Codes as in Slicer's SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json and
    SegmentationCategoryTypeModifier-DICOM-Master.json (Slicer/Slicer, Modules/Loadable/Terminologies)."""
    term = lib.terminology.term_for
    assert term("Left lung").entry() == (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^39607008^Lung~SCT^7771000^Left~~^^~^^"
    )
    assert term("right_lung").modifier == ("SCT", "24028007", "Right")
    assert term("heart").type == ("SCT", "80891009", "Heart") and term("heart").colour == (206, 110, 84)
    assert term("grey matter").type == ("SCT", "389081007", "Gray Matter")
    assert term("White-matter").type == ("SCT", "389080008", "White Matter")
    tumour = term("whole tumour")
    assert tumour.category == ("SCT", "49755003", "Morphologically Altered Structure")
    assert tumour.type == ("SCT", "108369006", "Neoplasm") and tumour.region == ("SCT", "12738006", "Brain")
    assert term("disc") is None


def test_segments_written_by_tedm_carry_terminology_and_its_colour(lib, scene, tmp_path):
    volume, array = _sphere_node(scene, tmp_path)
    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    labels = np.zeros(array.shape, dtype=np.uint8)
    labels[3:6, 4:8, 4:8] = 1
    labels[7:9, 4:8, 4:8] = 2
    ids = lib.mrml_io.write_class_labels(
        segmentation, volume, labels, ["background", "left lung", "heart"], [[0, 0, 0], [10, 20, 30], [40, 50, 60]]
    )
    lung = segmentation.GetSegmentation().GetSegment(ids[0])
    assert "SCT^39607008^Lung~SCT^7771000^Left" in _terminology(lung)
    assert np.allclose(np.array(lung.GetColor()) * 255, (197, 165, 145), atol=1e-3)
    heart = segmentation.GetSegmentation().GetSegment(ids[1])
    assert np.allclose(np.array(heart.GetColor()) * 255, (206, 110, 84), atol=1e-3)
    assert np.array_equal(export_labelmap(scene, segmentation, volume)[0], labels)


def test_channels_must_share_a_grid(lib, scene, tmp_path):
    import nibabel as nib

    volume, array = _sphere_node(scene, tmp_path, affine_name="ras")
    affine = affine_zoo()["ras"].copy()
    affine[:3, 3] += 2.0  # the same voxels, 2 mm away: not the same grid
    nib.save(nib.Nifti1Image(array.T, affine), tmp_path / "shifted.nii.gz")
    moved = load_volume_node(scene, tmp_path / "shifted.nii.gz")
    with pytest.raises(lib.mrml_io.GeometryError, match="resample"):
        lib.mrml_io.volume_arrays_from_nodes([volume, moved])


# --------------------------------------------------------------------------------------------
# A result goes into MRML one segment per timer tick (a full volume's segment costs 50-250 ms)
# --------------------------------------------------------------------------------------------
THREE_CLASSES = ("background", "core", "edema", "enhancing")


def _poll_until_writing(logic):
    for _ in range(50):
        logic.poll()
        if logic.running is not None and logic.running.write is not None:
            return logic.running.write
    raise AssertionError("the result never arrived")


def test_a_new_segmentation_is_written_one_segment_per_poll_and_appears_complete(lib, scene, tmp_path):
    client = ScriptedWorkerClient(class_names=THREE_CLASSES)
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    write = _poll_until_writing(logic)
    labels = write.labels.copy()
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    polls = 0
    while logic.busy:
        assert _segmentations(scene) == [], "the node is filled outside the scene: nobody sees it half-written"
        logic.poll()
        polls += 1
    assert polls == len(THREE_CLASSES), "one poll per segment, then one that adds the node"
    finished = logic.listener.finished_operations[-1]
    assert finished.status == lib.DONE
    (node,) = _segmentations(scene)
    assert finished.segmentation_node is node and node.GetDisplayNode() is not None
    assert np.array_equal(lib.mrml_io.read_class_labels(node, volume), labels)
    assert lib.mrml_io.class_names_of(node) == list(THREE_CLASSES)
    assert set(logic.timings.report()) >= {"read volume", "submit request", "poll worker", "write result piece"}


def test_scene_closed_between_pieces_leaves_no_node(lib, scene, tmp_path):
    client = ScriptedWorkerClient(class_names=THREE_CLASSES)
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    _poll_until_writing(logic)
    logic.poll()  # one segment written into the staged node
    logic.on_scene_closed()
    scene.Clear(0)
    finished = _run(logic)
    assert finished.status == lib.DROPPED and "scene was closed" in finished.message
    assert _segmentations(scene) == []


def test_cancel_while_a_result_is_written_changes_nothing(lib, scene, tmp_path):
    client = ScriptedWorkerClient(class_names=THREE_CLASSES)
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    _poll_until_writing(logic)
    logic.cancel()  # too late to stop the job: the result is completed, not left half-written
    finished = _run(logic)
    assert finished.status == lib.DONE and len(_segmentations(scene)) == 1


def test_an_edit_between_pieces_of_an_in_place_write_is_kept(lib, scene, tmp_path):
    client = ScriptedWorkerClient(class_names=THREE_CLASSES)
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    (segmentation,) = [_run(logic).segmentation_node]
    ids = logic.record_for(segmentation).segment_ids
    editor = SegmentEditor(scene, segmentation, volume)
    # The user erases slice 6 of the first structure, then segments again into the same node.
    erase = np.zeros(lib.mrml_io.read_class_labels(segmentation, volume).shape, dtype=bool)
    erase[6] = True
    editor.erase(ids[0], erase)
    before = {s: lib.mrml_io.read_class_labels(segmentation, volume, [s]) for s in ids}
    assert not before[ids[0]][6].any()
    logic.written.clear()  # as for a segmentation TEDM wrote in an earlier Slicer session: its erase is not known
    logic.begin_segment([volume], "/model", segmentation)
    write = _poll_until_writing(logic)
    assert not write.staged and write.target is segmentation
    logic.poll()  # the first structure as it is now is kept (to put it back after an edit) ...
    logic.poll()  # ... then written in place (slice 6 comes back)
    assert lib.mrml_io.read_class_labels(segmentation, volume, [ids[0]])[6].any()
    painted = np.zeros_like(erase)
    painted[2, :3, :3] = True
    editor.add(ids[2], painted)  # ... and the user paints the third structure before it is written
    users = lib.mrml_io.read_class_labels(segmentation, volume, [ids[2]])
    finished = _run(logic)
    assert finished.status == lib.DONE and finished.written_to_new_node
    assert "edited while the result was being written" in finished.message
    assert np.array_equal(lib.mrml_io.read_class_labels(segmentation, volume, [ids[0]]), before[ids[0]]), (
        "the piece already written was put back"
    )
    assert np.array_equal(lib.mrml_io.read_class_labels(segmentation, volume, [ids[1]]), before[ids[1]])
    assert np.array_equal(lib.mrml_io.read_class_labels(segmentation, volume, [ids[2]]), users), "the edit is kept"
    result_node = finished.segmentation_node
    assert result_node is not segmentation and len(_segmentations(scene)) == 2
    assert np.array_equal(lib.mrml_io.read_class_labels(result_node, volume), write.labels)
    assert logic.has_result(result_node) and not logic.has_result(segmentation)


def _user_segmentation_being_written(lib, scene, tmp_path):
    """A user's segmentation with two structures painted (a third class is new to it), Segment
    into it, polled until its first structure has been written in place. Returns the logic, the
    segmentation, a copy of the volume in the same grid (to read with after the volume goes), and
    what Slicer's export held before."""
    client = ScriptedWorkerClient(class_names=THREE_CLASSES)
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, array = _sphere_node(scene, tmp_path)
    same_grid, _ = _sphere_node(scene, tmp_path, name="copy")
    segmentation, ids = new_segmentation(scene, [("core", (1.0, 0.0, 0.0)), ("edema", (0.0, 1.0, 0.0))])
    editor = SegmentEditor(scene, segmentation, volume)
    for n, segment_id in enumerate(ids):
        mask = np.zeros(array.shape, dtype=bool)
        mask[n + 1, 2:6, 3:9] = True
        editor.add(segment_id, mask)
    before = export_labelmap(scene, segmentation, same_grid)[0]
    logic.begin_segment([volume], "/model", segmentation)
    write = _poll_until_writing(logic)
    assert not write.staged and write.target is segmentation
    while write.done < 1:
        logic.poll()
    assert not np.array_equal(export_labelmap(scene, segmentation, same_grid)[0], before), "half written"
    return logic, volume, segmentation, same_grid, before


def _as_before(lib, scene, segmentation, same_grid, before):
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2, "the segment the write added is gone"
    assert segmentation.GetAttribute(lib.mrml_io.CLASS_SEGMENT_IDS_ATTRIBUTE) is None
    return np.array_equal(export_labelmap(scene, segmentation, same_grid)[0], before)


def test_a_volume_deleted_during_an_in_place_write_leaves_the_segmentation_as_it_was(lib, scene, tmp_path):
    """The README's promise, a segmentation is never left half old, half new: the pieces
    already written are put back, and the message that nothing was written is true."""
    logic, volume, segmentation, same_grid, before = _user_segmentation_being_written(lib, scene, tmp_path)
    scene.RemoveNode(volume)
    logic.on_node_removed(volume)
    finished = _run(logic)
    assert finished.status == lib.DROPPED and "nothing was written" in finished.message
    assert _as_before(lib, scene, segmentation, same_grid, before)


def test_a_segment_mrml_refuses_mid_write_leaves_the_segmentation_as_it_was(lib, scene, tmp_path, monkeypatch):
    logic, volume, segmentation, same_grid, before = _user_segmentation_being_written(lib, scene, tmp_path)

    def refuse(*_args):
        raise RuntimeError("could not write segment")

    monkeypatch.setattr(logic, "_write_segment", refuse)
    finished = _run(logic)
    assert finished.status == lib.FAILED and "could not write segment" in finished.message
    assert _as_before(lib, scene, segmentation, same_grid, before)


def test_an_in_place_write_without_edits_replaces_every_segment(lib, scene, tmp_path):
    client = ScriptedWorkerClient(class_names=THREE_CLASSES)
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, _ = _sphere_node(scene, tmp_path)
    segmentation, _ = new_segmentation(scene, [("core", (1.0, 0.0, 0.0))])
    logic.begin_segment([volume], "/model", segmentation)
    write = _poll_until_writing(logic)
    finished = _run(logic)
    assert finished.status == lib.DONE and finished.segmentation_node is segmentation
    assert not finished.written_to_new_node and len(_segmentations(scene)) == 1
    assert np.array_equal(lib.mrml_io.read_class_labels(segmentation, volume), write.labels)


# --------------------------------------------------------------------------------------------
# Each segment is written as its bounding box only, voxel for voxel what a full-extent write gives
# --------------------------------------------------------------------------------------------
def _three_structures(shape):
    """Class indices 0-3 in ``shape`` (KJI): two boxes off the centre, touching different faces
    of the grid, and class 3 empty (its segment must end up empty, not keep old voxels)."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:7, 3:9, 5:20] = 1
    labels[8:, 12:, :4] = 2
    labels[5, 15, 10] = 2  # a lone voxel far from its box: the box grows to hold it
    return labels


def _full_extent_write(lib, node, volume, ids, labels):
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    ijk_to_ras = lib.mrml_io.ijk_to_ras_of(volume)
    for index, segment_id in enumerate(ids, start=1):
        image = lib.mrml_io.oriented_image_from_array((labels == index).astype(np.uint8), ijk_to_ras)
        assert logic.SetBinaryLabelmapToSegment(image, node, segment_id, logic.MODE_REPLACE)


@pytest.mark.parametrize("affine_name", ["ras", "flipped", "oblique", "permuted", "left_handed"])
def test_cropped_segment_writes_equal_full_extent_writes(lib, scene, tmp_path, affine_name):
    volume, array = _sphere_node(scene, tmp_path, affine_name)
    labels = _three_structures(array.shape)
    names = list(THREE_CLASSES)
    image = lib.mrml_io.cropped_oriented_image_from_mask(labels == 1, lib.mrml_io.ijk_to_ras_of(volume))
    assert image.GetExtent() == (5, 19, 3, 8, 2, 6), "only the box of class 1 (IJK extent)"

    # A new node, written one-shot at full extent (the reference) and cropped (the module's way).
    reference = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(reference)
    _full_extent_write(lib, reference, volume, lib.mrml_io.prepare_segmentation_node(reference, volume, names), labels)
    cropped = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(cropped)
    lib.mrml_io.write_class_labels(cropped, volume, labels, names)
    expected, expected_ijk_to_ras = export_labelmap(scene, reference, volume)
    assert np.array_equal(expected, labels)
    voxels, ijk_to_ras = export_labelmap(scene, cropped, volume)
    assert np.array_equal(voxels, expected) and np.allclose(ijk_to_ras, expected_ijk_to_ras, atol=1e-9)

    # In place, over a user's segments sharing one layer, each holding voxels everywhere.
    user, ids = new_segmentation(scene, [(name, (1.0, 0.0, 0.0)) for name in names[1:]])
    assert user.GetSegmentation().GetNumberOfLayers() == 1, "the shared-layer case is the one tested"
    editor = SegmentEditor(scene, user, volume)
    old = np.zeros(array.shape, dtype=np.uint8)
    old[:, :, 10:] = 1
    old[:, :4, :] = 2
    old[::2, 8:, :3] = 3
    for index, segment_id in enumerate(ids, start=1):
        editor.add(segment_id, old == index)
    assert lib.mrml_io.write_class_labels(user, volume, labels, names) == ids
    for index, segment_id in enumerate(ids, start=1):
        assert np.array_equal(lib.mrml_io.read_class_labels(user, volume, [segment_id]), (labels == index) * 1), (
            f"segment {index}: the box written, nothing left of the old voxels outside it"
        )
    voxels, _ = export_labelmap(scene, user, volume)
    assert np.array_equal(voxels, expected)


def _begin_into_two_segments(lib, scene, tmp_path):
    client = ScriptedWorkerClient(class_names=THREE_CLASSES)
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, array = _sphere_node(scene, tmp_path)
    segmentation, ids = new_segmentation(scene, [("core", (1.0, 0.0, 0.0)), ("other", (0.0, 1.0, 0.0))])
    editor = SegmentEditor(scene, segmentation, volume)
    for n, segment_id in enumerate(ids):
        mask = np.zeros(array.shape, dtype=bool)
        mask[n, 2:5, 2:5] = True
        editor.add(segment_id, mask)
    logic.begin_segment([volume], "/model", segmentation)
    return logic, volume, segmentation, ids, editor


def _rewrite_unchanged(lib, segmentation, volume, segment_id):
    """Write a segment's own voxels back: its modified time changes, its content does not."""
    voxels = lib.mrml_io.read_class_labels(segmentation, volume, [segment_id])
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = lib.mrml_io.oriented_image_from_array(voxels, lib.mrml_io.ijk_to_ras_of(volume))
    assert logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE)


def test_the_segmentation_is_read_during_the_job_and_the_result_kept_by_the_poll_receiving_it(lib, scene, tmp_path):
    """No segment is read at the click: the segmentation at the request is read one segment per
    tick while the job runs. The poll in which the result arrives does no MRML work; untouched
    segments need no second read, so the result is staged in one tick and written after."""
    logic, volume, segmentation, ids, _ = _begin_into_two_segments(lib, scene, tmp_path)
    running = logic.running
    assert running.segmentation_digest is None and "segmentation digest" not in logic.timings.longest
    logic.poll()
    logic.poll()
    assert running.segmentation_digest is None, "one segment per tick"
    logic.poll()
    assert running.segmentation_digest is not None and running.digesting is None
    while running.preparing is None:
        logic.poll()
    assert running.write is None, "nothing prepared in the poll that received the result"
    digest_time = logic.timings.total["segmentation digest"]
    logic.poll()
    assert running.write is not None and not running.write.staged, "untouched: staged in one tick, in place"
    finished = _run(logic)
    assert finished.status == lib.DONE and finished.segmentation_node is segmentation
    assert not finished.written_to_new_node and logic.timings.total["segmentation digest"] == digest_time
    assert set(logic.timings.report()) >= {"read segmentation at request", "prepare result", "write result piece"}


def test_a_touched_but_unchanged_segmentation_is_compared_and_written_in_place(lib, scene, tmp_path):
    logic, volume, segmentation, ids, _ = _begin_into_two_segments(lib, scene, tmp_path)
    running = logic.running
    while running.digesting is not None:
        logic.poll()
    _rewrite_unchanged(lib, segmentation, volume, ids[1])
    while running.preparing is None:
        logic.poll()
    ticks = 0
    while running.write is None:
        logic.poll()
        ticks += 1
    assert ticks == 3, "touched: one tick per segment compared (2), then the node prepared"
    finished = _run(logic)
    assert finished.status == lib.DONE and finished.segmentation_node is segmentation
    assert not finished.written_to_new_node


def test_an_edit_while_the_result_is_checked_sends_it_to_a_new_node(lib, scene, tmp_path):
    logic, volume, segmentation, ids, editor = _begin_into_two_segments(lib, scene, tmp_path)
    running = logic.running
    while running.digesting is not None:
        logic.poll()
    _rewrite_unchanged(lib, segmentation, volume, ids[0])  # touched: the result is compared voxel by voxel
    while running.preparing is None:
        logic.poll()
    logic.poll()  # the first segment compared, unchanged since the request ...
    painted = np.zeros(lib.mrml_io.read_class_labels(segmentation, volume).shape, dtype=bool)
    painted[1, :2, :2] = True
    editor.add(ids[0], painted)  # ... and the user paints it now
    users = lib.mrml_io.read_class_labels(segmentation, volume, [ids[0]])
    finished = _run(logic)
    assert finished.status == lib.DONE and finished.written_to_new_node
    assert f"was edited while {finished.title} ran" in finished.message
    assert finished.segmentation_node is not segmentation and len(_segmentations(scene)) == 2
    assert np.array_equal(lib.mrml_io.read_class_labels(segmentation, volume, [ids[0]]), users)


def test_an_edit_before_the_segmentation_is_read_counts_as_an_edit(lib, scene, tmp_path):
    """Painted and erased again in the first ticks: the content at the request was not read
    yet, so it is unknown, and the result does not overwrite the segmentation."""
    logic, volume, segmentation, ids, editor = _begin_into_two_segments(lib, scene, tmp_path)
    logic.poll()  # the first segment read
    stroke = np.zeros(lib.mrml_io.read_class_labels(segmentation, volume).shape, dtype=bool)
    stroke[8, :2, :2] = True
    editor.add(ids[1], stroke)
    editor.erase(ids[1], stroke)
    finished = _run(logic)
    assert logic.listener.finished_operations[-1] is finished and finished.status == lib.DONE
    assert finished.written_to_new_node and finished.segmentation_node is not segmentation


def test_node_deleted_while_the_result_is_checked_drops_it(lib, scene, tmp_path):
    logic, volume, segmentation, ids, _ = _begin_into_two_segments(lib, scene, tmp_path)
    while logic.running.digesting is not None:
        logic.poll()
    _rewrite_unchanged(lib, segmentation, volume, ids[0])
    while logic.running.preparing is None:
        logic.poll()
    logic.poll()  # the first segment compared
    scene.RemoveNode(segmentation)
    logic.on_node_removed(segmentation)
    finished = _run(logic)
    assert finished.status == lib.DROPPED and _segmentations(scene) == []


# --------------------------------------------------------------------------------------------
# The user's own segments, renames and colours in a segmentation TEDM wrote
# --------------------------------------------------------------------------------------------
def _names(node):
    segmentation = node.GetSegmentation()
    return {segmentation.GetNthSegmentID(n): segmentation.GetNthSegment(n).GetName() for n in range(len(_ids(node)))}


def _ids(node):
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def test_segment_again_leaves_a_segment_the_user_added_alone(lib, scene, tmp_path):
    client = ScriptedWorkerClient(class_names=("background", "grey", "white"))
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, array = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    node = _run(logic).segmentation_node
    grey_id, white_id = _ids(node)
    # The user deletes 'grey', adds a segment of their own and paints it.
    mine = node.GetSegmentation().AddEmptySegment("", "my notes", [0.0, 0.0, 1.0])
    notes = np.zeros(array.shape, dtype=bool)
    notes[0, :4, :4] = True
    SegmentEditor(scene, node, volume).add(mine, notes)
    node.GetSegmentation().RemoveSegment(grey_id)

    logic.begin_segment([volume], "/model", node)
    finished = _run(logic)
    assert finished.status == lib.DONE and finished.segmentation_node is node
    names = _names(node)
    assert names[mine] == "my notes" and names[white_id] == "white"
    assert np.array_equal(lib.mrml_io.read_class_labels(node, volume, [mine]) > 0, notes), "the user's voxels"
    (new_grey,) = [s for s, name in names.items() if name == "grey"]
    assert new_grey not in (mine, white_id), "the deleted class gets a new segment"
    labels = lib.mrml_io.read_class_labels(node, volume, [new_grey, white_id])
    assert np.array_equal(labels, client.last_labels[logic.record_for(node).session_id])


def test_an_unrecorded_segment_is_only_taken_for_a_class_of_its_name(lib, scene, tmp_path):
    volume, array = _sphere_node(scene, tmp_path)
    node, (notes_id, white_id) = new_segmentation(scene, [("notes", (0.0, 0.0, 1.0)), ("white", (0.1, 0.2, 0.3))])
    ids = lib.mrml_io.prepare_segmentation_node(node, volume, ["background", "grey", "white"])
    assert ids[1] == white_id and ids[0] not in (notes_id, white_id)
    assert _names(node)[notes_id] == "notes"
    assert np.allclose(node.GetSegmentation().GetSegment(white_id).GetColor(), (0.1, 0.2, 0.3))


def test_refine_keeps_the_users_rename_and_colour(lib, logic, client, scene, tmp_path):
    volume, array = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    node = _run(logic).segmentation_node
    (segment_id,) = _ids(node)
    segment = node.GetSegmentation().GetSegment(segment_id)
    segment.SetName("left tumour (checked)")
    segment.SetColor(0.0, 1.0, 0.0)
    corrected = np.zeros(array.shape, dtype=bool)
    corrected[2, :3, :3] = True
    SegmentEditor(scene, node, volume).add(segment_id, corrected)
    logic.begin_refine(node, volume)
    assert _run(logic).status == lib.DONE
    logic.begin_segment([volume], "/model", node)
    assert _run(logic).status == lib.DONE
    assert _ids(node) == [segment_id]
    assert segment.GetName() == "left tumour (checked)" and segment.GetColor() == (0.0, 1.0, 0.0)


def test_fit_in_a_tedm_segmentation_learns_a_segment_the_user_added(lib, scene, tmp_path):
    client = ScriptedWorkerClient(class_names=("background", "grey"))
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, array = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    node = _run(logic).segmentation_node
    (grey_id,) = _ids(node)
    csf_id = node.GetSegmentation().AddEmptySegment("", "csf", [0.0, 0.0, 1.0])
    csf = np.zeros(array.shape, dtype=bool)
    csf[3, 2:6, 2:6] = True
    SegmentEditor(scene, node, volume).add(csf_id, csf)
    drawn = lib.mrml_io.read_class_labels(node, volume, [grey_id, csf_id])

    logic.begin_fit([volume], "/backbone", node)
    finished = _run(logic)
    op, fields, arrays = client.requests[-1]
    assert op == "fit" and fields["class_names"] == ["background", "grey", "csf"]
    assert np.array_equal(arrays["labels"], drawn) and set(np.unique(arrays["labels"][csf])) == {2}
    assert any("grey, csf" in line for line in logic.listener.lines), logic.listener.lines
    assert finished.status == lib.DONE and finished.segmentation_node is node
    assert _ids(node) == [grey_id, csf_id], "the result goes back into the very segments painted"
    result = lib.mrml_io.read_class_labels(node, volume, [grey_id, csf_id])
    assert np.array_equal(result[3], drawn[3]), "the labelled slice stays as drawn"
    assert logic.record_for(node).segment_ids == [grey_id, csf_id]


def test_fit_names_segments_with_nothing_painted(lib, logic, client, scene, tmp_path):
    volume, array = _sphere_node(scene, tmp_path)
    node, (tumour_id, _) = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0)), ("notes", (0.0, 0.0, 1.0))])
    drawn = np.zeros(array.shape, dtype=bool)
    drawn[6, 4:8, 4:8] = True
    SegmentEditor(scene, node, volume).add(tumour_id, drawn)
    logic.begin_fit([volume], "/backbone", node)
    _run(logic)
    assert any("notes have no painted voxel" in line for line in logic.listener.lines), logic.listener.lines


# --------------------------------------------------------------------------------------------
# A worker session is reused only for the very voxels and geometry it holds, every channel
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["second channel voxels", "second channel image replaced", "first channel geometry"])
def test_segment_again_resends_volumes_that_changed(lib, logic, client, scene, tmp_path, change):
    from vtk.util import numpy_support

    flair, _ = _sphere_node(scene, tmp_path, name="flair")
    t1, _ = _sphere_node(scene, tmp_path, name="t1")
    logic.begin_segment([flair, t1], "/model", None)
    node = _run(logic).segmentation_node
    first_session = logic.record_for(node).session_id
    logic.begin_segment([flair, t1], "/model", node)  # nothing changed: the session is reused
    _run(logic)
    assert client.ops() == ["open_session", "segment", "segment"]

    if change == "second channel voxels":
        numpy_support.vtk_to_numpy(t1.GetImageData().GetPointData().GetScalars())[:] = 0
        t1.GetImageData().Modified()
    elif change == "second channel image replaced":
        import vtk

        image = vtk.vtkImageData()
        image.DeepCopy(t1.GetImageData())
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = 0
        t1.SetAndObserveImageData(image)
    else:
        spacing = flair.GetSpacing()
        flair.SetSpacing(spacing[0] * 2, spacing[1], spacing[2])
        t1.SetSpacing(spacing[0] * 2, spacing[1], spacing[2])
    with pytest.raises(lib.UserInputError, match="changed"):
        logic.begin_refine(node, flair)
    logic.begin_segment([flair, t1], "/model", node)
    finished = _run(logic)
    assert finished.status == lib.DONE
    assert client.ops()[3:5] == ["open_session", "segment"] and "close_session" in client.ops()[5:]
    session = logic.record_for(node).session_id
    assert session != first_session and first_session not in client.sessions
    volume, ijk_to_ras = client.sessions[session]
    assert np.array_equal(volume[1], lib.mrml_io.array_from_volume_node(t1))
    assert np.allclose(ijk_to_ras, lib.mrml_io.ijk_to_ras_of(flair))


# --------------------------------------------------------------------------------------------
# A hung worker, a worker that died while idle, the worker's description, shutdown
# --------------------------------------------------------------------------------------------
class _Clock:
    """``time`` for the logic with a monotonic clock the test moves (a hung worker is told by the
    time Cancel stays unanswered; a test does not wait seconds for it)."""

    def __init__(self) -> None:
        import time

        self.now = time.monotonic()
        self.perf_counter = time.perf_counter

    def monotonic(self) -> float:
        return self.now


def _timer_ticks(logic, clock, ticks, seconds_per_tick=0.05):
    """The widget's QTimer: poll(0.02, 0) every 50 ms while the logic needs polling."""
    for _ in range(ticks):
        if not logic.needs_polling():
            return True
        logic.poll(max_seconds=0.02, wait_seconds=0.0)
        clock.now += seconds_per_tick
    return not logic.needs_polling()


@pytest.fixture
def clock(lib, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(lib.logic, "time", clock)
    return clock


def test_a_hung_worker_is_stopped_when_it_does_not_answer_cancel(lib, logic, client, scene, tmp_path, clock):
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    _timer_ticks(logic, clock, 3)
    client.hang()
    assert not _timer_ticks(logic, clock, 200), "a hung worker never ends the job by itself"
    logic.cancel()
    seconds = lib.logic.CANCEL_ANSWER_TIMEOUT_S
    assert not _timer_ticks(logic, clock, int(seconds / 0.05) - 2), "not before the timeout"
    assert _timer_ticks(logic, clock, 10), "stopped a few ticks after the timeout"
    finished = logic.listener.finished_operations[-1]
    assert finished.status == lib.CANCELLED and "did not answer Cancel" in finished.message
    assert "next request starts a new worker" in finished.message and finished.message in logic.listener.lines
    assert client.close_calls == [0.0] and logic.client is None and _segmentations(scene) == []

    generation = client.generation
    logic.begin_segment([volume], "/model", None)
    assert client.generation == generation + 1 and client.ops()[-1] == "open_session"
    assert _timer_ticks(logic, clock, 20) and logic.listener.finished_operations[-1].status == lib.DONE


def test_cancel_pressed_twice_stops_a_hung_worker_at_once(lib, logic, client, scene, tmp_path, clock):
    volume, _ = _sphere_node(scene, tmp_path)
    segmentation, _ = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    logic.begin_segment([volume], "/model", segmentation)
    _timer_ticks(logic, clock, 5)
    client.hang()
    logic.cancel()
    logic.cancel()
    assert not logic.busy and not logic.needs_polling()
    finished = logic.listener.finished_operations[-1]
    assert finished.status == lib.CANCELLED and "Cancel was pressed again" in finished.message
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1 and not logic.has_result(segmentation)


def test_a_worker_that_answers_cancel_is_left_to_finish_its_step(lib, scene, tmp_path, clock):
    client = ScriptedWorkerClient(job_polls=400)  # a long step: the job ends 20 s after Cancel
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    _timer_ticks(logic, clock, 3)
    logic.cancel()
    assert _timer_ticks(logic, clock, 1000)
    finished = logic.listener.finished_operations[-1]
    assert finished.status == lib.CANCELLED and "did not answer" not in finished.message
    assert client.close_calls == [] and client.alive


def test_a_worker_that_died_while_idle_is_restarted_by_the_next_request(lib, logic, client, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    node = _run(logic).segmentation_node
    assert logic.has_result(node)
    client.kill()  # no timer runs while idle: nobody polls the client
    assert not logic.has_result(node), "its sessions are gone"
    logic.begin_segment([volume], "/model", node)
    assert client.ops()[-1] == "open_session", "a new worker gets the volume"
    finished = _run(logic)
    assert finished.status == lib.DONE and finished.segmentation_node is node, finished.message
    assert logic.has_result(node)


def test_the_workers_description_is_polled_for_without_an_operation(lib, logic, client, clock):
    seen = []
    assert not logic.needs_polling()
    logic.describe_worker(seen.append)
    assert not logic.busy and logic.needs_polling(), "the timer keeps running for the answer"
    assert _timer_ticks(logic, clock, 5)
    assert len(seen) == 1 and seen[0].startswith("Worker pid")
    client.hang()
    logic.describe_worker(seen.append)
    assert not _timer_ticks(logic, clock, 50) and len(seen) == 1
    logic.shutdown()
    assert not logic.needs_polling()


def test_shutdown_closes_every_session_and_reports_the_running_operation(lib, logic, client, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    other, _ = _sphere_node(scene, tmp_path, name="other")
    logic.begin_segment([volume], "/model", None)
    first = _run(logic).segmentation_node
    logic.begin_segment([other], "/model", None)
    second = _run(logic).segmentation_node
    sessions = {logic.record_for(first).session_id, logic.record_for(second).session_id}
    logic.begin_refine(first, volume)
    logic.poll()
    logic.shutdown()
    assert not logic.busy and client.closed and logic.client is None
    closed = {fields["session"] for op, fields, _ in client.requests if op == "close_session"}
    assert closed == sessions
    assert client.ops()[-3] == "cancel" and client.requests[-3][1]["target"]
    finished = logic.listener.finished_operations[-1]
    assert finished.operation == "refine" and finished.status == lib.CANCELLED
    assert "stopped" in finished.message and "nothing was written" in finished.message


def test_a_worker_still_starting_gets_longer_to_answer_cancel(lib, logic, client, scene, tmp_path, clock):
    volume, _ = _sphere_node(scene, tmp_path)
    client.hang()  # nothing answered yet: it may be importing torch
    logic.begin_segment([volume], "/model", None)
    logic.cancel()
    assert not _timer_ticks(logic, clock, int(2 * lib.logic.CANCEL_ANSWER_TIMEOUT_S / 0.05))
    ticks = int(lib.logic.CANCEL_ANSWER_TIMEOUT_STARTING_S / 0.05)
    assert _timer_ticks(logic, clock, ticks) and client.close_calls == [0.0]
    assert "did not answer Cancel within 60 s" in logic.listener.finished_operations[-1].message


def test_an_upload_the_worker_does_not_read_does_not_hold_cancel_forever(lib, logic, client, scene, tmp_path, clock):
    """A worker that never starts (stuck in its imports, a launcher buffering its output) never
    reads the volume sent to it: the cancel queued behind that upload is never read either. While
    the upload moves, the clock waits for it; once it stands still, Cancel's timeout runs."""
    volume, _ = _sphere_node(scene, tmp_path)
    client.hang()
    logic.begin_segment([volume], "/model", None)
    client.held_bytes = 393_557  # the volume, never read
    logic.cancel()
    for _ in range(40):  # moving: the worker reads it, slowly
        client.held_bytes -= 1000
        assert not _timer_ticks(logic, clock, 40)  # 2 s each
    ticks = int(lib.logic.CANCEL_ANSWER_TIMEOUT_STARTING_S / 0.05)
    assert _timer_ticks(logic, clock, ticks + 10) and client.close_calls == [0.0], "stopped once it stood still"
    assert "did not answer Cancel within 60 s" in logic.listener.finished_operations[-1].message


def test_a_scene_closed_after_cancel_does_not_stop_the_worker(lib, logic, client, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    logic.poll()
    logic.cancel()
    logic.on_scene_closed()  # not a second press of Cancel
    scene.Clear(0)
    finished = _run(logic)
    assert finished.status in (lib.DROPPED, lib.CANCELLED) and "worker was stopped" not in finished.message
    assert client.close_calls == [] and client.alive


# --------------------------------------------------------------------------------------------
# Session 20 audit: restart during a write, Segment over corrections, the scene changing under a job
# --------------------------------------------------------------------------------------------
def _three_class_logic(lib, scene, tmp_path):
    """A logic whose scripted worker answers with three structures, and the sphere volume."""
    client = ScriptedWorkerClient(class_names=THREE_CLASSES)
    logic = lib.TEDMWorkerLogic(lambda: client)
    volume, _ = _sphere_node(scene, tmp_path)
    return logic, volume


def test_a_restart_during_an_in_place_write_finishes_the_write(lib, scene, tmp_path):
    logic, volume = _three_class_logic(lib, scene, tmp_path)
    segmentation, _ = new_segmentation(scene, [("core", (1.0, 0.0, 0.0)), ("edema", (0.0, 1.0, 0.0))])
    editor = SegmentEditor(scene, segmentation, volume)
    ids = lib.mrml_io.all_segment_ids(segmentation)
    old = np.zeros(lib.mrml_io.read_class_labels(segmentation, volume).shape, dtype=bool)
    old[:, :4, :4] = True
    for segment_id in ids:
        editor.add(segment_id, old)
    logic.begin_segment([volume], "/model", segmentation)
    write = _poll_until_writing(logic)
    while write.done < 1:  # one class written, two to go
        logic.poll()
    logic.shutdown(reason="the worker was restarted")
    finished = logic.listener.finished_operations[-1]
    assert finished.status == lib.DONE and not finished.written_to_new_node, finished.message
    assert not logic.busy
    assert np.array_equal(lib.mrml_io.read_class_labels(segmentation, volume, write.segment_ids), write.labels), (
        "every class holds the new result, none the old one"
    )


def test_segment_again_over_corrected_slices_keeps_the_corrections(lib, scene, tmp_path):
    logic, volume = _three_class_logic(lib, scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    segmentation = _run(logic).segmentation_node
    ids = logic.record_for(segmentation).segment_ids
    # A display-only change (the 3D surface) is not a correction: Segment writes in place.
    segmentation.CreateClosedSurfaceRepresentation()
    logic.begin_segment([volume], "/model", segmentation)
    finished = _run(logic)
    assert finished.segmentation_node is segmentation and not finished.written_to_new_node, finished.message
    # The user corrects slice 6 (as after a worker restart, whose message sends them to Segment).
    editor = SegmentEditor(scene, segmentation, volume)
    erase = np.zeros(lib.mrml_io.read_class_labels(segmentation, volume).shape, dtype=bool)
    erase[6] = True
    editor.erase(ids[0], erase)
    corrected = lib.mrml_io.read_class_labels(segmentation, volume)
    logic.shutdown(reason="the worker was restarted")
    with pytest.raises(lib.UserInputError, match="press Segment"):
        logic.begin_refine(segmentation, volume)
    logic.begin_segment([volume], "/model", segmentation)
    finished = _run(logic, polls=80)
    assert finished.status == lib.DONE and not finished.written_to_new_node, finished.message
    assert "were kept over the new result" in finished.message and len(_segmentations(scene)) == 1
    assert np.array_equal(lib.mrml_io.read_class_labels(segmentation, volume), corrected), "the corrections are kept"
    # ... and the next Refine sends them, so the worker learns from them.
    logic.begin_refine(segmentation, volume)
    _, _, arrays = next(r for r in reversed(logic.client.requests) if r[0] == "refine")
    assert np.array_equal(arrays["labels"], corrected)
    assert _run(logic).status == lib.DONE


def test_a_volume_changed_while_the_job_ran_gets_no_result(lib, logic, scene, tmp_path):
    volume, array = _sphere_node(scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    slicer.util.updateVolumeFromArray(volume, (array[::-1] * 2).astype(np.int16))  # a filter, another frame
    finished = _run(logic)
    assert finished.status == lib.FAILED and finished.error_kind == "user", finished.message
    assert "changed while Segment ran" in finished.message and not finished.details
    assert _segmentations(scene) == [], "nothing written onto voxels the result was not made from"


def test_a_segmentation_under_another_transform_is_not_moved(lib, logic, scene, tmp_path):
    import vtk

    volume, _ = _sphere_node(scene, tmp_path)
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 30.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation, (note,) = new_segmentation(scene, [("my note", (0.0, 0.0, 1.0))])
    mask = np.zeros(tuple(reversed(volume.GetImageData().GetDimensions())), dtype=np.uint8)
    mask[3:5, 3:6, 3:6] = 1
    image = lib.mrml_io.oriented_image_from_array(mask, lib.mrml_io.ijk_to_ras_of(volume))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentation, note, 0)
    bounds = [0.0] * 6
    segmentation.GetRASBounds(bounds)
    logic.begin_segment([volume], "/model", segmentation)
    finished = _run(logic)
    assert finished.status == lib.DONE and finished.written_to_new_node, finished.message
    assert "another transform" in finished.message
    after = [0.0] * 6
    segmentation.GetRASBounds(after)
    assert segmentation.GetTransformNodeID() is None and np.allclose(after, bounds), "the user's segment stayed put"
    assert finished.segmentation_node.GetTransformNodeID() == transform.GetID()


def test_a_surface_only_segmentation_is_refused_at_the_click(lib, logic, client, scene, tmp_path):
    volume, _ = _sphere_node(scene, tmp_path)
    segmentation, (segment_id,) = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    mask = np.zeros(tuple(reversed(volume.GetImageData().GetDimensions())), dtype=np.uint8)
    mask[4:8, 6:14, 6:14] = 1
    image = lib.mrml_io.oriented_image_from_array(mask, lib.mrml_io.ijk_to_ras_of(volume))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, 0)
    segmentation.CreateClosedSurfaceRepresentation()
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    segmentation.GetSegmentation().SetSourceRepresentationName(surface)
    for begin in (
        lambda: logic.begin_segment([volume], "/model", segmentation),
        lambda: logic.begin_fit([volume], "/backbone", segmentation),
    ):
        with pytest.raises(lib.UserInputError, match="closed surfaces.*Binary labelmap"):
            begin()
    assert client.requests == [] and not logic.busy
    assert lib.mrml_io.all_segment_ids(segmentation) == [segment_id], "nothing added to the user's node"


def test_a_scalar_volume_with_several_frames_is_not_read_as_colour(lib, logic, scene):
    import vtk
    from vtk.util import numpy_support

    node = slicer.vtkMRMLScalarVolumeNode()  # as MultiVolumeExplorer keeps a series: one component per frame
    node.SetName("series")
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 4)
    frames = np.stack([np.full((4, 8, 8), v, np.float32) for v in (100, 500, 900)], axis=-1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(frames.reshape(-1, 3), deep=True))
    node.SetAndObserveImageData(image)
    scene.AddNode(node)
    with pytest.raises(lib.UserInputError, match="3 frames per voxel"):
        logic.begin_segment([node], "/model", None)


def test_corrections_are_only_looked_for_in_the_grid_tedm_wrote_in(lib, scene, tmp_path):
    """The volume moved (its origin, as hardening a transform does) since TEDM wrote the node: the
    old result is in another grid, so nothing can be kept as "corrections" (it would keep the old
    result's misplaced voxels); the user's node is left as it is and the result goes beside it."""
    logic, volume = _three_class_logic(lib, scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    segmentation = _run(logic).segmentation_node
    ids = logic.record_for(segmentation).segment_ids
    painted = np.zeros(lib.mrml_io.read_class_labels(segmentation, volume).shape, dtype=bool)
    painted[0, 0, 0] = True
    SegmentEditor(scene, segmentation, volume).add(ids[0], painted)
    origin = list(volume.GetOrigin())
    volume.SetOrigin(origin[0] + 4.0, origin[1], origin[2])
    before = lib.mrml_io.read_class_labels(segmentation, volume)
    logic.begin_segment([volume], "/model", segmentation)
    finished = _run(logic, polls=80)
    assert finished.status == lib.DONE and finished.written_to_new_node, finished.message
    assert "another volume's grid" in finished.message
    assert np.array_equal(lib.mrml_io.read_class_labels(segmentation, volume), before)


def test_a_write_finished_by_shutdown_is_reported_as_such(lib, scene, tmp_path):
    logic, volume = _three_class_logic(lib, scene, tmp_path)
    logic.begin_segment([volume], "/model", None)
    _poll_until_writing(logic)
    logic.shutdown()
    finished = logic.listener.finished_operations[-1]
    assert finished.status == lib.DONE and finished.during_shutdown
