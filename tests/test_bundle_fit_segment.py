"""Bundles (round trip, refusals), fitting every method, segmenting, refining, the CLI end to end."""

from __future__ import annotations

import copy
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import synthetic_disc_images
from PIL import Image

from tedm_core.bundle import load_bundle, save_bundle
from tedm_core.cli import main
from tedm_core.errors import BundleError
from tedm_core.model.checkpoint import load_backbone
from tedm_core.pipelines.evaluate import dice_precision_recall
from tedm_core.pipelines.fit import fit_bundle, refine_bundle
from tedm_core.pipelines.segment import Segmenter


def _mean_dice(prediction, truth):
    return float(np.mean([dice_precision_recall(p == 1, t == 1)[0] for p, t in zip(prediction, truth)]))


def test_bundle_round_trip_gives_identical_predictions(tiny_bundle_dir, tmp_path):
    images, _ = synthetic_disc_images(2, size=40, seed=7)
    bundle = load_bundle(tiny_bundle_dir)
    before = Segmenter(bundle, device="cpu").predict(images)
    copy = save_bundle(bundle, tmp_path / "copy")
    after = Segmenter(load_bundle(copy), device="cpu").predict(images)
    np.testing.assert_array_equal(before.probabilities, after.probabilities)
    meta = json.loads((copy / "bundle.json").read_text())
    assert meta["tedm_core_version"] and meta["torch_version"] and meta["method"] == "tedm"
    assert meta["class_names"] == ["background", "disc"] and len(meta["class_colours"]) == 2
    assert meta["head"]["timesteps"] == [1, 10, 25, 50, 200, 400, 600, 800]
    assert meta["backbone"]["intensity"]["kind"] == "percentile"


def test_tedm_learns_discs_from_three_images_and_generalises(tiny_bundle_dir):
    images, masks = synthetic_disc_images(6, size=32, seed=11)
    prediction = Segmenter(load_bundle(tiny_bundle_dir), device="cpu").predict(images)
    assert prediction.probabilities.shape == (6, 2, 32, 32)
    np.testing.assert_allclose(prediction.probabilities.sum(1), 1, atol=1e-5)
    assert _mean_dice(prediction.labels, masks) > 0.8


def test_segmentation_does_not_depend_on_batch_size(tiny_bundle_dir):
    images, _ = synthetic_disc_images(5, size=32, seed=12)
    bundle = load_bundle(tiny_bundle_dir)
    one = Segmenter(bundle, device="cpu", batch_size=1).predict(images)
    five = Segmenter(bundle, device="cpu", batch_size=5).predict(images)
    np.testing.assert_allclose(one.probabilities, five.probabilities, atol=1e-5)


def test_probabilities_are_resized_back_to_any_input_grid(tiny_bundle_dir):
    images, masks = synthetic_disc_images(2, size=96, seed=13)
    wide = np.concatenate([images, np.full((2, 1, 96, 20), -1, np.float32)], axis=3)  # 96x116, not square
    prediction = Segmenter(load_bundle(tiny_bundle_dir), device="cpu").predict(wide)
    assert prediction.labels.shape == (2, 96, 116) and prediction.uncertainty.shape == (2, 96, 116)
    assert _mean_dice(prediction.labels[:, :, :96], masks) > 0.7
    assert prediction.labels[:, :, 100:].sum() == 0


@pytest.mark.parametrize("method", ["ledm", "ledme", "probe", "baseline"])
def test_every_method_fits_and_segments(method, tiny_backbone_dir, tmp_path):
    images, masks = synthetic_disc_images(4, size=32, seed=21)
    bundle = fit_bundle(
        load_backbone(tiny_backbone_dir),
        images,
        masks,
        method,
        ["background", "disc"],
        [0, 1],
        steps=40,
        device="cpu",
        show_progress=False,
    )
    saved = save_bundle(bundle, tmp_path / method)
    prediction = Segmenter(load_bundle(saved), device="cpu").predict(images)
    assert prediction.labels.shape == (4, 32, 32)
    if method in ("ledm", "ledme"):
        assert np.all(prediction.uncertainty == 0)  # one prediction: no per-step spread
    assert _mean_dice(prediction.labels, masks) > 0.5


