"""Render docs/images/TEDMSlicer-screenshot.png from the module's own output.

Everything the picture shows is made the way a user makes it, with the module's logic on real
MRML (slicer-core) and a real TEDM worker process: the MNI152 2009a T1 template (it ships in the
``nilearn`` wheel) is a volume node; a user paints grey and white matter on 3 axial slices
through the Segment Editor's logic; the worker pretrains a small backbone on the volume and
*Fit from labelled slices* segments every other slice into the segmentation node; *Next
uncertain slice* picks the slice shown. The segmentation is exported by Slicer's own
segmentation logic and drawn with matplotlib in the three views (no Slicer GUI is needed).

    python docs/images/make_tedmslicer_screenshot.py [--steps 40] [--fit-steps 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "TEDMSlicer"))
sys.path.insert(0, str(REPO / "tests"))
OUT = Path(__file__).resolve().parent / "TEDMSlicer-screenshot.png"
CLASSES = [("grey matter", (0.90, 0.62, 0.0)), ("white matter", (0.34, 0.71, 0.91))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="backbone pretraining steps in the worker")
    parser.add_argument("--fit-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import slicer
    from nilearn import datasets
    from slicer_helpers import SegmentEditor, export_labelmap, load_volume_node, new_segmentation

    from tedm_core.serve.client import WorkerClient
    from TEDMSlicerLib import DONE, TEDMWorkerLogic, mrml_io, worker_client

    work = Path(tempfile.mkdtemp(prefix="tedmslicer-screenshot-"))
    t1 = datasets.load_mni152_template(resolution=1)
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    white = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    truth = np.zeros(grey.shape, dtype=np.uint8)
    truth[(grey >= 0.5) & (grey >= white)] = 1
    truth[(white >= 0.5) & (white > grey)] = 2
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32), t1.affine), work / "mni152_t1.nii.gz")
    truth_kji = truth.T  # nibabel (i, j, k) -> Slicer's (k, j, i)

    scene = slicer.vtkMRMLScene()
    volume = load_volume_node(scene, work / "mni152_t1.nii.gz", "MNI152 T1")
    segmentation, ids = new_segmentation(scene, CLASSES, name="MNI152 T1 TEDM")
    editor = SegmentEditor(scene, segmentation, volume)
    areas = (truth_kji > 0).sum(axis=(1, 2))
    middle = int(np.argmax(areas))
    labelled = [middle - 25, middle, middle + 25]
    for index, segment_id in enumerate(ids, start=1):
        painted = np.zeros(truth_kji.shape, dtype=bool)
        painted[labelled] = truth_kji[labelled] == index
        editor.add(segment_id, painted)

    env = worker_client.worker_environment(worker_client.WorkerSettings())
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    logic = TEDMWorkerLogic(lambda: WorkerClient.start_local(python=sys.executable, env=env))
    started = time.perf_counter()
    try:
        logic.begin_pretrain([volume], str(work / "backbone"), preset="small", steps=args.steps, axis="axial")
        pretrained = logic.wait(timeout=7200)
        assert pretrained.status == DONE, pretrained.message + pretrained.details
        print(f"pretrained in {pretrained.seconds:.0f} s")
        logic.begin_fit([volume], pretrained.saved_path, segmentation, axis="axial", device="cpu", steps=args.fit_steps)
        fitted = logic.wait(timeout=7200)
        assert fitted.status == DONE, fitted.message + fitted.details
        print(fitted.message)
        logic.begin_next_uncertain_slice(segmentation)
        uncertain = logic.wait(timeout=600).uncertain_slice
    finally:
        logic.shutdown()
    total = time.perf_counter() - started

    labels, ijk_to_ras = export_labelmap(scene, segmentation, volume)
    image = mrml_io.array_from_volume_node(volume).astype(np.float32)
    # The views cross at an unlabelled axial slice between two labelled ones (what Fit had to
    # segment), at the middle of the brain; the next uncertain slice is named below.
    shown = labelled[1] + 12
    ijk = np.argwhere(truth_kji[shown] > 0).mean(axis=0)  # (j, i) centre of the brain in that slice
    centre = np.array([int(ijk[1]), int(ijk[0]), shown])  # (i, j, k)
    dice = {}
    for index, (name, _) in enumerate(CLASSES, start=1):
        others = [k for k in range(labels.shape[0]) if k not in labelled]
        a, b = labels[others] == index, truth_kji[others] == index
        dice[name] = 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())

    # The template's voxel axes run towards R, A, S: flipping both in-plane axes shows every view
    # as Slicer does (superior/anterior up, the patient's right on the left of axial and coronal).
    views = [
        (f"Axial (slice {shown}: segmented, not labelled)", image[centre[2]], labels[centre[2]]),
        ("Coronal", image[:, centre[1], :], labels[:, centre[1], :]),
        ("Sagittal", image[:, :, centre[0]], labels[:, :, centre[0]]),
    ]
    colours = {index: np.array(colour) for index, (_, colour) in enumerate(CLASSES, start=1)}
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.6), dpi=100, facecolor="black")
    high = np.percentile(image, 99.5)
    for axis, (title, slice_image, slice_labels) in zip(axes, views):
        grey_rgb = np.repeat(np.clip(slice_image / high, 0, 1)[..., None], 3, axis=2)
        for index, colour in colours.items():
            mask = slice_labels == index
            grey_rgb[mask] = 0.5 * grey_rgb[mask] + 0.5 * colour
        axis.imshow(grey_rgb[::-1, ::-1], interpolation="nearest")
        axis.set_title(title, color="white", fontsize=10)
        axis.axis("off")
    legend = "    ".join(
        f"{name}: Dice {dice[name]:.2f} (SCT {mrml_io.terminology.term_for(name).type[1]})" for name, _ in CLASSES
    )
    figure.suptitle(
        "TEDM Segmentation in 3D Slicer: Fit from 3 labelled axial slices of the MNI152 2009a T1 (worker process, CPU)",
        color="white",
        fontsize=11,
    )
    figure.text(
        0.5,
        0.04,
        f"{legend}    |    next uncertain slice: {uncertain.index}    |    worker: {total / 60:.0f} min in all",
        color="white",
        ha="center",
        fontsize=9,
    )
    figure.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.1, wspace=0.02)
    figure.savefig(args.out, facecolor="black")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
