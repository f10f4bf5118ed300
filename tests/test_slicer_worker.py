"""TEDMSlicer end to end: real MRML (slicer-core) and a real TEDM worker process.

What a user does, through the module's logic exactly as the widget drives it (requests sent,
then ``poll`` as the QTimer calls it, never a sleep): a BraTS volume node is segmented by the
worker into a segmentation node on the volume's exact grid; two slices are corrected through
the Segment Editor's logic and Refine learns from them; an oblique volume, a radiograph with
three classes and a two-channel input keep their geometry; and the lifecycle with a real
process: the scene closed mid-job, a node deleted mid-job, the worker killed with SIGKILL
mid-job (reported, scene unchanged, restarted by the next request), no orphan process after
shutdown.

Models are tiny and trained on the spot (conftest), and the BraTS case is cropped around its
tumour so that the file runs in about a minute on two CPU cores. Refine's share of a Segment on
a whole volume is measured by ``benchmarks/refine_vs_segment.py``; the ratio seen here is
printed, not asserted (timings on a shared machine are not a unit test's business).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    affine_zoo,
    assert_labels_agree_across_processes,
    require_shared_data,
    sphere_volume_array,
    world_centroid,
)
from slicer_helpers import (
    SLICER_TEST_MARKS,
    SegmentEditor,
    dice,
    export_labelmap,
    import_module_lib,
    load_volume_node,
    new_segmentation,
    slicer,
)

pytestmark = SLICER_TEST_MARKS

REPO = Path(__file__).resolve().parents[1]
BRATS_CASE = ("brain", "brats", "Brats18_CBICA_AAB_1")
STEPS = 60  # head training steps: enough for the tiny backbone, seconds on one thread


def _start_worker():
    from tedm_core.serve.client import WorkerClient

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # two shared cores: one thread, as the suite
    return WorkerClient.start_local(python=sys.executable, env=env)


@pytest.fixture(scope="module")
def lib():
    pytest.importorskip("tedm_core.serve.client", reason="the worker client (tedm_core.serve) is not available")
    return import_module_lib()


@pytest.fixture(scope="module")
def logic(lib):
    """One module logic with one worker process for the file (starting one imports torch)."""
    module_logic = lib.TEDMWorkerLogic(_start_worker)
    yield module_logic
    module_logic.shutdown()


@pytest.fixture
def scene(logic):
    yield slicer.vtkMRMLScene()
    if logic.busy:  # a failed test must not leave a job for the next one
        logic.cancel()
        logic.wait(timeout=60)
    logic.on_scene_closed()


def _finish(logic, timeout=300.0):
    """Poll as the widget's timer does (waiting in select between polls, as Qt's loop does)."""
    finished = logic.wait(timeout=timeout)
    assert finished is not None
    return finished


def _segmentations(scene):
    return [
        scene.GetNthNodeByClass(n, "vtkMRMLSegmentationNode")
        for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))
    ]


@pytest.fixture(scope="module")
def brats_crop(tmp_path_factory):
    """The BraTS case cropped around its tumour (24 axial slices, 112 x 112 voxels), written as
    NIfTI with nibabel's slicer (the affine follows the crop exactly). Temporary files only: the
    data set's licence forbids copying it into the repository."""
    import nibabel as nib

    case = require_shared_data(*BRATS_CASE)
    truth = nib.load(case / "GT_W.nii.gz")
    mask = np.asarray(truth.dataobj) > 0  # nibabel order (i, j, k)
    centre = [int(np.mean(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))))) for axis in range(3)]
    half = (56, 56, 12)
    window = tuple(slice(max(0, c - h), max(0, c - h) + 2 * h) for c, h in zip(centre, half))
    out = tmp_path_factory.mktemp("brats_crop")
    paths = {}
    for name in ("FLAIR", "T1", "GT_W"):
        paths[name] = out / f"{name}.nii.gz"
        nib.save(nib.load(case / f"{name}.nii.gz").slicer[window], paths[name])
    truth_kji = (np.asarray(nib.load(paths["GT_W"]).dataobj).T > 0).astype(np.uint8)
    return {"paths": paths, "truth": truth_kji}


