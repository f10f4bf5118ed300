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
