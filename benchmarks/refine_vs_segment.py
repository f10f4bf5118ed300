"""Refine after two corrected slices, as a fraction of a full segmentation of the same volume.

Both are measured in one run, through the Slicer module's logic on real MRML (slicer-core):

1. a BraTS volume (all of it) is read by Slicer's storage node and segmented (Segment);
2. the two tumour slices the model got most wrong are corrected to the ground truth through
   ``vtkSlicerSegmentEditorLogic`` (what the Segment Editor's effects call);
3. Refine: the corrected slices are found, the head is fine-tuned warm-started on the cached
   decoder features and re-applied to every other slice (no UNet pass), and the result is
   written back.

Goal: refine <= 15 % of segment. Wall times include reading and writing MRML.

    python benchmarks/refine_vs_segment.py BUNDLE [--case DIR] [--device cpu] [--threads 2]

``BUNDLE`` is a fitted model folder whose channels are BraTS modalities (e.g. FLAIR, or FLAIR
and T1). With ``--make-timing-bundle PRESET`` a missing BUNDLE is first created from an
*untrained* backbone of that preset and a head fitted on two slices: its timings are real (the
cost does not depend on the weights), its Dice scores are meaningless.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

from tedm_core.choices import PRESET_NAMES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "TEDMSlicer"))
DEFAULT_CASE = REPO.parent / "shared" / "data" / "brain" / "brats" / "Brats18_CBICA_AAB_1"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def load_volume(scene, path: Path, name: str):
    import slicer

    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise SystemExit(f"Slicer could not read {path}")
    return node


class PhaseClock:
    """Callbacks that note when each phase (first word of the progress message) starts and ends."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases = {}

    def progress(self, fraction: float, message: str = "") -> None:
        phase = re.split(r"\s\d", message, maxsplit=1)[0]  # "refine step 3/100, loss ..." -> "refine step"
        now = time.perf_counter() - self.start
        first, _last = self.phases.get(phase, (now, now))
        self.phases[phase] = (first, now)

    def log(self, message: str) -> None:
        pass

    def cancelled(self) -> bool:
        return False

    def describe(self, total: float) -> str:
        parts = [f"{name} {last - first:.2f} s" for name, (first, last) in self.phases.items() if last > first]
        return (
            "; ".join(parts) + f"; the rest (MRML read/write, diff, setup) "
            f"{total - sum(last - first for first, last in self.phases.values()):.2f} s"
        )


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
    parser.add_argument(
        "--refine-steps", type=int, default=None, help="head fine-tuning steps (default: the backend's)"
    )
    parser.add_argument(
        "--make-timing-bundle",
        metavar="PRESET",
        choices=PRESET_NAMES,
        help="create BUNDLE first if missing (untrained backbone: timing only)",
    )
    parser.add_argument(
        "--channels", nargs="+", default=None, help="channel files for --make-timing-bundle (default: FLAIR)"
    )
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import slicer

    from TEDMSlicerLib import TEDMSlicerCoreLogic, mrml_io

    if not args.case.is_dir():
        raise SystemExit(f"{args.case}: BraTS case folder not found (the data lives in ../shared/data)")
    if not args.bundle.exists():
        if not args.make_timing_bundle:
            raise SystemExit(
                f"{args.bundle}: no such bundle (pass --make-timing-bundle PRESET to create a timing-only one)"
            )
        make_timing_bundle(args.bundle, args.make_timing_bundle, args.case, args.channels or ["FLAIR"], args.device)

    logic = TEDMSlicerCoreLogic()
    bundle = logic.load_model(str(args.bundle))
    scene = slicer.vtkMRMLScene()
    volumes = [load_volume(scene, args.case / f"{channel}.nii.gz", channel) for channel in bundle.channel_names]
    truth = load_volume(scene, args.case / "GT_W.nii.gz", "truth")
    truth_kji = (mrml_io.array_from_volume_node(truth) > 0).astype(np.uint8)
    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    segmentation.CreateDefaultDisplayNodes()
    shape = mrml_io.array_from_volume_node(volumes[0]).shape
    print(
        f"case {args.case.name}: {shape[::-1]} voxels (IJK), channels {bundle.channel_names}; "
        f"model: {bundle.describe()}"
    )

    # 1. Segment (warm-up: load the model first so that loading is not counted).
    segment_clock = PhaseClock()
    tic = time.perf_counter()
    segmented = logic.segment(
        volumes, str(args.bundle), segmentation, axis="auto", device=args.device, callbacks=segment_clock
    )
    segment_seconds = time.perf_counter() - tic
    session = segmented.session
    cache = session.features.nbytes / 2**20 if session.features is not None else 0.0
    print(
        f"segment: {segment_seconds:.2f} s ({session.layout.num_slices} {session.axis} slices; feature "
        f"cache {cache:.0f} MiB)"
    )
    print(f"  phases: {segment_clock.describe(segment_seconds)}")

    # 2. Correct the two tumour slices the model got most wrong, through the Segment Editor logic.
    current = mrml_io.read_class_labels(segmentation, volumes[0])
    to_slices = lambda array: np.ascontiguousarray(logic.backend.slice_arrays(array, session.layout))  # noqa: E731
    current_slices, truth_slices = to_slices(current), to_slices(truth_kji)
    tumour = [n for n in range(len(truth_slices)) if truth_slices[n].any()]
    worst = sorted(tumour, key=lambda n: dice(current_slices[n], truth_slices[n]))[:2]
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor_node = slicer.vtkMRMLSegmentEditorNode()
    scene.AddNode(editor_node)
    editor.SetSegmentEditorNode(editor_node)
    editor.SetSegmentationNode(segmentation)
    editor.SetSourceVolumeNode(volumes[0])
    segment_id = session.segment_ids[0]
    where = np.zeros(len(truth_slices), dtype=bool)
    where[worst] = True
    where_kji = (
        logic.backend.reassemble(
            np.broadcast_to(where[:, None, None], truth_slices.shape).astype(np.uint8), session.layout
        )
        > 0
    )
    ijk_to_ras = mrml_io.ijk_to_ras_of(volumes[0])
    for mask, mode in (
        (where_kji & (current > 0) & (truth_kji == 0), editor.ModificationModeRemove),
        (where_kji & (truth_kji > 0) & (current == 0), editor.ModificationModeAdd),
    ):
        if mask.any():
            editor.ModifySegmentByLabelmap(
                segmentation, segment_id, mrml_io.oriented_image_from_array(mask, ijk_to_ras), mode, False, True
            )
    others = [n for n in tumour if n not in worst]
    before = dice(current_slices[others], truth_slices[others])

    # 3. Refine.
    refine_clock = PhaseClock()
    tic = time.perf_counter()
    refined = logic.refine(
        segmentation, volumes[0], steps=args.refine_steps, device=args.device, callbacks=refine_clock
    )
    refine_seconds = time.perf_counter() - tic
    after_slices = to_slices(mrml_io.read_class_labels(segmentation, volumes[0]))
    after = dice(after_slices[others], truth_slices[others])
    assert refined.changed_slices == sorted(worst), (refined.changed_slices, worst)
    assert np.array_equal(after_slices[worst], truth_slices[worst])

    fraction = refine_seconds / segment_seconds
    print(
        f"refine:  {refine_seconds:.2f} s (corrected slices {sorted(worst)}; "
        f"trained on {refined.session.training_slices})"
    )
    print(f"  phases: {refine_clock.describe(refine_seconds)}")
    print(f"Dice on the other tumour slices: {before:.3f} before, {after:.3f} after refine")
    print(f"refine / segment = {100 * fraction:.1f} % (goal <= 15 %) -> {'MET' if fraction <= 0.15 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
