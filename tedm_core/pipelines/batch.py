"""Headless batch segmentation of a cohort: discover cases, segment each, write mirrored outputs.

The logic behind ``scripts/batch_segment.py``. Guarantees:

* one failing case never stops the others; its one-line error goes to ``summary.csv``;
* every output is written atomically (temporary file, then rename), the label file last, so
  a case whose label file exists is complete: after a crash (even ``kill -9``) a rerun skips
  finished cases and redoes the rest, and the outputs equal those of an uninterrupted run;
* ``--shard K/N`` splits the sorted case list round-robin, so N job-array nodes sharing one
  output folder each take a disjoint, deterministic subset.

What a case is (see :func:`discover_cases`):

* single-channel model: every image or volume file under the input folder (recursively), and
  every folder holding a DICOM series (``.dcm``/``.ima`` files);
* multi-channel model (e.g. channels FLAIR, T1): every folder containing a file named after one
  of the channels (``FLAIR.nii.gz``, ``t1.nrrd``; case-insensitive, any volume format); all
  channels must be present. Other files in the folder (e.g. a ground truth) are ignored.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..errors import InputError
from ..io.atomic import write_text_atomic
from ..io.images import IMAGE_SUFFIXES
from ..io.volumes import (
    VOLUME_SUFFIXES,
    Volume,
    geometry_mismatch,
    is_dicom_folder,
    read_case,
    read_volume,
    strip_suffix,
    volume_suffix,
    write_float_volume,
    write_label_volume,
)
from .volume import label_array_to_classes, segment_volume

log = logging.getLogger(__name__)

UNCERTAINTY_SUFFIX = "_uncertainty"
# Outputs keep the input's format where it can hold labels; 2D images become PNG, DICOM
# series and split-header formats become single files.
_OUTPUT_SUFFIX = {".nii": ".nii", ".nii.gz": ".nii.gz", ".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha", ".mhd": ".mha"}
SUMMARY_EVERY_S = 30.0


@dataclass
class Case:
    """One unit of work: the files of one case and where its outputs go."""

    case_id: str  # relative to the input folder, POSIX separators, format suffix removed
    inputs: List[Path]
    output: Path
    is_folder: bool = False
    problem: Optional[str] = None  # found at discovery (e.g. a missing modality): the case fails

    def uncertainty_output(self) -> Path:
        suffix = volume_suffix(self.output)
        name = self.output.name[: len(self.output.name) - len(suffix)]
        return self.output.with_name(name + UNCERTAINTY_SUFFIX + suffix)


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


@dataclass
class BatchOptions:
    overwrite: bool = False
    uncertainty: bool = False
    labels_dir: Optional[Path] = None
    label_name: Optional[str] = None
    include: Optional[str] = None
    shard: Tuple[int, int] = (1, 1)
    require_3d: bool = False
    axis: Optional[str] = None
    show_progress: bool = True


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _output_suffix(path: Path) -> str:
    suffix = volume_suffix(path)
    if suffix in IMAGE_SUFFIXES:
        return ".png"
    return _OUTPUT_SUFFIX.get(suffix, ".nii.gz")


def check_output_folder(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output folder that is, or lies inside, the input folder: outputs would be
    rediscovered as inputs on the next run, and a mistake could overwrite the data."""
    inp, out = input_dir.resolve(), output_dir.resolve()
    if out == inp or inp in out.parents:
        raise InputError(output_dir, f"the output folder is inside the input folder {input_dir}; choose a folder outside it")


def parse_shard(text: str) -> Tuple[int, int]:
    """``"K/N"`` (1-based K) -> (K, N)."""
    try:
        k, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise InputError(None, f"--shard {text!r}: expected K/N, e.g. 1/4 (K counts from 1)") from None
    if not (n >= 1 and 1 <= k <= n):
        raise InputError(None, f"--shard {text!r}: K must be within 1..N")
    return k, n