def _two_labelled_slices(truth_kji):
    areas = truth_kji.sum(axis=(1, 2))
    first = int(np.argmax(areas))
    second = first - 6 if first - 6 >= 0 and areas[first - 6] > 0 else first + 6
    return sorted([first, second])


# --------------------------------------------------------------------------------------------
# Segment through the worker: tedm_core's own output, on the volume's exact grid
# --------------------------------------------------------------------------------------------
def test_segment_through_the_worker_equals_tedm_core(lib, logic, scene, brats_crop, tiny_bundle_dir):
    from tedm_core.bundle import load_bundle
    from tedm_core.io.volumes import read_volume
    from tedm_core.pipelines.segment import Segmenter
    from tedm_core.pipelines.volume import segment_volume

    path = brats_crop["paths"]["FLAIR"]
    volume = load_volume_node(scene, path)
    logic.begin_segment([volume], str(tiny_bundle_dir), None, axis="axial", device="cpu")
    assert _segmentations(scene) == []
    finished = _finish(logic)
    assert finished.status == lib.DONE, finished.message + finished.details
    (segmentation,) = _segmentations(scene)

    reference = read_volume(path)
    expected = segment_volume(
        Segmenter(load_bundle(tiny_bundle_dir), device="cpu"), reference, "axial", keep_probabilities=False
    ).labels
    assert expected.any() and not expected.all(), "the comparison needs a non-trivial segmentation"
    voxels, ijk_to_ras = export_labelmap(scene, segmentation, volume)
    assert np.allclose(ijk_to_ras, reference.ijk_to_ras, atol=1e-5)
    assert_labels_agree_across_processes(voxels, expected)
    merged = slicer.vtkOrientedImageData()
    assert segmentation.GenerateMergedLabelmapForAllSegments(merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    assert tuple(merged.GetExtent()) == tuple(volume.GetImageData().GetExtent())
    names = [segmentation.GetSegmentation().GetNthSegment(n).GetName() for n in range(1)]
    assert names == list(load_bundle(tiny_bundle_dir).class_names[1:])


# --------------------------------------------------------------------------------------------
# BraTS: fit from two labelled slices, correct two slices, Refine
# --------------------------------------------------------------------------------------------
def test_brats_fit_correct_refine_through_the_worker(
    lib, logic, scene, brats_crop, tiny_backbone_dir, tmp_path, capsys
):
    truth = brats_crop["truth"]
    volume = load_volume_node(scene, brats_crop["paths"]["FLAIR"], "FLAIR")
    segmentation, (tumour_id,) = new_segmentation(scene, [("tumour", (0.9, 0.1, 0.1))])
    editor = SegmentEditor(scene, segmentation, volume)
    labelled = _two_labelled_slices(truth)
    drawn = np.zeros_like(truth)
    drawn[labelled] = truth[labelled]
    editor.add(tumour_id, drawn > 0)

    logic.begin_fit([volume], str(tiny_backbone_dir), segmentation, axis="axial", device="cpu", steps=STEPS)
    fitted = _finish(logic)
    assert fitted.status == lib.DONE, fitted.message + fitted.details
    assert fitted.segmentation_node is segmentation and fitted.training_slices == labelled
    after_fit, ijk_to_ras = export_labelmap(scene, segmentation, volume)
    assert np.allclose(ijk_to_ras, lib.mrml_io.ijk_to_ras_of(volume), atol=1e-9), "the volume's exact grid"
    assert np.array_equal(after_fit[labelled], drawn[labelled]), "labelled slices are kept exactly as drawn"
    segment = segmentation.GetSegmentation().GetSegment(tumour_id)
    assert segment.GetName() == "tumour"
    others = [k for k in range(truth.shape[0]) if k not in labelled and truth[k].any()]
    assert dice(after_fit[others], truth[others]) > 0.4

    # A whole Segment of the same volume with the fitted model, timed for the ratio below.
    logic.begin_save_model(segmentation, str(tmp_path / "fitted"))
    model = _finish(logic)
    assert model.status == lib.DONE and Path(model.saved_path, "bundle.json").is_file()
    logic.begin_segment([volume], model.saved_path, segmentation, axis="axial", device="cpu")
    segmented = _finish(logic)
    assert segmented.status == lib.DONE and segmented.segmentation_node is segmentation

    current, _ = export_labelmap(scene, segmentation, volume)
    per_slice = {k: dice(current[k], truth[k]) for k in others}
    corrected = sorted(sorted(others, key=lambda k: per_slice[k])[:2])  # the two worst slices
    where = np.zeros(truth.shape, dtype=bool)
    where[corrected] = True
    editor.correct([tumour_id], current, truth, where)

    logic.begin_refine(segmentation, volume, steps=STEPS // 2, device="cpu")
    refined = _finish(logic)
    assert refined.status == lib.DONE, refined.message + refined.details
    assert not refined.written_to_new_node
    after, _ = export_labelmap(scene, segmentation, volume)
    assert refined.changed_slices == corrected
    assert np.array_equal(after[corrected], truth[corrected]), "corrected slices are kept exactly as drawn"
    rest = [k for k in others if k not in corrected]
    assert dice(after[rest], truth[rest]) >= dice(current[rest], truth[rest]) - 0.02
    with capsys.disabled():
        print(
            f"\n[slicer worker] Segment {segmented.seconds:.2f} s, Refine {refined.seconds:.2f} s (module wall "
            f"times, worker overhead included): refine/segment = {refined.seconds / segmented.seconds:.2f} "
            "on a 24-slice crop with a tiny model (whole volume: benchmarks/gui_responsiveness.py)"
        )

    # Nothing changed since: the worker says so, and the scene is left alone.
    logic.begin_refine(segmentation, volume)
    unchanged = _finish(logic)
    assert unchanged.status == lib.FAILED and unchanged.error_kind == "user" and "no slice" in unchanged.message.lower()
    assert np.array_equal(export_labelmap(scene, segmentation, volume)[0], after)


# --------------------------------------------------------------------------------------------
# An oblique volume; next uncertain slice in world coordinates
# --------------------------------------------------------------------------------------------
def _on_the_files_grid(voxels: np.ndarray, node_ijk_to_ras: np.ndarray, file_ijk_to_ras: np.ndarray) -> np.ndarray:
    """A node's (K, J, I) voxels re-indexed onto the file's grid: Slicer stores a left-handed
    volume with K reversed, so the same world image has other voxel indices in the node."""
    node_to_file = np.linalg.inv(file_ijk_to_ras) @ node_ijk_to_ras
    assert np.allclose(node_to_file, np.round(node_to_file), atol=1e-4), "the same grid, only flipped or permuted"
    node_to_file = np.round(node_to_file).astype(int)
    ijk = np.indices(voxels.shape[::-1]).reshape(3, -1)  # node i, j, k
    file_ijk = node_to_file[:3, :3] @ ijk + node_to_file[:3, 3:]
    out = np.zeros_like(voxels)
    out[file_ijk[2], file_ijk[1], file_ijk[0]] = voxels[ijk[2], ijk[1], ijk[0]]
    return out


@pytest.mark.parametrize("affine_name", ["oblique", "left_handed"])
def test_oblique_volume_and_uncertain_slices(lib, logic, scene, tiny_bundle_dir, tmp_path, affine_name):
    import nibabel as nib

    from tedm_core.bundle import load_bundle
    from tedm_core.io.volumes import read_volume
    from tedm_core.pipelines.segment import Segmenter
    from tedm_core.pipelines.volume import segment_volume

    affine = affine_zoo()[affine_name]
    centre = (affine @ np.array([16.0, 18.0, 10.0, 1.0]))[:3]
    array = sphere_volume_array((20, 36, 32), affine, centre, radius_mm=9.0)
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(array.T, affine), path)
    volume = load_volume_node(scene, path)
    logic.begin_segment([volume], str(tiny_bundle_dir), None, axis="axial", device="cpu")
    finished = _finish(logic)
    assert finished.status == lib.DONE, finished.message
    segmentation = finished.segmentation_node
    expected = segment_volume(
        Segmenter(load_bundle(tiny_bundle_dir), device="cpu"), read_volume(path), "axial", keep_probabilities=False
    ).labels
    voxels, ijk_to_ras = export_labelmap(scene, segmentation, volume)
    assert np.array_equal(_on_the_files_grid(voxels, ijk_to_ras, affine), expected)
    assert voxels.any() and np.linalg.norm(world_centroid(voxels, ijk_to_ras) - centre) < 3.0

    # Each offered slice's centre lies on that slice's plane; presses walk down the ranking.
    ras_to_ijk = np.linalg.inv(lib.mrml_io.ijk_to_ras_of(volume))
    seen = []
    for _ in range(3):
        logic.begin_next_uncertain_slice(segmentation)
        offered = _finish(logic).uncertain_slice
        ijk = ras_to_ijk @ np.append(offered.centre_world, 1.0)
        assert np.all(ijk[:3] > -1) and np.all(ijk[:3] < np.array(array.shape[::-1]) + 1), "inside the volume"
        seen.append(offered.index)
    assert len(set(seen)) == 3, "each press offers another slice"


# --------------------------------------------------------------------------------------------
# A radiograph with three classes; two modalities as channels
# --------------------------------------------------------------------------------------------
def test_radiograph_fit_then_segment(lib, logic, scene, tiny_backbone_dir, tmp_path):
    import SimpleITK as sitk
    from PIL import Image

    from tedm_core.bundle import load_bundle
    from tedm_core.io.volumes import read_volume
    from tedm_core.pipelines.segment import Segmenter
    from tedm_core.pipelines.volume import segment_volume

    folder = require_shared_data("cxr", "covid_gb")
    first, second = sorted((folder / "images").glob("*.png"))[:2]
    labels = np.asarray(Image.open(folder / "labels" / first.name)).astype(np.uint8)[None]

    def as_nrrd(png, out):  # Slicer's Add Data of a PNG: one slice, unit spacing (no PNG reader in the wheel)
        sitk.WriteImage(sitk.JoinSeries(sitk.ReadImage(str(png))), str(out))
        return out

    train = load_volume_node(scene, as_nrrd(first, tmp_path / "train.nrrd"), "train")
    classes = [("right lung", (0.2, 0.6, 0.9)), ("left lung", (0.9, 0.6, 0.2)), ("heart", (0.8, 0.1, 0.3))]
    segmentation, ids = new_segmentation(scene, classes)
    editor = SegmentEditor(scene, segmentation, train)
    for index, segment_id in enumerate(ids, start=1):
        editor.add(segment_id, labels == index)
    logic.begin_fit([train], str(tiny_backbone_dir), segmentation, device="cpu", steps=STEPS)
    fitted = _finish(logic)
    assert fitted.status == lib.DONE, fitted.message + fitted.details
    assert fitted.training_slices == [0]
    assert np.array_equal(export_labelmap(scene, segmentation, train)[0], labels)

    logic.begin_save_model(segmentation, str(tmp_path / "cxr_bundle"))
    saved = _finish(logic).saved_path
    bundle = load_bundle(saved)
    assert bundle.class_names == ["background", "right lung", "left lung", "heart"]

    test = load_volume_node(scene, as_nrrd(second, tmp_path / "test.nrrd"), "test")
    logic.begin_segment([test], saved, None, device="cpu")
    result = _finish(logic)
    assert result.status == lib.DONE
    expected = segment_volume(Segmenter(bundle, device="cpu"), read_volume(second), keep_probabilities=False).labels
    assert_labels_agree_across_processes(export_labelmap(scene, result.segmentation_node, test)[0], expected)
    # New segments of known structures carry standard terminology.
    names = {}
    segments = result.segmentation_node.GetSegmentation()
    for n in range(segments.GetNumberOfSegments()):
        import vtk

        value = vtk.reference("")
        segments.GetNthSegment(n).GetTag("TerminologyEntry", value)
        names[segments.GetNthSegment(n).GetName()] = str(value)
    assert "SCT^39607008^Lung~SCT^24028007^Right" in names["right lung"]
    assert "SCT^80891009^Heart" in names["heart"]


def test_two_modalities_as_channels(lib, logic, scene, brats_crop, tmp_path):
    import torch

    from tedm_core.model.backbone import PRESETS
    from tedm_core.model.checkpoint import Backbone, save_backbone
    from tedm_core.preprocessing.intensity import MULTIMODAL_MRI

    torch.manual_seed(0)
    backbone_dir = save_backbone(
        tmp_path / "two_channel",
        Backbone.new(PRESETS["tiny"].with_(in_channels=2), intensity=MULTIMODAL_MRI, channel_names=["FLAIR", "T1"]),
    )
    flair = load_volume_node(scene, brats_crop["paths"]["FLAIR"], "FLAIR")
    t1 = load_volume_node(scene, brats_crop["paths"]["T1"], "T1")
    segmentation, (tumour_id,) = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    truth = brats_crop["truth"]
    labelled = _two_labelled_slices(truth)
    drawn = np.zeros_like(truth)
    drawn[labelled] = truth[labelled]
    SegmentEditor(scene, segmentation, flair).add(tumour_id, drawn > 0)

    logic.begin_fit([flair], str(backbone_dir), segmentation, device="cpu", steps=2)
    refused = _finish(logic)
    assert refused.status == lib.FAILED and "2" in refused.message, refused.message
    logic.begin_fit([flair, t1], str(backbone_dir), segmentation, device="cpu", steps=5)
    fitted = _finish(logic)
    assert fitted.status == lib.DONE, fitted.message
    assert np.array_equal(export_labelmap(scene, segmentation, flair)[0][labelled], drawn[labelled])


# --------------------------------------------------------------------------------------------
# Lifecycle with a real worker process
# --------------------------------------------------------------------------------------------
def _until_progress(logic):
    """Poll until the running job reports progress (it is computing), as the timer would."""
    seen = []
    original = logic.listener.progress

    def progress(fraction, message):
        seen.append(message)
        original(fraction, message)

    logic.listener.progress = progress
    try:
        deadline = time.monotonic() + 120
        while logic.busy and not any("slice" in m or "step" in m for m in seen) and time.monotonic() < deadline:
            logic.poll(max_seconds=0.05, wait_seconds=0.05)
    finally:
        logic.listener.progress = original
    return seen


def test_scene_closed_mid_job(lib, logic, scene, brats_crop, tiny_bundle_dir):
    volume = load_volume_node(scene, brats_crop["paths"]["FLAIR"])
    segmentation, _ = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    logic.begin_segment([volume], str(tiny_bundle_dir), segmentation, axis="axial", device="cpu")
    _until_progress(logic)
    # Slicer's order: StartCloseEvent (the widget calls on_scene_closed), then the nodes go
    # (on_node_removed is not called for them), then EndCloseEvent.
    logic.on_scene_closed()
    scene.Clear(0)
    reused, _ = new_segmentation(scene, [("mine", (0.0, 1.0, 0.0))], name="after close")
    finished = _finish(logic)
    assert finished.status in (lib.DROPPED, lib.CANCELLED), finished.message
    assert "scene was closed" in finished.message
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1, "nothing written into the removed node"
    assert reused.GetSegmentation().GetNumberOfSegments() == 1 and len(_segmentations(scene)) == 1
    # The worker goes on serving; its session for the closed scene is gone.
    status = logic.client.request("status", timeout=30).result
    assert status["busy"] is None and status["sessions"] == []


def test_node_deleted_mid_job(lib, logic, scene, brats_crop, tiny_bundle_dir):
    volume = load_volume_node(scene, brats_crop["paths"]["FLAIR"])
    logic.begin_segment([volume], str(tiny_bundle_dir), None, axis="axial", device="cpu")
    _until_progress(logic)
    scene.RemoveNode(volume)
    logic.on_node_removed(volume)
    finished = _finish(logic)
    assert finished.status in (lib.DROPPED, lib.CANCELLED), finished.message
    assert "was deleted" in finished.message
    assert _segmentations(scene) == [], "no node created for a dropped result"


def test_worker_killed_mid_job_then_restarted(lib, logic, scene, brats_crop, tiny_bundle_dir):
    volume = load_volume_node(scene, brats_crop["paths"]["FLAIR"])
    logic.begin_segment([volume], str(tiny_bundle_dir), None, axis="axial", device="cpu")
    first = _finish(logic)
    segmentation = first.segmentation_node
    before, _ = export_labelmap(scene, segmentation, volume)
    nodes_before = scene.GetNumberOfNodes()
    old_client, old_pid, old_generation = logic.client, logic.client.pid, logic.client.generation

    logic.begin_segment([volume], str(tiny_bundle_dir), segmentation, axis="axial", device="cpu")
    _until_progress(logic)
    os.kill(old_pid, signal.SIGKILL)
    died = _finish(logic, timeout=60)
    assert died.status == lib.WORKER_DIED and "\n" not in died.message, died.message
    assert scene.GetNumberOfNodes() == nodes_before
    assert np.array_equal(export_labelmap(scene, segmentation, volume)[0], before), "scene unchanged"
    with pytest.raises(lib.UserInputError, match="restarted"):
        logic.begin_refine(segmentation, volume)

    logic.begin_segment([volume], str(tiny_bundle_dir), segmentation, axis="axial", device="cpu")
    again = _finish(logic)
    assert again.status == lib.DONE, again.message
    # A new worker (the dead one's client is closed and replaced: a remote worker is reconnected the same way).
    assert (
        logic.client is not old_client or logic.client.generation == old_generation + 1
    ) and logic.client.pid != old_pid
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)  # reaped: no zombie left behind either


