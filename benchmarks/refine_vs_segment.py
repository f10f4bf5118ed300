"""Refine after two corrected slices, as a fraction of a full segmentation of the same volume.

Both are measured in one run through the TEDM worker process (``tedm serve``, the process the
Slicer module talks to), so the times include the worker's overhead: sending the volume and the
corrected labels, receiving the labels. With ``--in-process`` the same
:class:`~tedm_core.pipelines.interactive.InteractiveSession` runs in this process instead.

1. a BraTS volume (all of it) is opened and segmented (Segment);
2. the two tumour slices the model got most wrong are corrected to the ground truth;
3. Refine: the corrected slices are found, the head is fine-tuned warm-started on the cached
   decoder features and re-applied to every other slice (no UNet pass).

Goal: refine <= 15 % of segment.

    python benchmarks/refine_vs_segment.py BUNDLE [--case DIR] [--device cpu] [--threads 1] [--in-process]

``BUNDLE`` is a fitted model folder whose channels are BraTS modalities (e.g. FLAIR, or FLAIR
and T1). With ``--make-timing-bundle PRESET`` a missing BUNDLE is first created from an
*untrained* backbone of that preset and a head fitted on two slices: its timings are real (the
cost does not depend on the weights), its Dice scores are meaningless.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASE = REPO.parent / "shared" / "data" / "brain" / "brats" / "Brats18_CBICA_AAB_1"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


class InProcess:
    """The session in this process, with the worker's request names."""

    def __init__(self, volume) -> None:
        from tedm_core.pipelines.interactive import InteractiveSession

        self.session = InteractiveSession(volume)

    def segment(self, bundle_path: Path, device: str):
        from tedm_core.bundle import load_bundle

        return self.session.segment(load_bundle(bundle_path), device=device).labels

    def refine(self, labels: np.ndarray, steps):
        result = self.session.refine(labels, steps=steps)
        return result.labels, result.changed_slices

    def close(self) -> None:
        self.session.close()


class ThroughWorker:
    """The session in a worker process, reached with the Slicer module's client."""

    def __init__(self, volume, threads) -> None:
        from tedm_core.serve.client import WorkerClient

        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.client = WorkerClient.start_local(python=sys.executable, env=env)
        self.client.hello()  # the worker's start (importing torch) is not part of Segment
        self.volume = volume

    def segment(self, bundle_path: Path, device: str):
        fields = {"session": "bench", "ijk_to_ras": self.volume.ijk_to_ras.tolist()}
        fields["channel_names"] = list(self.volume.channel_names)
        self.client.request("open_session", fields, {"volume": self.volume.array})
        event = self.client.request("segment", {"session": "bench", "model": str(bundle_path), "device": device})
        return event.arrays["labels"]

    def refine(self, labels: np.ndarray, steps):
        fields = {"session": "bench", **({"steps": steps} if steps else {})}
        event = self.client.request("refine", fields, {"labels": labels})
        return event.arrays["labels"], event.result["changed_slices"]

    def close(self) -> None:
        self.client.close()