def discover_cases(input_dir: Path, output_dir: Path, channel_names: Sequence[str], include: Optional[str] = None) -> List[Case]:
    """The cases under ``input_dir``, sorted by id (rules in the module docstring).

    ``include``: a glob on file names (single-channel) or folder names (multi-channel), e.g.
    ``"*FLAIR*"``; hidden files and folders are never cases.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise InputError(input_dir, "input folder not found" if not input_dir.exists() else "is not a folder")
    cases = _discover_multichannel(input_dir, output_dir, channel_names, include) if len(channel_names) > 1 else _discover_single(input_dir, output_dir, include)
    if not cases:
        what = f"no case folders with files named {', '.join(channel_names)}" if len(channel_names) > 1 else "no image or volume files"
        raise InputError(input_dir, f"{what} found{' matching ' + repr(include) if include else ''}")
    return sorted(cases, key=lambda c: c.case_id)


def _discover_single(input_dir: Path, output_dir: Path, include: Optional[str]) -> List[Case]:
    cases: List[Case] = []
    for path in sorted(input_dir.rglob("*")):
        if _is_hidden(path, input_dir):
            continue
        rel = path.relative_to(input_dir)
        if path.is_dir():
            if is_dicom_folder(path) and (include is None or fnmatch.fnmatch(path.name, include)):
                cases.append(Case(rel.as_posix(), [path], output_dir / rel.parent / f"{path.name}.nii.gz", is_folder=True))
            continue
        suffix = volume_suffix(path)
        if suffix not in VOLUME_SUFFIXES + IMAGE_SUFFIXES or (include and not fnmatch.fnmatch(path.name, include)):
            continue
        stem = strip_suffix(path)
        case_id = (rel.parent / stem).as_posix()
        cases.append(Case(case_id, [path], output_dir / rel.parent / f"{stem}{_output_suffix(path)}"))
    return _check_unique(cases)


def _discover_multichannel(input_dir: Path, output_dir: Path, channel_names: Sequence[str], include: Optional[str]) -> List[Case]:
    wanted = {name.lower(): name for name in channel_names}
    cases: List[Case] = []
    for folder in [input_dir] + sorted(p for p in input_dir.rglob("*") if p.is_dir() and not _is_hidden(p, input_dir)):
        if include and not fnmatch.fnmatch(folder.name, include):
            continue
        found: Dict[str, List[Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(".") and volume_suffix(path) in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
                key = strip_suffix(path).lower()
                if key in wanted:
                    found.setdefault(wanted[key], []).append(path)
            elif path.is_dir() and path.name.lower() in wanted and is_dicom_folder(path):
                found.setdefault(wanted[path.name.lower()], []).append(path)  # e.g. case/FLAIR/*.dcm
        if not found:
            continue
        rel = folder.relative_to(input_dir)
        case_id = rel.as_posix() if rel.parts else folder.name
        first = next(iter(found.values()))[0]
        suffix = _output_suffix(first) if first.is_file() else ".nii.gz"
        output = (output_dir / rel.parent / f"{folder.name}{suffix}") if rel.parts else output_dir / f"{folder.name}{suffix}"
        problem = None
        missing = [name for name in channel_names if name not in found]
        doubled = [name for name, paths in found.items() if len(paths) > 1]
        if missing:
            problem = f"missing modality {', '.join(missing)} (found {', '.join(n for n in channel_names if n in found)}; the model expects files named {', '.join(channel_names)})"
        elif doubled:
            problem = f"several files for modality {', '.join(doubled)}: {', '.join(p.name for n in doubled for p in found[n])}"
        inputs = [found[name][0] for name in channel_names if name in found]
        cases.append(Case(case_id, inputs, output, is_folder=True, problem=problem))
    return _check_unique(cases)


def _check_unique(cases: List[Case]) -> List[Case]:
    """Two inputs that would write the same output (``a.nii`` and ``a.nii.gz``) both fail, clearly."""
    by_output: Dict[Path, List[Case]] = {}
    for case in cases:
        by_output.setdefault(case.output, []).append(case)
    for output, group in by_output.items():
        if len(group) > 1:
            for case in group:
                case.problem = f"{len(group)} inputs would write the same output {output.name} ({', '.join(c.inputs[0].name for c in group)}); rename one"
    return cases


def select_shard(cases: Sequence[Case], shard: Tuple[int, int]) -> List[Case]:
    k, n = shard
    return [case for i, case in enumerate(sorted(cases, key=lambda c: c.case_id)) if i % n == k - 1]


def find_label_file(case: Case, labels_dir: Path, label_name: Optional[str] = None) -> Optional[Path]:
    """The ground truth of ``case``: ``labels_dir/<case id>/<label_name>`` when ``label_name`` is
    given (e.g. BraTS ``GT_W.nii.gz`` inside each case folder), else ``labels_dir/<case id>.<any
    volume or image suffix>``."""
    candidates: List[Path] = []
    if label_name:
        candidates.append(labels_dir / case.case_id / label_name)
        candidates.append(labels_dir / Path(case.case_id).parent / label_name)
    candidates.extend(labels_dir / f"{case.case_id}{suffix}" for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary files a killed run left beside ``output`` (``atomic_path``'s ``.name.*.part*``)."""
    if output.parent.is_dir():
        for stale in output.parent.glob(f".{output.name}.*.part*"):
            stale.unlink(missing_ok=True)