def test_shutdown_leaves_no_orphan_process(lib, scene, tmp_path):
    module_logic = lib.TEDMWorkerLogic(_start_worker)
    volume = load_volume_node(scene, _sphere_file(tmp_path))
    module_logic.describe_worker(lambda text: None)
    pid = module_logic.client.pid
    os.kill(pid, 0)  # running
    module_logic.shutdown()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)  # waiting for the OS, not for the worker's work
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert volume.GetScene() is scene


def _sphere_file(tmp_path):
    import nibabel as nib

    affine = affine_zoo()["lps"]
    array = sphere_volume_array((12, 24, 24), affine, (affine @ np.array([12.0, 12.0, 6.0, 1.0]))[:3], 6.0)
    nib.save(nib.Nifti1Image(array.T, affine), tmp_path / "sphere.nii.gz")
    return tmp_path / "sphere.nii.gz"


def _wait_until_exited(pid, timeout=10.0):
    """Until the process has ended (a zombie counts: its parent, the client, reaps it later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(")")[-1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)  # waiting for the OS, not for the worker's work


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_killed_while_idle_is_restarted_by_the_next_request(lib, logic, scene, brats_crop, tiny_bundle_dir):
    volume = load_volume_node(scene, brats_crop["paths"]["FLAIR"])
    logic.begin_segment([volume], str(tiny_bundle_dir), None, axis="axial", device="cpu")
    segmentation = _finish(logic).segmentation_node
    old_pid = logic.client.pid
    os.kill(old_pid, signal.SIGKILL)  # between jobs: no timer polls, nobody reads the pipe
    _wait_until_exited(old_pid)
    logic.begin_segment([volume], str(tiny_bundle_dir), segmentation, axis="axial", device="cpu")
    again = _finish(logic)
    assert again.status == lib.DONE, again.message
    assert logic.client.pid != old_pid and logic.has_result(segmentation)


def test_a_hung_worker_process_is_stopped_by_a_second_cancel(lib, scene, tmp_path):
    from tedm_core.serve.client import WorkerClient

    hung = [sys.executable, "-c", "import time; time.sleep(600)"]  # never reads, never answers
    module_logic = lib.TEDMWorkerLogic(lambda: WorkerClient.start_local(command=hung, log_path=tmp_path / "w.log"))
    volume = load_volume_node(scene, _sphere_file(tmp_path))
    module_logic.begin_segment([volume], str(tmp_path / "model"), None, device="cpu")
    pid = module_logic.client.pid
    for _ in range(5):  # the widget's timer ticks
        module_logic.poll(max_seconds=0.02, wait_seconds=0.0)
    module_logic.cancel()
    module_logic.poll(max_seconds=0.02, wait_seconds=0.0)
    assert module_logic.busy
    module_logic.cancel()
    assert not module_logic.busy and not module_logic.needs_polling()
    finished = module_logic.listener.finished_operations[-1]
    assert finished.status == lib.CANCELLED and "worker was stopped" in finished.message
    _wait_until_exited(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped by close(grace_s=0)
    module_logic.shutdown()
