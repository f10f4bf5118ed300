"""Overlap metrics and paired comparisons, as the paper reports them.

Rule for empty masks (documented in the README): when both the prediction and the ground
truth are empty, Dice, precision and recall are all 1 (nothing to find, nothing found); when
only one is empty, Dice is 0 and so is whichever of precision/recall has an empty denominator.
This matches MONAI's ``compute_dice(..., ignore_empty=False)`` for Dice.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import wilcoxon

from ..errors import InputError
from ..io.atomic import atomic_path
from ..io.images import list_images_under, read_label_image


def dice_precision_recall(prediction: np.ndarray, truth: np.ndarray) -> Tuple[float, float, float]:
    """Dice, precision and recall of two boolean masks of the same shape (the empty-mask rule above)."""
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from ground truth shape {truth.shape}")
    # Three counts over the voxels: cheaper than a confusion-matrix library call, and exact.
    tp = float(np.count_nonzero(prediction & truth))
    n_pred, n_true = float(np.count_nonzero(prediction)), float(np.count_nonzero(truth))
    if n_pred == 0 and n_true == 0:
        return 1.0, 1.0, 1.0
    dice = 2 * tp / (n_pred + n_true)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    return dice, precision, recall


def per_class_metrics(
    prediction: np.ndarray, truth: np.ndarray, class_indices: Sequence[int]
) -> Dict[int, Tuple[float, float, float]]:
    """Dice, precision, recall per foreground class index of two label maps."""
    return {k: dice_precision_recall(prediction == k, truth == k) for k in class_indices}


@dataclass
class Summary:
    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f} +- {100 * self.std:.1f} (n={self.n})"


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1, the SD papers in the field report; before session 20
    the project gave the population SD, ddof=0). For a single value the sample SD is undefined:
    it is reported as 0.0, everywhere (the n beside it says so); for no values, nan."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return float("nan")
    if array.size == 1:
        return 0.0
    return float(array.std(ddof=1))


def summarise(values: Sequence[float]) -> Summary:
    """Mean and sample SD (ddof=1; 0.0 for a single value, see :func:`sample_std`) of the values
    that are not nan, and their count."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if array.size == 0:
        return Summary(float("nan"), float("nan"), 0)
    return Summary(float(array.mean()), sample_std(array), int(array.size))


def paired_wilcoxon(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Two-sided p-value of the paired Wilcoxon signed-rank test on per-image scores."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired scores must have the same length")
    if np.array_equal(a, b):
        return 1.0  # no difference at all: scipy has no statistic to give (a tolerance would hide
        # consistent differences of a few voxels in a volume, 1e-6 of Dice)
    return float(wilcoxon(a, b).pvalue)


def wilcoxon_min_p(n: int) -> float:
    """The smallest two-sided p-value the exact paired Wilcoxon signed-rank test can give on
    ``n`` pairs: 2 / 2**n, when every difference has the same sign (1.0 for no pairs)."""
    return min(1.0, 2.0 ** (1 - n)) if n > 0 else 1.0


def wilcoxon_can_reach(n: int, alpha: float = 0.05) -> bool:
    """Whether ``n`` pairs are enough for the two-sided exact Wilcoxon test to give p < ``alpha``
    at all (at 0.05: n >= 6; with n <= 5 no difference, however consistent, is significant)."""
    return wilcoxon_min_p(n) < alpha


@dataclass
class PairedComparison:
    """Per-image Dice of two predictions of the same images: how often the first wins, and the test."""

    n: int
    better: int  # images where the first prediction's Dice is higher
    worse: int
    p_value: float  # two-sided paired Wilcoxon

    def __str__(self) -> str:
        return (
            f"better on {self.better} of {self.n} images, worse on {self.worse}, paired Wilcoxon p = {self.p_value:.2g}"
        )


def compare_dice(
    rows_a: Sequence[Dict[str, object]], rows_b: Sequence[Dict[str, object]], class_index: int
) -> PairedComparison:
    """Pair two :func:`evaluate_folders` results on the images both scored, for one class."""
    dice_b = {r["image"]: float(r["dice"]) for r in rows_b if r["class"] == class_index}
    pairs = [
        (float(r["dice"]), dice_b[r["image"]]) for r in rows_a if r["class"] == class_index and r["image"] in dice_b
    ]
    if not pairs:
        raise ValueError("the two predictions have no scored image in common")
    a, b = np.array(pairs).T
    return PairedComparison(len(pairs), int(np.sum(a > b)), int(np.sum(a < b)), paired_wilcoxon(a, b))


@dataclass
class Matched:
    """Ground truths paired with predictions: ``pairs`` of (name, prediction, truth), the name
    being the ground truth's path under its folder, and the ground truths without a prediction."""

    pairs: List[Tuple[str, Path, Path]]
    unmatched: List[str]