def _one_line(case: Case, error: BaseException) -> str:
    if isinstance(error, InputError):
        return str(error)
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{case.inputs[0] if case.inputs else case.case_id}: {type(error).__name__}: {text}"[:500]


class BatchRunner:
    """Segments cases one after another with one loaded :class:`Segmenter`."""

    def __init__(self, segmenter, options: BatchOptions) -> None:
        self.segmenter = segmenter
        self.bundle = segmenter.bundle
        self.options = options

    def outputs_of(self, case: Case) -> List[Path]:
        return ([case.uncertainty_output()] if self.options.uncertainty else []) + [case.output]

    def run_case(self, case: Case, slice_bar: Optional[tqdm] = None) -> CaseResult:
        tic = time.perf_counter()
        try:
            if case.problem:
                raise InputError(case.inputs[0].parent if case.is_folder and case.inputs else (case.inputs[0] if case.inputs else case.case_id), case.problem)
            if not self.options.overwrite and all(p.is_file() for p in self.outputs_of(case)):
                result = self._existing(case)
            else:
                result = self._segment(case, slice_bar)
        except Exception as error:  # one case's failure, whatever it is, must not stop the batch
            log.debug("case %s failed", case.case_id, exc_info=True)
            result = CaseResult(case.case_id, "failed", error=_one_line(case, error))
        if self.options.labels_dir is not None and result.status != "failed":
            # A missing or mismatched ground truth spoils the metrics, not the segmentation:
            # the case stays ok, the reason goes to the error column and the console.
            try:
                result.metrics = self._metrics(case)
            except Exception as error:
                result.error = f"metrics not computed: {_one_line(case, error)}"
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
            _remove_stale_temporaries(output)

        def progress(done: int, total: int) -> None:
            if slice_bar is not None:
                slice_bar.total = total
                slice_bar.n = done
                slice_bar.refresh()

        if slice_bar is not None:
            slice_bar.reset()
            slice_bar.set_description(case.case_id[-40:])
        seg = segment_volume(self.segmenter, volume, axis=self.options.axis, progress=progress, keep_probabilities=False)
        # The label file last: its presence marks the case complete.
        if self.options.uncertainty:
            write_float_volume(case.uncertainty_output(), seg.uncertainty, volume)
        write_label_volume(case.output, seg.label_values(self.bundle.label_values), volume)
        return CaseResult(
            case.case_id, "ok", slices=seg.layout.num_slices, slices_segmented=seg.slices_run,
            voxels=seg.voxels_per_class(len(self.bundle.class_names)),
        )

    def _existing(self, case: Case) -> CaseResult:
        output = read_volume(case.output, allow_constant=True)
        classes = label_array_to_classes(output, self.bundle.label_values)
        voxels = np.bincount(classes.ravel(), minlength=len(self.bundle.class_names))[: len(self.bundle.class_names)].tolist()
        return CaseResult(case.case_id, "exists", voxels=voxels)

    def _metrics(self, case: Case) -> List[Dict[str, object]]:
        from .evaluate import dice_precision_recall

        label_path = find_label_file(case, self.options.labels_dir, self.options.label_name)
        if label_path is None:
            raise InputError(self.options.labels_dir, f"no ground truth for case {case.case_id} (looked for {case.case_id}.<suffix>{' and ' + case.case_id + '/' + self.options.label_name if self.options.label_name else ''})")
        truth_volume = read_volume(label_path, allow_constant=True)
        prediction_volume = read_volume(case.output, allow_constant=True)
        problem = geometry_mismatch(prediction_volume, truth_volume)
        if problem:
            raise InputError(label_path, f"ground truth does not match the case's grid: {problem}")
        truth = label_array_to_classes(truth_volume, self.bundle.label_values)
        prediction = label_array_to_classes(prediction_volume, self.bundle.label_values)
        rows = []
        for k, name in enumerate(self.bundle.class_names[1:], start=1):
            dice, precision, recall = dice_precision_recall(prediction == k, truth == k)
            rows.append({"case": case.case_id, "class": name, "dice": round(dice, 6), "precision": round(precision, 6), "recall": round(recall, 6), "label_file": str(label_path)})
        return rows


