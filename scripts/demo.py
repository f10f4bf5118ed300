#!/usr/bin/env python
"""The one-command demo: TEDM end to end on real data that ships with a PyPI package.

The MNI152 2009a T1 template and its grey/white-matter probability maps come inside the
``nilearn`` wheel (no download). The demo
  1. writes the T1 volume and tissue labels (grey matter, white matter: probability >= 0.5),
     and a copy of the T1 stored in another orientation (LPS) as the input to segment;
  2. pretrains a small DDPM on the T1's axial slices (a few minutes on 2 CPU cores);
  3. fits TEDM on 3 labelled axial slices;
  4. runs scripts/batch_segment.py on the input folder, with the held-back labels;
  5. prints Dice per tissue and where the label volume and an overlay PNG are.
Each step prints the command a user would type, then runs it.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from tedm_core.argtypes import device, positive_int
from tedm_core.choices import DEFAULT_PRESET, PRESET_NAMES

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("grey_matter", "white_matter")


def run(command: list, started: float) -> None:
    print(f"\n[{time.perf_counter() - started:5.0f} s] $ {' '.join(shlex.quote(str(c)) for c in command)}", flush=True)
    subprocess.run([str(c) for c in command], check=True)


def write_demo_data(work: Path) -> tuple:
    """T1 + tissue labels (training), and the same T1 resaved in LPS order with its labels held back."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    white = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    labels = np.zeros(grey.shape, dtype=np.uint8)
    labels[(grey >= 0.5) & (grey >= white)] = 1
    labels[(white >= 0.5) & (white > grey)] = 2
    train, held_out, to_segment = work / "train" / "images", work / "held_out_labels", work / "input"
    for folder in (train, work / "train" / "labels", held_out, to_segment):
        folder.mkdir(parents=True, exist_ok=True)
    t1_data = np.asarray(t1.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(t1_data, t1.affine), train / "mni152.nii.gz")
    nib.save(nib.Nifti1Image(labels, t1.affine), work / "train" / "labels" / "mni152.nii.gz")
    # The input to segment is stored left-right and front-back flipped (LPS+ voxel order):
    # the segmentation must still land on the right voxels.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [t1_data.shape[0] - 1, t1_data.shape[1] - 1]
    lps_affine = t1.affine @ flip
    nib.save(nib.Nifti1Image(t1_data[::-1, ::-1].copy(), lps_affine), to_segment / "mni152_lps.nii.gz")
    nib.save(nib.Nifti1Image(labels[::-1, ::-1].copy(), lps_affine), held_out / "mni152_lps.nii.gz")
    return train, to_segment, held_out


def overlay_png(image_path: Path, label_path: Path, out: Path) -> Path:
    """Middle axial slice of the input with grey matter (orange) and white matter (blue) overlaid."""
    from PIL import Image

    image = nib.as_closest_canonical(nib.load(str(image_path)))
    labels = nib.as_closest_canonical(nib.load(str(label_path)))
    k = image.shape[2] // 2 + 10
    grey = np.asarray(image.dataobj)[:, :, k].astype(np.float32)
    lab = np.asarray(labels.dataobj)[:, :, k]
    grey = np.clip(grey / np.percentile(grey, 99.5), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for value, colour in ((1, (230, 159, 0)), (2, (86, 180, 233))):
        rgb[lab == value] = 0.55 * rgb[lab == value] + 0.45 * np.array(colour)
    # RAS canonical: show with anterior up and the patient's left on the right (radiological).
    picture = np.flipud(np.transpose(rgb, (1, 0, 2)))[:, ::-1]
    Image.fromarray(picture.astype(np.uint8)).resize((picture.shape[1] * 2, picture.shape[0] * 2)).save(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", type=Path, default=Path("tedm_demo"), help="where everything is written (default: ./tedm_demo)"
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESET_NAMES)
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=300,
        help="DDPM pretraining steps (default: 300, about 6 minutes on 2 CPU cores)",
    )
    parser.add_argument("--device", type=device, default="auto")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work = args.workdir.resolve()
    print(f"TEDM demo in {work}: MNI152 T1 from nilearn, {len(CLASSES)} tissues, 3 labelled slices")
    train, to_segment, held_out = write_demo_data(work)
    tedm = [sys.executable, "-m", "tedm_core.cli"]
    backbone, bundle, output = work / "backbone", work / "bundle", work / "output"
    run(
        tedm
        + [
            "pretrain",
            "--images",
            train,
            "--out",
            backbone,
            "--preset",
            args.preset,
            "--steps",
            args.steps,
            "--intensity",
            "brain",
            "--checkpoint-every",
            max(50, args.steps // 4),
            "--shift",
            4,
            "--device",
            args.device,
            "--overwrite",
        ],
        started,
    )
    run(
        tedm
        + [
            "fit",
            "--backbone",
            backbone,
            "--images",
            train,
            "--masks",
            work / "train" / "labels",
            "--slices-per-case",
            3,
            "--classes",
            *CLASSES,
            "--out",
            bundle,
            "--device",
            args.device,
            "--overwrite",
        ],
        started,
    )
    run(
        [
            sys.executable,
            REPO / "scripts" / "batch_segment.py",
            "--model",
            bundle,
            "--input",
            to_segment,
            "--output",
            output,
            "--labels",
            held_out,
            "--uncertainty",
            "--overwrite",
            "--device",
            args.device,
        ],
        started,
    )
    segmentation = next(p for p in output.rglob("*.nii.gz") if "uncertainty" not in p.name)
    overlay = overlay_png(to_segment / "mni152_lps.nii.gz", segmentation, output / "overlay.png")
    print(f"\n[{time.perf_counter() - started:5.0f} s] done.")
    with open(output / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            print(
                f"  Dice {row.get('class', '?'):>14}: {float(row['dice']):.3f}   (precision "
                f"{float(row['precision']):.3f}, recall {float(row['recall']):.3f})"
            )
    print(
        f"  segmentation:  {segmentation}\n  uncertainty:   "
        f"{next(output.rglob('*uncertainty*'), 'n/a')}\n  overlay PNG:   {overlay}\n  model bundle:  {bundle}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