def test_multiclass_head_predicts_every_class(tiny_backbone_dir):
    images, masks = synthetic_disc_images(4, size=32, seed=22)
    labels = masks.copy()
    labels[:, :, 16:] *= 2  # the right half of each disc is class 2
    bundle = fit_bundle(
        load_backbone(tiny_backbone_dir),
        images,
        labels,
        "tedm",
        ["background", "left", "right"],
        [0, 10, 20],
        steps=80,
        device="cpu",
        show_progress=False,
    )
    prediction = Segmenter(bundle, device="cpu").predict(images)
    assert prediction.probabilities.shape == (4, 3, 32, 32)
    assert set(np.unique(prediction.labels)) == {0, 1, 2}


def test_refine_from_cached_features_runs_no_unet_and_learns_the_correction(tiny_bundle_dir):
    bundle = load_bundle(tiny_bundle_dir)
    images, masks = synthetic_disc_images(4, size=32, seed=31)
    segmenter = Segmenter(bundle, device="cpu")
    first = segmenter.predict(images, keep_features=True)
    assert first.features is not None and first.features.levels[0].dtype == torch.float16
    corrected = np.zeros_like(masks)  # a "user" erases everything on slices 0 and 1
    calls = []
    handle = bundle.backbone.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    refined = refine_bundle(
        bundle,
        images[:2],
        corrected[:2],
        features=first.features.select([0, 1]).levels,
        steps=60,
        device="cpu",
        show_progress=False,
    )
    again = Segmenter(refined, device="cpu").predict_from_features(first.features)
    handle.remove()
    assert calls == []
    assert again.labels[:2].sum() < first.labels[:2].sum()
    assert refined.head is not bundle.head  # the original bundle is left as it was


