"""The model and training faces under a user's mistakes and accidents: a pretraining killed while
saving, resumed with other settings or into a bundle, and hand-edited model files."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_disc_images, write_disc_pngs
from PIL import Image
from safetensors.torch import load_file

from tedm_core.cli import main
from tedm_core.errors import BundleError, SettingError

REPO = Path(__file__).resolve().parents[1]


def _pngs(folder: Path, n: int = 6) -> Path:
    return write_disc_pngs(folder, n, size=32)


PRETRAIN = ["--preset", "tiny", "--batch-size", "2", "--checkpoint-every", "2"]


def _files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_pretrain(out: Path, steps: int, resume: bool = False, images=None, **options):
    from tedm_core.model.backbone import PRESETS
    from tedm_core.model.checkpoint import Backbone
    from tedm_core.pipelines.pretrain import PretrainOptions, pretrain
    from tedm_core.preprocessing.intensity import RADIOGRAPH

    if images is None:
        images, _ = synthetic_disc_images(8, size=32, seed=1)
    torch.manual_seed(0)
    backbone = Backbone.new(PRESETS["tiny"], intensity=RADIOGRAPH)
    defaults = {"batch_size": 4, "checkpoint_every": 2, "device": "cpu", "show_progress": False}
    return pretrain(
        torch.from_numpy(images), backbone, out, PretrainOptions(steps=steps, **{**defaults, **options}), resume=resume
    )


# --- a pretraining killed while it saves ---------------------------------------------------------

# Runs `tedm pretrain`, killing the process (os._exit: no cleanup, as kill -9) right after the
# N-th safetensors file is written. Each checkpoint writes 4: the step folder's unet and EMA,
# then the top-level copy's unet and EMA.
_KILLED_AFTER_WRITE = """
import os, sys
import tedm_core.model.checkpoint as checkpoint
kill_after, written, write = int(sys.argv[1]), [0], checkpoint.write_tensors
def killed(path, tensors):
    write(path, tensors)
    written[0] += 1
    if written[0] == kill_after:
        os._exit(9)
