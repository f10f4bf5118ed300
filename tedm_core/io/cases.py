"""Which files make a case: one rule for pretraining, fitting, the CLI and the batch script.

* single-channel model: every image or volume file under the input folder (recursively, links
  to folders followed, each real folder once), and every folder holding a DICOM series
  (``.dcm``/``.ima`` files);
* multi-channel model (e.g. channels FLAIR, T1): every folder containing a file named after one
  of the channels (``FLAIR.nii.gz``, ``t1.nrrd``; case-insensitive, any volume format); all
  channels must be present. Other files in the folder (e.g. a ground truth) are ignored.

Each case also knows where its outputs go (mirroring the input tree), so the batch pipeline
and the CLI agree on file names.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import InputError
from .images import IMAGE_SUFFIXES
from .outputs import is_output_folder, refuse_overlap
from .volumes import VOLUME_SUFFIXES, is_dicom_folder, strip_suffix, unsupported_format, volume_suffix
from .walk import walk_following_links

log = logging.getLogger(__name__)

# Maps written beside a case's label file: <name>_uncertainty.<ext>, <name>_prob.<ext> (one
# structure) or <name>_prob_<class>.<ext> (several).
UNCERTAINTY_SUFFIX = "_uncertainty"
PROBABILITY_SUFFIX = "_prob"

# Outputs keep the input's format where it can hold labels; 2D images become PNG, DICOM
# series and split-header formats become single files.
_OUTPUT_SUFFIX = {
    ".nii": ".nii",
    ".nii.gz": ".nii.gz",
    ".nrrd": ".nrrd",
    ".nhdr": ".nrrd",
    ".mha": ".mha",
    ".mhd": ".mha",
}


@dataclass
class Case:
    """One unit of work: the files of one case and where its outputs go."""

    case_id: str  # relative to the input folder, POSIX separators, format suffix removed
    inputs: List[Path]
    output: Path
    is_folder: bool = False
    problem: Optional[str] = None  # found at discovery (e.g. a missing modality): the case fails

    def sidecar(self, tag: str) -> Path:
        """The output beside the label file with ``tag`` after its name: ``scan_uncertainty.nii.gz``."""
        suffix = volume_suffix(self.output)
        name = self.output.name[: len(self.output.name) - len(suffix)]
        return self.output.with_name(name + tag + suffix)

    def uncertainty_output(self) -> Path:
        return self.sidecar(UNCERTAINTY_SUFFIX)

    def probability_outputs(self, class_names: Sequence[str]) -> List[Path]:
        """One map per structure (background excluded): ``_prob`` for one, ``_prob_<class>`` for several."""
        if len(class_names) == 2:
            return [self.sidecar(PROBABILITY_SUFFIX)]
        return [self.sidecar(f"{PROBABILITY_SUFFIX}_{name}") for name in class_names[1:]]


def _walk(input_dir: Path, output_dir: Path) -> Tuple[List[Path], List[Path]]:
    """The folders and files under ``input_dir``, each sorted, as paths under it; hidden ones and
    folders of an earlier run's outputs left out.

    Links to folders are followed (patients' folders are often links into an archive, and
    ``Path.rglob`` does not follow them), each real folder once, so a link loop ends and a
    folder reached by two paths is not two sets of cases. A linked folder or file is checked
    against the output folder as the input itself is: outputs written inside the place it
    leads to could replace an input.
    """
    folders: List[Path] = []
    files: List[Path] = []

    def refuse_linked_output(path: Path) -> None:
        if path.is_symlink():
            refuse_overlap(output_dir, [("input", path)])

    def admit(path: Path) -> bool:
        refuse_linked_output(path)
        if is_output_folder(path):
            # Results of an earlier run are not images to segment.
            log.warning("skipped %s: it holds TEDM outputs (a provenance record), not inputs", path)
            return False
        folders.append(path)
        return True

    def repeated(path: Path, real: str) -> None:
        refuse_linked_output(path)
        log.warning("skipped %s: it leads to %s, which is already searched", path, real)

    for top, names in walk_following_links(input_dir, admit, repeated):
        for name in names:
            refuse_linked_output(top / name)
            files.append(top / name)
    return sorted(folders), sorted(files)


def _output_suffix(path: Path) -> str:
    suffix = volume_suffix(path)
    if suffix in IMAGE_SUFFIXES:
        return ".png"
    return _OUTPUT_SUFFIX.get(suffix, ".nii.gz")


def discover_cases(
    input_dir: Path, output_dir: Path, channel_names: Sequence[str], include: Optional[str] = None
) -> List[Case]:
    """The cases under ``input_dir``, sorted by id (rules in the module docstring).

    ``include``: a glob on file names (single-channel) or folder names (multi-channel), e.g.
    ``"*FLAIR*"``; hidden files and folders are never cases.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise InputError(input_dir, "input folder not found" if not input_dir.exists() else "is not a folder")
    cases = (
        _discover_multichannel(input_dir, output_dir, channel_names, include)
        if len(channel_names) > 1
        else _discover_single(input_dir, output_dir, include)
    )
    if not cases:
        what = (
            f"no case folders with files named {', '.join(channel_names)}"
            if len(channel_names) > 1
            else "no image or volume files"
        )
        raise InputError(input_dir, f"{what} found{' matching ' + repr(include) if include else ''}")
    return sorted(cases, key=lambda c: c.case_id)


