"""Writes that the system refuses: a full disk stops a batch whatever the output format, a
read-only subfolder fails only its cases, and a killed run's temporaries are found by name,
never by pattern."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from conftest import ThresholdSegmenter  # noqa: E402

from tedm_core.errors import InputError  # noqa: E402
from tedm_core.io import volumes  # noqa: E402
from tedm_core.io.atomic import remove_stale_temporaries  # noqa: E402
from tedm_core.pipelines.batch import BatchOptions, run_batch  # noqa: E402

# What ITK's NRRD writer says on a full disk: no errno, no "No space left".
NRRD_FULL = (
    "Exception thrown in SimpleITK ImageFileWriter_Execute: itkNrrdImageIO.cxx:1349:\nITK ERROR: "
    "NrrdImageIO(0x1): Write: Error writing x.nrrd:\n[nrrd] _nrrdGzWrite: failed to write to file\n"
)


def _nrrd_cohort(inp: Path, n: int = 4) -> None:
    inp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        array = np.full((3, 10, 10), 10.0, np.float32)
        array[:, 2 : 6 + i % 3, 3:7] = 90.0
        sitk.WriteImage(sitk.GetImageFromArray(array), str(inp / f"c{i}.nrrd"))


def _failing_itk(message: str):
    def write(tmp, data, reference):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError(message)

    return write


@pytest.mark.parametrize("how", ["said", "probed"])
def test_a_full_disk_stops_a_batch_of_nrrd_outputs(how, tmp_path, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    _nrrd_cohort(inp)
    segmenter = ThresholdSegmenter()
    if how == "said":  # MetaImage says it
        monkeypatch.setattr(volumes, "_write_itk", _failing_itk("ITK ERROR: Reason: No space left on device"))
    else:  # NRRD does not: the probe write finds the disk full

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(volumes, "_write_itk", _failing_itk(NRRD_FULL))
        monkeypatch.setattr(volumes.os, "fsync", full)
    with pytest.raises(InputError, match=r"c0\.nrrd: No space left on device"):
        run_batch(segmenter, inp, out, BatchOptions(show_progress=False))
    assert segmenter.calls == 1  # stopped at the first case, not failed case by case
    assert not [p.name for p in out.iterdir() if ".part" in p.name]


def test_an_itk_write_failure_of_no_known_cause_fails_the_case_in_one_line(tmp_path, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    _nrrd_cohort(inp, 2)
    monkeypatch.setattr(volumes, "_write_itk", _failing_itk(NRRD_FULL))
    report = run_batch(ThresholdSegmenter(), inp, out, BatchOptions(show_progress=False))
    assert report.counts() == {"failed": 2}
    error = report.failed[0].error
    assert "\n" not in error and "c0.nrrd" in error and "failed to write to file" in error, error


def test_a_read_only_subfolder_fails_its_cases_and_the_batch_goes_on(tmp_path, monkeypatch):
    from tedm_core.pipelines import batch

    inp, out = tmp_path / "in", tmp_path / "out"
    _nrrd_cohort(inp, 2)
    _nrrd_cohort(inp / "sub", 1)
    real = batch.write_label_volume

    def refuse_in_sub(path, labels, reference):
        if Path(path).parent.name == "sub":  # as a folder made read-only by someone else
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, labels, reference)

    monkeypatch.setattr(batch, "write_label_volume", refuse_in_sub)
    report = run_batch(ThresholdSegmenter(), inp, out, BatchOptions(show_progress=False))
    assert {r.case_id: r.status for r in report.results} == {"c0": "ok", "c1": "ok", "sub/c0": "failed"}
    assert report.failed[0].error == f"{out / 'sub' / 'c0.nrrd'}: cannot be written (Permission denied)"
    assert "sub/c0,failed" in (out / "summary.csv").read_text()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_link_in_the_output_folder_never_leads_outputs_onto_the_inputs(tmp_path, overwrite):
    """A subfolder of the output folder that is a link into the input folder (an earlier copy of
    the tree, say): its cases fail in one line naming the link, the inputs stay byte for byte, the
    other cases are segmented. An output file that is itself a link to an input is refused too."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _nrrd_cohort(inp, 2)
    _nrrd_cohort(inp / "sub", 1)
    out.mkdir()
    (out / "sub").symlink_to(inp / "sub", target_is_directory=True)
    (out / "c1.nrrd").symlink_to(inp / "c1.nrrd")
    before = {p: p.read_bytes() for p in inp.rglob("*.nrrd")}
    report = run_batch(ThresholdSegmenter(), inp, out, BatchOptions(show_progress=False, overwrite=overwrite))
    assert {r.case_id: r.status for r in report.results} == {"c0": "ok", "c1": "failed", "sub/c0": "failed"}
    for result in report.failed:
        assert "\n" not in result.error and "leads out of the output folder" in result.error, result.error
    assert {p: p.read_bytes() for p in inp.rglob("*.nrrd")} == before
    assert sorted(p.name for p in (inp / "sub").iterdir()) == ["c0.nrrd"], "nothing written into the input"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_read_only_folders_for_real(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _nrrd_cohort(inp, 2)
    _nrrd_cohort(inp / "sub", 1)
    (out / "sub").mkdir(parents=True)
    (out / "sub").chmod(0o555)
    try:
        report = run_batch(ThresholdSegmenter(), inp, out, BatchOptions(show_progress=False))
        assert report.counts() == {"ok": 2, "failed": 1}
        out.chmod(0o555)
        with pytest.raises(InputError, match="cannot be written"):
            run_batch(ThresholdSegmenter(), inp, tmp_path / "out", BatchOptions(overwrite=True, show_progress=False))
    finally:
        out.chmod(0o755)
        (out / "sub").chmod(0o755)


def test_stale_temporaries_are_found_by_name_not_by_pattern(tmp_path):
    other = tmp_path / ".scan1.nii.gz.1a2b3c4d.part.nii.gz"  # another case's, being written
    other.write_bytes(b"shard 2 is writing this")
    own = tmp_path / ".scan[1].nii.gz.5e6f7a8b.part.nii.gz"
    own.write_bytes(b"stale")
    remove_stale_temporaries(tmp_path / "scan[1].nii.gz")
    assert other.exists() and not own.exists()


def test_a_name_too_long_for_a_temporary_beside_it_is_still_written_atomically(tmp_path):
    """A 240-byte file name is legal (255 is the limit), ``.NAME.xxxxxxxx.part.png`` beside it is
    not: its temporaries take the start of the name and a hash of all of it, their own (another
    long name with the same start keeps its temporaries), and are found again as stale."""
    from tedm_core.io.atomic import atomic_path

    def another_of(tmp, token):  # a temporary of the same target, as a killed run would leave one
        start, rest = tmp.name.rsplit(".part", 1)
        return tmp.with_name(f"{start[:-8]}{token}.part{rest}")

    long_name = "p" * 236 + ".png"
    sibling = tmp_path / ("p" * 236 + "q.png")  # the same start
    with atomic_path(sibling) as tmp:
        theirs = another_of(tmp, "11111111")
    with atomic_path(tmp_path / long_name) as tmp:
        assert len(tmp.name.encode()) <= 255 and tmp.name.endswith(".part.png") and "~" in tmp.name
        ours = another_of(tmp, "00000000")
        tmp.write_bytes(b"labels")
    assert (tmp_path / long_name).read_bytes() == b"labels"
    ours.write_bytes(b"stale")
    theirs.write_bytes(b"being written")
    remove_stale_temporaries(tmp_path / long_name)
    assert not ours.exists() and theirs.exists()