def summary_name(shard: Tuple[int, int], stem: str) -> str:
    return f"{stem}.csv" if shard[1] == 1 else f"{stem}.shard{shard[0]}of{shard[1]}.csv"


def _csv_text(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_summary(path: Path, results: Sequence[CaseResult], class_names: Sequence[str]) -> None:
    voxel_columns = [f"voxels_{name}" for name in class_names]
    rows = []
    for r in results:
        row: Dict[str, object] = {"case": r.case_id, "status": r.status, "seconds": r.seconds, "slices": r.slices, "slices_segmented": r.slices_segmented}
        row.update({c: (r.voxels[i] if i < len(r.voxels) else "") for i, c in enumerate(voxel_columns)})
        row["error"] = r.error
        rows.append(row)
    write_text_atomic(path, _csv_text(rows, ["case", "status", "seconds", "slices", "slices_segmented", *voxel_columns, "error"]))


def write_metrics(path: Path, results: Sequence[CaseResult]) -> None:
    rows = [row for r in results for row in r.metrics]
    write_text_atomic(path, _csv_text(rows, ["case", "class", "dice", "precision", "recall", "label_file"]))


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

    def mean_dice(self) -> Dict[str, float]:
        per_class: Dict[str, List[float]] = {}
        for r in self.results:
            for row in r.metrics:
                per_class.setdefault(str(row["class"]), []).append(float(row["dice"]))
        return {name: float(np.mean(values)) for name, values in per_class.items()}


def run_batch(segmenter, input_dir: Path, output_dir: Path, options: BatchOptions) -> BatchReport:
    """Segment every case of this shard under ``input_dir`` into ``output_dir``; never raises for a
    single case (see ``BatchReport.failed``). Setup problems (bad folders) raise :class:`InputError`."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_folder(input_dir, output_dir)
    if options.labels_dir is not None and not Path(options.labels_dir).is_dir():
        raise InputError(options.labels_dir, "labels folder not found")
    bundle = segmenter.bundle
    cases = select_shard(discover_cases(input_dir, output_dir, bundle.channel_names, options.include), options.shard)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary_path = output_dir / summary_name(options.shard, "summary")
    metrics_path = output_dir / summary_name(options.shard, "metrics") if options.labels_dir is not None else None
    runner = BatchRunner(segmenter, options)
    results: List[CaseResult] = []
    last_write = time.monotonic()
    case_bar = tqdm(cases, desc="cases", unit="case", disable=not options.show_progress, position=0)
    slice_bar = tqdm(total=0, desc="slices", unit="slice", disable=not options.show_progress, position=1, leave=False)
    try:
        for case in case_bar:
            result = runner.run_case(case, slice_bar)
            results.append(result)
            if result.status == "failed":
                tqdm.write(f"FAILED {result.error}")
            elif result.error:
                tqdm.write(f"WARNING {result.case_id}: {result.error}")
            case_bar.set_postfix(failed=sum(r.status == "failed" for r in results), refresh=False)
            if time.monotonic() - last_write > SUMMARY_EVERY_S:
                write_summary(summary_path, results, bundle.class_names)
                last_write = time.monotonic()
    finally:
        slice_bar.close()
        case_bar.close()
        # Also on Ctrl-C: what was done is recorded (the rerun completes the rest).
        write_summary(summary_path, results, bundle.class_names)
        if metrics_path is not None:
            write_metrics(metrics_path, results)
    return BatchReport(results, summary_path, metrics_path)