def _discover_single(input_dir: Path, output_dir: Path, include: Optional[str]) -> List[Case]:
    cases: List[Case] = []
    folders, files = _walk(input_dir, output_dir)
    for path in folders:
        rel = path.relative_to(input_dir)
        if is_dicom_folder(path) and (include is None or fnmatch.fnmatch(path.name, include)):
            cases.append(Case(rel.as_posix(), [path], output_dir / rel.parent / f"{path.name}.nii.gz", is_folder=True))
    for path in files:
        rel = path.relative_to(input_dir)
        if include and not fnmatch.fnmatch(path.name, include):
            continue
        stem = strip_suffix(path)
        case_id = (rel.parent / stem).as_posix()
        problem = unsupported_format(path)
        if problem:
            # A file of an image format we do not read fails with a word rather than vanishing.
            if problem != "skip":
                cases.append(Case(case_id, [path], output_dir / rel.parent / f"{stem}.nii.gz", problem=problem))
            continue
        if volume_suffix(path) not in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
            continue
        cases.append(Case(case_id, [path], output_dir / rel.parent / f"{stem}{_output_suffix(path)}"))
    return _check_unique(cases)


def _discover_multichannel(
    input_dir: Path, output_dir: Path, channel_names: Sequence[str], include: Optional[str]
) -> List[Case]:
    wanted = {name.lower(): name for name in channel_names}
    cases: List[Case] = []
    for folder in [input_dir] + _walk(input_dir, output_dir)[0]:
        if include and not fnmatch.fnmatch(folder.name, include):
            continue
        found: Dict[str, List[Path]] = {}
        for path in sorted(folder.iterdir()):
            if (
                path.is_file()
                and not path.name.startswith(".")
                and volume_suffix(path) in VOLUME_SUFFIXES + IMAGE_SUFFIXES
            ):
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
        output = (
            (output_dir / rel.parent / f"{folder.name}{suffix}") if rel.parts else output_dir / f"{folder.name}{suffix}"
        )
        problem = None
        missing = [name for name in channel_names if name not in found]
        doubled = [name for name, paths in found.items() if len(paths) > 1]
        if missing:
            present = ", ".join(n for n in channel_names if n in found)
            problem = (
                f"missing modality {', '.join(missing)} (found {present}; "
                f"the model expects files named {', '.join(channel_names)})"
            )
        elif doubled:
            names = ", ".join(p.name for n in doubled for p in found[n])
            problem = f"several files for modality {', '.join(doubled)}: {names}"
        inputs = [found[name][0] for name in channel_names if name in found]
        cases.append(Case(case_id, inputs, output, is_folder=True, problem=problem))
    return _check_unique(cases)


def order_channel_files(paths: Sequence[Path], channel_names: Sequence[str]) -> List[Path]:
    """The files of one case (given in any order) in the model's channel order, matched by file
    name as case discovery matches them (``FLAIR.nii.gz`` or a ``FLAIR`` DICOM folder; case-insensitive).

    Taking them by position would silently feed swapped modalities to the model, so files whose
    names do not each name a different channel are refused, naming the files the model expects.
    """
    paths = [Path(p) for p in paths]
    expected = (
        f"the model expects one file per channel named {', '.join(channel_names)} (e.g. {channel_names[0]}.nii.gz)"
    )
    if len(paths) != len(channel_names):
        raise InputError(paths[0], f"{len(paths)} files for a {len(channel_names)}-channel model; {expected}")
    wanted = {name.lower(): name for name in channel_names}
    by_channel: Dict[str, Path] = {}
    for path in paths:
        key = (path.name if path.is_dir() else strip_suffix(path)).lower()
        if key not in wanted:
            raise InputError(path, f"names no channel of the model; {expected}")
        if wanted[key] in by_channel:
            raise InputError(path, f"is a second file for channel {wanted[key]}; {expected}")
        by_channel[wanted[key]] = path
    return [by_channel[name] for name in channel_names]


