"""Masks of 2D images given as volumes are named as such, not as missing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import write_disc_pngs

from tedm_core.errors import InputError
from tedm_core.pipelines.labelled import load_labelled_data
from tedm_core.preprocessing.intensity import RADIOGRAPH


def test_a_nifti_mask_of_a_png_image_is_called_a_volume(tmp_path):
    images = write_disc_pngs(tmp_path / "images", 2, size=32)
    masks = tmp_path / "masks"
    masks.mkdir()
    for image in sorted(images.iterdir()):
        mask = np.zeros((32, 32, 1), dtype=np.uint8)
        mask[10:20, 10:20] = 1
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(masks / f"{image.stem}.nii.gz"))
    with pytest.raises(InputError) as error:
        load_labelled_data(images, masks, RADIOGRAPH, [0, 1])
    message = str(error.value)
    assert message.startswith(str(masks / "img_00.nii.gz")) and "is a volume" in message
    assert "masks of 2D images must be 2D images" in message and "\n" not in message
