"""TEDMSlicer's logic against real MRML (the ``slicer-core`` wheel, plain pytest, no mocks).

Covered: a NIfTI read by Slicer's storage node and segmented through the module equals
``tedm_core``'s own output for the same file, voxel for voxel, in the same geometry; fitting from
two labelled slices; two slices corrected through the Segment Editor logic, then Refine; a
radiograph (one-slice volume, three classes); an oblique volume; several modalities as
channels; the background task runner with Cancel.

Models are tiny and trained on the spot (conftest's ``tiny_backbone_dir``/``tiny_bundle_dir``),
and the real BraTS case is cropped around its tumour into a temporary NIfTI so that the whole
file runs in well under two minutes on two CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import affine_zoo, require_shared_data, sphere_volume_array, world_centroid
from slicer_helpers import SegmentEditor, dice, export_labelmap, import_module_lib, load_volume_node, new_segmentation

try:
    import slicer

    HAVE_SLICER = hasattr(slicer, "vtkMRMLScene")
except ImportError:
    HAVE_SLICER = False

pytestmark = [
    pytest.mark.slicer,
    pytest.mark.skipif(
        not HAVE_SLICER,
        reason="slicer-core is not installed (`pip install slicer-core`): the MRML tests need Slicer's MRML libraries",
    ),
]

BRATS_CASE = ("brain", "brats", "Brats18_CBICA_AAB_1")
STEPS = 60  # head training steps: enough for the tiny backbone, seconds on one thread


@pytest.fixture(scope="module")
def lib():
    return import_module_lib()


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def brats_crop(tmp_path_factory):
    """The BraTS case cropped around its tumour (24 axial slices, 112 x 112 voxels), written as
    NIfTI files with nibabel's slicer (the affine follows the crop exactly). Temporary files only:
    the data set's licence forbids copying it into the repository."""
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
        image = nib.load(case / f"{name}.nii.gz")
        cropped = image.slicer[window]
        paths[name] = out / f"{name}.nii.gz"
        nib.save(cropped, paths[name])
    truth_kji = (np.asarray(nib.load(paths["GT_W"]).dataobj).T > 0).astype(np.uint8)
    return {"paths": paths, "truth": truth_kji}


def _two_labelled_slices(truth_kji: np.ndarray):
    """The axial slice with most tumour and one 6 slices away (a user labels a few spread-out slices)."""
    areas = truth_kji.sum(axis=(1, 2))
    first = int(np.argmax(areas))
    second = first - 6 if first - 6 >= 0 and areas[first - 6] > 0 else first + 6
    return sorted([first, second])


