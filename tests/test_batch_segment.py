"""scripts/batch_segment.py and tedm_core.pipelines.batch: discovery, mirroring, skipping, shards,
metrics, and a kill -9 in the middle of a batch."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from conftest import REPO, ThresholdSegmenter, sphere_volume_array  # noqa: E402

from tedm_core.errors import InputError, SettingError  # noqa: E402
from tedm_core.pipelines.batch import BatchOptions, discover_cases, parse_shard, run_batch, select_shard  # noqa: E402

SCRIPT = REPO / "scripts" / "batch_segment.py"
AFFINE = np.diag([-1.0, -1.0, 2.0, 1.0])


def _save(path: Path, array_kji: np.ndarray, affine=AFFINE, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array_kji, dtype=dtype).transpose(2, 1, 0), affine), str(path))
    return path


def _sphere(seed: int, shape=(6, 24, 24), inside: float = 80.0, outside: float = 10.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = (AFFINE @ np.array([12 + rng.integers(-3, 3), 12 + rng.integers(-3, 3), 3, 1.0]))[:3]
    return sphere_volume_array(
        shape, AFFINE, centre, radius_mm=float(rng.uniform(4, 7)), inside=inside, outside=outside
    )


def _read_csv(path: Path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_discovery_mirrors_paths_and_formats(tmp_path):
    inp = tmp_path / "in"
    _save(inp / "a" / "b" / "scan.nii.gz", _sphere(0))
    _save(inp / "c.nii", _sphere(1))
    (inp / ".hidden").mkdir()
    _save(inp / ".hidden" / "x.nii.gz", _sphere(2))
    (inp / "notes.txt").write_text("not an image")
    cases = discover_cases(inp, tmp_path / "out", ["image"])
    assert [c.case_id for c in cases] == ["a/b/scan", "c"]
    assert cases[0].output == tmp_path / "out" / "a" / "b" / "scan.nii.gz"
    assert cases[1].output == tmp_path / "out" / "c.nii"
    assert cases[0].uncertainty_output().name == "scan_uncertainty.nii.gz"


def test_multichannel_cases_are_folders_named_by_channel(tmp_path):
    inp = tmp_path / "in"
    for case in ("p1", "p2"):
        _save(inp / "site" / case / "FLAIR.nii.gz", _sphere(0))
        _save(inp / "site" / case / "t1.nii.gz", _sphere(1))  # case-insensitive
        _save(inp / "site" / case / "GT_W.nii.gz", _sphere(2))  # ignored
    _save(inp / "site" / "p3" / "FLAIR.nii.gz", _sphere(3))
    cases = discover_cases(inp, tmp_path / "out", ["FLAIR", "T1"])
    assert [c.case_id for c in cases] == ["site/p1", "site/p2", "site/p3"]
    assert cases[0].output == tmp_path / "out" / "site" / "p1.nii.gz" and [p.name for p in cases[0].inputs] == [
        "FLAIR.nii.gz",
        "t1.nii.gz",
    ]
    assert cases[2].problem and "missing modality T1" in cases[2].problem


def test_shards_partition_the_cohort():
    from tedm_core.pipelines.batch import Case

    cases = [Case(f"c{i:02d}", [], Path(f"c{i:02d}")) for i in range(10)]
    parts = [select_shard(cases, (k, 3)) for k in (1, 2, 3)]
    ids = sorted(c.case_id for part in parts for c in part)
    assert ids == [c.case_id for c in cases] and all(len(p) in (3, 4) for p in parts)
    assert [c.case_id for c in select_shard(list(reversed(cases)), (2, 3))] == [
        c.case_id for c in parts[1]
    ]  # order-independent
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "x", "1-4"):
        with pytest.raises(SettingError, match="shard"):
            parse_shard(bad)


def test_run_batch_skips_existing_and_writes_metrics(tmp_path):
    inp, out, labels = tmp_path / "in", tmp_path / "out", tmp_path / "labels"
    for i in range(3):
        raw = _sphere(i)
        _save(inp / f"case{i}.nii.gz", raw)
        _save(labels / f"case{i}.nii.gz", (raw > 50).astype(np.uint8), dtype=np.uint8)
    _save(labels / "case2.nii.gz", np.zeros((6, 24, 24)), dtype=np.uint8)  # a wrong ground truth: Dice 0
    segmenter = ThresholdSegmenter()
    options = BatchOptions(labels_dir=labels, uncertainty=True, show_progress=False)
    report = run_batch(segmenter, inp, out, options)
    assert report.counts() == {"ok": 3}
    summary = _read_csv(out / "summary.csv")
    assert [r["status"] for r in summary] == ["ok"] * 3 and int(summary[0]["voxels_sphere"]) > 0
    metrics = {r["case"]: r for r in _read_csv(out / "metrics.csv")}
    assert float(metrics["case0"]["dice"]) == 1.0 and float(metrics["case2"]["dice"]) == 0.0
    assert (out / "case1_uncertainty.nii.gz").is_file()
    # Rerun: nothing recomputed, files untouched, summary and metrics the same.
    stamp = (out / "case0.nii.gz").stat().st_mtime_ns
    calls = segmenter.calls
    again = run_batch(segmenter, inp, out, options)
    assert again.counts() == {"exists": 3} and segmenter.calls == calls
    assert (out / "case0.nii.gz").stat().st_mtime_ns == stamp
    assert _read_csv(out / "metrics.csv") == list(metrics.values())
    # --overwrite recomputes.
    run_batch(segmenter, inp, out, BatchOptions(overwrite=True, show_progress=False))
    assert segmenter.calls == calls + 3


def _script_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("batch_segment_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_output_inside_input_is_refused_by_the_script(tmp_path, capsys):
    _save(tmp_path / "in" / "a.nii.gz", _sphere(0))
    code = _script_main()(
        [
            "--model",
            str(tmp_path / "nomodel"),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "in" / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "output folder is inside the input folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "in" / "out").exists()


def _run_script(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _outputs(folder: Path):
    return {
        p.relative_to(folder).as_posix(): np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.rglob("*.nii.gz"))
    }


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_bundle_dir):
    import torch

    from tedm_core.bundle import load_bundle
    from tedm_core.pipelines.segment import Segmenter

    inp = tmp_path / "in"
    n_cases = 10
    for i in range(n_cases):
        _save(inp / f"group{i % 2}" / f"case{i:02d}.nii.gz", _sphere(i, shape=(4, 24, 24), inside=200.0, outside=30.0))

    # The uninterrupted reference, in this process (one thread, as the script below). fp32 in
    # both: `auto` is timed in each process, and a loaded machine can tip the tiny model's
    # choice between processes, which would change the last digits, not what is tested here.
    torch.set_num_threads(1)
    reference = run_batch(
        Segmenter(load_bundle(tiny_bundle_dir), device="cpu", precision="fp32"),
        inp,
        tmp_path / "reference",
        BatchOptions(uncertainty=True, show_progress=False),
    )
    assert reference.counts() == {"ok": n_cases}

    out = tmp_path / "out"
    args = [
        "--model",
        tiny_bundle_dir,
        "--input",
        inp,
        "--output",
        out,
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--uncertainty",
        "--no-progress",
    ]
    process = _run_script(args)
    deadline = time.monotonic() + 120
    # Three label files, so that at least two cases are complete: a case's label file is written
    # last and the provenance record marks it done just after, so a kill between the two leaves
    # a label the rerun rightly does not trust (it segments that case again). Cases run one after
    # another, so the third label means the second case was marked done.
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(out.rglob("case*[0-9].nii.gz"))) >= 3:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    done_at_kill = len(list(out.rglob("case*[0-9].nii.gz")))
    assert 3 <= done_at_kill < n_cases, "the batch should have been killed part-way"

    rerun = _run_script(args)
    stdout, stderr = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, stderr
    summary = _read_csv(out / "summary.csv")
    assert sorted(r["status"] for r in summary).count("exists") >= 2 and all(
        r["status"] in ("ok", "exists") for r in summary
    )
    expected, got = _outputs(tmp_path / "reference"), _outputs(out)
    assert sorted(got) == sorted(expected) and len(got) == 2 * n_cases  # labels + uncertainty
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name
    assert not [p for p in out.rglob("*") if ".part" in p.name]  # nothing half-written left behind


# --- provenance per output: a run vouches only for what it wrote ---------------------------------


def _cohort(inp: Path, n: int = 4) -> None:
    for i in range(n):
        _save(inp / f"c{i}.nii.gz", _sphere(i))


def _quiet(**kwargs) -> BatchOptions:
    return BatchOptions(show_progress=False, **kwargs)


def test_each_shard_with_ground_truth_does_its_part_of_the_whole_run(tmp_path):
    """Ground truth for c0 and c2 of four cases: shard 2/2 (c1, c3) holds none of it, and shard
    3/3 of a two-case cohort holds no case; each does what its part of one run does (segment,
    name its unscored cases), not refuse the labels folder or crash."""
    inp, out, labels = tmp_path / "in", tmp_path / "out", tmp_path / "labels"
    _cohort(inp)
    for i in (0, 2):
        _save(labels / f"c{i}.nii.gz", (_sphere(i) > 50).astype(np.uint8), dtype=np.uint8)
    report = run_batch(ThresholdSegmenter(), inp, out, _quiet(labels_dir=labels, shard=(2, 2)))
    assert [(r.case_id, r.status, r.truth) for r in report.results] == [
        ("c1", "ok", "missing"),
        ("c3", "ok", "missing"),
    ]
    small = tmp_path / "small"
    _cohort(small, 2)
    empty = run_batch(ThresholdSegmenter(), small, tmp_path / "out3", _quiet(labels_dir=labels, shard=(3, 3)))
    assert empty.results == []
    wrong = tmp_path / "wrong"  # a folder of other names: still refused, naming the whole cohort
    _save(wrong / "other.nii.gz", np.zeros((6, 24, 24)), dtype=np.uint8)
    with pytest.raises(InputError, match="no ground truth for any of the 4 cases"):
        run_batch(ThresholdSegmenter(), inp, tmp_path / "out4", _quiet(labels_dir=wrong, shard=(1, 2)))


def test_outputs_made_with_other_flip_or_crop_than_the_models_are_not_taken_as_done(tmp_path, tiny_bundle_dir):
    """The model's own test-time flip and cropping are in its content hash; a segmenter that
    departs from them makes other outputs, which a run with the model's settings must not skip
    as its own (and the other way round). Without departures the record's maker key is what it
    was before they were recorded, so folders written then still resume."""
    from tedm_core.bundle import load_bundle
    from tedm_core.io.outputs import maker_key
    from tedm_core.pipelines.batch import provenance_record
    from tedm_core.pipelines.segment import Segmenter

    inp, out = tmp_path / "in", tmp_path / "out"
    _cohort(inp, 2)
    bundle = load_bundle(tiny_bundle_dir)
    plain = Segmenter(bundle, device="cpu")
    flipped = Segmenter(bundle, device="cpu", test_time_flip=not bundle.test_time_flip)
    assert run_batch(plain, inp, out, _quiet()).counts() == {"ok": 2}
    with pytest.raises(InputError, match="with other prediction_overrides"):
        run_batch(flipped, inp, out, _quiet())
    assert run_batch(flipped, inp, out, _quiet(overwrite=True)).counts() == {"ok": 2}
    with pytest.raises(InputError, match="with other prediction_overrides"):
        run_batch(plain, inp, out, _quiet())
    record = provenance_record(plain, _quiet())
    assert record["prediction_overrides"] is None
    legacy = {key: value for key, value in record.items() if key != "prediction_overrides"}
    assert maker_key(record) == maker_key(legacy)


def test_a_partial_overwrite_vouches_only_for_the_outputs_it_wrote(tmp_path):
    from tedm_core.errors import InputError

    inp, out = tmp_path / "in", tmp_path / "out"
    _cohort(inp)
    model_a, model_b = ThresholdSegmenter(threshold=0.0), ThresholdSegmenter(threshold=0.5)
    assert run_batch(model_a, inp, out, _quiet()).counts() == {"ok": 4}
    a_made = {name: (out / name).read_bytes() for name in ("c1.nii.gz", "c2.nii.gz", "c3.nii.gz")}
    assert run_batch(model_b, inp, out, _quiet(overwrite=True, include="c0*")).counts() == {"ok": 1}
    # B's plain run must not take A's c1..c3 as its own.
    with pytest.raises(InputError, match=r"c1\.nii\.gz \(and 2 more.*made by threshold with other model_sha256"):
        run_batch(model_b, inp, out, _quiet())
    assert {name: (out / name).read_bytes() for name in a_made} == a_made
    # A shard of B that covers only its own output is fine, and skips it as done.
    assert run_batch(model_b, inp, out, _quiet(include="c0*")).counts() == {"exists": 1}
    with pytest.raises(InputError, match="made by threshold with other model_sha256"):
        run_batch(model_a, inp, out, _quiet(include="c0*"))
    calls = model_b.calls
    assert run_batch(model_b, inp, out, _quiet(overwrite=True)).counts() == {"ok": 4}
    assert model_b.calls == calls + 4
    assert run_batch(model_b, inp, out, _quiet()).counts() == {"exists": 4}


def test_outputs_outside_a_subset_run_are_never_taken_for_this_models(tmp_path):
    from tedm_core.errors import InputError

    inp, out = tmp_path / "in", tmp_path / "out"
    _cohort(inp, 3)
    for i in (1, 2):  # someone's masks, no record
        _save(out / f"c{i}.nii.gz", np.zeros((6, 24, 24)), dtype=np.uint8)
    model = ThresholdSegmenter()
    with pytest.raises(InputError, match="c1.nii.gz .*no .tedm_outputs.json entry"):
        run_batch(model, inp, out, _quiet())
    assert run_batch(model, inp, out, _quiet(include="c0*")).counts() == {"ok": 1}  # claims the folder
    with pytest.raises(InputError, match="c1.nii.gz .*no .tedm_outputs.json entry"):
        run_batch(model, inp, out, _quiet())
    report = run_batch(model, inp, out, _quiet(overwrite=True))
    assert report.counts() == {"ok": 3} and all(r.voxels[1] > 0 for r in report.results)


def test_an_output_changed_since_it_was_written_is_not_taken_as_done(tmp_path):
    from tedm_core.errors import InputError

    inp, out = tmp_path / "in", tmp_path / "out"
    _cohort(inp, 2)
    model = ThresholdSegmenter()
    run_batch(model, inp, out, _quiet())
    _save(out / "c1.nii.gz", np.zeros((6, 24, 24)), dtype=np.uint8)  # a hand-edited mask
    with pytest.raises(InputError, match="c1.nii.gz has changed since this model wrote it"):
        run_batch(model, inp, out, _quiet())


def test_a_case_stopped_between_its_label_file_and_its_record_is_redone(tmp_path):
    from tedm_core.io.outputs import PROVENANCE_FILE, OutputRecord
    from tedm_core.pipelines.batch import provenance_record

    inp, out = tmp_path / "in", tmp_path / "out"
    _cohort(inp, 2)
    model = ThresholdSegmenter()
    run_batch(model, inp, out, _quiet(include="c0*"))
    # What a kill leaves when it lands after c1's label file and before its entry says done.
    record = OutputRecord(out, provenance_record(model, _quiet()))
    record.writing(out / "c1.nii.gz", [out / "c1.nii.gz"])
    _save(out / "c1.nii.gz", np.zeros((6, 24, 24)), dtype=np.uint8)
    report = run_batch(model, inp, out, _quiet())
    assert {r.case_id: r.status for r in report.results} == {"c0": "exists", "c1": "ok"}
    entries = __import__("json").loads((out / PROVENANCE_FILE).read_text())["outputs"]
    assert entries["c1.nii.gz"]["state"] == "done"


def test_a_record_of_the_earlier_version_is_refused_clearly(tmp_path):
    import json

    from tedm_core.errors import InputError
    from tedm_core.io.outputs import PROVENANCE_FILE
    from tedm_core.pipelines.batch import provenance_record

    inp, out = tmp_path / "in", tmp_path / "out"
    _cohort(inp, 2)
    model = ThresholdSegmenter()
    run_batch(model, inp, out, _quiet())
    legacy = provenance_record(model, _quiet())  # a folder-wide record only, as before
    (out / PROVENANCE_FILE).write_text(json.dumps(legacy))
    with pytest.raises(InputError, match="recorded by an earlier TEDM version"):
        run_batch(model, inp, out, _quiet())
    assert run_batch(model, inp, out, _quiet(overwrite=True)).counts() == {"ok": 2}
    assert run_batch(model, inp, out, _quiet()).counts() == {"exists": 2}


def _shard_worker(inp: Path, out: Path, k: int, n: int) -> None:
    run_batch(ThresholdSegmenter(), inp, out, BatchOptions(shard=(k, n), show_progress=False))


def test_concurrent_shards_keep_each_others_record_entries(tmp_path):
    import json
    import multiprocessing

    from tedm_core.io.outputs import PROVENANCE_FILE

    inp, out = tmp_path / "in", tmp_path / "out"
    n_cases, n_shards = 12, 3
    for i in range(n_cases):
        _save(inp / f"c{i:02d}.nii.gz", _sphere(i, shape=(2, 16, 16)))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_shard_worker, args=(inp, out, k, n_shards)) for k in range(1, n_shards + 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    entries = json.loads((out / PROVENANCE_FILE).read_text())["outputs"]
    assert sorted(entries) == [f"c{i:02d}.nii.gz" for i in range(n_cases)]
    assert {entry["state"] for entry in entries.values()} == {"done"}
    assert run_batch(ThresholdSegmenter(), inp, out, _quiet()).counts() == {"exists": n_cases}
    assert not [p for p in out.iterdir() if ".part" in p.name]


# --- cases under linked folders ------------------------------------------------------------------


def test_cases_under_linked_folders_are_found_once_and_loops_end(tmp_path, caplog):
    archive, inp = tmp_path / "archive", tmp_path / "in"
    _save(archive / "p02" / "scan.nii.gz", _sphere(1))
    _save(archive / "p03.nii.gz", _sphere(2))
    _save(inp / "p01" / "scan.nii.gz", _sphere(0))
    (inp / "p02").symlink_to(archive / "p02")  # a patient's folder linked from an archive
    (inp / "p03.nii.gz").symlink_to(archive / "p03.nii.gz")
    (inp / "p01" / "loop").symlink_to(inp)  # a link back up: must not loop
    (inp / "zz_again").symlink_to(archive / "p02")  # the same folder by a second path: one case
    before = _snapshot(archive)
    with caplog.at_level("WARNING"):
        report = run_batch(ThresholdSegmenter(), inp, tmp_path / "out", _quiet())
    assert [(r.case_id, r.status) for r in report.results] == [("p01/scan", "ok"), ("p02/scan", "ok"), ("p03", "ok")]
    assert (tmp_path / "out" / "p02" / "scan.nii.gz").is_file() and (tmp_path / "out" / "p03.nii.gz").is_file()
    assert "zz_again: it leads to" in caplog.text
    assert _snapshot(archive) == before


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_multichannel_cases_under_linked_folders_are_found(tmp_path):
    archive, inp = tmp_path / "archive", tmp_path / "in"
    for case in ("p1", "p2"):
        _save(archive / case / "FLAIR.nii.gz", _sphere(0))
        _save(archive / case / "T1.nii.gz", _sphere(1))
    inp.mkdir()
    (inp / "site").mkdir()
    (inp / "site" / "p1").symlink_to(archive / "p1")
    (inp / "p2").symlink_to(archive / "p2")
    cases = discover_cases(inp, tmp_path / "out", ["FLAIR", "T1"])
    assert [c.case_id for c in cases] == ["p2", "site/p1"] and not any(c.problem for c in cases)


def test_a_linked_input_leading_into_the_output_folder_is_refused(tmp_path):
    from tedm_core.errors import InputError

    inp, out = tmp_path / "in", tmp_path / "out"
    _save(inp / "a.nii.gz", _sphere(0))
    _save(out / "elsewhere" / "b.nii.gz", _sphere(1))
    (inp / "b").symlink_to(out / "elsewhere")  # its outputs would land beside (or on) its inputs
    with pytest.raises(InputError, match="the output folder holds the input"):
        discover_cases(inp, out, ["image"])


def test_a_case_without_its_own_ground_truth_is_never_scored_against_a_shared_one(tmp_path):
    """--labels given as one subject's folder (a slip): the other case folders, and the files of a
    folder holding several cases, have no ground truth of their own and must come out `missing`,
    never scored against the one GT_W.nii.gz found higher up."""
    import nibabel as nib

    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    subjects = ["subjA", "subjB", "subjC"]
    for index, subject in enumerate(subjects):
        image = np.full((32, 32, 12), 10.0, np.float32)
        image[4 + 6 * index : 12 + 6 * index, 8:20, 2:9] = 80.0
        folder = tmp_path / "in" / subject
        folder.mkdir(parents=True)
        for channel in ("FLAIR", "T1"):
            nib.save(nib.Nifti1Image(image, affine), folder / f"{channel}.nii.gz")
        nib.save(nib.Nifti1Image((image > 50).astype(np.uint8), affine), folder / "GT_W.nii.gz")
    labels = tmp_path / "in" / "subjA"  # the slip: one subject's folder
    options = BatchOptions(labels_dir=labels, label_name="GT_W.nii.gz", show_progress=False)
    segmenter = ThresholdSegmenter(channel_names=("FLAIR", "T1"))
    with pytest.raises(Exception, match="no ground truth for any of the 3 cases"):  # was: all scored against subjA's
        run_batch(segmenter, tmp_path / "in", tmp_path / "out", options)
    # The right folder, with subjB's ground truth missing and a stray GT_W.nii.gz above the cases.
    (tmp_path / "in" / "subjB" / "GT_W.nii.gz").rename(tmp_path / "in" / "GT_W.nii.gz")
    options = BatchOptions(labels_dir=tmp_path / "in", label_name="GT_W.nii.gz", show_progress=False)
    report = run_batch(segmenter, tmp_path / "in", tmp_path / "out", options)
    truth = {r.case_id: r.truth for r in report.results}
    assert truth["subjB"] == "missing" and truth["subjA"] != "missing", truth
    rows = {row["case"]: row for row in csv.DictReader(open(tmp_path / "out" / "metrics.csv"))}
    assert "subjB" not in rows and "subjA" in rows, rows

    # Single-file cases: several in one folder share nothing; one alone in its subject folder does.
    flat = tmp_path / "flat"
    (flat / "site").mkdir(parents=True)
    for subject in subjects:
        nib.save(nib.Nifti1Image(np.asarray(nib.load(tmp_path / "in" / subject / "FLAIR.nii.gz").dataobj), affine),
                 flat / "site" / f"{subject}.nii.gz")  # fmt: skip
    (tmp_path / "flat_labels" / "site").mkdir(parents=True)
    nib.save(nib.load(tmp_path / "in" / "subjA" / "GT_W.nii.gz"), tmp_path / "flat_labels" / "site" / "GT_W.nii.gz")
    options = BatchOptions(labels_dir=tmp_path / "flat_labels", label_name="GT_W.nii.gz", show_progress=False)
    with pytest.raises(Exception, match="no ground truth for any of the 3 cases"):
        run_batch(ThresholdSegmenter(), flat, tmp_path / "flat_out", options)


def test_ground_truth_files_among_one_channel_cases_are_not_cases(tmp_path):
    """subj/image.nii.gz + subj/label.nii.gz, --label-name label.nii.gz, a one-channel model: the label
    files are ground truth, never cases (nor their own ground truth), and each image finds its own."""
    import nibabel as nib

    from tedm_core.pipelines.labelled import load_labelled_data

    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for index, subject in enumerate(["subjA", "subjB"]):
        image = np.full((24, 24, 6), 10.0, np.float32)
        image[4 + 4 * index : 12 + 4 * index, 6:16, 1:5] = 80.0
        folder = tmp_path / "vols" / subject
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(image, affine), folder / "image.nii.gz")
        nib.save(nib.Nifti1Image((image > 50).astype(np.uint8), affine), folder / "label.nii.gz")
    options = BatchOptions(labels_dir=tmp_path / "vols", label_name="label.nii.gz", show_progress=False)
    report = run_batch(ThresholdSegmenter(), tmp_path / "vols", tmp_path / "out", options)
    assert sorted(r.case_id for r in report.results) == ["subjA/image", "subjB/image"]
    assert all(r.truth == "scored" for r in report.results), [r.error for r in report.results]
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert {Path(row["label_file"]).name for row in rows} == {"label.nii.gz"}
    from tedm_core.preprocessing.intensity import BRAIN_T1

    _, labels, sources = load_labelled_data(tmp_path / "vols", None, BRAIN_T1, [0, 1], label_name="label.nii.gz")
    assert sources and not any("label" in str(source) for source in sources), sources
    assert int(np.asarray(labels).max()) == 1


def test_a_case_with_two_ground_truth_files_is_not_scored_against_either(tmp_path):
    inp, out, labels = tmp_path / "in", tmp_path / "out", tmp_path / "labels"
    _cohort(inp, 2)
    for i in range(2):
        _save(labels / f"c{i}.nii.gz", (_sphere(i) > 50).astype(np.uint8), dtype=np.uint8)
    _save(labels / "c1.nii", np.zeros((6, 24, 24)), dtype=np.uint8)  # which is c1's truth?
    report = run_batch(ThresholdSegmenter(), inp, out, _quiet(labels_dir=labels))
    truth = {r.case_id: (r.status, r.truth) for r in report.results}
    assert truth == {"c0": ("ok", "scored"), "c1": ("ok", "unusable")}
    assert "are both the ground truth of case c1" in report.results[1].error