checkpoint.write_tensors = killed
from tedm_core.cli import main
main(sys.argv[2:])
"""


def test_a_pretraining_killed_while_saving_leaves_no_mixed_backbone(tmp_path, capsys):
    from tedm_core.model.checkpoint import load_backbone

    pngs, out = _pngs(tmp_path / "pngs"), tmp_path / "ckpt"
    argv = ["pretrain", "--images", str(pngs), "--out", str(out), *PRETRAIN, "--ema", "0.9"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # Killed after the step-4 checkpoint is in place and the top-level unet is written, before its EMA.
    run = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_WRITE, "7", *argv, "--steps", "4"], env=env, capture_output=True
    )
    assert run.returncode == 9, run.stderr[-2000:]
    # The top level holds step 4's unet but step 2's EMA: it must not load as a backbone (it did,
    # as step 2 with step 2's EMA, over step 4's weights).
    with pytest.raises(BundleError) as caught:
        load_backbone(out)
    message = str(caught.value)
    assert "backbone.json" in message and "stopped while saving" in message and "00000004" in message
    assert "\n" not in message
    code = main(
        ["fit", "--backbone", str(out), "--images", str(pngs), "--masks", str(pngs), "--out", str(tmp_path / "b")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "stopped while saving" in err, err
    # Resuming finishes the run, and the top level is then one step's files.
    assert main([*argv, "--steps", "6", "--resume"]) == 0
    backbone = load_backbone(out, use_ema=False)
    assert backbone.steps_trained == 6
    for name in ("unet.safetensors", "ema.safetensors"):
        top, step = load_file(str(out / name)), load_file(str(out / "steps" / "00000006" / name))
        assert all(torch.equal(top[k], step[k]) for k in top), name


def test_a_save_without_ema_removes_the_earlier_saves_ema(tmp_path):
    from tedm_core.model.backbone import PRESETS
    from tedm_core.model.checkpoint import Backbone, load_backbone, save_backbone

    torch.manual_seed(0)
    backbone = Backbone.new(PRESETS["tiny"])
    stale = {k: torch.zeros_like(v) for k, v in backbone.unet.state_dict().items()}
    save_backbone(tmp_path, backbone, stale)
    save_backbone(tmp_path, backbone)  # the same folder, now without EMA
    assert not (tmp_path / "ema.safetensors").exists()
    loaded = load_backbone(tmp_path).unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in backbone.unet.state_dict().items())


# --- resuming with other settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    "changed, words",
    [
        (["--schedule", "linear"], "schedule 'cosine' (now 'linear')"),
        (["--intensity", "brain"], "intensity 'radiograph' (now 'brain')"),
        (["--image-size", "64"], "image_size 32 (now 64)"),
        (["--preset", "small"], "preset 'tiny' (now 'small')"),
        (["--ema", "0.99"], "ema_decay 0.9 (now 0.99)"),
        (["--lr", "0.001"], "learning_rate 0.0001 (now 0.001)"),
        (["--seed", "4"], "seed 0 (now 4)"),
        (["--flip"], "flip False (now True)"),
    ],
)
def test_resume_with_other_settings_is_refused_before_the_images_are_read(
    changed, words, tmp_path, capsys, monkeypatch
):
    """The checkpoint's weights were learnt with its settings: continuing with others silently
    wrote a backbone described with the new schedule or intensity convention, and the optimiser
    state restored kept the old learning rate whatever --lr said."""
    import tedm_core.data

    pngs, out = _pngs(tmp_path / "pngs"), tmp_path / "ckpt"
    base = ["pretrain", "--images", str(pngs), "--out", str(out), *PRETRAIN, "--ema", "0.9"]
    assert main([*base, "--steps", "2"]) == 0
    capsys.readouterr()
    before = _files(out)

    def not_read(*args, **kwargs):
        raise AssertionError("the images were read before the refusal")

    monkeypatch.setattr(tedm_core.data, "load_pretraining_slices", not_read)
    code = main([*base, *changed, "--steps", "4", "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err and "00000002" in err, err
    assert _files(out) == before


def test_resume_without_the_ema_is_refused_naming_the_option(tmp_path):
    out = tmp_path / "ckpt"
    _tiny_pretrain(out, steps=2, ema_decay=0.9)
    with pytest.raises(SettingError) as caught:
        _tiny_pretrain(out, steps=4, resume=True)
    assert caught.value.setting == "ema_decay" and "ema_decay 0.9 (now None)" in str(caught.value)


def test_ema_added_when_resuming_an_older_checkpoint_starts_from_the_restored_weights(tmp_path):
    """A checkpoint written before the options were recorded resumes with an EMA asked for: the
    EMA starts from the restored weights (it was a copy of the new run's random initial weights,
    averaged as if it had followed the whole run)."""
    out = tmp_path / "ckpt"
    _tiny_pretrain(out, steps=2)
    state_path = out / "steps" / "00000002" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    torch.save({"step": state["step"], "optimiser": state["optimiser"]}, state_path)  # the older format
    _tiny_pretrain(out, steps=3, resume=True, ema_decay=0.9, checkpoint_every=1)
    ema, unet = load_file(str(out / "ema.safetensors")), load_file(str(out / "unet.safetensors"))
    assert all(torch.equal(ema[k], unet[k]) for k in unet)  # one update from n = 0: a copy of the weights


def test_resume_on_other_images_says_it_will_not_repeat_the_run(tmp_path, caplog):
    out = tmp_path / "ckpt"
    _tiny_pretrain(out, steps=2)
    other, _ = synthetic_disc_images(5, size=32, seed=9)
    with caplog.at_level(logging.WARNING, logger="tedm_core.pipelines.pretrain"):
        _tiny_pretrain(out, steps=4, resume=True, images=other)
    assert any(
        "training images differ" in r.getMessage() and "8 slices then, 5 now" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("mode", ["--resume", "--overwrite", None])
def test_pretraining_into_a_model_bundle_is_refused(mode, tiny_bundle_dir, tmp_path, capsys):
    import shutil

    bundle = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    before = _files(bundle)
    pngs = _pngs(tmp_path / "pngs")
    code = main(
        ["pretrain", "--images", str(pngs), "--out", str(bundle), *PRETRAIN, "--steps", "2"] + ([mode] if mode else [])
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is a fitted model bundle" in err, err
    assert _files(bundle) == before


# --- where a bundle is saved ---------------------------------------------------------------------


def _fit_argv(backbone: Path, pngs: Path, out: Path) -> list:
    return ["fit", "--backbone", str(backbone), "--images", str(pngs), "--masks", str(pngs.parent / "masks")] + [
        "--out",
        str(out),
        "--steps",
        "2",
        "--members",
        "1",
    ]


def _labelled_pngs(folder: Path) -> Path:
    images, masks = synthetic_disc_images(2, size=32, seed=5)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i, (image, mask) in enumerate(zip(images, masks)):
        Image.fromarray(((image[0] + 1) * 127.5).astype(np.uint8)).save(folder / "images" / f"{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "masks" / f"{i}.png")
    return folder / "images"


def test_overwriting_a_linked_bundle_replaces_the_bundle_it_points_to(tiny_backbone_dir, tiny_bundle_dir, tmp_path):
    """models/current -> models/v1: the link became a folder of its own, v1 stayed the old model
    and a '.current.previous' link was left behind."""
    import shutil

    from tedm_core.bundle import load_bundle

    pngs = _labelled_pngs(tmp_path / "data")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_bundle_dir, models / "v1")
    (models / "current").symlink_to("v1")
    old = (models / "v1" / "head.safetensors").read_bytes()
    assert main(_fit_argv(tiny_backbone_dir, pngs, models / "current") + ["--overwrite"]) == 0
    assert (models / "current").is_symlink() and os.readlink(models / "current") == "v1"
    assert (models / "v1" / "head.safetensors").read_bytes() != old
    assert load_bundle(models / "current").training["labelled_slices"] == 2
    assert sorted(p.name for p in models.iterdir()) == ["current", "v1"]


def test_a_bundle_saved_at_a_broken_link_is_refused_before_the_work(tiny_backbone_dir, tmp_path, capsys):
    """It failed after the fitting with '.model.partial: Not a directory', leaving that folder."""
    pngs = _labelled_pngs(tmp_path / "data")
    (tmp_path / "model").symlink_to(tmp_path / "gone")
    code = main(_fit_argv(tiny_backbone_dir, pngs, tmp_path / "model"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is a link to" in err and "does not exist" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model"]


def test_a_bundle_whose_replacement_was_interrupted_says_where_the_old_one_is(tiny_bundle_dir, tmp_path):
    import shutil

    from tedm_core.bundle import load_bundle, save_bundle

    previous = shutil.copytree(tiny_bundle_dir, tmp_path / ".model.previous")  # moved aside, then killed
    with pytest.raises(BundleError) as caught:
        load_bundle(tmp_path / "model")
    assert "interrupted" in str(caught.value) and str(previous) in str(caught.value)
    save_bundle(load_bundle(previous), tmp_path / "model")  # saving again completes it
    assert load_bundle(tmp_path / "model") and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- labelled data -------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [["0", "255", "100"], None])
def test_a_class_no_mask_holds_is_refused_before_fitting(values, tiny_backbone_dir, tmp_path, capsys):
    """Two structures asked for, masks holding one: a 3-class model was fitted and saved whose
    third class had never been seen (a wrong label value, or a class too many)."""
    pngs = _labelled_pngs(tmp_path / "data")
    if values is None:  # masks as 0/1 with the default values 0, 1, 2
        for mask in (tmp_path / "data" / "masks").iterdir():
            Image.fromarray((np.asarray(Image.open(mask)) > 0).astype(np.uint8)).save(mask)
    argv = _fit_argv(tiny_backbone_dir, pngs, tmp_path / "model") + ["--classes", "lung", "heart"]
    code = main(argv + (["--label-values", *values] if values else []))
    err = capsys.readouterr().err.strip()
    value = values[2] if values else "2"
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "masks" in err and f"class 2 (label value {value})" in err and "every class needs examples" in err
    assert not (tmp_path / "model").exists()


# --- tedm refine: where its results go, checked before the work ----------------------------------


@pytest.mark.parametrize(
    "where, words",
    [
        ({"--out": "refined", "--output": "seg.txt"}, "argument --output: seg.txt: unsupported format"),
        ({"--out": "seg.nii.gz", "--output": "seg.nii.gz"}, "is the --out model folder too"),
        ({"--out": "model/refined"}, "inside the model folder"),
        ({"--out": "afile/refined"}, "afile: is a file, not a folder"),
        ({"--out": "refined", "--output": "afile/seg.nii.gz"}, "afile: is a file, not a folder"),
    ],
)
def test_refine_outputs_that_cannot_be_written_are_refused_before_the_work(
    where, words, tiny_bundle_dir, tmp_path, capsys, monkeypatch
):
    """Found after segmenting and refining, the refined model was lost ('.refined.partial: Not a
    directory'), or saved and followed by a traceback (an output of no known format), or saved
    inside the model it came from."""
    import shutil

    import nibabel as nib

    import tedm_core.pipelines.interactive as interactive

    shutil.copytree(tiny_bundle_dir, tmp_path / "model")
    (tmp_path / "afile").write_text("notes")
    array = np.zeros((8, 8, 4), np.float32)
    array[2:6, 2:6] = 80.0
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image((array > 0).astype(np.uint8), np.eye(4)), tmp_path / "corrected.nii.gz")

    def not_run(*args, **kwargs):
        raise AssertionError("the work started before the refusal")

    monkeypatch.setattr(interactive, "InteractiveSession", not_run)
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    argv = ["refine", "--model", "model", "--image", "image.nii.gz", "--corrected", "corrected.nii.gz"]
    code = main(argv + [item for pair in where.items() for item in pair])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert _files(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model", "afile", "image.nii.gz", "corrected.nii.gz"]
    )
