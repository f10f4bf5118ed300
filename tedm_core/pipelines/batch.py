"""Headless batch segmentation of a cohort: discover cases, segment each, write mirrored outputs.

The one writer of segmentation outputs, behind ``tedm segment`` and ``scripts/batch_segment.py``
alike (the conventions are in the README's "Output files"). Guarantees:

* before any case: the output folder is checked apart from every input (images, labels, model)
  and writable, no two inputs would write one file, and the folder's provenance record
  (``.tedm_outputs.json``) has an entry saying this model and these settings made each of this
  run's outputs already there, else the run is refused (unless ``overwrite``);

* one failing case never stops the others; its one-line error goes to ``summary.csv``;
* every output is written atomically (temporary file, then rename), the label file last, and
  the case's entry says ``done`` only after it: after a crash (even ``kill -9``) a rerun skips
  finished cases and redoes the rest, and the outputs equal those of an uninterrupted run;
* ``--shard K/N`` splits the sorted case list round-robin, so N job-array nodes sharing one
  output folder each take a disjoint, deterministic subset.

What a case is: see :mod:`tedm_core.io.cases`.
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..errors import InputError, SettingError
from ..io.atomic import remove_stale_temporaries, write_text_atomic
from ..io.cases import (
    Case,
    discover_cases,
    find_label_file,
    refuse_another_label_file,
    single_file_cases_per_folder,
    without_label_files,
)
from ..io.images import IMAGE_SUFFIXES, is_image_file, read_label_image
from ..io.outputs import OutputRecord, check_writable_folder, refuse_output_outside, refuse_overlap
from ..io.volumes import (
    Volume,
    geometry_mismatch,
    read_case,
    read_volume,
    volume_suffix,
    write_float_volume,
    write_label_volume,
)
from .volume import label_array_to_classes, segment_volume

if TYPE_CHECKING:
    from .evaluate import Summary

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 30.0
# Bumped when what an output file holds changes (values, scaling, names): outputs of another
# convention are never taken for this one's.
OUTPUT_CONVENTION = 1
# A write that fails for one of these reasons fails every case after it too: the batch stops.
FATAL_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


@dataclass
class CaseResult:
    case_id: str
    status: str  # ok, exists, failed
    seconds: float = 0.0
    slices: int = 0
    slices_segmented: int = 0
    voxels: List[int] = field(default_factory=list)
    error: str = ""
    metrics: List[Dict[str, object]] = field(default_factory=list)
    # With ground truth: scored, missing (no file) or unusable (unreadable, another grid ...).
    truth: str = ""


@dataclass
class BatchOptions:
    overwrite: bool = False
    uncertainty: bool = False
    probabilities: bool = False
    labels_dir: Optional[Path] = None
    label_name: Optional[str] = None
    include: Optional[str] = None
    shard: Tuple[int, int] = (1, 1)
    require_3d: bool = False
    axis: Optional[str] = None
    show_progress: bool = True


def check_output_folder(
    input_dir: Path, output_dir: Path, labels_dir: Optional[Path] = None, model_dir: Optional[Path] = None
) -> None:
    """Refuse an output folder that overlaps the input, labels or model folder, is a file, or
    cannot be written: found before the model is loaded (see :mod:`tedm_core.io.outputs`)."""
    for what, folder in (("input", input_dir), ("labels", labels_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(folder, f"{what} folder not found" if not Path(folder).exists() else "is not a folder")
    refuse_overlap(output_dir, [("input", input_dir), ("labels", labels_dir), ("model", model_dir)])
    check_writable_folder(output_dir)  # (created when the first file is written)


def parse_shard(text: str) -> Tuple[int, int]:
    """``"K/N"`` (1-based K) -> (K, N)."""
    try:
        k, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise SettingError("shard", f"{text!r}: expected K/N, e.g. 1/4 (K counts from 1)") from None
    if not (n >= 1 and 1 <= k <= n):
        raise SettingError("shard", f"{text!r}: K must be within 1..N")
    return k, n


def select_shard(cases: Sequence[Case], shard: Tuple[int, int]) -> List[Case]:
    k, n = shard
    return [case for i, case in enumerate(sorted(cases, key=lambda c: c.case_id)) if i % n == k - 1]


def _one_line(case: Case, error: BaseException) -> str:
    if isinstance(error, InputError):
        return str(error)
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{case.inputs[0] if case.inputs else case.case_id}: {type(error).__name__}: {text}"[:500]


class _OutputFailure(Exception):
    """Writing failed for a reason every later case would share (disk full, read-only): stop."""

    def __init__(self, error: InputError) -> None:
        super().__init__(str(error))
        self.error = error


def file_label_values(output: Path, bundle) -> List[int]:
    """The value each class gets in a label file: the bundle's label values, except that a one-
    structure model writes 0/255 into 2D image formats, the masks' own convention (and visible
    in any viewer); ``label_array_to_classes`` reads any non-zero value back as the structure."""
    if volume_suffix(output) in IMAGE_SUFFIXES and len(bundle.class_names) == 2:
        return [0, 255]
    return list(bundle.label_values)


class BatchRunner:
    """Segments cases one after another with one loaded :class:`Segmenter`."""

    def __init__(self, segmenter, options: BatchOptions, record: Optional[OutputRecord] = None) -> None:
        self.segmenter = segmenter
        self.bundle = segmenter.bundle
        self.options = options
        self.record = record
        # Label files of the cases the record vouches for as this model's, complete (see claim).
        self.done: Set[Path] = set()
        self.cases_per_folder: Dict[str, int] = {}  # of the whole cohort, shards included (find_label_file)

    def claim(self, cases: Sequence[Case]) -> None:
        """Check the output folder's record against this run's cases, before any work."""
        if self.record is not None:
            usable = [(case.output, self.outputs_of(case)) for case in cases if not case.problem and self._inside(case)]
            self.done = self.record.claim(usable, self.options.overwrite)

    def _inside(self, case: Case, refuse: bool = False) -> bool:
        """Whether every output of ``case`` lands inside the output folder (no link leads it out);
        with ``refuse``, an :class:`InputError` naming the one that does not."""
        if self.record is None:
            return True
        try:
            for output in self.outputs_of(case):
                refuse_output_outside(output, self.record.folder)
        except InputError:
            if refuse:
                raise
            return False
        return True

    def outputs_of(self, case: Case) -> List[Path]:
        """Every file this case writes, the label file last (its presence marks the case done)."""
        maps = case.probability_outputs(self.bundle.class_names) if self.options.probabilities else []
        if self.options.uncertainty:
            maps.append(case.uncertainty_output())
        return [*maps, case.output]

    def run_case(self, case: Case, slice_bar: Optional[tqdm] = None) -> CaseResult:
        tic = time.perf_counter()
        try:
            if case.problem:
                raise InputError(
                    case.inputs[0].parent
                    if case.is_folder and case.inputs
                    else (case.inputs[0] if case.inputs else case.case_id),
                    case.problem,
                )
            self._inside(case, refuse=True)
            if case.output in self.done:
                result = self._existing(case)
            else:
                result = self._segment(case, slice_bar)
        except _OutputFailure:
            raise
        except Exception as error:  # one case's failure, whatever it is, must not stop the batch
            log.debug("case %s failed", case.case_id, exc_info=True)
            result = CaseResult(case.case_id, "failed", error=_one_line(case, error))
        if self.options.labels_dir is not None and result.status != "failed":
            # A missing or mismatched ground truth spoils the metrics, not the segmentation: the
            # case keeps its status, and the reason goes to the summary, the console and the exit
            # status (a mean over the other cases must not pass for the cohort's).
            label_path = find_label_file(case, self.options.labels_dir, self.options.label_name, self.cases_per_folder)
            if label_path is None:
                result.truth = "missing"
                result.error = f"not scored: {self._no_truth(case)}"
            else:
                try:
                    refuse_another_label_file(case, self.options.labels_dir, label_path)
                    result.metrics = self._metrics(case, label_path)
                    result.truth = "scored"
                except Exception as error:
                    result.truth = "unusable"
                    result.error = f"not scored: {_one_line(case, error)}"
        result.seconds = round(time.perf_counter() - tic, 2)
        return result

    def _read(self, case: Case) -> Volume:
        names = self.bundle.channel_names
        channel_names = names if len(names) == len(case.inputs) else None
        require_3d = self.options.require_3d or len(names) > 1
        return read_case(case.inputs, channel_names=channel_names, require_3d=require_3d)

    def _segment(self, case: Case, slice_bar: Optional[tqdm]) -> CaseResult:
        volume = self._read(case)
        for output in self.outputs_of(case):
            remove_stale_temporaries(output)

        def progress(done: int, total: int) -> None:
            if slice_bar is not None:
                slice_bar.total = total
                slice_bar.n = done
                slice_bar.refresh()

        if slice_bar is not None:
            slice_bar.reset()
            slice_bar.set_description(case.case_id[-40:])
        seg = segment_volume(
            self.segmenter,
            volume,
            axis=self.options.axis,
            progress=progress,
            keep_probabilities=self.options.probabilities,
        )
        outputs = self.outputs_of(case)
        try:
            if self.options.probabilities:
                for k, path in enumerate(case.probability_outputs(self.bundle.class_names), start=1):
                    write_float_volume(path, seg.probabilities[k], volume)
            if self.options.uncertainty:
                write_float_volume(case.uncertainty_output(), seg.uncertainty, volume)
            # The label file last: its presence marks the case complete.
            write_label_volume(case.output, seg.label_values(file_label_values(case.output, self.bundle)), volume)
            if self.record is not None:
                self.record.done(case.output, outputs)
        except OSError as error:
            if error.errno in FATAL_WRITE_ERRNOS and self._shared_by_every_case(error, case.output):
                raise _OutputFailure(InputError(error.filename or case.output, error.strerror or str(error))) from None
            # Named by the output, not by the temporary file the refusal hit.
            raise InputError(case.output, f"cannot be written ({error.strerror or error})") from None
        return CaseResult(
            case.case_id,
            "ok",
            slices=seg.layout.num_slices,
            slices_segmented=seg.slices_run,
            voxels=seg.voxels_per_class(len(self.bundle.class_names)),
        )

    def _shared_by_every_case(self, error: OSError, output: Path) -> bool:
        """Whether a refused write would refuse every later case too: a full disk or quota
        does; no permission (or a read-only mount) does in the output folder itself (refused
        there, or found unwritable now), not in one mirrored subfolder."""
        if error.errno in (errno.ENOSPC, errno.EDQUOT) or self.record is None:
            return True
        if Path(output).parent == self.record.folder:
            return True
        try:
            check_writable_folder(self.record.folder)
        except InputError:
            return True
        return False

    def _existing(self, case: Case) -> CaseResult:
        output = read_volume(case.output, allow_constant=True)
        classes = label_array_to_classes(output, self.bundle.label_values)
        voxels = np.bincount(classes.ravel(), minlength=len(self.bundle.class_names))[
            : len(self.bundle.class_names)
        ].tolist()
        return CaseResult(case.case_id, "exists", voxels=voxels)

    def _no_truth(self, case: Case) -> str:
        name = self.options.label_name
        looked = f"{case.case_id}.<suffix>" + (f" and {case.case_id}/{name}" if name else "")
        return f"{self.options.labels_dir}: no ground truth for case {case.case_id} (looked for {looked})"

    def _metrics(self, case: Case, label_path: Path) -> List[Dict[str, object]]:
        from .evaluate import dice_precision_recall, voxel_counts

        prediction_volume = read_volume(case.output, allow_constant=True)
        prediction = label_array_to_classes(prediction_volume, self.bundle.label_values)
        if is_image_file(label_path):
            # The masks' reader, as `tedm fit` and `tedm evaluate` use: a mask in the alpha
            # channel, a colour image or a JPEG is refused, not read as grey (an empty truth).
            truth = read_label_image(label_path, self.bundle.label_values)[None]
            if prediction_volume.source_format != "image2d" or truth.shape != prediction.shape:
                raise InputError(
                    label_path,
                    f"ground truth of {truth.shape[2]}x{truth.shape[1]} pixels does not match the case's grid "
                    f"{tuple(prediction_volume.shape[::-1])}",
                )
        else:
            truth_volume = read_volume(label_path, allow_constant=True)
            problem = geometry_mismatch(prediction_volume, truth_volume)
            if problem:
                raise InputError(label_path, f"ground truth does not match the case's grid: {problem}")
            truth = label_array_to_classes(truth_volume, self.bundle.label_values)
        rows = []
        for k, name in enumerate(self.bundle.class_names[1:], start=1):
            dice, precision, recall = dice_precision_recall(prediction == k, truth == k)
            rows.append(
                {
                    "case": case.case_id,
                    "class": name,
                    "dice": round(dice, 6),
                    "precision": round(precision, 6),
                    "recall": round(recall, 6),
                    **voxel_counts(prediction == k, truth == k),
                    "label_file": str(label_path),
                }
            )
        return rows


def summary_name(shard: Tuple[int, int], stem: str) -> str:
    return f"{stem}.csv" if shard[1] == 1 else f"{stem}.shard{shard[0]}of{shard[1]}.csv"


def _csv_text(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_summary(
    path: Path, results: Sequence[CaseResult], class_names: Sequence[str], with_truth: bool = False
) -> None:
    """One row per case; ``with_truth`` adds ``ground_truth`` (scored, missing, unusable, or
    empty for a failed case)."""
    voxel_columns = [f"voxels_{name}" for name in class_names]
    truth_columns = ["ground_truth"] if with_truth else []
    rows = []
    for r in results:
        row: Dict[str, object] = {
            "case": r.case_id,
            "status": r.status,
            "seconds": r.seconds,
            "slices": r.slices,
            "slices_segmented": r.slices_segmented,
        }
        row.update({c: (r.voxels[i] if i < len(r.voxels) else "") for i, c in enumerate(voxel_columns)})
        if with_truth:
            row["ground_truth"] = r.truth
        row["error"] = r.error
        rows.append(row)
    columns = ["case", "status", "seconds", "slices", "slices_segmented", *voxel_columns, *truth_columns, "error"]
    write_text_atomic(path, _csv_text(rows, columns))


def write_metrics(path: Path, results: Sequence[CaseResult]) -> None:
    rows = [row for r in results for row in r.metrics]
    write_text_atomic(
        path,
        _csv_text(
            rows, ["case", "class", "dice", "precision", "recall", "truth_voxels", "predicted_voxels", "label_file"]
        ),
    )


@dataclass
class BatchReport:
    results: List[CaseResult]
    summary_path: Path
    metrics_path: Optional[Path]

    @property
    def failed(self) -> List[CaseResult]:
        return [r for r in self.results if r.status == "failed"]

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    @property
    def unscored(self) -> List[CaseResult]:
        """Cases segmented (or found done) whose ground truth is missing or unusable."""
        return [r for r in self.results if r.truth in ("missing", "unusable")]

    def mean_dice(self) -> Dict[str, float]:
        return {name: summary.mean for name, summary in self.dice_summaries().items()}

    def metric_rows_by_class(self) -> Dict[str, List[Dict[str, object]]]:
        per_class: Dict[str, List[Dict[str, object]]] = {}
        for r in self.results:
            for row in r.metrics:
                per_class.setdefault(str(row["class"]), []).append(row)
        return per_class

    def dice_summaries(self) -> Dict[str, Summary]:
        from .evaluate import summarise

        return {
            name: summarise([float(row["dice"]) for row in rows]) for name, rows in self.metric_rows_by_class().items()
        }

    def dice_line(self) -> str:
        """``mean Dice over K of N cases (M without ground truth, F failed): lung 91.2 +- 3.4``: a
        mean says over which cases it is taken (README "Conventions": mean +- std x 100)."""
        scored = sum(r.truth == "scored" for r in self.results)
        parts = [
            f"{n} {what}"
            for n, what in (
                (sum(r.truth == "missing" for r in self.results), "without ground truth"),
                (sum(r.truth == "unusable" for r in self.results), "with unusable ground truth"),
                (len(self.failed), "failed"),
            )
            if n
        ]
        head = f"mean Dice over {scored} of {len(self.results)} cases" + (f" ({', '.join(parts)})" if parts else "")
        from .evaluate import neither_note

        rows = self.metric_rows_by_class()
        values = ", ".join(
            f"{name} {100 * s.mean:.1f} +- {100 * s.std:.1f}{neither_note(rows.get(name, []))}"
            for name, s in self.dice_summaries().items()
        )
        return f"{head}: {values or 'none'}"


def provenance_record(segmenter, options: BatchOptions) -> Dict[str, object]:
    """What made the outputs: the model (its content hash), the settings that change them, and
    (for the reader only) where and when."""
    record: Dict[str, object] = dict(segmenter.provenance())
    record.update(
        convention=OUTPUT_CONVENTION,
        axis=options.axis or getattr(segmenter.bundle, "axis", None) or "axial",
        written=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return record


def run_batch(segmenter, input_dir: Path, output_dir: Path, options: BatchOptions) -> BatchReport:
    """Segment every case of this shard under ``input_dir`` into ``output_dir``; never raises for a
    single case (see ``BatchReport.failed``). Setup problems (bad folders, colliding names,
    another model's outputs) raise :class:`InputError` before any case is segmented; so does a
    write failure every later case would share (disk full, read-only), which stops the batch."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    bundle = segmenter.bundle
    if options.uncertainty and not getattr(segmenter, "gives_uncertainty", True):
        raise SettingError(
            "uncertainty",
            "this model makes one prediction per pixel (the baseline, or one head that concatenates its timesteps or "
            "predicts on a single one), so there is no spread over timesteps or heads to write",
        )
    check_output_folder(input_dir, output_dir, options.labels_dir, getattr(bundle, "source", None))
    cohort = discover_cases(input_dir, output_dir, bundle.channel_names, options.include)
    if options.labels_dir is not None:
        cohort = without_label_files(cohort, options.label_name)
    cases_per_folder = single_file_cases_per_folder(cohort)
    cases = select_shard(cohort, options.shard)
    if (
        options.labels_dir is not None
        and cohort
        and not any(find_label_file(case, options.labels_dir, options.label_name, cases_per_folder) for case in cohort)
    ):
        # Every case unscored is a wrong folder or file name, not a cohort without ground truth.
        # Asked of the whole cohort, so that each shard does what its part of one run would (a
        # shard may hold only unlabelled cases, or none: a job array larger than the cohort).
        first = cohort[0].case_id
        looked = f"{first}.<suffix>" + (f" or {first}/{options.label_name}" if options.label_name else "")
        raise InputError(
            options.labels_dir,
            f"no ground truth for any of the {len(cohort)} cases (looked for e.g. {looked}); give the folder that "
            "holds them, and for a file inside each case's folder its name",
        )
    runner = BatchRunner(segmenter, options, OutputRecord(output_dir, provenance_record(segmenter, options)))
    runner.cases_per_folder = cases_per_folder
    runner.claim(cases)
    summary_path = output_dir / summary_name(options.shard, "summary")
    metrics_path = output_dir / summary_name(options.shard, "metrics") if options.labels_dir is not None else None
    for path in (summary_path, metrics_path):
        if path is not None:
            remove_stale_temporaries(path)  # this shard's own files: no other process writes them
    results: List[CaseResult] = []
    completed = False
    last_write = time.monotonic()
    case_bar = tqdm(cases, desc="cases", unit="case", disable=not options.show_progress, position=0)
    slice_bar = tqdm(total=0, desc="slices", unit="slice", disable=not options.show_progress, position=1, leave=False)
    try:
        for case in case_bar:
            try:
                result = runner.run_case(case, slice_bar)
            except _OutputFailure as failure:
                raise failure.error from None
            results.append(result)
            if result.status == "failed":
                tqdm.write(f"FAILED {result.error}")
            elif result.error:
                tqdm.write(f"WARNING {result.case_id}: {result.error}")
            case_bar.set_postfix(failed=sum(r.status == "failed" for r in results), refresh=False)
            if time.monotonic() - last_write > SUMMARY_EVERY_S:
                write_summary(summary_path, results, bundle.class_names, options.labels_dir is not None)
                last_write = time.monotonic()
        completed = True
    finally:
        slice_bar.close()
        case_bar.close()
        # Also on Ctrl-C: what was done is recorded (the rerun completes the rest). When the
        # disk is full this may fail too; the error that stopped the batch is the one to report.
        try:
            write_summary(summary_path, results, bundle.class_names, options.labels_dir is not None)
            if metrics_path is not None:
                write_metrics(metrics_path, results)
        except OSError as error:
            if completed:
                raise InputError(summary_path, f"cannot be written ({error.strerror or error})") from None
            log.warning("could not write %s: %s", summary_path, error.strerror or error)
    return BatchReport(results, summary_path, metrics_path)
