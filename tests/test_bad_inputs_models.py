"""The bad-input corpus, part two: edited or broken model files, training that diverges, masks
that would be misread, header-declared sizes, and what atomic writes leave behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

nib = pytest.importorskip("nibabel")

from conftest import synthetic_disc_images  # noqa: E402

from tedm_core.errors import BundleError, InputError, SettingError, TrainingDiverged  # noqa: E402

# --- bundle.json: every field validated at load --------------------------------------------------


def _edit(meta: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        meta = meta[key]
    meta[last] = value


BUNDLE_EDITS = {
    "more_classes_than_head_outputs": (
        [("class_names", ["background", "a", "b"]), ("label_values", [0, 1, 2]), ("class_colours", [])],
        "the head has 2 classes but class_names lists 3",
    ),
    "label_values_count": ([("label_values", [0, 1, 2])], "label_values must be one whole number"),
    "label_value_out_of_range": ([("label_values", [0, 70000])], "0..65535"),
    "label_value_repeated": ([("label_values", [1, 1])], "repeat a value"),
    "label_value_not_a_number": ([("label_values", [0, "one"])], "label_values must be"),
    "label_value_bool": ([("label_values", [False, True])], "label_values must be"),
    "class_names_repeated": ([("class_names", ["background", "Background"])], "class_names must list"),
    "class_names_not_a_list": ([("class_names", "background,disc")], "class_names must list"),
    "unknown_method": ([("method", "magic")], "method must be one of"),
    "unknown_axis": ([("axis", "diagonal")], "axis must be one of"),
    "colour_out_of_range": ([("class_colours", [[0, 0, 0], [300, 0, 0]])], "class_colours"),
    "head_timestep_beyond_schedule": ([("head.timesteps", [1, 5000])], "head timesteps"),
    "head_timesteps_empty": ([("head.timesteps", [])], "head timesteps"),
    "head_method_differs": ([("head.method", "ledm")], "differs from the bundle's method"),
    "head_level_channels_differ": ([("head.level_channels", [8, 8, 8])], "do not match the backbone's decoder"),
    "head_hidden_negative": ([("head.hidden", [128, -32])], "hidden widths"),
    "head_missing": ([("head", None)], "needs a 'head' object"),
    "backbone_in_channels_vs_names": ([("backbone.channel_names", ["FLAIR", "T1"])], "channel_names"),
    "backbone_channels_not_numbers": ([("backbone.config.channels", ["16", 32, 32])], "backbone channels"),
    "backbone_groups_do_not_divide": ([("backbone.config.norm_num_groups", 5)], "not all divisible"),
    "backbone_schedule_unknown": ([("backbone.schedule", "quadratic")], "schedule must be one of"),
    "intensity_lower_above_upper": ([("backbone.intensity.lower", 99.5), ("backbone.intensity.upper", 0.5)], "below"),
    "training_not_an_object": ([("training", [1, 2])], "training must be an object"),
    "test_time_flip_not_a_bool": ([("test_time_flip", "yes")], "test_time_flip must be true or false"),
    # Found when an image is normalised, these failed every case as the image's fault (a numpy
    # type error, "percentiles must be in [0, 100]") or, for a zero scale, made garbage silently.
    "intensity_clip_not_a_number": ([("backbone.intensity.clip_min", "a")], "clip_min must be a finite number"),
    "intensity_clip_min_above_max": (
        [("backbone.intensity.clip_min", 50.0), ("backbone.intensity.clip_max", 10.0)],
        "clip_min 50.0 must be below clip_max 10.0",
    ),
    "intensity_percentile_beyond_100": ([("backbone.intensity.upper", 150)], "percentiles in 0..100"),
    "intensity_zscore_scale_zero": ([("backbone.intensity.zscore_scale", 0)], "zscore_scale must be above 0"),
    # Read as int(t) for t in it: 1.5 became 1, and "50" became 5 and 0.
    "inference_timesteps_fractional": ([("inference_timesteps", [1.5])], "inference_timesteps must be a list"),
    "inference_timesteps_a_string": ([("inference_timesteps", "50")], "inference_timesteps must be a list"),
}


@pytest.mark.parametrize("name", sorted(BUNDLE_EDITS))
def test_an_edited_bundle_json_is_refused_naming_the_field(name, tiny_bundle_dir, tmp_path):
    from tedm_core.bundle import load_bundle

    bundle = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    meta = json.loads((bundle / "bundle.json").read_text())
    edits, problem = BUNDLE_EDITS[name]
    for path, value in edits:
        _edit(meta, path, value)
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as caught:
        load_bundle(bundle)
    message = str(caught.value)
    assert "\n" not in message and str(bundle / "bundle.json") in message and problem in message, message


@pytest.mark.parametrize(
    "edit, words",
    [
        ("wrong_shape", "size mismatch for"),
        ("extra", 'Unexpected key(s) in state_dict: "extra"'),
        ("missing", "Missing key(s) in state_dict"),
        ("integers", "holds int32 values where the model has float32"),  # (load_state_dict casts them)
        ("negative_variance", "holds a negative variance"),
    ],
)
def test_head_weights_that_do_not_fit_say_which(edit, words, tiny_bundle_dir, tmp_path):
    """The refusal named only "Error(s) in loading state_dict for FeatureHead:", not what was wrong."""
    from safetensors.torch import load_file, save_file

    from tedm_core.bundle import load_bundle

    bundle = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    tensors = load_file(str(bundle / "head.safetensors"))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.ndim >= 1)[0]
    if edit == "wrong_shape":
        tensors[name] = torch.zeros(3, 3)
    elif edit == "extra":
        tensors["extra"] = torch.zeros(1)
    elif edit == "integers":
        tensors[name] = tensors[name].round().to(torch.int32)
    elif edit == "negative_variance":
        variance = next(k for k in tensors if k.endswith("running_var"))
        tensors[variance] = -tensors[variance].abs() - 1
    else:
        del tensors[name]
    save_file(tensors, str(bundle / "head.safetensors"))
    with pytest.raises(BundleError) as caught:
        load_bundle(bundle)
    message = str(caught.value)
    assert "\n" not in message and str(bundle / "head.safetensors") in message and words in message, message


def test_a_missing_head_file_is_named_as_missing(tiny_bundle_dir, tmp_path):
    from tedm_core.bundle import load_bundle

    bundle = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    (bundle / "head.safetensors").unlink()
    with pytest.raises(BundleError) as caught:
        load_bundle(bundle)
    assert str(caught.value) == f"{bundle / 'head.safetensors'}: missing file"


def test_a_deeply_nested_bundle_json_is_one_line(tiny_bundle_dir, tmp_path, capsys):
    from tedm_core.cli import main

    bundle = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    (bundle / "bundle.json").write_text("[" * 100_000 + "]" * 100_000)
    images = tmp_path / "images"
    images.mkdir()
    code = main(["segment", "--model", str(bundle), "--input", str(images), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nested too deeply" in err and "bundle.json" in err


def test_an_old_step_bundle_still_loads_as_the_probe(tiny_bundle_dir, tmp_path):
    from tedm_core.bundle import load_bundle

    bundle = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["method"] = meta["head"]["method"] = "step"  # a tedm head's weights under the old name: the
    meta["head"]["hidden"] = [128, 32]  # description still matches them, which is what is checked
    (bundle / "bundle.json").write_text(json.dumps(meta))
    assert load_bundle(bundle).method == "probe"


@pytest.mark.parametrize("weights", ["head.safetensors", "backbone.safetensors"])
def test_nan_weights_are_refused_at_load(weights, tiny_bundle_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from tedm_core.bundle import load_bundle

    bundle = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    tensors = load_file(str(bundle / weights))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(bundle / weights))
    with pytest.raises(BundleError, match="NaN or infinite weights") as caught:
        load_bundle(bundle)
    assert str(bundle / weights) in str(caught.value)


def test_a_nan_backbone_is_refused_by_fit(tiny_backbone_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from tedm_core.model.checkpoint import load_backbone

    backbone = shutil.copytree(tiny_backbone_dir, tmp_path / "backbone")
    tensors = load_file(str(backbone / "unet.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * float("inf")
    save_file(tensors, str(backbone / "unet.safetensors"))
    (backbone / "ema.safetensors").unlink(missing_ok=True)
    with pytest.raises(BundleError, match="NaN or infinite weights"):
        load_backbone(backbone)


def test_nan_weights_are_never_written(tiny_bundle_dir, tmp_path):
    from tedm_core.bundle import load_bundle, save_bundle

    bundle = load_bundle(tiny_bundle_dir)
    with torch.no_grad():
        next(bundle.head.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="NaN or infinite"):
        save_bundle(bundle, tmp_path / "nan_bundle")
    assert not (tmp_path / "nan_bundle").exists()


# --- training that diverges stops loudly and keeps the last good checkpoint ---------------------


def _tiny_backbone():
    from tedm_core.model.backbone import PRESETS
    from tedm_core.model.checkpoint import Backbone
    from tedm_core.preprocessing.intensity import RADIOGRAPH

    torch.manual_seed(0)
    return Backbone.new(PRESETS["tiny"], intensity=RADIOGRAPH)


def _tiny_pretrain(out: Path, steps: int, backbone=None, on_step=None, resume=False, overwrite=False, **options):
    from tedm_core.pipelines.pretrain import PretrainOptions, pretrain

    images, _ = synthetic_disc_images(8, size=32, seed=1)
    defaults = {"batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 1, "device": "cpu", "show_progress": False}
    return pretrain(
        torch.from_numpy(images),
        backbone or _tiny_backbone(),
        out,
        PretrainOptions(steps=steps, **{**defaults, **options}),
        resume=resume,
        on_step=on_step,
        overwrite=overwrite,
    )


@pytest.mark.parametrize("when", ["between_checkpoints", "at_a_checkpoint"])
def test_pretraining_that_diverges_stops_and_keeps_the_last_good_checkpoint(when, tmp_path):
    from tedm_core.model.checkpoint import load_backbone

    backbone = _tiny_backbone()
    poison_at = 5 if when == "between_checkpoints" else 4

    def poison(step, loss):  # what a far too large learning rate does, deterministically
        if step == poison_at:
            with torch.no_grad():
                for parameter in backbone.unet.parameters():
                    parameter.fill_(float("nan"))

    out = tmp_path / "ckpt"
    with pytest.raises(TrainingDiverged) as caught:
        _tiny_pretrain(out, steps=20, backbone=backbone, on_step=poison)
    assert "\n" not in str(caught.value) and "diverged" in str(caught.value)
    kept = sorted(p.name for p in (out / "steps").iterdir())
    assert kept == ["00000004" if when == "between_checkpoints" else "00000002"]
    assert load_backbone(out / "steps" / kept[0]).steps_trained == int(kept[0])  # finite: it loads
    assert load_backbone(out).steps_trained == int(kept[0])


def test_retention_never_deletes_checkpoints_newer_than_the_one_saved(tmp_path):
    out = tmp_path / "ckpt"
    _tiny_pretrain(out, steps=4, keep_checkpoints=1)
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["00000004"]
    _tiny_pretrain(out, steps=2, keep_checkpoints=1, overwrite=True)  # afresh: the old run's are removed
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["00000002"]


def test_a_corrupt_trainer_state_on_resume_is_one_line(tmp_path):
    out = tmp_path / "ckpt"
    _tiny_pretrain(out, steps=2)
    state = out / "steps" / "00000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(BundleError) as caught:
        _tiny_pretrain(out, steps=4, resume=True)
    assert str(state) in str(caught.value) and "cannot be read as a trainer state" in str(caught.value)


@pytest.mark.parametrize("edit", ["moment_of_another_shape", "negative_step"])
def test_a_trainer_state_that_does_not_fit_is_refused_before_training(edit, tmp_path):
    """Adam's moments of another weight's shape (as many parameters: load_state_dict took them, the
    first step failed with a traceback), or a negative step, are refused in one line."""
    out = tmp_path / "ckpt"
    _tiny_pretrain(out, steps=2)
    path = out / "steps" / "00000002" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    if edit == "negative_step":
        state["step"] = -5
    else:
        moments = state["optimiser"]["state"][0]
        moments["exp_avg"] = moments["exp_avg"].reshape(-1)
    torch.save(state, path)
    with pytest.raises(BundleError) as caught:
        _tiny_pretrain(out, steps=4, resume=True)
    words = "is for another weight" if edit != "negative_step" else "cannot be read as a trainer state"
    assert str(path) in str(caught.value) and words in str(caught.value), caught.value


def test_resume_asking_for_no_more_steps_is_a_setting_error(tmp_path):
    out = tmp_path / "ckpt"
    _tiny_pretrain(out, steps=2)
    with pytest.raises(SettingError, match="already at step 2"):
        _tiny_pretrain(out, steps=2, resume=True)


def test_resume_finishes_a_last_save_stopped_before_its_top_level_copy(tmp_path, monkeypatch):
    """Killed after its last checkpoint was in place but before the loadable copy at the top level
    was complete: loading the folder says "resume the pretraining to finish the save", and that
    resume (same command) does finish it, with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from tedm_core.errors import BundleError
    from tedm_core.model import checkpoint as checkpoint_module
    from tedm_core.model.checkpoint import load_backbone
    from tedm_core.pipelines import pretrain as pretrain_module

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    _tiny_pretrain(whole, steps=4)
    real = pretrain_module.save_backbone

    def killed_at_the_last_top_level_copy(directory, backbone, ema_state=None):
        if Path(directory) == stopped and backbone.steps_trained == 4:
            checkpoint_module.write_tensors(Path(directory) / "unet.safetensors", backbone.unet.state_dict())
            (Path(directory) / "backbone.json").unlink(missing_ok=True)
            raise KeyboardInterrupt  # the process ends here, as a kill would end it
        return real(directory, backbone, ema_state)

    monkeypatch.setattr(pretrain_module, "save_backbone", killed_at_the_last_top_level_copy)
    with pytest.raises(KeyboardInterrupt):
        _tiny_pretrain(stopped, steps=4)
    monkeypatch.setattr(pretrain_module, "save_backbone", real)
    with pytest.raises(BundleError, match="resume the pretraining to finish the save"):
        load_backbone(stopped)
    finished = _tiny_pretrain(stopped, steps=4, resume=True)
    assert finished.steps_trained == 4 == load_backbone(stopped).steps_trained
    ours, theirs = load_file(str(stopped / "unet.safetensors")), load_file(str(whole / "unet.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert sorted(p.name for p in (stopped / "steps").iterdir()) == ["00000004"]  # keep_checkpoints=1, as whole
    with pytest.raises(SettingError, match="already at step 4"):
        _tiny_pretrain(stopped, steps=4, resume=True)


def test_pretraining_into_a_used_folder_without_resume_or_overwrite_is_refused(tmp_path, capsys):
    from tedm_core.cli import main

    out = tmp_path / "ckpt"
    _tiny_pretrain(out, steps=2)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(images / "a.png")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = main(["pretrain", "--images", str(images), "--out", str(out), "--preset", "tiny", "--steps", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "already holds a checkpoint" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_fitting_on_features_that_make_the_loss_nan_stops(tiny_bundle_dir):
    from tedm_core.bundle import load_bundle
    from tedm_core.heads import FeatureHead
    from tedm_core.pipelines.fit import train_head

    head = FeatureHead(load_bundle(tiny_bundle_dir).head.config)
    levels = [torch.full((2, 8, c, 8, 8), float("nan")) for c in head.config.level_channels]
    with pytest.raises(TrainingDiverged, match="fitting the head diverged"):
        train_head(head, [levels], torch.ones(2, 32, 32, dtype=torch.long), steps=3)


@pytest.mark.parametrize("setting, value", [("steps", 0), ("steps", -5), ("learning_rate", float("nan"))])
def test_fit_bundle_refuses_settings_that_would_make_an_untrained_model(setting, value, tiny_backbone_dir):
    from tedm_core.model.checkpoint import load_backbone
    from tedm_core.pipelines.fit import fit_bundle

    images, masks = synthetic_disc_images(2, size=32)
    with pytest.raises(SettingError) as caught:
        fit_bundle(load_backbone(tiny_backbone_dir), images, masks, device="cpu", **{setting: value})
    assert caught.value.setting == setting


# --- masks that would be misread ---------------------------------------------------------------


def _mask_alpha_only(path: Path, mask: np.ndarray) -> None:
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[..., 3] = mask * 255
    Image.fromarray(rgba).save(path)


def _mask_jpeg(path: Path, mask: np.ndarray) -> None:
    Image.fromarray((mask * 255).astype(np.uint8)).save(path.with_suffix(".jpg"), quality=90)


def _mask_colour(path: Path, mask: np.ndarray) -> None:
    rgb = np.zeros(mask.shape + (3,), np.uint8)
    rgb[mask > 0] = (255, 0, 0)
    Image.fromarray(rgb).save(path)


def _mask_empty(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(np.zeros_like(mask, dtype=np.uint8)).save(path)


@pytest.mark.parametrize(
    "make, problem",
    [
        (_mask_alpha_only, "alpha (transparency) channel"),
        (_mask_jpeg, "is a JPEG"),
        (_mask_colour, "is a colour image"),
        (_mask_empty, "holds no labelled pixels"),
    ],
)
def test_masks_that_would_be_misread_are_refused(make, problem, tiny_backbone_dir, tmp_path, capsys):
    from tedm_core.cli import main

    images_dir, masks_dir = tmp_path / "images", tmp_path / "masks"
    images_dir.mkdir()
    masks_dir.mkdir()
    images, masks = synthetic_disc_images(2, size=32, seed=4)
    for i in range(2):
        Image.fromarray(((images[i, 0] + 1) * 127.5).astype(np.uint8)).save(images_dir / f"c{i}.png")
        Image.fromarray((masks[i] * 255).astype(np.uint8)).save(masks_dir / f"c{i}.png")
    (masks_dir / "c1.png").unlink()
    make(masks_dir / "c1.png", masks[1])
    out = tmp_path / "bundle"
    code = main(
        ["fit", "--backbone", str(tiny_backbone_dir), "--images", str(images_dir), "--masks", str(masks_dir)]
        + ["--out", str(out), "--steps", "2", "--device", "cpu"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and problem in err and "c1." in err, err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["nan", "constant"])
def test_a_labelled_image_that_segment_would_refuse_is_refused_by_fit(kind, tiny_backbone_dir, tmp_path, capsys):
    """A float TIFF with a NaN ended fit in a traceback naming no file; a blank image (one value
    everywhere) was learnt from, as "the structure is here" on nothing. Each is one line naming the
    image, as segment words it."""
    from tedm_core.cli import main

    images_dir, masks_dir = tmp_path / "images", tmp_path / "masks"
    images_dir.mkdir()
    masks_dir.mkdir()
    images, masks = synthetic_disc_images(2, size=32, seed=4)
    Image.fromarray(((images[0, 0] + 1) * 127.5).astype(np.uint8)).save(images_dir / "c0.png")
    for i in range(2):
        Image.fromarray((masks[i] * 255).astype(np.uint8)).save(masks_dir / f"c{i}.png")
    bad = images[1, 0].astype(np.float32)
    if kind == "nan":
        bad[3, 3] = np.nan
    else:
        bad[:] = 7.0
    Image.fromarray(bad, mode="F").save(images_dir / "c1.tif")
    out = tmp_path / "bundle"
    code = main(
        ["fit", "--backbone", str(tiny_backbone_dir), "--images", str(images_dir), "--masks", str(masks_dir)]
        + ["--out", str(out), "--steps", "2", "--device", "cpu"]
    )
    err = capsys.readouterr().err.strip()
    words = "contains 1 NaN or infinite voxel values" if kind == "nan" else "every voxel is 7: the image is empty"
    assert code == 2 and err == f"tedm fit: error: {images_dir / 'c1.tif'}: {words}", err
    assert not out.exists()


def test_an_image_without_its_mask_is_named_not_dropped(tmp_path):
    from tedm_core.pipelines.labelled import match_image_pairs

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((16, 16), 100, np.uint8)).save(images / f"{name}.png")
    for name in ("a", "c", "z"):  # z: a mask without an image is fine (a pool of masks)
        Image.fromarray(np.full((16, 16), 255, np.uint8)).save(masks / f"{name}.png")
    with pytest.raises(InputError) as caught:
        match_image_pairs(images, masks)
    assert str(images / "b.png") in str(caught.value) and "1 of 3 images" in str(caught.value)


def test_fit_bundle_refuses_labels_that_are_all_background(tiny_backbone_dir):
    from tedm_core.model.checkpoint import load_backbone
    from tedm_core.pipelines.fit import fit_bundle

    images, masks = synthetic_disc_images(2, size=32)
    with pytest.raises(InputError, match="every labelled pixel is background"):
        fit_bundle(load_backbone(tiny_backbone_dir), images, np.zeros_like(masks), steps=2, device="cpu")


# --- volumes whose header declares more than memory holds ---------------------------------------


def test_a_nifti_declaring_a_huge_grid_is_refused_before_allocation(tmp_path):
    from tedm_core.io.volumes import read_volume

    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).header
    header.set_data_shape((30000, 30000, 30000))
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 1004)
    with pytest.raises(InputError, match="declares a 30000x30000x30000 grid") as caught:
        read_volume(path)
    assert str(path) in str(caught.value)


def test_an_mha_declaring_a_huge_grid_is_refused_before_allocation(tmp_path):
    from tedm_core.io.volumes import read_volume

    path = tmp_path / "huge.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 30000 30000 30000\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    with pytest.raises(InputError, match="declares a 30000x30000x30000 grid"):
        read_volume(path)


# --- atomic writes: the umask's mode, no stale temporaries, disk full ---------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_keep_the_umask_mode(umask, mode, tmp_path):
    from tedm_core.io.atomic import write_text_atomic

    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "out.csv", "a,b\n")
    finally:
        os.umask(old)
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == mode


def test_a_rerun_removes_the_temporaries_a_killed_run_left(tiny_bundle_dir, tmp_path, capsys):
    from tedm_core.cli import main

    images = tmp_path / "images"
    images.mkdir()
    data, _ = synthetic_disc_images(2, size=32, seed=6)
    for i in range(2):
        Image.fromarray(((data[i, 0] + 1) * 127.5).astype(np.uint8)).save(images / f"x{i}.png")
    out = tmp_path / "pred"
    argv = ["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(out), "--uncertainty"]
    assert main(argv) == 0
    (out / "x1.png").unlink()  # as after a kill -9 between a case's maps and its label file
    stale = [out / ".x1.png.dead.part.png", out / ".x1_uncertainty.png.beef.part.png", out / ".summary.csv.0a.part.csv"]
    for path in stale:
        path.write_bytes(b"half")
    assert main(argv) == 0
    assert not any(p.exists() for p in stale) and (out / "x1.png").is_file()
    assert not list(out.glob("*.part*")) and not list(out.glob(".*.part*"))


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EROFS, "Read-only file system"),
        (errno.EACCES, "Permission denied"),
    ],
)
def test_disk_full_stops_the_batch_with_one_line(code, words, tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    import tedm_core.pipelines.batch as batch
    from tedm_core.cli import main

    images = tmp_path / "images"
    images.mkdir()
    data, _ = synthetic_disc_images(3, size=32, seed=7)
    for i in range(3):
        Image.fromarray(((data[i, 0] + 1) * 127.5).astype(np.uint8)).save(images / f"y{i}.png")
    calls = []

    def full(path, *args, **kwargs):
        calls.append(path)
        raise OSError(code, words, str(path))

    monkeypatch.setattr(batch, "write_label_volume", full)
    status = main(["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # (progress bars aside)
    assert status == 2 and len(err) == 1 and words in err[0] and "y0.png" in err[0], err
    assert len(calls) == 1  # stopped at the first case, not tried on every one
    assert not list((tmp_path / "o").glob("*.png"))


def test_bundles_are_written_with_the_umask_mode_and_replace_only_bundles(tiny_bundle_dir, tmp_path):
    from tedm_core.bundle import load_bundle, save_bundle

    bundle = load_bundle(tiny_bundle_dir)
    old = os.umask(0o022)
    try:
        target = save_bundle(bundle, tmp_path / "copy")
        save_bundle(bundle, target, overwrite=True)  # a bundle may replace a bundle
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in target.iterdir()} == {0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no staging or previous copy left


@pytest.mark.parametrize("mistake", ["backbone_as_model", "bundle_as_backbone"])
def test_a_backbone_and_a_bundle_are_told_apart(mistake, tiny_backbone_dir, tiny_bundle_dir, tmp_path, capsys):
    from tedm_core.cli import main

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(images / "a.png")
    if mistake == "backbone_as_model":
        argv = ["segment", "--model", str(tiny_backbone_dir), "--input", str(images), "--output", str(tmp_path / "o")]
        expected = "is a pretrained backbone, not a fitted model"
    else:
        argv = ["fit", "--backbone", str(tiny_bundle_dir), "--images", str(images), "--masks", str(images)]
        argv += ["--out", str(tmp_path / "b")]
        expected = "is a fitted model bundle, not a pretrained backbone"
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


def test_masks_folder_that_is_the_images_folder_is_refused(tmp_path):
    from tedm_core.pipelines.labelled import match_image_pairs

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(images / "a.png")
    with pytest.raises(InputError, match="each image would be taken for its own mask"):
        match_image_pairs(images, images)


def test_a_checkpoint_staged_by_a_killed_run_is_cleaned(tmp_path):
    out = tmp_path / "ckpt"
    _tiny_pretrain(out, steps=2)
    stale = out / "steps" / ".00000004.partial"
    stale.mkdir()
    (stale / "unet.safetensors").write_bytes(b"half")
    _tiny_pretrain(out, steps=4, resume=True)
    assert not stale.exists() and (out / "steps" / "00000004").is_dir()
