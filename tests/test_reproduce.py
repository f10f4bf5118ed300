"""The study command (issue 10): ``scripts/reproduce.py --smoke`` runs every section on tiny sizes,
writes the tables, plots and summary, and a rerun resumes instead of redoing the work."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import REPO, require_shared_data


def _run(tmp_path, *extra, config=REPO / "configs" / "paper_study.json"):
    command = [
        sys.executable,
        str(REPO / "scripts" / "reproduce.py"),
        str(config),
        "--smoke",
        "--work",
        str(tmp_path / "work"),
        "--results",
        str(tmp_path / "results"),
        "--data",
        str(require_shared_data()),
        "--threads",
        "1",
        *extra,
    ]
    tic = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - tic, done.stderr


def test_smoke_study_runs_every_section_and_resumes(tmp_path):
    require_shared_data("cxr", "shenzhen")
    require_shared_data("brain", "brats")
    seconds, _ = _run(tmp_path)
    results = tmp_path / "results"
    summary = json.loads((results / "summary.json").read_text())
    for key in (
        "shenzhen_tedm_n3",
        "covid_gb_tedm_n3",
        "covid_gb_tedm_n3_min_over_checkpoints",
        "p_tedm_vs_baseline_covid_gb_n3",
        "p_tedm_vs_ledm_covid_gb_n3",
        "brats_refine_round3",
        "brats_refine_round5",
        "brats_paste_only_round5",
        "brats_scratch_round5",
    ):
        assert key in summary  # null where the smoke sizes do not reach (n = 3, round 5)
    assert summary["covid_gb_tedm_n3_min_over_checkpoints"] is not None
    # The report applies the checkpoint rule itself: the best mean over the validation sets.
    assert summary["cxr_checkpoint_chosen_on_validation"] in (2, 4)
    text = (results / "RESULTS.md").read_text()
    for heading in (
        "shenzhen_test (test)",
        "covid_gb (test)",
        "Single-step ablation",
        "| steps 1, 10 |",  # a subset of the 8 steps at inference, beside the single steps
        "Step-wise logistic probes",
        "Checkpoint sweep",
        "Chosen on validation",
        "Compute per image",
        "BraTS",
        "Correct-and-refine",
        "Validation experiments",
    ):
        assert heading in text, heading
    assert (results / "probes.png").stat().st_size > 1000
    assert (results / "refine_curve.png").stat().st_size > 1000
    # Per-image metrics of a fitted bundle, as a unit of work on disk.
    metrics = list((tmp_path / "work" / "cxr" / "bundles").glob("*/tedm_n1_s0/metrics/covid_gb.csv"))
    assert metrics and "precision" in metrics[0].read_text().splitlines()[0]
    # A rerun finds every unit done: nothing is fitted or scored again.
    again, log = _run(tmp_path)
    assert " fit " not in log and "Dice" not in log, log[-2000:]
    assert again < seconds
    print(f"smoke study: {seconds:.0f} s, rerun {again:.0f} s")
    # A second study reporting into the same folder (here: the BraTS part alone, under its own
    # report name) replaces only the keys it measured; the others keep their values and sources.
    brats_only = json.loads((REPO / "configs" / "paper_study.json").read_text())
    brats_only.update(name="brats_only", report_name="RESULTS_brats")
    for config in (brats_only, brats_only["smoke"]):
        config.pop("cxr")
        config.pop("compute")
    config_path = tmp_path / "brats_only.json"
    config_path.write_text(json.dumps(brats_only))
    before = (results / "RESULTS.md").read_text()
    _run(tmp_path, "--only", "report", config=config_path)
    merged = json.loads((results / "summary.json").read_text())
    assert merged["p_tedm_vs_ledm_covid_gb_n3"] == summary["p_tedm_vs_ledm_covid_gb_n3"]
    assert merged["_sources"]["covid_gb_tedm_n3_min_over_checkpoints"]["config"] == "paper_study"
    # (the smoke curve stops at round 2, so the BraTS report measures no summary key of its own)
    assert {source["config"] for source in merged["_sources"].values()} == {"paper_study"}
    assert (results / "RESULTS.md").read_text() == before
    assert "Correct-and-refine" in (results / "RESULTS_brats.md").read_text()
    assert (results / "RESULTS_brats.config.json").is_file()


def test_the_refine_curve_corrects_the_tumour_slices_with_the_most_wrong_voxels():
    sys.path.insert(0, str(REPO / "scripts"))
    import numpy as np
    from reproduce import most_wrong_slices

    truth = np.zeros((5, 8, 8), np.uint8)
    truth[1, :4] = 1  # 32 tumour voxels
    truth[2, 0, 0] = 1  # a sliver: its slice Dice is 0, but it has one wrong voxel
    truth[3, :2] = 1
    labels = np.zeros_like(truth)
    labels[0] = 1  # 64 false positives on a slice without tumour: not a tumour slice
    labels[3, :2] = 1  # right
    labels[3, 7] = 1  # 8 false positives
    assert most_wrong_slices(labels, truth, [], 2) == [1, 3]
    assert most_wrong_slices(labels, truth, [1], 5) == [3, 2]  # slices without an error are never chosen
    assert most_wrong_slices(truth, truth, [], 2) == []


def test_cxr_seeds_follow_n_and_the_per_method_narrowing():
    sys.path.insert(0, str(REPO / "scripts"))
    from reproduce import cxr_seeds

    cxr = {"seeds": [0, 1, 2], "seeds_up_to_n": 3, "seeds_by_method": {"baseline": [0]}}
    assert cxr_seeds(cxr, "tedm", 3) == [0, 1, 2]
    assert cxr_seeds(cxr, "tedm", 6) == [0]
    assert cxr_seeds(cxr, "baseline", 3) == [0]
    assert cxr_seeds({"seeds": [0, 1], "seeds_up_to_n": 3}, "baseline", 1) == [0, 1]
