"""scripts/experiments/compare_units.py: seeds averaged per image, images paired, a missing unit named."""

from __future__ import annotations

import csv
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "experiments" / "compare_units.py"


def _unit(folder, rows):
    (folder / "metrics").mkdir(parents=True)
    with (folder / "metrics" / "val.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "post", "dice", "precision", "recall"])
        writer.writeheader()
        for image, dice in rows.items():
            writer.writerow({"image": image, "post": "none", "dice": dice, "precision": dice, "recall": 1.0})
            writer.writerow({"image": image, "post": "largest2_fill", "dice": 0.0, "precision": 0.0, "recall": 0.0})
    return folder


def test_seeds_are_averaged_per_image_and_only_shared_images_are_compared(tmp_path):
    a = [_unit(tmp_path / "a0", {"x": 0.80, "y": 0.90, "z": 0.5}), _unit(tmp_path / "a1", {"x": 0.90, "y": 0.90})]
    b = [_unit(tmp_path / "b0", {"x": 0.95, "y": 0.70, "z": 0.9})]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--a", *map(str, a), "--b", *map(str, b), "--sets", "val"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    row = done.stdout.strip().splitlines()[-1].split("|")
    # A: x = 0.85, y = 0.90 (z is missing from one seed); B: x = 0.95, y = 0.70
    assert [c.strip() for c in row[1:5]] == ["val", "2", "87.50", "82.50"]
    assert row[7].strip() == "1 of 2" and row[8].strip() == "87.5 / 82.5"


def test_a_unit_without_the_sets_metrics_is_named(tmp_path):
    a = _unit(tmp_path / "a0", {"x": 0.8})
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--a", str(a), "--b", str(tmp_path / "missing"), "--sets", "val"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "missing/metrics/val.csv" in done.stderr and "Traceback" not in done.stderr


def test_a_side_can_read_the_units_ablation_scores(tmp_path):
    """``--b-timesteps 1`` compares the same units on step 1 alone (the study's ``SET_t1.csv``)."""
    unit = _unit(tmp_path / "u0", {"x": 0.80, "y": 0.90})
    with (unit / "metrics" / "val_t1.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "post", "dice", "precision", "recall"])
        writer.writeheader()
        writer.writerows(
            {"image": i, "post": "none", "dice": d, "precision": d, "recall": 1.0}
            for i, d in (("x", 0.90), ("y", 0.95))
        )
    argv = ["--a", str(unit), "--b", str(unit), "--b-timesteps", "1", "--sets", "val"]
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    row = done.stdout.strip().splitlines()[-1].split("|")
    assert [c.strip() for c in row[1:6]] == ["val", "2", "85.00", "92.50", "+7.50"]
