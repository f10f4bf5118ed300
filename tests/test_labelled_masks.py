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


def test_two_masks_for_one_labelled_image_or_case_are_refused_naming_both(tmp_path):
    """msk/a.png beside msk/a.tif, or case1.nii beside case1.nii.gz: one was taken by the sort or
    suffix order, unseen, and the model learnt from a ground truth nobody chose."""
    import nibabel as nib
    from PIL import Image

    from tedm_core.errors import InputError
    from tedm_core.pipelines.labelled import load_labelled_data, match_image_pairs
    from tedm_core.preprocessing.intensity import MULTIMODAL_MRI

    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(images / "a.png")
    one = np.zeros((16, 16), np.uint8)
    one[4:8, 4:8] = 255
    Image.fromarray(one).save(masks / "a.png")
    Image.fromarray(one).save(masks / "a.tif")
    with pytest.raises(InputError, match=r"a\.tif: and a\.png are both masks of a\.png"):
        match_image_pairs(images, masks)

    volumes, labels = tmp_path / "vol", tmp_path / "lab"
    volumes.mkdir()
    labels.mkdir()
    image = np.random.default_rng(0).uniform(10, 200, (8, 8, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(volumes / "case1.nii.gz"))
    label = np.zeros((8, 8, 6), np.uint8)
    label[2:5, 2:5, 2:4] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(labels / "case1.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(labels / "case1.nii"))
    with pytest.raises(InputError, match="are both the ground truth of case case1"):
        load_labelled_data(volumes, labels, MULTIMODAL_MRI, [0, 1])


def test_one_slice_per_case_is_the_middle_of_the_structure_and_one_case_folder_finds_its_label(tmp_path):
    """--slices-per-case 1 took the first labelled slice (its edge: 4 of a tumour's 4921 voxels);
    --images pointing at one subject's folder looked for its --label-name one folder too deep."""
    from tedm_core.pipelines.labelled import spread_evenly

    assert spread_evenly(83, 1) == [41] and spread_evenly(83, 3) == [0, 41, 82] and spread_evenly(2, 5) == [0, 1]
    subject = tmp_path / "Subj1"
    subject.mkdir()
    rng = np.random.default_rng(1)
    for channel in ("FLAIR", "T1"):
        nib.save(
            nib.Nifti1Image(rng.uniform(10, 200, (8, 8, 7)).astype(np.float32), np.eye(4)),
            str(subject / f"{channel}.nii.gz"),
        )
    label = np.zeros((8, 8, 7), np.uint8)
    label[2:6, 2:6, 1:6] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(subject / "GT.nii.gz"))
    from tedm_core.preprocessing.intensity import MULTIMODAL_MRI

    slices, labels, sources = load_labelled_data(
        subject, None, MULTIMODAL_MRI, [0, 1], channel_names=["FLAIR", "T1"], label_name="GT.nii.gz", slices_per_case=1
    )
    assert slices.shape[:2] == (1, 2) and sources == [f"{subject / 'FLAIR.nii.gz'}#slice3"], sources