def match_predictions(pred_dir: Path, truth_dir: Path) -> Matched:
    """Pair each ground-truth image with its prediction: the one at the same path under
    ``pred_dir`` (``tedm segment`` mirrors the input tree), else the one image of that file name
    anywhere under it (a flat ground-truth folder for a tree of predictions, or the other way
    round). A prediction is paired once: one at another ground truth's path is that one's, and
    two predictions for one ground truth, or one for two, are refused as ambiguous (``a/x.png``
    and ``b/x.png`` are two patients: a missing one is reported, never scored against the
    other's). ``_prob``/``_uncertainty`` maps have no ground truth and are not paired. Neither
    folder's search enters the other."""
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    predictions = list_images_under(pred_dir, exclude=[truth_dir])
    truths = list_images_under(truth_dir, exclude=[pred_dir])
    by_path = {p.relative_to(pred_dir).as_posix(): p for p in predictions}
    names = {truth: truth.relative_to(truth_dir).as_posix() for truth in truths}
    taken = {by_path[name] for name in names.values() if name in by_path}
    by_name: Dict[str, List[Path]] = {}
    for p in predictions:
        if p not in taken:
            by_name.setdefault(p.name, []).append(p)
    seeking: Dict[str, List[Path]] = {}  # file name -> the ground truths with no prediction at their path
    for truth, name in names.items():
        if name not in by_path:
            seeking.setdefault(truth.name, []).append(truth)
    pairs: List[Tuple[str, Path, Path]] = []
    unmatched: List[str] = []
    for truth, name in names.items():
        prediction = by_path.get(name)
        if prediction is None:
            candidates = by_name.get(truth.name, [])
            if len(candidates) > 1:
                raise InputError(
                    truth,
                    f"has {len(candidates)} predictions of its name ({candidates[0]} and {candidates[1]}) and none at "
                    "its own path under the prediction folder; mirror the ground truth's folders, or give one folder",
                )
            rivals = seeking[truth.name]
            if candidates and len(rivals) > 1:
                raise InputError(
                    candidates[0],
                    f"is the one prediction of its name for {len(rivals)} ground truths ({rivals[0]} and {rivals[1]}), "
                    "none of which has a prediction at its own path; mirror the ground truth's folders",
                )
            prediction = candidates[0] if candidates else None
        if prediction is None:
            unmatched.append(name)
        else:
            pairs.append((name, prediction, truth))
    return Matched(pairs, unmatched)


def evaluate_folders(
    pred_dir: Path, truth_dir: Path, label_values: Sequence[int] = (0, 255), matched: Optional[Matched] = None
) -> List[Dict[str, object]]:
    """Per-image metrics of predicted vs ground-truth mask images, paired by
    :func:`match_predictions` (or ``matched``, its result).

    Only ground truths with a prediction are scored; the caller reports the others
    (``Matched.unmatched``): a mean over the rest must say so. ``label_values`` are the pixel
    values of the classes, background first; binary masks may be 0/1 or 0/255.
    """
    if matched is None:
        matched = match_predictions(pred_dir, truth_dir)
    if not matched.pairs:
        raise InputError(pred_dir, f"no prediction has a ground-truth mask of the same name in {truth_dir}")
    rows: List[Dict[str, object]] = []
    foreground = range(1, len(label_values))
    for name, prediction_path, truth_path in matched.pairs:
        truth = read_label_image(truth_path, label_values)
        prediction = read_label_image(prediction_path, label_values)
        if prediction.shape != truth.shape:
            raise InputError(prediction_path, f"shape {prediction.shape} differs from the ground truth's {truth.shape}")
        for k, (d, p, r) in per_class_metrics(prediction, truth, foreground).items():
            row = {"image": name, "class": k, "dice": d, "precision": p, "recall": r}
            rows.append({**row, **voxel_counts(prediction == k, truth == k)})
    return rows


def voxel_counts(prediction: np.ndarray, truth: np.ndarray) -> Dict[str, int]:
    """The structure's voxels in the ground truth and in the prediction: a row's Dice of 1 with
    both 0 is the empty-mask rule, not a found structure (see :func:`neither_note`)."""
    return {"truth_voxels": int(np.count_nonzero(truth)), "predicted_voxels": int(np.count_nonzero(prediction))}


def neither_note(rows: Sequence[Dict[str, object]]) -> str:
    """``" (3 of 10 with the structure in neither: Dice 1 by the empty-mask rule)"``, or "" when
    every row's ground truth or prediction holds the structure: a mean that counts such rows as 1
    says how many there are."""
    neither = sum(int(r.get("truth_voxels", 1)) == 0 and int(r.get("predicted_voxels", 1)) == 0 for r in rows)
    if not neither:
        return ""
    return f" ({neither} of {len(rows)} with the structure in neither: Dice 1 by the empty-mask rule)"


def same_images(rows_a: Sequence[Dict[str, object]], rows_b: Sequence[Dict[str, object]], pred_a, pred_b) -> None:
    """Refuse to compare two predictions unless they scored the very same images: means over
    different image sets side by side would mislead, and the paired test needs pairs."""
    a, b = {r["image"] for r in rows_a}, {r["image"] for r in rows_b}
    if a != b:
        only_a, only_b = sorted(a - b), sorted(b - a)
        example = f"{only_a[0]} only in {pred_a}" if only_a else f"{only_b[0]} only in {pred_b}"
        raise InputError(
            pred_b,
            f"scores {len(b)} images and {pred_a} scores {len(a)}; a comparison needs the same images ({example})",
        )


def write_metrics_csv(path: Path, rows: Sequence[Dict[str, object]]) -> None:
    if not rows:
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
