"""Metrics: the documented empty-mask rule, agreement with MONAI's Dice, folders, real masks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import require_shared_data
from monai.metrics import compute_dice
from PIL import Image

from tedm_core.cli import main
from tedm_core.errors import InputError
from tedm_core.pipelines.evaluate import (
    compare_dice,
    dice_precision_recall,
    evaluate_folders,
    paired_wilcoxon,
    summarise,
)


def test_empty_mask_rule():
    empty, some = np.zeros((4, 4), bool), np.eye(4, dtype=bool)
    assert dice_precision_recall(empty, empty) == (1.0, 1.0, 1.0)
    assert dice_precision_recall(some, empty) == (0.0, 0.0, 0.0)
    assert dice_precision_recall(empty, some) == (0.0, 0.0, 0.0)


def test_dice_agrees_with_monai_including_empty_cases():
    rng = np.random.default_rng(0)
    for _ in range(20):
        prediction = rng.random((16, 16)) < rng.uniform(0, 0.5)
        truth = rng.random((16, 16)) < rng.uniform(0, 0.5)
        if rng.random() < 0.2:
            truth[:] = False
        ours = dice_precision_recall(prediction, truth)[0]
        theirs = compute_dice(
            torch.from_numpy(prediction)[None, None].float(),
            torch.from_numpy(truth)[None, None].float(),
            include_background=True,
            ignore_empty=False,
        )
        assert ours == pytest.approx(float(theirs), abs=1e-6)


def test_precision_and_recall():
    prediction = np.array([1, 1, 1, 0, 0], bool)
    truth = np.array([1, 0, 0, 1, 0], bool)
    dice, precision, recall = dice_precision_recall(prediction, truth)
    assert (dice, precision, recall) == pytest.approx((2 / 5, 1 / 3, 1 / 2))


def test_summary_and_paired_test():
    assert str(summarise([0.9, 0.8])) == "85.0 +- 7.1 (n=2)"  # sample SD (ddof=1); 5.0 was ddof=0
    better = np.linspace(0.8, 0.9, 12)
    assert paired_wilcoxon(better + 0.05, better) < 0.05
    assert paired_wilcoxon(better, better) == 1.0
    # A consistent difference of a few voxels in a volume is a difference (no tolerance hides it).
    tiny = better + np.linspace(3e-7, 6e-6, 12)
    p = paired_wilcoxon(tiny, better)
    assert p == pytest.approx(scipy.stats.wilcoxon(tiny, better).pvalue) and p < 0.01


def test_summaries_give_the_sample_sd_and_zero_for_one_value():
    """The field reports the sample SD (ddof=1); a single value's SD is reported as 0.0, not nan."""
    values = [0.91, 0.85, 0.78, 0.95, 0.88]
    summary = summarise(values + [float("nan")])
    assert summary.n == 5
    assert summary.std == pytest.approx(np.std(values, ddof=1))
    assert summary.std > np.std(values)  # ~11% above the population SD at n = 5
    assert summarise([0.7]).std == 0.0 and summarise([0.7]).n == 1
    assert summarise([]).n == 0


def test_the_exact_wilcoxon_cannot_reach_005_with_five_pairs_or_fewer():
    from scipy.stats import wilcoxon

    from tedm_core.pipelines.evaluate import wilcoxon_can_reach, wilcoxon_min_p

    for n in range(1, 9):
        all_better = wilcoxon(np.arange(1, n + 1) + 0.5, np.zeros(n), method="exact").pvalue
        assert wilcoxon_min_p(n) == pytest.approx(all_better)
    assert [wilcoxon_can_reach(n) for n in (1, 5, 6, 10)] == [False, False, True, True]


def test_folders_are_matched_by_name_and_extra_maps_ignored(tmp_path):
    for folder in ("pred", "truth"):
        (tmp_path / folder).mkdir()
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    for name in ("a.png", "b.png"):
        Image.fromarray(mask).save(tmp_path / "truth" / name)
    Image.fromarray(mask).save(tmp_path / "pred" / "a.png")
    Image.fromarray(mask).save(tmp_path / "pred" / "a_prob.png")
    rows = evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    assert [(r["image"], r["dice"]) for r in rows] == [("a.png", 1.0)]
    Image.fromarray(mask[:4]).save(tmp_path / "pred" / "b.png")
    with pytest.raises(InputError, match="b.png: shape"):
        evaluate_folders(tmp_path / "pred", tmp_path / "truth")