def test_pickle_disguised_as_a_bundle_is_refused_without_unpickling(tiny_bundle_dir, tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    fake = tmp_path / "fake_bundle"
    shutil.copytree(tiny_bundle_dir, fake)
    (fake / "bundle.json").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(fake)
    torch.save({"x": Evil()}, tmp_path / "model.pt")
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(tmp_path / "model.pt")
    weights = tmp_path / "weights_bundle"
    shutil.copytree(tiny_bundle_dir, weights)
    (weights / "head.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(weights)
    assert not marker.exists()


def test_incompatible_or_incomplete_bundles_are_refused_clearly(tiny_bundle_dir, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(tiny_bundle_dir, newer)
    meta = json.loads((newer / "bundle.json").read_text())
    meta["format"] = 99
    (newer / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format 99 is not supported"):
        load_bundle(newer)
    missing = tmp_path / "missing"
    shutil.copytree(tiny_bundle_dir, missing)
    (missing / "head.safetensors").unlink()
    with pytest.raises(BundleError, match="head.safetensors: missing file"):
        load_bundle(missing)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")


def _write_pngs(folder, images, masks=None, prefix="case"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(((image[0] + 1) * 127.5).astype(np.uint8)).save(folder / f"{prefix}_{i:02d}.png")
        if masks is not None:
            (folder.parent / "masks").mkdir(exist_ok=True)
            Image.fromarray((masks[i] * 255).astype(np.uint8)).save(folder.parent / "masks" / f"{prefix}_{i:02d}.png")


def test_cli_fit_segment_evaluate_end_to_end(tiny_backbone_dir, tmp_path, capsys):
    train, train_masks = synthetic_disc_images(5, size=64, seed=41)
    test, test_masks = synthetic_disc_images(4, size=64, seed=42)
    _write_pngs(tmp_path / "train" / "images", train, train_masks)
    _write_pngs(tmp_path / "test" / "images", test, test_masks, prefix="test")
    bundle = tmp_path / "bundle"
    assert (
        main(
            [
                "fit",
                "--backbone",
                str(tiny_backbone_dir),
                "--images",
                str(tmp_path / "train/images"),
                "--masks",
                str(tmp_path / "train/masks"),
                "--out",
                str(bundle),
                "--n",
                "3",
                "--steps",
                "80",
                "--classes",
                "disc",
            ]
        )
        == 0
    )
    assert load_bundle(bundle).training["labelled_slices"] == 3
    assert load_bundle(bundle).training["learning_rate_schedule"] == "cosine"  # a radiograph backbone's default
    constant = tmp_path / "bundle_constant"
    fit_args = ["fit", "--backbone", str(tiny_backbone_dir), "--images", str(tmp_path / "train/images")]
    fit_args += ["--masks", str(tmp_path / "train/masks"), "--steps", "2", "--lr-schedule", "constant"]
    assert main(fit_args + ["--out", str(constant), "--timesteps-per-image", "0", "--members", "1"]) == 0
    assert load_bundle(constant).training["learning_rate_schedule"] == "constant"
    assert load_bundle(constant).head.config.members == 1
    assert load_bundle(bundle).head.config.members == 3  # a radiograph backbone's default
    assert load_bundle(constant).training["timesteps_per_image"] is None  # 0 = every timestep
    assert load_bundle(bundle).training["timesteps_per_image"] == 2  # a radiograph backbone's default
    out = tmp_path / "pred"
    assert (
        main(
            [
                "segment",
                "--model",
                str(bundle),
                "--input",
                str(tmp_path / "test/images"),
                "--output",
                str(out),
                "--probabilities",
                "--uncertainty",
            ]
        )
        == 0
    )
    # The one writer's convention (README "Output files"): label file, maps beside it, a summary, a provenance record.
    assert sorted(p.name for p in out.iterdir())[:5] == [
        ".tedm_outputs.json",
        "summary.csv",
        "test_00.png",
        "test_00_prob.png",
        "test_00_uncertainty.png",
    ]
    assert set(np.unique(np.asarray(Image.open(out / "test_00.png")))) <= {0, 255}
    capsys.readouterr()
    assert (
        main(
            ["evaluate", "--pred", str(out), "--truth", str(tmp_path / "test/masks"), "--csv", str(tmp_path / "m.csv")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "4 images scored" in printed and "Dice" in printed
    dice = float(printed.split("Dice ")[1].split()[0])
    assert dice > 70
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 5


def test_cli_reports_bad_input_in_one_line_with_nonzero_exit(tiny_bundle_dir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png at all")
    images, _ = synthetic_disc_images(1, size=32)
    _write_pngs(tmp_path / "in", images)
    code = main(
        ["segment", "--model", str(tiny_bundle_dir), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 1
    error_lines = [line for line in err.splitlines() if "broken.png" in line]
    assert len(error_lines) == 1 and "broken.png: cannot be read as an image" in error_lines[0]
    assert (tmp_path / "out" / "case_00.png").exists()  # the good image was still segmented
    assert (
        main(
            [
                "segment",
                "--model",
                str(tmp_path / "in" / "broken.png"),
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )


def test_test_time_flip_averages_the_mirrored_prediction_voxel_for_voxel(tiny_bundle_dir, tmp_path):
    """The mirrored slice is predicted in its own grid and mirrored back: on a non-square slice
    (padded unevenly to the model's square grid) the result is the mean of the two predictions."""
    bundle = load_bundle(tiny_bundle_dir)
    assert bundle.test_time_flip  # the default of fit_bundle, recorded in the bundle
    images, _ = synthetic_disc_images(3, size=40, seed=71)
    wide = np.concatenate([images, np.full((3, 1, 40, 13), -1, np.float32)], axis=3)  # 40x53
    plain = Segmenter(bundle, device="cpu", test_time_flip=False)
    once, mirrored = plain.predict(wide), plain.predict(wide[..., ::-1].copy())
    flipped = Segmenter(bundle, device="cpu").predict(wide, keep_features=True)
    expected = (once.probabilities + mirrored.probabilities[..., ::-1]) / 2
    np.testing.assert_allclose(flipped.probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(flipped.uncertainty, (once.uncertainty + mirrored.uncertainty[..., ::-1]) / 2, atol=1e-6)
    # The whole-volume path writes the same labels; the cache re-applies both orientations.
    labels, spread = np.zeros((3, 40, 53), np.uint8), np.zeros((3, 40, 53), np.float32)
    Segmenter(bundle, device="cpu").predict_into(wide, np.arange(3), labels, spread)
    assert np.array_equal(labels, flipped.labels)
    again = Segmenter(bundle, device="cpu").predict_from_features(flipped.features)
    np.testing.assert_allclose(again.probabilities, flipped.probabilities, atol=2e-3)
    # Switched off at fit time, recorded, and kept through a save.
    off = fit_bundle(
        bundle.backbone, images, (images[:, 0] > 0).astype(np.int64), steps=2, device="cpu", test_time_flip=False
    )
    assert not load_bundle(save_bundle(off, tmp_path / "off")).test_time_flip
    assert not Segmenter(off, device="cpu").test_time_flip


def test_bundles_written_before_test_time_flip_predict_once(tiny_bundle_dir, tmp_path):
    copy = shutil.copytree(tiny_bundle_dir, tmp_path / "old")
    meta = json.loads((copy / "bundle.json").read_text())
    del meta["test_time_flip"]
    (copy / "bundle.json").write_text(json.dumps(meta))
    assert not load_bundle(copy).test_time_flip


def test_predict_from_features_equals_predict(tiny_bundle_dir):
    """Re-applying the head to the cached (float16) features gives the prediction of ``predict``:
    the fast path (channels-last, a few maps at a time, BatchNorm folded) changes no result."""
    bundle = load_bundle(tiny_bundle_dir)
    images, _ = synthetic_disc_images(5, size=40, seed=61)
    segmenter = Segmenter(bundle, device="cpu", batch_size=2)
    first = segmenter.predict(images, keep_features=True)
    again = segmenter.predict_from_features(first.features)
    # Only the float16 rounding of the cached features separates the two.
    np.testing.assert_allclose(again.probabilities, first.probabilities, atol=2e-3)
    np.testing.assert_allclose(again.uncertainty, first.uncertainty, atol=2e-3)
    decided = np.abs(first.probabilities[:, 1] - 0.5) > 2e-3
    assert np.array_equal(again.labels[decided], first.labels[decided])
    # On exactly the features ``predict`` used, the head gives exactly its probabilities.
    cache = first.features
    exact = segmenter.predict_from_features(
        type(cache)([f.float() for f in cache.levels], cache.transform, [f.float() for f in cache.flipped])
    )
    rounded = Segmenter(bundle, device="cpu", batch_size=2)
    rounded._features = lambda grid, cancel=None: [f.half().float() for f in Segmenter._features(rounded, grid, cancel)]
    np.testing.assert_allclose(exact.probabilities, rounded.predict(images).probabilities, atol=1e-6)


@pytest.mark.parametrize("fail_on_call", [1, 2], ids=["in the head", "in the mirrored pass"])
def test_an_out_of_memory_retry_keeps_one_cache_row_per_slice(tiny_bundle_dir, fail_on_call):
    """A GPU out-of-memory error halfway through a chunk (after its features were computed: in the
    head, or in the mirrored pass of test-time flipping) makes the chunk run again at half the size.
    Its features must be cached once, or every later row of the cache belongs to another slice and
    Refine puts each slice's result on its neighbour. The error is raised on the CPU with the text
    of torch's CUDA error, which is what ``runtime.map_in_chunks`` recognises."""
    bundle = load_bundle(tiny_bundle_dir)
    assert bundle.test_time_flip
    images, _ = synthetic_disc_images(6, size=40, seed=67)
    expected = Segmenter(bundle, device="cpu", batch_size=4).predict(images, keep_features=True)
    segmenter = Segmenter(bundle, device="cpu", batch_size=4)
    real_head, calls = segmenter._head_predict, []

    def failing_head(levels, transform, *rest):
        calls.append(levels[0].shape[0])
        if len(calls) == fail_on_call:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_head(levels, transform, *rest)

    segmenter._head_predict = failing_head
    first = segmenter.predict(images, keep_features=True)
    assert calls[fail_on_call - 1] == 4 and calls[fail_on_call] == 2  # the chunk was retried at half the size
    assert first.features.levels[0].shape[0] == len(images) == first.features.flipped[0].shape[0]
    np.testing.assert_allclose(first.probabilities, expected.probabilities, atol=1e-5)
    again = Segmenter(bundle, device="cpu").predict_from_features(first.features)
    np.testing.assert_allclose(again.probabilities, expected.probabilities, atol=2e-3)


def test_bf16_passes_cache_their_features_exactly_and_channels_last(tiny_bundle_dir):
    """A bf16 segmenter caches the UNet's bf16 features as they are (no float16 rounding), each
    map channels-last, so re-applying the head reads them without a copy and gives exactly the
    probabilities ``predict`` gave."""
    bundle = load_bundle(tiny_bundle_dir)
    images, _ = synthetic_disc_images(5, size=40, seed=62)
    segmenter = Segmenter(bundle, device="cpu", batch_size=2, precision="bf16")
    first = segmenter.predict(images, keep_features=True)
    cache = first.features
    for level in cache.levels + cache.flipped:
        assert level.dtype == torch.bfloat16
        n, s, c, h, w = level.shape
        assert level[:3].reshape(3 * s, c, h, w).is_contiguous(memory_format=torch.channels_last)
    again = segmenter.predict_from_features(cache)
    np.testing.assert_array_equal(again.probabilities, first.probabilities)
    np.testing.assert_array_equal(again.uncertainty, first.uncertainty)


def test_refine_with_anchor_keeps_the_other_slices(tiny_bundle_dir):
    """Two slices 'corrected' to empty: refined on them alone, the head forgets the discs on
    every other slice; with a few uncorrected slices' previous result as anchor, it keeps them."""
    bundle = load_bundle(tiny_bundle_dir)
    images, masks = synthetic_disc_images(10, size=32, seed=51)
    first = Segmenter(bundle, device="cpu").predict(images, keep_features=True)
    corrected, anchors, others = [0, 1], [2, 3, 4, 5], [6, 7, 8, 9]
    before = _mean_dice(first.labels[others], masks[others])
    assert before > 0.7
    wrong = np.zeros_like(masks[corrected])
    common = {"features": first.features.select(corrected).levels, "device": "cpu", "show_progress": False}
    plain = refine_bundle(bundle, images[corrected], wrong, **common)
    anchored = refine_bundle(
        bundle,
        images[corrected],
        wrong,
        anchor_slices=images[anchors],
        anchor_labels=first.labels[anchors],
        anchor_features=first.features.select(anchors).levels,
        **common,
    )
    assert anchored.training["refine_anchor_slices"] == 4
    assert anchored.training["refine_pull_to_start"] == 0.0  # anchors guard it: no pull
    plain_dice = _mean_dice(
        Segmenter(plain, device="cpu").predict_from_features(first.features).labels[others], masks[others]
    )
    after = Segmenter(anchored, device="cpu").predict_from_features(first.features).labels
    anchored_dice = _mean_dice(after[others], masks[others])
    assert anchored_dice >= before - 0.05
    assert plain_dice <= anchored_dice
    assert after[corrected].sum() < first.labels[corrected].sum()  # the correction is still learnt from
    # Without cached features the anchor slices' features are extracted (inference noise).
    extracted = refine_bundle(
        bundle,
        images[corrected],
        wrong,
        anchor_slices=images[anchors],
        anchor_labels=first.labels[anchors],
        steps=5,
        device="cpu",
        show_progress=False,
    )
    assert extracted.training["refine_anchor_slices"] == 4
    with pytest.raises(ValueError, match="go together"):
        refine_bundle(
            bundle, images[corrected], wrong, anchor_slices=images[anchors], device="cpu", show_progress=False
        )


def test_fit_bundle_takes_class_colours(tiny_backbone_dir):
    images, masks = synthetic_disc_images(2, size=32, seed=71)
    backbone = load_backbone(tiny_backbone_dir)
    bundle = fit_bundle(
        backbone,
        images,
        masks,
        "tedm",
        ["background", "disc"],
        class_colours=[(0, 0, 0), (10, 200, 30)],
        steps=2,
        device="cpu",
        show_progress=False,
    )
    assert [tuple(c) for c in bundle.class_colours] == [(0, 0, 0), (10, 200, 30)]
    assert (
        len(
            fit_bundle(
                backbone, images, masks, "tedm", ["background", "disc"], steps=1, device="cpu", show_progress=False
            ).class_colours
        )
        == 2
    )
    with pytest.raises(ValueError, match="class_colours"):
        fit_bundle(
            backbone,
            images,
            masks,
            "tedm",
            ["background", "disc"],
            class_colours=[(0, 0, 0)],
            steps=1,
            device="cpu",
            show_progress=False,
        )


def test_precise_statistics_average_the_batch_statistics_of_every_draw(tiny_backbone_dir):
    """The head's BatchNorm running statistics become the mean over draws of each draw's batch
    statistics, whatever the exponential average had kept; the momentum is restored; the fit records it."""
    from tedm_core.heads import FeatureHead, HeadConfig
    from tedm_core.pipelines.fit import recompute_statistics

    torch.manual_seed(0)
    head = FeatureHead(HeadConfig.for_method("tedm", [4, 8], 2, timesteps=[1, 10]))
    draws = [[torch.randn(3, 2, 4, 8, 8) * scale, torch.randn(3, 2, 8, 4, 4) * scale] for scale in (1.0, 5.0)]
    norm = head.mlp.rest[1]
    expected = []
    probe = copy.deepcopy(head).train()
    hook = probe.mlp.rest[1].register_forward_hook(lambda _m, args, _o: expected.append(args[0].mean(dim=(0, 2, 3))))
    with torch.no_grad():
        for levels in draws:
            probe.logits(levels, (16, 16))
    hook.remove()
    norm.running_mean.fill_(100.0)  # what a last, unrepresentative draw might have left
    recompute_statistics(head, draws, images_per_step=8, size=(16, 16))
    assert torch.allclose(norm.running_mean, torch.stack(expected).mean(dim=0), atol=1e-5)
    assert norm.momentum == 0.1

    images, masks = synthetic_disc_images(2, size=32, seed=2)
    bundle = fit_bundle(
        load_backbone(tiny_backbone_dir), images, masks, "tedm", ["background", "disc"],
        steps=3, device="cpu", show_progress=False, precise_statistics=True,
    )  # fmt: skip
    assert bundle.training["precise_statistics"] is True


def _tiny_head_problem():
    from tedm_core.heads import FeatureHead, HeadConfig

    torch.manual_seed(0)
    levels = [torch.randn(4, 2, 4, 8, 8), torch.randn(4, 2, 8, 4, 4)]
    targets = (torch.rand(4, 16, 16) > 0.5).long()
    return (lambda: FeatureHead(HeadConfig.for_method("tedm", [4, 8], 2, timesteps=[1, 10]))), levels, targets


def test_weight_averaging_keeps_the_mean_of_the_second_half_of_the_steps():
    """With ``average_weights`` the head ends with the equal average of its weights after steps
    3-6 of 6 (the trajectory itself is the constant-rate one), and BatchNorm statistics that
    were recomputed for those averaged weights."""
    from tedm_core.pipelines.fit import recompute_statistics, train_head

    new_head, levels, targets = _tiny_head_problem()
    seen = []
    start = new_head()
    plain = copy.deepcopy(start)
    train_head(
        plain, [levels], targets, steps=6,
        progress=lambda step, _total, _loss: seen.append([p.detach().clone() for p in plain.parameters()]),
    )  # fmt: skip
    averaged = train_head(copy.deepcopy(start), [levels], targets, steps=6, average_weights=True)
    for k, parameter in enumerate(averaged.parameters()):
        assert torch.allclose(parameter, torch.stack([s[k] for s in seen[3:]]).mean(dim=0), atol=1e-6)
    expected = copy.deepcopy(averaged)
    recompute_statistics(expected, [levels], images_per_step=8, size=(16, 16))
    assert torch.allclose(averaged.mlp.rest[1].running_mean, expected.mlp.rest[1].running_mean)


def test_pull_to_start_keeps_the_head_near_its_start_weights(monkeypatch):
    """L2-SP: the stronger the pull, the nearer the fine-tuned head stays to the weights it started
    from; with a pull each step adds ``pull x (weights - start)`` to the gradient, once (not once
    per chunk of the frozen-statistics loss)."""
    from tedm_core.pipelines import fit
    from tedm_core.pipelines.fit import train_head

    new_head, levels, targets = _tiny_head_problem()
    start = new_head()

    def distance(pull: float, steps: int = 30) -> float:
        head = train_head(copy.deepcopy(start), [levels], targets, steps, freeze_statistics=True, pull_to_start=pull)
        return float(sum(((a - b) ** 2).sum() for a, b in zip(head.parameters(), start.parameters())).detach())

    free, weak, strong = distance(0.0), distance(0.1), distance(10.0)
    assert strong < weak < free

    # The penalty joins the gradient once per step, however many backward passes the loss took.
    def pulled(maps_per_chunk):
        monkeypatch.setattr(fit, "maps_per_chunk", lambda _device, _dtype=None: maps_per_chunk)
        head = train_head(copy.deepcopy(start), [levels], targets, 5, freeze_statistics=True, pull_to_start=1.0)
        return torch.cat([p.detach().flatten() for p in head.parameters()])

    torch.testing.assert_close(pulled(1), pulled(None), atol=1e-5, rtol=1e-4)


def test_bf16_training_learns_as_fp32_does_in_twice_the_maps_per_chunk():
    """``train_head(precision="bf16")``: autocast over the head, fp32 weights and loss, chunks of
    the same bytes of hidden maps as fp32's (twice the maps); it learns what fp32 learns up to
    rounding. Anything but fp32 or bf16 is refused (``auto`` is for the passes to resolve)."""
    from tedm_core.errors import SettingError
    from tedm_core.heads import CPU_MAPS_PER_CHUNK, maps_per_chunk
    from tedm_core.pipelines.fit import train_head

    cpu = torch.device("cpu")
    assert maps_per_chunk(cpu, torch.bfloat16) == 2 * maps_per_chunk(cpu) == 2 * CPU_MAPS_PER_CHUNK
    assert maps_per_chunk(torch.device("cuda")) is None  # a GPU takes every map at once
    new_head, levels, targets = _tiny_head_problem()
    start = new_head()

    def trained(precision: str) -> torch.Tensor:
        head = train_head(copy.deepcopy(start), [levels], targets, 20, freeze_statistics=True, precision=precision)
        assert all(p.dtype == torch.float32 for p in head.parameters())
        return torch.cat([(p - q).detach().flatten() for p, q in zip(head.parameters(), start.parameters())])

    fp32, bf16 = trained("fp32"), trained("bf16")
    assert float(torch.nn.functional.cosine_similarity(fp32, bf16, dim=0)) > 0.95
    with pytest.raises(SettingError, match="precision"):
        train_head(new_head(), [levels], targets, steps=1, precision="auto")


def test_cosine_schedule_anneals_the_steps_and_unknown_schedules_are_refused(tiny_backbone_dir):
    """Under the cosine schedule the first step moves the weights as far as a constant rate's
    first step and the last one barely; a misspelt schedule is refused; cosine is the default on
    radiograph backbones only (measured there), and the fit records the schedule it used."""
    from tedm_core.errors import SettingError
    from tedm_core.pipelines.fit import FitOptions, default_learning_rate_schedule, train_head
    from tedm_core.preprocessing.intensity import MULTIMODAL_MRI, RADIOGRAPH

    new_head, levels, targets = _tiny_head_problem()
    start = new_head()

    def step_sizes(schedule):
        head = copy.deepcopy(start)
        trail = [torch.cat([p.detach().flatten() for p in head.parameters()])]
        record = lambda *_: trail.append(torch.cat([p.detach().flatten() for p in head.parameters()]))  # noqa: E731
        train_head(head, [levels], targets, steps=20, progress=record, learning_rate_schedule=schedule)
        return [float((b - a).abs().max()) for a, b in zip(trail, trail[1:])]

    constant, cosine = step_sizes("constant"), step_sizes("cosine")
    assert cosine[0] == pytest.approx(constant[0], rel=1e-4)
    assert cosine[-1] < 0.05 * constant[-1]
    with pytest.raises(SettingError, match="learning_rate_schedule"):
        train_head(new_head(), [levels], targets, steps=1, learning_rate_schedule="linear")

    assert default_learning_rate_schedule(FitOptions(), RADIOGRAPH) == "cosine"
    assert default_learning_rate_schedule(FitOptions(), MULTIMODAL_MRI) == "constant"
    assert default_learning_rate_schedule(FitOptions(learning_rate_schedule="constant"), RADIOGRAPH) == "constant"

    backbone = load_backbone(tiny_backbone_dir)
    assert backbone.intensity == RADIOGRAPH
    images, masks = synthetic_disc_images(2, size=32, seed=2)
    for given, recorded in ((None, "cosine"), ("constant", "constant")):
        bundle = fit_bundle(
            backbone, images, masks, "tedm", ["background", "disc"],
            steps=2, device="cpu", show_progress=False, learning_rate_schedule=given,
        )  # fmt: skip
        assert bundle.training["learning_rate_schedule"] == recorded


def test_a_head_on_some_decoder_levels_keeps_them_through_saving_and_segmenting(tiny_backbone_dir, tmp_path):
    """``levels`` picks the decoder levels a head reads and ``hidden`` its widths; the bundle
    records both, and the segmenter taps only those levels (one feature tensor per level)."""
    from tedm_core.errors import SettingError
    from tedm_core.pipelines.fit import RADIOGRAPH_TIMESTEPS_PER_IMAGE
    from tedm_core.pipelines.segment import Segmenter

    backbone = load_backbone(tiny_backbone_dir)
    images, masks = synthetic_disc_images(2, size=32, seed=4)
    fit = {"steps": 2, "device": "cpu", "show_progress": False}
    bundle = fit_bundle(backbone, images, masks, "tedm", ["background", "disc"], levels=[1, 0], hidden=[24, 8], **fit)
    assert bundle.head.config.levels == (0, 1) and bundle.head.config.hidden == (24, 8)
    assert len(bundle.head.config.level_channels) == 2
    save_bundle(bundle, tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.head.config.levels == (0, 1) and loaded.head.config.hidden == (24, 8)
    prediction = Segmenter(loaded, device="cpu").predict(images, keep_features=True)
    assert prediction.labels.shape == masks.shape and len(prediction.features.levels) == 2
    every = fit_bundle(
        backbone, images, masks, "tedm", ["background", "disc"], steps=2, device="cpu", show_progress=False
    )
    assert every.head.config.levels is None and len(every.head.config.level_channels) == 3
    assert every.head.config.hidden == (128, 32)
    # the radiograph default (the tiny backbone is a radiograph one); 0 asks for all timesteps
    assert every.training["timesteps_per_image"] == RADIOGRAPH_TIMESTEPS_PER_IMAGE
    every_step = fit_bundle(backbone, images, masks, "tedm", ["background", "disc"], timesteps_per_image=0, **fit)
    assert every_step.training["timesteps_per_image"] is None
    with pytest.raises(SettingError, match="timesteps_per_image"):
        fit_bundle(backbone, images, masks, "tedm", ["background", "disc"], timesteps_per_image=-1, **fit)


def test_an_ensemble_fit_is_its_one_head_fits_with_spaced_seeds(tiny_backbone_dir, tmp_path):
    """TEDM on a radiograph backbone fits RADIOGRAPH_ENSEMBLE_MEMBERS heads by default; member k
    is exactly the one-head fit with seed + 100 k (so member 0 is the one-head model), and the
    members survive saving, loading and Refine."""
    from tedm_core.errors import SettingError
    from tedm_core.pipelines.fit import RADIOGRAPH_ENSEMBLE_MEMBERS, refine_bundle
    from tedm_core.pipelines.segment import Segmenter

    backbone = load_backbone(tiny_backbone_dir)
    images, masks = synthetic_disc_images(2, size=32, seed=4)
    fit = {"steps": 3, "device": "cpu", "show_progress": False, "seed": 5}
    ensemble = fit_bundle(backbone, images, masks, "tedm", ["background", "disc"], **fit)
    assert ensemble.head.config.members == RADIOGRAPH_ENSEMBLE_MEMBERS == 3
    assert ensemble.training["members"] == 3 and ensemble.training["member_seeds"] == [5, 105, 205]
    for k, seed in enumerate(ensemble.training["member_seeds"]):
        alone = fit_bundle(backbone, images, masks, "tedm", ["background", "disc"], members=1, **{**fit, "seed": seed})
        assert alone.head.config.members == 1 and alone.training["members"] == 1
        for name, tensor in alone.head.mlp.state_dict().items():
            assert torch.equal(tensor, ensemble.head.member_mlps[k].state_dict()[name]), (k, name)
    assert not torch.equal(ensemble.head.mlp.first[0].weight, ensemble.head.extra_members[0].first[0].weight)
    save_bundle(ensemble, tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.head.config.members == 3
    before = Segmenter(ensemble, device="cpu").predict(images)
    after = Segmenter(loaded, device="cpu").predict(images)
    np.testing.assert_array_equal(before.labels, after.labels)
    refined = refine_bundle(loaded, images, masks, steps=2, device="cpu", show_progress=False)
    assert refined.head.config.members == 3
    assert not torch.equal(refined.head.extra_members[1].first[0].weight, loaded.head.extra_members[1].first[0].weight)
    # other methods keep one head; the setting is checked
    ledm = fit_bundle(backbone, images, masks, "ledm", ["background", "disc"], **fit)
    assert ledm.head.config.members == 1
    with pytest.raises(SettingError, match="members"):
        fit_bundle(backbone, images, masks, "tedm", ["background", "disc"], members=0, **fit)


def test_ensemble_cost_benchmark_writes_the_first_head_alone(tiny_bundle_dir, tmp_path):
    """benchmarks/ensemble_cost.py compares a model with its first head alone: the same weights."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ensemble_cost.py"
    spec = importlib.util.spec_from_file_location("ensemble_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.write_first_head(tiny_bundle_dir, tmp_path / "first") == 3  # the radiograph default
    several, first = load_bundle(tiny_bundle_dir), load_bundle(tmp_path / "first")
    assert first.head.config.members == 1 and first.fingerprint != several.fingerprint
    for name, tensor in first.head.state_dict().items():
        assert torch.equal(tensor, several.head.state_dict()[name])