def make_timing_bundle(path: Path, preset: str, case: Path, channels, device: str) -> None:
    """An untrained backbone of ``preset`` plus a head fitted on two slices (timing only)."""
    import torch

    from tedm_core.bundle import save_bundle
    from tedm_core.io.volumes import read_case, read_volume
    from tedm_core.model.backbone import PRESETS
    from tedm_core.model.checkpoint import Backbone
    from tedm_core.pipelines.fit import fit_bundle
    from tedm_core.pipelines.volume import labelled_slices_from_volumes
    from tedm_core.preprocessing.intensity import MULTIMODAL_MRI

    torch.manual_seed(0)
    backbone = Backbone.new(
        PRESETS[preset].with_(in_channels=len(channels)), intensity=MULTIMODAL_MRI, channel_names=list(channels)
    )
    image = read_case([case / f"{c}.nii.gz" for c in channels], channel_names=channels)
    truth = read_volume(case / "GT_W.nii.gz", allow_constant=True)
    areas = (truth.array[0] > 0).sum(axis=(1, 2))
    top = int(np.argmax(areas))
    pairs = labelled_slices_from_volumes(image, truth, backbone.intensity, [0, 1], axis="axial", slices=[top, top - 8])
    bundle = fit_bundle(
        backbone,
        pairs.slices,
        pairs.labels,
        "tedm",
        ["background", "tumour"],
        [0, 1],
        steps=20,
        device=device,
        show_progress=False,
    )
    save_bundle(bundle, path)
    print(f"made a timing-only bundle ({preset}, untrained backbone) at {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "bundle", type=Path, help="fitted model folder (bundle.json); channels named after BraTS files (FLAIR, T1)"
    )
    parser.add_argument(
        "--case", type=Path, default=DEFAULT_CASE, help="BraTS case folder with <channel>.nii.gz and GT_W.nii.gz"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--refine-steps", type=int, default=None, help="head fine-tuning steps (default: the core's)")
    parser.add_argument(
        "--make-timing-bundle",
        metavar="PRESET",
        choices=["tiny", "small", "paper"],
        help="create BUNDLE first if missing (untrained backbone: timing only)",
    )
    parser.add_argument(
        "--channels", nargs="+", default=None, help="channel files for --make-timing-bundle (default: FLAIR)"
    )
    parser.add_argument("--in-process", action="store_true", help="run the session here, not in a worker process")
    args = parser.parse_args(argv)

    import torch

    from tedm_core.bundle import load_bundle
    from tedm_core.io.volumes import read_case, read_volume
    from tedm_core.slicing import extract_slices, reassemble, to_slices

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.case.is_dir():
        raise SystemExit(f"{args.case}: BraTS case folder not found (the data lives in ../shared/data)")
    if not args.bundle.exists():
        if not args.make_timing_bundle:
            raise SystemExit(
                f"{args.bundle}: no such bundle (pass --make-timing-bundle PRESET to create a timing-only one)"
            )
        make_timing_bundle(args.bundle, args.make_timing_bundle, args.case, args.channels or ["FLAIR"], args.device)

    bundle = load_bundle(args.bundle)
    volume = read_case([args.case / f"{c}.nii.gz" for c in bundle.channel_names], channel_names=bundle.channel_names)
    truth_kji = (read_volume(args.case / "GT_W.nii.gz", allow_constant=True).array[0] > 0).astype(np.uint8)
    _, layout = extract_slices(volume, bundle.axis or "axial")
    print(f"case {args.case.name}: {volume.shape[::-1]} voxels (IJK), channels {bundle.channel_names}")
    print(f"model: {bundle.describe()}; {'in process' if args.in_process else 'through the worker process'}")
    runner = InProcess(volume) if args.in_process else ThroughWorker(volume, args.threads)
    try:
        load_bundle(args.bundle)  # warm the file cache: reading the model is not part of the comparison
        tic = time.perf_counter()
        labels = runner.segment(args.bundle, args.device)
        segment_seconds = time.perf_counter() - tic
        print(f"segment: {segment_seconds:.2f} s ({layout.num_slices} slices)")

        # The two tumour slices the model got most wrong, corrected to the ground truth.
        current, truth = to_slices(labels, layout), to_slices(truth_kji, layout)
        tumour = [n for n in range(len(truth)) if truth[n].any()]
        worst = sorted(sorted(tumour, key=lambda n: dice(current[n], truth[n]))[:2])
        edited = current.copy()
        edited[worst] = truth[worst]
        edited_kji = reassemble(edited.astype(np.uint8), layout)
        others = [n for n in tumour if n not in worst]
        before = dice(current[others], truth[others])

        tic = time.perf_counter()
        refined, changed = runner.refine(edited_kji, args.refine_steps)
        refine_seconds = time.perf_counter() - tic
    finally:
        runner.close()
    after_slices = to_slices(refined, layout)
    assert list(changed) == worst, (changed, worst)
    assert np.array_equal(after_slices[worst], truth[worst])
    after = dice(after_slices[others], truth[others])
    fraction = refine_seconds / segment_seconds
    print(f"refine:  {refine_seconds:.2f} s (corrected slices {worst})")
    print(f"Dice on the other tumour slices: {before:.3f} before, {after:.3f} after refine")
    print(f"refine / segment = {100 * fraction:.1f} % (goal <= 15 %) -> {'MET' if fraction <= 0.15 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
