"""tedm refine's inputs: channel files matched to the model by name, corrections checked on reading,
label files written as segment writes them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import List

import nibabel as nib
import numpy as np
import pytest

import tedm_core.bundle
import tedm_core.pipelines.interactive
from tedm_core.cli import main
from tedm_core.errors import TEDMError


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4)), str(path))
    return path


class _Stop(TEDMError):
    """Raised by the stand-in session once refine has handed it the image."""


@pytest.fixture
def two_channel_refine(monkeypatch):
    """``tedm refine`` against a FLAIR, T1 model, stopped where the image reaches the session;
    returns the list the images it was given are appended to."""
    seen: List = []

    class Session:
        def __init__(self, image) -> None:
            seen.append(image)
            raise _Stop("stopped after reading")

    model = SimpleNamespace(channel_names=["FLAIR", "T1"], label_values=[0, 1])
    monkeypatch.setattr(tedm_core.bundle, "load_bundle", lambda path: model)
    monkeypatch.setattr(tedm_core.pipelines.interactive, "InteractiveSession", Session)
    return seen


def _refine_argv(tmp_path: Path, *images: Path) -> List[str]:
    corrected = _nifti(tmp_path / "corrected.nii.gz", np.zeros((6, 5, 4)))
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return ["refine", "--model", str(model), "--image", *map(str, images), "--corrected", str(corrected)] + [
        "--out",
        str(tmp_path / "refined"),
    ]


def test_refine_takes_channel_files_by_name_not_position(tmp_path, two_channel_refine, capsys):
    flair = _nifti(tmp_path / "FLAIR.nii.gz", np.full((6, 5, 4), 10.0) + np.arange(4))
    t1 = _nifti(tmp_path / "t1.nii.gz", np.full((6, 5, 4), 50.0) + np.arange(4))
    assert main(_refine_argv(tmp_path, t1, flair)) == 2  # T1 given first
    assert "stopped after reading" in capsys.readouterr().err
    (image,) = two_channel_refine
    assert image.array[0].min() == 10.0 and image.array[1].min() == 50.0  # FLAIR first, as the model expects


def test_refine_refuses_channel_files_named_after_no_channel(tmp_path, two_channel_refine, capsys):
    a = _nifti(tmp_path / "a.nii.gz", np.full((6, 5, 4), 10.0) + np.arange(4))
    b = _nifti(tmp_path / "b.nii.gz", np.full((6, 5, 4), 50.0) + np.arange(4))
    assert main(_refine_argv(tmp_path, a, b)) == 2
    err = capsys.readouterr().err
    assert not two_channel_refine
    assert len(err.strip().splitlines()) == 1 and f"{a}: names no channel" in err and "FLAIR, T1" in err


def _png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def _disc_png_pair(tmp_path: Path):
    from conftest import synthetic_disc_images

    images, masks = synthetic_disc_images(1, size=32, seed=5)
    image = _png(tmp_path / "image.png", (images[0, 0] + 1) * 127.5)
    return image, masks[0]


def test_refine_writes_a_one_structure_png_as_segment_does_0_and_255(tiny_bundle_dir, tmp_path):
    from PIL import Image

    from tedm_core.bundle import load_bundle

    assert len(load_bundle(tiny_bundle_dir).class_names) == 2
    image, mask = _disc_png_pair(tmp_path)
    corrected = _png(tmp_path / "corrected.png", mask * 255)
    output = tmp_path / "seg.png"
    argv = ["refine", "--model", str(tiny_bundle_dir), "--image", str(image), "--corrected", str(corrected)]
    assert main([*argv, "--out", str(tmp_path / "refined"), "--output", str(output), "--steps", "2"]) == 0
    values = set(np.unique(np.asarray(Image.open(output))).tolist())
    assert values <= {0, 255} and 255 in values


def test_refine_checks_the_corrected_label_values_before_segmenting(tiny_bundle_dir, tmp_path, monkeypatch, capsys):
    segmented = []
    real_segment = tedm_core.pipelines.interactive.InteractiveSession.segment
    monkeypatch.setattr(
        tedm_core.pipelines.interactive.InteractiveSession,
        "segment",
        lambda self, *a, **k: segmented.append(1) or real_segment(self, *a, **k),
    )
    image, mask = _disc_png_pair(tmp_path)
    values = mask.copy()
    values[:2, :2] = 7  # a second structure value for a one-structure model
    corrected = _png(tmp_path / "corrected.png", values)
    argv = ["refine", "--model", str(tiny_bundle_dir), "--image", str(image), "--corrected", str(corrected)]
    assert main([*argv, "--out", str(tmp_path / "refined")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(corrected) in err
    assert not segmented