# --------------------------------------------------------------------------------------------
# Segment: equals tedm_core's output for the same file, in the same geometry
# --------------------------------------------------------------------------------------------
def test_segment_nifti_equals_tedm_core(lib, scene, brats_crop, tiny_bundle_dir):
    from tedm_core.bundle import load_bundle
    from tedm_core.io.volumes import read_volume
    from tedm_core.pipelines.segment import Segmenter
    from tedm_core.pipelines.volume import segment_volume

    path = brats_crop["paths"]["FLAIR"]
    volume_node = load_volume_node(scene, path)
    segmentation_node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation_node)
    logic = lib.TEDMSlicerCoreLogic()
    outcome = logic.segment([volume_node], str(tiny_bundle_dir), segmentation_node, axis="axial", device="cpu")

    bundle = load_bundle(tiny_bundle_dir)
    reference = read_volume(path)
    expected = segment_volume(Segmenter(bundle, device="cpu"), reference, "axial", keep_probabilities=False).labels
    assert expected.any() and not expected.all(), "the comparison needs a non-trivial segmentation"

    # Geometry: Slicer's volume equals tedm_core's reading of the file.
    assert np.allclose(lib.mrml_io.ijk_to_ras_of(volume_node), reference.ijk_to_ras, atol=1e-5)
    # The segmentation's own reference geometry is the input volume's grid.
    merged = slicer.vtkOrientedImageData()
    assert segmentation_node.GenerateMergedLabelmapForAllSegments(
        merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    assert tuple(merged.GetExtent()) == tuple(volume_node.GetImageData().GetExtent())
    import vtk

    image_to_world = vtk.vtkMatrix4x4()
    merged.GetImageToWorldMatrix(image_to_world)
    assert np.allclose(lib.mrml_io.numpy_from_vtk_matrix(image_to_world), reference.ijk_to_ras, atol=1e-5)
    # Voxels, exported by Slicer's own segmentation logic: equal to tedm_core's labels.
    voxels, ijk_to_ras = export_labelmap(scene, segmentation_node, volume_node)
    assert np.allclose(ijk_to_ras, reference.ijk_to_ras, atol=1e-5)
    assert np.array_equal(voxels, expected)
    assert np.array_equal(outcome.labels_kji, expected)
    # Named, coloured segments from the bundle.
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
    assert names == list(bundle.class_names[1:])
    colour = segmentation.GetNthSegment(0).GetColor()
    assert np.allclose(colour, np.asarray(bundle.class_colours[1][:3]) / 255.0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Fit from two labelled slices, then correct two slices in the Segment Editor and Refine
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_brats(lib, brats_crop, tiny_backbone_dir):
    """A user paints the tumour on two axial slices of a fresh segmentation and presses Fit."""
    scene = slicer.vtkMRMLScene()
    truth = brats_crop["truth"]
    volume_node = load_volume_node(scene, brats_crop["paths"]["FLAIR"], "FLAIR")
    segmentation_node, (tumour_id,) = new_segmentation(scene, [("tumour", (0.9, 0.1, 0.1))])
    editor = SegmentEditor(scene, segmentation_node, volume_node)
    labelled = _two_labelled_slices(truth)
    drawn = np.zeros_like(truth)
    drawn[labelled] = truth[labelled]
    editor.add(tumour_id, drawn > 0)
    logic = lib.TEDMSlicerCoreLogic()
    outcome = logic.fit(
        [volume_node], str(tiny_backbone_dir), segmentation_node, axis="axial", device="cpu", steps=STEPS
    )
    after_fit, _ = export_labelmap(scene, segmentation_node, volume_node)
    return {
        "scene": scene,
        "logic": logic,
        "volume": volume_node,
        "segmentation": segmentation_node,
        "editor": editor,
        "tumour_id": tumour_id,
        "labelled": labelled,
        "drawn": drawn,
        "outcome": outcome,
        "after_fit": after_fit.copy(),
        "truth": truth,
    }


def _per_slice_dice(prediction: np.ndarray, truth: np.ndarray, slices):
    return {int(k): dice(prediction[k], truth[k]) for k in slices}


def test_fit_from_two_labelled_slices(fitted_brats):
    f = fitted_brats
    truth, labelled, after_fit = f["truth"], f["labelled"], f["after_fit"]
    session = f["outcome"].session
    assert session.layout.slice_dim == 0, "BraTS axial slices run along K"
    assert session.training_slices == labelled
    # The labelled slices are kept exactly as drawn...
    assert np.array_equal(after_fit[labelled], f["drawn"][labelled])
    # ... the user's segment keeps its ID, name and colour ...
    segment = f["segmentation"].GetSegmentation().GetSegment(f["tumour_id"])
    assert segment is not None and segment.GetName() == "tumour"
    assert session.class_names == ["background", "tumour"]
    # ... and the other slices are segmented usefully, even by a 40-step toy backbone.
    others = [k for k in range(truth.shape[0]) if k not in labelled and truth[k].any()]
    assert dice(after_fit[others], truth[others]) > 0.4


def test_refine_after_two_corrected_slices(fitted_brats):
    f = fitted_brats
    logic, truth, labelled = f["logic"], f["truth"], f["labelled"]
    current, _ = export_labelmap(f["scene"], f["segmentation"], f["volume"])
    candidates = [k for k in range(truth.shape[0]) if k not in labelled and truth[k].any()]
    before = _per_slice_dice(current, truth, candidates)
    corrected = sorted(sorted(candidates, key=lambda k: before[k])[:2])  # the two worst slices
    where = np.zeros(truth.shape, dtype=bool)
    where[corrected] = True
    f["editor"].correct([f["tumour_id"]], current, truth, where)

    outcome = logic.refine(f["segmentation"], f["volume"], steps=STEPS // 2)
    after, _ = export_labelmap(f["scene"], f["segmentation"], f["volume"])

    assert outcome.changed_slices == corrected
    assert set(corrected) <= set(outcome.session.training_slices)
    assert outcome.session.training_slices == sorted(set(labelled) | set(corrected))
    assert outcome.session.bundle.training.get("refined_on_slices") == 4
    assert np.array_equal(after[corrected], truth[corrected]), "corrected slices are kept exactly as drawn"
    assert np.array_equal(after[labelled], f["drawn"][labelled]), "labelled slices are kept exactly as drawn"
    others = [k for k in candidates if k not in corrected]
    assert dice(after[others], truth[others]) >= dice(current[others], truth[others]) - 0.005
    # Refine again with nothing changed: a clear message rather than a silent no-op.
    with pytest.raises(ValueError, match="no slice differs"):
        logic.refine(f["segmentation"], f["volume"], steps=STEPS)


def test_refine_needs_a_previous_result(lib, scene, brats_crop):
    volume_node = load_volume_node(scene, brats_crop["paths"]["FLAIR"])
    segmentation_node, _ = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    with pytest.raises(lib.UserInputError, match="press Segment"):
        lib.TEDMSlicerCoreLogic().refine(segmentation_node, volume_node)


# --------------------------------------------------------------------------------------------
# A radiograph: a one-slice volume, three classes
# --------------------------------------------------------------------------------------------
def _png_as_nrrd(png, out):
    """What Slicer's Add Data makes of a PNG (ITK's reader: unit spacing, identity LPS), saved as
    NRRD because the slicer-core wheel's ITK has no PNG reader."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(png))
    image = sitk.JoinSeries(image)  # a 3D image with one slice, as Slicer holds every volume
    sitk.WriteImage(image, str(out))
    return out


def test_radiograph_fit_then_segment(lib, scene, tiny_backbone_dir, tmp_path):
    from PIL import Image

    from tedm_core.bundle import load_bundle
    from tedm_core.io.volumes import read_volume
    from tedm_core.pipelines.segment import Segmenter
    from tedm_core.pipelines.volume import segment_volume

    folder = require_shared_data("cxr", "covid_gb")
    first, second = sorted((folder / "images").glob("*.png"))[:2]
    labels = np.asarray(Image.open(folder / "labels" / first.name)).astype(np.uint8)[None]  # (K=1, J, I)

    train_node = load_volume_node(scene, _png_as_nrrd(first, tmp_path / "train.nrrd"), "train")
    assert train_node.GetImageData().GetDimensions()[2] == 1
    classes = [("right lung", (0.2, 0.6, 0.9)), ("left lung", (0.9, 0.6, 0.2)), ("heart", (0.8, 0.1, 0.3))]
    segmentation_node, ids = new_segmentation(scene, classes)
    editor = SegmentEditor(scene, segmentation_node, train_node)
    for index, segment_id in enumerate(ids, start=1):
        editor.add(segment_id, labels == index)
    logic = lib.TEDMSlicerCoreLogic()
    outcome = logic.fit([train_node], str(tiny_backbone_dir), segmentation_node, device="cpu", steps=STEPS)
    assert outcome.session.axis == "k" and outcome.session.training_slices == [0]
    assert np.array_equal(export_labelmap(scene, segmentation_node, train_node)[0], labels)

    saved = logic.save_bundle(segmentation_node, str(tmp_path / "cxr_bundle"))
    bundle = load_bundle(saved)
    assert bundle.class_names == ["background", "right lung", "left lung", "heart"]
    assert [tuple(c) for c in bundle.class_colours[1:]] == [
        tuple(int(round(255 * v)) for v in colour) for _, colour in classes
    ]

    test_node = load_volume_node(scene, _png_as_nrrd(second, tmp_path / "test.nrrd"), "test")
    result_node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(result_node)
    logic.segment([test_node], saved, result_node, device="cpu")
    reference = read_volume(second)
    assert np.allclose(lib.mrml_io.ijk_to_ras_of(test_node), reference.ijk_to_ras, atol=1e-6)
    expected = segment_volume(Segmenter(bundle, device="cpu"), reference, keep_probabilities=False).labels
    voxels, _ = export_labelmap(scene, result_node, test_node)
    assert np.array_equal(voxels, expected)
    assert len(np.unique(expected)) >= 2


# --------------------------------------------------------------------------------------------
# An oblique volume
# --------------------------------------------------------------------------------------------
def test_oblique_volume_geometry(lib, scene, tiny_bundle_dir, tmp_path):
    import nibabel as nib

    from tedm_core.bundle import load_bundle
    from tedm_core.io.volumes import read_volume
    from tedm_core.pipelines.segment import Segmenter
    from tedm_core.pipelines.volume import segment_volume

    affine = affine_zoo()["oblique"]
    shape_kji = (20, 36, 32)
    centre = (affine @ np.array([16.0, 18.0, 10.0, 1.0]))[:3]
    array = sphere_volume_array(shape_kji, affine, centre, radius_mm=9.0)
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(array.T, affine), path)

    volume_node = load_volume_node(scene, path)
    reference = read_volume(path)
    assert np.allclose(lib.mrml_io.ijk_to_ras_of(volume_node), reference.ijk_to_ras, atol=1e-4)
    segmentation_node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation_node)
    logic = lib.TEDMSlicerCoreLogic()
    outcome = logic.segment([volume_node], str(tiny_bundle_dir), segmentation_node, axis="axial", device="cpu")
    expected = segment_volume(
        Segmenter(load_bundle(tiny_bundle_dir), device="cpu"), reference, "axial", keep_probabilities=False
    ).labels
    voxels, ijk_to_ras = export_labelmap(scene, segmentation_node, volume_node)
    assert np.array_equal(voxels, expected)
    assert np.allclose(ijk_to_ras, lib.mrml_io.ijk_to_ras_of(volume_node), atol=1e-9)
    # The sphere is found where it is in the world (no axis flips).
    assert voxels.any()
    assert np.linalg.norm(world_centroid(voxels, ijk_to_ras) - centre) < 3.0

    # Next uncertain slice: ranked by disagreement, each centre on its own slice plane.
    ranked = logic.uncertain_slices(segmentation_node)
    scores = [s.score for s in ranked]
    assert scores == sorted(scores, reverse=True) and len(ranked) == outcome.session.layout.num_slices
    ras_to_ijk = np.linalg.inv(lib.mrml_io.ijk_to_ras_of(volume_node))
    slice_voxel_axis = 2 - outcome.session.layout.slice_dim  # (K, J, I) dimension -> i/j/k
    for candidate in ranked[:5]:
        ijk = ras_to_ijk @ np.append(candidate.centre_ras, 1.0)
        assert abs(ijk[slice_voxel_axis] - candidate.index) < 1e-6
    assert logic.next_uncertain_slice(segmentation_node).index == ranked[0].index
    assert logic.next_uncertain_slice(segmentation_node).index == ranked[1].index


# --------------------------------------------------------------------------------------------
# Several modalities as channels
# --------------------------------------------------------------------------------------------
def test_two_modalities_as_channels(lib, scene, brats_crop, tmp_path):
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
    segmentation_node, (tumour_id,) = new_segmentation(scene, [("tumour", (1.0, 0.0, 0.0))])
    truth = brats_crop["truth"]
    labelled = _two_labelled_slices(truth)
    drawn = np.zeros_like(truth)
    drawn[labelled] = truth[labelled]
    SegmentEditor(scene, segmentation_node, flair).add(tumour_id, drawn > 0)

    logic = lib.TEDMSlicerCoreLogic()
    with pytest.raises(lib.UserInputError, match="expects 2 input volume"):
        logic.fit([flair], str(backbone_dir), segmentation_node, device="cpu", steps=2).session
    outcome = logic.fit([flair, t1], str(backbone_dir), segmentation_node, device="cpu", steps=5)
    assert outcome.session.slices.shape[1] == 2
    voxels, _ = export_labelmap(scene, segmentation_node, flair)
    assert np.array_equal(voxels[labelled], drawn[labelled])


def test_channels_must_share_a_grid(lib, scene, brats_crop, tmp_path):
    import nibabel as nib

    image = nib.load(brats_crop["paths"]["T1"])
    affine = image.affine.copy()
    affine[:3, 3] += 2.0  # the same voxels, 2 mm away: not the same grid
    shifted = nib.Nifti1Image(np.asarray(image.dataobj), affine)
    nib.save(shifted, tmp_path / "shifted.nii.gz")
    flair = load_volume_node(scene, brats_crop["paths"]["FLAIR"])
    moved = load_volume_node(scene, tmp_path / "shifted.nii.gz")
    with pytest.raises(lib.mrml_io.GeometryError, match="resample"):
        lib.mrml_io.volume_arrays_from_nodes([flair, moved])


# --------------------------------------------------------------------------------------------
# Off the GUI thread: the background task runner (what the widget polls with a QTimer)
# --------------------------------------------------------------------------------------------
def _small_sphere_node(scene, tmp_path):
    import nibabel as nib

    affine = affine_zoo()["lps"]
    array = sphere_volume_array((12, 24, 24), affine, (affine @ np.array([12.0, 12.0, 6.0, 1.0]))[:3], 6.0)
    nib.save(nib.Nifti1Image(array.T, affine), tmp_path / "sphere.nii.gz")
    return load_volume_node(scene, tmp_path / "sphere.nii.gz")


def test_background_task_reports_progress_and_result(lib, scene, tiny_bundle_dir, tmp_path):
    volume_node = _small_sphere_node(scene, tmp_path)
    segmentation_node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation_node)
    logic = lib.TEDMSlicerCoreLogic()
    job = logic.begin_segment([volume_node], str(tiny_bundle_dir), segmentation_node, device="cpu")
    task = lib.BackgroundTask(job.title, job.compute)
    task.start()
    events = task.wait(timeout=60)
    assert events[-1].kind == "done", events[-1].details
    fractions = [e.fraction for e in events if e.kind == "progress"]
    assert fractions and fractions == sorted(fractions)
    assert any(e.kind == "log" and "Segmented" in e.message for e in events)
    job.apply(events[-1].result)  # MRML is written on the calling (GUI) thread
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 1


def test_background_task_cancel(lib, scene, tiny_bundle_dir, tmp_path):
    volume_node = _small_sphere_node(scene, tmp_path)
    segmentation_node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation_node)
    job = lib.TEDMSlicerCoreLogic().begin_segment([volume_node], str(tiny_bundle_dir), segmentation_node, device="cpu")
    task = lib.BackgroundTask(job.title, job.compute)
    task.cancel()  # pressed before the first check: nothing is computed
    task.start()
    events = task.wait(timeout=60)
    assert events[-1].kind == "error" and lib.is_cancellation(events[-1].error)
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 0
