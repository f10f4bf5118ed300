"""Does the GUI stay responsive while the worker segments a full volume, and what does the worker cost?

A real Qt event loop (PyQt5, offscreen) runs the Slicer module's worker logic exactly as the
widget does: a QTimer polls the worker client (a non-blocking read every 50 ms) while a whole
BraTS volume, read by Slicer's storage node (slicer-core), is segmented by a real worker process
and the result written into a segmentation node. A second QTimer ticks at 20 Hz and records
when it fires: the largest gap between two ticks is how long the GUI could not react
(goal <= 100 ms). At the same moment the same volume is segmented in-process: a plain
Python process (no worker, no pipes, no MRML) runs ``tedm_core.pipelines.interactive.InteractiveSession``
with the same torch threads. Both run at once, so both see the same machine load (run one after
the other, a load that comes and goes biased the ratio by +-50 % on the shared 2-core
machines); each has a core of its own when ``2 * --threads`` cores are free (with fewer, PyTorch's
spinning OpenMP threads make both many times slower: 361 s against 34 s per segmentation at
``--threads 2`` against 1 on 2 cores, session 28; the README's *Threads, and two jobs on one machine*). The worker's
overhead is the module's wall time (volume node -> worker -> segmentation node) over the
in-process time (goal <= 1.1x). The longest GUI-thread time of each of the module's steps
(reading the volume, sending, polling, writing each piece of the result) is reported too. Last, two tumour slices are
corrected through the Segment Editor's logic and Refine runs through the module and the same
worker: its wall time as a share of the Segment's (goal <= 15 %), worker overhead included.

    pip install PyQt5                      # not a dependency of tedm-core: only this benchmark needs it
    python benchmarks/gui_responsiveness.py [BUNDLE] [--case DIR] [--threads 1] [--json out.json]

Without ``BUNDLE``, a timing-only bundle is made first from an *untrained* ``small`` backbone
and a head fitted on two slices (the cost does not depend on the weights). The worker and the
in-process run use the same number of torch threads (``--threads``), and the worker's start-up
(importing torch) is reported separately: it happens once per Slicer session.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "TEDMSlicer"))
sys.path.insert(0, str(REPO / "tests"))  # slicer_helpers: the Segment Editor's logic, as a user's edit
DEFAULT_CASE = REPO.parent / "shared" / "data" / "brain" / "brats" / "Brats18_CBICA_AAB_1"
TICK_MS = 50  # 20 Hz
POLL_MS = 50  # the widget's POLL_INTERVAL_MS


def make_timing_bundle(path: Path, case: Path, threads: int) -> None:
    """An untrained ``small`` backbone plus a head fitted on two tumour slices (timing only)."""
    import torch

    from tedm_core.bundle import save_bundle
    from tedm_core.io.volumes import read_volume
    from tedm_core.model.backbone import PRESETS
    from tedm_core.model.checkpoint import Backbone
    from tedm_core.pipelines.fit import fit_bundle
    from tedm_core.pipelines.volume import labelled_slices_from_volumes
    from tedm_core.preprocessing.intensity import MULTIMODAL_MRI

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = Backbone.new(PRESETS["small"], intensity=MULTIMODAL_MRI, channel_names=["FLAIR"])
    image = read_volume(case / "FLAIR.nii.gz")
    truth = read_volume(case / "GT_W.nii.gz", allow_constant=True)
    top = int(np.argmax((truth.array[0] > 0).sum(axis=(1, 2))))
    pairs = labelled_slices_from_volumes(image, truth, backbone.intensity, [0, 1], axis="axial", slices=[top, top - 8])
    bundle = fit_bundle(
        backbone, pairs.slices, pairs.labels, "tedm", ["background", "tumour"], [0, 1], steps=20, device="cpu",
        show_progress=False,
    )  # fmt: skip
    save_bundle(bundle, path)
    print(f"made a timing-only bundle (small, untrained backbone) at {path}")


def start_in_process_run(bundle: Path, case: Path, threads: int) -> subprocess.Popen:
    """A child that imports torch and reads the volume, says ``ready``, and segments in-process
    when told ``go`` (so its clock starts with the module's)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [
        sys.executable,
        __file__,
        str(bundle),
        "--case",
        str(case),
        "--threads",
        str(threads),
        "--in-process-child",
    ]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        raise SystemExit(f"the in-process run did not start: {line!r}")
    return child


def in_process_child(bundle: Path, case: Path, threads: int) -> int:
    import torch

    from tedm_core.bundle import load_bundle
    from tedm_core.io.volumes import read_volume
    from tedm_core.pipelines.interactive import InteractiveSession

    torch.set_num_threads(threads)
    volume = read_volume(case / "FLAIR.nii.gz")
    print("ready", flush=True)
    sys.stdin.readline()
    tic = time.perf_counter()
    session = InteractiveSession(volume)
    session.segment(load_bundle(bundle), axis="axial", device="cpu")
    seconds = time.perf_counter() - tic
    session.close()
    print(json.dumps({"seconds": seconds}), flush=True)
    return 0


