"""Anatomy post-processing learnt from the labelled masks (tedm_core.postprocessing,
ModelBundle.component_rule): what it learns, what it does to a whole 2D image, that it is
recorded in a bundle and refused when its description is wrong, and that volumes never get it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import synthetic_disc_images

from tedm_core.bundle import load_bundle, model_fingerprint, save_bundle
from tedm_core.errors import BundleError
from tedm_core.pipelines.fit import fit_bundle, refine_bundle
from tedm_core.pipelines.segment import Segmenter
from tedm_core.postprocessing import ComponentRule
from tedm_core.preprocessing.intensity import MULTIMODAL_MRI


def two_lungs(size: int = 40) -> np.ndarray:
    """Two rectangles (left and right lung) as class 1 of one mask."""
    mask = np.zeros((size, size), np.int64)
    mask[5:30, 4:16] = 1
    mask[5:32, 22:36] = 1
    return mask


def regions(mask: np.ndarray) -> int:
    from scipy import ndimage

    return ndimage.label(mask)[1]


def test_the_rule_counts_the_regions_and_holes_of_the_labelled_masks_ignoring_specks():
    lungs = two_lungs()
    speck = lungs.copy()
    speck[0, 39] = 1  # an annotation speck: 1 pixel of ~650, under 1 %
    rule = ComponentRule.learn(np.stack([lungs, speck]), 2)
    assert rule == ComponentRule((2,), (True,))
    holed = lungs.copy()
    holed[10:14, 8:12] = 0  # 16 pixels inside the left lung: a real hole
    assert ComponentRule.learn(np.stack([lungs, holed]), 2) == ComponentRule((2,), (False,))
    # A class no mask shows is left alone; three classes (two lungs and the heart) each their own.
    three = lungs.copy()
    three[5:32, 22:36] = 2
    assert ComponentRule.learn(three, 4) == ComponentRule((1, 1, 0), (True, True, False))
    assert "lung: at most 2 regions, holes filled" in rule.describe(["background", "lung"])


def test_applying_keeps_the_largest_regions_fills_holes_and_leaves_the_input_alone():
    rule = ComponentRule((2,), (True,))
    predicted = two_lungs()
    predicted[10:14, 8:12] = 0  # a hole in the left lung
    predicted[36:39, 0:3] = 1  # a blob in the detector band
    predicted[0:2, 37:40] = 1  # and another
    before = predicted.copy()
    out = rule.apply(predicted)
    assert np.array_equal(predicted, before)
    assert np.array_equal(out, two_lungs())
    # A stack is a set of independent images: each keeps its own two largest regions.
    stack = rule.apply(np.stack([predicted, two_lungs()]))
    assert np.array_equal(stack[0], two_lungs()) and np.array_equal(stack[1], two_lungs())
    # Holes of one class are not filled when the rule says the anatomy has some; removed
    # regions become background, never another class.
    keep_holes = ComponentRule((1, 1), (False, False)).apply(np.where(predicted > 0, 2, 0))
    assert regions(keep_holes == 2) == 1 and (keep_holes[10:14, 8:12] == 0).all()


def test_filling_holes_never_covers_another_structure():
    """A small lesion (class 2) inside an organ (class 1) is a hole in the organ's mask, too small
    to count against filling; filling wrote class 1 over it and the lesion was gone."""
    mask = np.zeros((1, 120, 120), np.uint8)
    mask[0, 10:110, 10:110] = 1
    mask[0, 50:53, 50:53] = 2
    rule = ComponentRule.learn(mask, 3)
    assert rule.fill_holes[0]
    assert np.array_equal(rule.apply(mask), mask)
    holed = mask.copy()
    holed[0, 30:32, 30:32] = 0  # a background hole is still filled
    assert np.array_equal(rule.apply(holed), mask)


def test_merging_widens_the_rule_to_both_sets_of_masks():
    fitted, corrected = ComponentRule((2, 1), (True, True)), ComponentRule((3, 1), (True, False))
    assert fitted.merged(corrected) == ComponentRule((3, 1), (True, False))
    assert ComponentRule((0,), (False,)).merged(ComponentRule((2,), (True,))) == ComponentRule((0,), (False,))
    with pytest.raises(ValueError, match="different numbers of classes"):
        fitted.merged(ComponentRule((2,), (True,)))


def test_radiograph_models_record_the_rule_and_the_baseline_volumes_and_old_bundles_do_not(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)  # TEDM on a radiograph (percentile) backbone, disc masks
    assert bundle.component_rule == ComponentRule((1,), (True,))
    assert load_bundle(save_bundle(bundle, tmp_path / "again")).component_rule == bundle.component_rule
    images, masks = synthetic_disc_images(2, size=32, seed=4)
    common = {"steps": 2, "device": "cpu", "show_progress": False}
    assert fit_bundle(bundle.backbone, images, masks, "baseline", **common).component_rule is None
    assert fit_bundle(bundle.backbone, images, masks, postprocess=False, **common).component_rule is None
    mri = fit_bundle(replace(bundle.backbone, intensity=MULTIMODAL_MRI), images, masks, **common)
    assert mri.component_rule is None  # volumes' slices cut one 3D structure into any number of regions
    # Refining widens the rule by the corrections: a mask with two discs allows two regions.
    corrected = masks.copy()
    corrected[0, 0:6, 0:6] = 1
    refined = refine_bundle(bundle, images, corrected, steps=1, device="cpu", show_progress=False)
    assert refined.component_rule == ComponentRule((2,), (True,))
    # On the slices of a volume (postprocess=False) the corrections teach no rule, and the model
    # keeps its own (it once lost it, and a model saved from such a session no longer post-processed).
    kept = refine_bundle(bundle, images, corrected, steps=1, device="cpu", postprocess=False).component_rule
    assert kept == bundle.component_rule
    # Written before the rule existed: no post-processing, same fingerprint rule as then.
    old = shutil.copytree(tiny_bundle_dir, tmp_path / "old")
    meta = json.loads((old / "bundle.json").read_text())
    del meta["component_rule"]
    (old / "bundle.json").write_text(json.dumps(meta))
    assert load_bundle(old).component_rule is None
    unsaved = replace(bundle, source=None, fingerprint=None)
    assert model_fingerprint(unsaved) != model_fingerprint(replace(unsaved, component_rule=None))


@pytest.mark.parametrize(
    "rule, problem",
    [
        ({"max_regions": [2]}, "component_rule is invalid"),
        ({"max_regions": [-1], "fill_holes": [True]}, "component_rule is invalid"),
        ({"max_regions": [2], "fill_holes": ["yes"]}, "component_rule is invalid"),
        ({"max_regions": [2, 1], "fill_holes": [True, True]}, "one entry per structure"),
    ],
)
def test_a_wrong_rule_in_bundle_json_is_refused_naming_the_file(tiny_bundle_dir, tmp_path, rule, problem):
    edited = shutil.copytree(tiny_bundle_dir, tmp_path / "edited")
    meta = json.loads((edited / "bundle.json").read_text())
    meta["component_rule"] = rule
    (edited / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=problem) as error:
        load_bundle(edited)
    assert "bundle.json" in str(error.value)


def test_a_whole_2d_image_is_post_processed_the_slices_of_a_volume_never(tiny_bundle_dir):
    """With a rule of one region per structure, a radiograph's output holds at most one region
    (segment_volume, the batch pipeline's and the CLI's path, and the interactive session's);
    the slices of a volume and ``postprocess=False`` keep the model's raw labels."""
    from tedm_core.io.volumes import Volume
    from tedm_core.pipelines.interactive import InteractiveSession
    from tedm_core.pipelines.volume import segment_volume

    bundle = replace(load_bundle(tiny_bundle_dir), component_rule=ComponentRule((1,), (True,)))
    images, _ = synthetic_disc_images(3, size=32, seed=11)
    images[:, :, 25:31, 1:7] = 0.6  # a second bright blob on each image, in a corner apart from the disc
    raw = (images[:, 0] + 1) * 50
    single = Volume(raw[:1][None].astype(np.float32), np.eye(4))
    stack = Volume(raw[None].astype(np.float32), np.eye(4))
    plain = Segmenter(bundle, device="cpu", postprocess=False)
    assert plain.component_rule is None and Segmenter(bundle, device="cpu").provenance()["postprocess"]
    raw_single = segment_volume(plain, single, "k").labels
    assert regions(raw_single[0] == 1) >= 2  # the model sees both blobs (the test's premise)
    processed = segment_volume(Segmenter(bundle, device="cpu"), single, "k", keep_probabilities=False).labels
    assert regions(processed[0] == 1) == 1
    assert np.array_equal(processed, bundle.component_rule.apply(raw_single))
    raw_stack = segment_volume(plain, stack, "k").labels
    assert np.array_equal(segment_volume(Segmenter(bundle, device="cpu"), stack, "k").labels, raw_stack)
    session = InteractiveSession(single)
    assert np.array_equal(session.segment(bundle, axis="k", device="cpu").labels, processed)
    session = InteractiveSession(stack)
    assert np.array_equal(session.segment(bundle, axis="k", device="cpu").labels, raw_stack)
    # A model fitted in the session on a volume records no rule; on a whole 2D image it does.
    drawn = np.zeros(raw_stack.shape, np.uint8)
    drawn[1, 10:20, 10:20] = 1
    session.fit(bundle.backbone, drawn, ["background", "disc"], axis="k", device="cpu", steps=2)
    assert session.bundle.component_rule is None
    session = InteractiveSession(single)
    session.fit(bundle.backbone, drawn[1:2], ["background", "disc"], axis="k", device="cpu", steps=2)
    assert session.bundle.component_rule == ComponentRule((1,), (True,))


def test_the_command_line_fits_the_rule_segments_with_it_and_never_mixes_raw_outputs_in(
    tiny_backbone_dir, tmp_path, capsys
):
    """``tedm fit`` on radiographs records the rule, ``tedm segment`` writes post-processed
    masks and records it; the same folder is refused to a ``--no-postprocess`` run (a resumed
    batch must not mix raw and post-processed outputs), a new folder gets the raw labels."""
    from PIL import Image

    from tedm_core.cli import main
    from tedm_core.io.outputs import read_provenance

    images_dir, masks_dir, test_dir = tmp_path / "images", tmp_path / "masks", tmp_path / "test"
    for folder in (images_dir, masks_dir, test_dir):
        folder.mkdir()
    images, masks = synthetic_disc_images(3, size=32, seed=2)
    for i in range(3):
        Image.fromarray(((images[i, 0] + 1) * 127.5).astype(np.uint8)).save(images_dir / f"c{i}.png")
        Image.fromarray((masks[i] * 255).astype(np.uint8)).save(masks_dir / f"c{i}.png")
    test, _ = synthetic_disc_images(2, size=32, seed=11)
    test[:, :, 25:31, 1:7] = 0.6  # a second bright blob, apart from the disc
    for i in range(2):
        Image.fromarray(((test[i, 0] + 1) * 127.5).astype(np.uint8)).save(test_dir / f"t{i}.png")
    bundle_dir = tmp_path / "bundle"
    fit = ["fit", "--backbone", str(tiny_backbone_dir), "--images", str(images_dir), "--masks", str(masks_dir)]
    assert main(fit + ["--out", str(bundle_dir), "--steps", "30", "--device", "cpu"]) == 0
    assert load_bundle(bundle_dir).component_rule == ComponentRule((1,), (True,))
    segment = ["segment", "--model", str(bundle_dir), "--input", str(test_dir), "--device", "cpu"]
    assert main(segment + ["--output", str(tmp_path / "out")]) == 0
    assert read_provenance(tmp_path / "out")["postprocess"] == {"max_regions": [1], "fill_holes": [True]}
    capsys.readouterr()
    assert main(segment + ["--output", str(tmp_path / "out"), "--no-postprocess"]) != 0
    err = capsys.readouterr().err
    assert "postprocess" in err and "out" in err
    assert main(segment + ["--output", str(tmp_path / "raw"), "--no-postprocess"]) == 0
    assert read_provenance(tmp_path / "raw")["postprocess"] is None
    raw_regions = []
    for i in range(2):
        processed = np.array(Image.open(next((tmp_path / "out").glob(f"t{i}*.png")))) > 0
        raw = np.array(Image.open(next((tmp_path / "raw").glob(f"t{i}*.png")))) > 0
        raw_regions.append(regions(raw))
        assert regions(processed) <= 1
        assert np.array_equal(processed, ComponentRule((1,), (True,)).apply(raw.astype(np.uint8)) > 0)
    assert max(raw_regions) >= 2  # the model painted the second blob: there was something to remove