def test_two_methods_are_compared_image_by_image(tmp_path, capsys):
    truth, good, poor = (tmp_path / name for name in ("truth", "good", "poor"))
    for folder in (truth, good, poor):
        folder.mkdir()
    for i in range(8):
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4:12] = 255
        Image.fromarray(mask).save(truth / f"{i}.png")
        near = mask.copy()
        near[4, 4 + i % 3] = 0  # one pixel off
        Image.fromarray(near).save(good / f"{i}.png")
        far = mask.copy()
        far[4:6, 4 : 4 + i + 1] = 0  # more pixels off, a different number per image
        Image.fromarray(far).save(poor / f"{i}.png")
    for folder in (truth, poor):  # scored for one method only: not paired
        Image.fromarray(mask).save(folder / "only_poor.png")
    comparison = compare_dice(evaluate_folders(good, truth), evaluate_folders(poor, truth), 1)
    assert (comparison.n, comparison.better, comparison.worse) == (8, 8, 0) and comparison.p_value < 0.05
    # The CLI prints means side by side: over different image sets they would mislead, so refused.
    assert main(["evaluate", "--pred", str(good), "--truth", str(truth), "--compare", str(poor)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only_poor.png only in" in err and str(poor) in err
    (poor / "only_poor.png").unlink()
    # Both score the same 8 images, but one ground truth has no prediction: named, exit status 1.
    assert main(["evaluate", "--pred", str(good), "--truth", str(truth), "--compare", str(poor)]) == 1
    captured = capsys.readouterr()
    assert "is better on 8 of 8 images" in captured.out
    assert captured.err.strip() == "tedm evaluate: 1 ground truth without a prediction (not scored): only_poor.png"
    (truth / "only_poor.png").unlink()
    assert main(["evaluate", "--pred", str(good), "--truth", str(truth), "--compare", str(poor)]) == 0
    assert "is better on 8 of 8 images, worse on 0, paired Wilcoxon p = " in capsys.readouterr().out


def test_real_lung_masks_score_one_against_themselves():
    masks = require_shared_data("cxr", "shenzhen", "masks")
    rows = evaluate_folders(masks, masks)
    assert len(rows) == 59 and all(r["dice"] == 1.0 for r in rows)


def _mask(path, value: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = value
    Image.fromarray(mask).save(path)


def test_ground_truths_without_a_prediction_are_named_and_fail_the_run(tmp_path, capsys):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    for name in ("a.png", "b.png", "c.png"):
        _mask(truth / name)
    _mask(pred / "a.png")  # b and c failed in the batch that made these
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth)]) == 1
    captured = capsys.readouterr()
    assert "1 images scored" in captured.out and "(n=1)" in captured.out
    assert captured.err.strip() == "tedm evaluate: 2 ground truths without a prediction (not scored): b.png, c.png"


def test_predictions_mirrored_into_subfolders_are_found(tmp_path, capsys):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    _mask(truth / "site1" / "a.png")  # the ground truth mirrors the input tree, as segment does
    _mask(pred / "site1" / "a.png")
    _mask(truth / "b.png")  # a flat ground truth for a prediction in a subfolder: found by its name
    _mask(pred / "site2" / "b.png", 0)
    _mask(pred / "site2" / "b_prob.png")
    (pred / ".hidden").mkdir()
    _mask(pred / ".hidden" / "c.png")
    rows = evaluate_folders(pred, truth)
    assert [(r["image"], r["dice"]) for r in rows] == [("b.png", 0.0), ("site1/a.png", 1.0)]
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth)]) == 0
    assert "2 images scored" in capsys.readouterr().out


def test_a_name_predicted_twice_elsewhere_is_refused_as_ambiguous(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    _mask(truth / "a.png")
    _mask(pred / "site1" / "a.png")
    _mask(pred / "site2" / "a.png", 0)
    with pytest.raises(InputError, match="has 2 predictions of its name"):
        evaluate_folders(pred, truth)


def test_a_prediction_is_never_scored_against_another_patients_ground_truth(tmp_path, capsys):
    """a/x.png and b/x.png are two patients: a's prediction missing (its case failed), b's at its
    own path is b's alone; a is reported missing, not scored against b's by file name."""
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    _mask(truth / "a" / "x.png")
    _mask(truth / "b" / "x.png")
    _mask(pred / "b" / "x.png")
    assert [(r["image"], r["dice"]) for r in evaluate_folders(pred, truth)] == [("b/x.png", 1.0)]
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth)]) == 1
    assert "without a prediction (not scored): a/x.png" in capsys.readouterr().err


def test_one_prediction_for_two_ground_truths_of_its_name_is_refused_as_ambiguous(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    _mask(truth / "a" / "x.png")
    _mask(truth / "b" / "x.png")
    _mask(pred / "x.png")
    with pytest.raises(InputError, match="one prediction of its name for 2 ground truths"):
        evaluate_folders(pred, truth)


def test_predictions_inside_the_truth_folder_are_not_taken_for_ground_truth(tmp_path):
    truth = tmp_path / "truth"
    _mask(truth / "a.png")
    _mask(truth / "pred" / "a.png", 0)
    rows = evaluate_folders(truth / "pred", truth)
    assert [(r["image"], r["dice"]) for r in rows] == [("a.png", 0.0)]


def test_rows_with_the_structure_in_neither_are_counted_and_several_tests_are_adjusted(tmp_path, capsys):
    """Class 2 is in 2 of 10 images: its mean counts 8 rows of Dice 1 by the empty-mask rule, and
    the output says so; comparing two predictions over 2 structures gives the Bonferroni p too."""
    rng = np.random.default_rng(0)
    folders = {name: tmp_path / name for name in ("truth", "a", "b")}
    for folder in folders.values():
        folder.mkdir()
    for n in range(10):
        truth = np.zeros((16, 16), np.uint8)
        truth[2:8, 2:8] = 1
        if n < 2:
            truth[10:14, 10:14] = 2
        a, b = truth.copy(), truth.copy()
        a[rng.integers(0, 16), rng.integers(0, 16)] = 0
        b[2:8, 2 : 3 + n % 3] = 0  # b misses more of class 1
        for name, array in (("truth", truth), ("a", a), ("b", b)):
            Image.fromarray(array).save(folders[name] / f"img{n}.png")
    argv = ["evaluate", "--pred", str(folders["a"]), "--truth", str(folders["truth"]), "--label-values", "0", "1", "2"]
    assert main([*argv, "--compare", str(folders["b"])]) == 0
    out = capsys.readouterr().out
    assert "class 2 Dice" in out and "(8 of 10 with the structure in neither: Dice 1 by the empty-mask rule)" in out
    assert out.count("Bonferroni over 2 structures") == 2, out
    rows = evaluate_folders(folders["a"], folders["truth"], (0, 1, 2))
    assert {
        (r["truth_voxels"], r["predicted_voxels"])
        for r in rows
        if r["class"] == 2 and str(r["image"]).startswith("img5")
    } == {(0, 0)}