def segment_through_the_module(bundle: Path, case: Path, threads: int, in_process: subprocess.Popen) -> dict:
    """The module's path under a real Qt event loop: returns tick gaps and wall times."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    try:
        from PyQt5 import QtCore, QtWidgets
    except ImportError:
        raise SystemExit("this benchmark needs PyQt5: pip install PyQt5") from None
    import slicer
    from slicer_helpers import SegmentEditor

    from tedm_core.serve.client import WorkerClient
    from TEDMSlicerLib import DONE, LoggingListener, TEDMWorkerLogic, mrml_io, worker_client
    from TEDMSlicerLib.mrml_io import ensure_segmentation_converters

    ensure_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName("FLAIR")
    scene.AddNode(volume)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(case / "FLAIR.nii.gz"))
    if not storage.ReadData(volume):
        raise SystemExit(f"Slicer could not read {case / 'FLAIR.nii.gz'}")

    env = worker_client.worker_environment(worker_client.WorkerSettings())
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TEDM_THREADS=str(threads))
    log_path = Path(tempfile.gettempdir()) / "gui_responsiveness_worker.log"
    tic = time.perf_counter()
    client = WorkerClient.start_local(python=sys.executable, log_path=str(log_path), env=env)
    client.request("hello", {}, timeout=300)  # the worker is up (torch imported there, not here)
    startup = time.perf_counter() - tic

    listener = LoggingListener()
    logic = TEDMWorkerLogic(lambda: client, listener)
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    ticks = []
    tick_timer = QtCore.QTimer()
    tick_timer.setInterval(TICK_MS)
    tick_timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    poll_timer = QtCore.QTimer()
    poll_timer.setInterval(POLL_MS)

    # What the GUI thread did inside the largest gaps: our own timer callbacks (the click that
    # starts the job, each poll) and Python's garbage collections; the rest of a gap is time the
    # process waited for a CPU.
    busy: list = []  # (what, started, ended)
    gc_started = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started.append(time.perf_counter())
        elif gc_started:
            busy.append((f"gc{info.get('generation', '?')}", gc_started.pop(), time.perf_counter()))

    def poll() -> None:
        started = time.perf_counter()
        logic.poll(max_seconds=0.02, wait_seconds=0.0)  # exactly what the widget's timer calls
        busy.append(("poll", started, time.perf_counter()))
        if not logic.busy:
            app.quit()

    poll_timer.timeout.connect(poll)
    result = {}

    def start() -> None:
        in_process.stdin.write("go\n")
        in_process.stdin.flush()
        result["start"] = time.perf_counter()
        logic.begin_segment([volume], str(bundle), None, axis="axial", device="cpu")
        busy.append(("begin_segment", result["start"], time.perf_counter()))
        poll_timer.start()

    tick_timer.start()
    QtCore.QTimer.singleShot(200, start)  # some ticks before the job, as in a running application
    gc.callbacks.append(on_gc)
    app.exec_()
    end = time.perf_counter()
    gc.callbacks.remove(on_gc)
    tick_timer.stop()
    poll_timer.stop()
    gui_steps = logic.timings.report()
    in_process_seconds = json.loads(in_process.communicate()[0].strip().splitlines()[-1])["seconds"]
    segmented = listener.finished_operations[-1]
    if segmented.status != DONE:
        logic.shutdown()
        raise SystemExit(f"the worker did not segment the volume: {segmented.message}\n{segmented.details}")
    during = [t for t in ticks if t >= result["start"]]
    edges = [result["start"]] + during + [end]
    gaps = np.diff(edges) * 1000.0
    largest = []
    for n in np.argsort(gaps)[::-1][:5]:
        low, high = edges[n], edges[n + 1]
        inside: dict = {}
        for what, started, ended in busy:
            overlap = min(ended, high) - max(started, low)
            if overlap > 0:
                inside[what] = round(inside.get(what, 0.0) + 1000.0 * overlap, 1)
        at = round(low - result["start"], 2)
        largest.append({"gap_ms": round(float(gaps[n]), 1), "at_s": at, "inside_ms": inside})

    # Refine after two corrected slices, through the module and the same worker (the features of
    # the segmentation are in the worker's session): the user's correction goes through the
    # Segment Editor's logic, as its effects do.
    segmentation = segmented.segmentation_node
    truth = _ground_truth_kji(case)
    current = mrml_io.read_class_labels(segmentation, volume)
    tumour_slices = [k for k in range(truth.shape[0]) if truth[k].any()]
    wrong = sorted(tumour_slices, key=lambda k: -int((current[k] != truth[k]).sum()))[:2]
    editor = SegmentEditor(scene, segmentation, volume)
    where = np.zeros(truth.shape, dtype=bool)
    where[wrong] = True
    editor.correct(mrml_io.class_segment_ids(segmentation), current, truth, where)
    logic.begin_refine(segmentation, volume, device="cpu")
    refined = logic.wait(timeout=3600)
    logic.shutdown()
    if refined.status != DONE:
        raise SystemExit(f"the worker did not refine: {refined.message}\n{refined.details}")
    return {
        "module_seconds": end - result["start"],
        "worker_segment_seconds": segmented.worker_seconds,
        "in_process_seconds": in_process_seconds,
        "gui_steps": gui_steps,
        "refine_seconds": refined.seconds,
        "corrected_slices": refined.changed_slices,
        "worker_startup_seconds": startup,
        "max_tick_gap_ms": float(gaps.max()),
        "largest_tick_gaps": largest,
        "tick_gap_p99_ms": float(np.percentile(gaps, 99)),
        "ticks": len(during),
    }


def _ground_truth_kji(case: Path) -> np.ndarray:
    import nibabel as nib

    return (np.asarray(nib.load(str(case / "GT_W.nii.gz")).dataobj).T > 0).astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, nargs="?", help="fitted model folder; default: a timing-only bundle")
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="BraTS case folder (FLAIR.nii.gz, GT_W.nii.gz)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same in the worker and in-process")
    parser.add_argument(
        "--json", type=Path, help="write max_tick_gap_ms, worker_overhead, refine_over_segment (and the rest) here"
    )
    parser.add_argument("--in-process-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process_child:
        return in_process_child(args.bundle, args.case, args.threads)
    if not (args.case / "FLAIR.nii.gz").is_file():
        raise SystemExit(f"no BraTS case at {args.case} (../shared/data/brain/brats/<subject>)")
    bundle = args.bundle
    if bundle is None:
        bundle = Path(tempfile.mkdtemp(prefix="gui_responsiveness-")) / "timing_small"
        make_timing_bundle(bundle, args.case, args.threads)

    module = segment_through_the_module(
        bundle, args.case, args.threads, start_in_process_run(bundle, args.case, args.threads)
    )
    in_process = module["in_process_seconds"]
    overhead = module["module_seconds"] / in_process
    report = {
        "max_tick_gap_ms": round(module["max_tick_gap_ms"], 1),
        "worker_overhead": round(overhead, 3),
        "refine_over_segment": round(module["refine_seconds"] / module["module_seconds"], 3),
        "refine_seconds": round(module["refine_seconds"], 2),
        "corrected_slices": module["corrected_slices"],
        "module_seconds": round(module["module_seconds"], 2),
        "in_process_seconds": round(in_process, 2),
        "worker_segment_seconds": round(module["worker_segment_seconds"], 2),
        "gui_steps": module["gui_steps"],
        "worker_startup_seconds": round(module["worker_startup_seconds"], 2),
        "ticks_during_job": module["ticks"],
        "tick_gap_p99_ms": round(module["tick_gap_p99_ms"], 1),
        "largest_tick_gaps": module["largest_tick_gaps"],
        "threads": args.threads,
        "case": args.case.name,
        "bundle": str(bundle),
    }
    print(
        f"GUI: largest gap between 20 Hz ticks while segmenting: {report['max_tick_gap_ms']:.1f} ms "
        f"(goal <= 100 ms) over {report['ticks_during_job']} ticks"
    )
    print(
        f"Worker overhead: {report['module_seconds']:.2f} s through the module (volume node -> worker -> "
        f"segmentation node) / {report['in_process_seconds']:.2f} s in-process = {overhead:.3f}x (goal <= 1.1x); "
        f"worker start-up {report['worker_startup_seconds']:.1f} s, once per session; the segmentation itself "
        f"took {report['worker_segment_seconds']:.2f} s in the worker"
    )
    for gap in report["largest_tick_gaps"]:
        print(f"  gap of {gap['gap_ms']:.1f} ms at {gap['at_s']:.2f} s, of which the GUI thread ran {gap['inside_ms']}")
    for name, step in report["gui_steps"].items():
        print(f"  GUI thread, {name}: longest {step['longest_ms']:.1f} ms, {step['total_ms']:.0f} ms in all")
    print(
        f"Refine after correcting slices {report['corrected_slices']}: {report['refine_seconds']:.2f} s = "
        f"{report['refine_over_segment']:.1%} of the Segment (goal <= 15 %), both through the module and the worker"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