def _check_unique(cases: List[Case]) -> List[Case]:
    """Refuse, before any work, two inputs whose outputs would collide: the same label file
    (``a.nii`` and ``a.nii.gz``, ``scan.png`` and ``scan.jpg``), or one case's label file on
    another's map (``p01.png`` and ``p01_uncertainty.png``). Names are compared ignoring case,
    as on the file systems of Windows and macOS."""
    usable = [c for c in cases if not c.problem]
    owner: Dict[str, Case] = {}
    by_id: Dict[str, Case] = {}
    for case in usable:
        key = case.output.as_posix().lower()
        if key in owner:
            _collision(owner[key], case, case.output.name)
        owner[key] = case
        # One case id, two files (scan.nrrd and scan.nii.gz): one summary row and one ground truth for two cases.
        if case.case_id.lower() in by_id:
            _collision(by_id[case.case_id.lower()], case, f"results for case {case.case_id}")
        by_id[case.case_id.lower()] = case
    for key, case in owner.items():
        # Is this label file one of another case's maps? Strip a map tag and look for that case.
        suffix = volume_suffix(key)
        name = key[: len(key) - len(suffix)]
        stems = [name[: -len(tag)] for tag in (UNCERTAINTY_SUFFIX, PROBABILITY_SUFFIX) if name.endswith(tag)]
        tag = PROBABILITY_SUFFIX + "_"
        stems += [name[:i] for i in range(len(name)) if name.startswith(tag, i)]
        for stem in stems:
            other = owner.get(stem + suffix)
            if other is not None and other is not case:
                _collision(other, case, case.output.name)
    return cases


def _collision(first: Case, second: Case, name: str) -> None:
    raise InputError(
        second.inputs[0],
        f"would write {name}, which {first.inputs[0]} also writes; rename one of the two",
    )


def without_label_files(cases: Sequence[Case], label_name: Optional[str]) -> List[Case]:
    """The cases less the ground-truth files named ``label_name`` found among them (a one-channel
    cohort of ``subj/image.nii.gz`` + ``subj/label.nii.gz``): a ground truth is never a case."""
    if not label_name:
        return list(cases)
    return [c for c in cases if c.is_folder or len(c.inputs) != 1 or c.inputs[0].name != label_name]


def single_file_cases_per_folder(cases: Sequence[Case]) -> Dict[str, int]:
    """How many single-file cases each folder (relative to the input) holds: see :func:`find_label_file`."""
    counts: Dict[str, int] = {}
    for case in cases:
        if not case.is_folder:
            folder = Path(case.case_id).parent.as_posix()
            counts[folder] = counts.get(folder, 0) + 1
    return counts


def _named_label_files(case: Case, labels_dir: Path) -> List[Path]:
    """The files ``labels_dir/<case id>.<any volume or image suffix>`` there are, in the suffixes'
    order, never one of the case's own images."""
    own = {os.path.realpath(p) for p in case.inputs}
    named = (labels_dir / f"{case.case_id}{suffix}" for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES)
    return [p for p in named if p.is_file() and os.path.realpath(p) not in own]


def refuse_another_label_file(case: Case, labels_dir: Path, found: Path) -> None:
    """Refuse a case whose ground truth ``found`` (named by the case, :func:`find_label_file`)
    has a namesake of another suffix beside it (``case1.nii`` and ``case1.nii.gz``): which one
    is the truth is the user's to say, not the suffixes' order. (A file found by --label-name is
    the one it names.)"""
    named = _named_label_files(case, labels_dir)
    if found in named and len(named) > 1:
        other = next(p for p in named if p != found)
        raise InputError(found, f"and {other} are both the ground truth of case {case.case_id}: keep one")


def find_label_file(
    case: Case,
    labels_dir: Path,
    label_name: Optional[str] = None,
    cases_per_folder: Optional[Dict[str, int]] = None,
) -> Optional[Path]:
    """The ground truth of ``case``: ``labels_dir/<case id>/<label_name>`` when ``label_name`` is
    given (e.g. BraTS ``GT_W.nii.gz`` inside each case folder), else ``labels_dir/<case id>.<any
    volume or image suffix>``. A single-file case alone in a subject's folder (``subj/FLAIR``, with
    ``--include``) also takes ``labels_dir/subj/<label_name>``.

    Never a file that several cases would share: a case folder, a case at the top of the input, or
    one of several in a folder (``cases_per_folder``, from :func:`single_file_cases_per_folder` of
    the whole cohort) whose own ground truth is missing must not be scored against a file higher
    up (another subject's, when --labels pointed into one subject's folder)."""
    candidates: List[Path] = []
    if label_name:
        candidates.append(labels_dir / case.case_id / label_name)
        subject = Path(case.case_id).parent
        alone = (cases_per_folder or {}).get(subject.as_posix(), 1) == 1
        if not case.is_folder and subject != Path(".") and alone:
            candidates.append(labels_dir / subject / label_name)
    own = {os.path.realpath(p) for p in case.inputs}
    for candidate in candidates:
        if candidate.is_file() and os.path.realpath(candidate) not in own:  # never a case's own image
            return candidate
    named = _named_label_files(case, labels_dir)
    return named[0] if named else None
