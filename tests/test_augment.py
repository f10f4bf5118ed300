"""Head-fitting augmentation (issue 10): deterministic, label-consistent, recorded in the bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synthetic_disc_images

from tedm_core.preprocessing.augment import AUGMENT_POLICIES, AugmentPolicy, augment_slices, resolve_policy


def _discs(n: int = 4, size: int = 32):
    images, masks = synthetic_disc_images(n, size=size, seed=3)
    return torch.from_numpy(images), torch.from_numpy(masks)


def test_augmented_copies_are_deterministic_and_keep_labels_on_the_image():
    images, masks = _discs()
    policy = AUGMENT_POLICIES["framing+intensity"]
    a_x, a_y = augment_slices(images, masks, policy, seed=7)
    b_x, b_y = augment_slices(images, masks, policy, seed=7)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert a_x.shape == images.shape and a_y.shape == masks.shape
    assert a_x.min() >= -1 and a_x.max() <= 1
    assert set(a_y.unique().tolist()) <= {0, 1}
    c_x, _ = augment_slices(images, masks, policy, seed=8)
    assert not torch.equal(a_x, c_x)


def test_a_black_band_is_background_in_image_and_labels():
    images, masks = _discs()
    masks = torch.ones_like(masks)  # foreground everywhere: the band must clear it
    policy = AugmentPolicy(border=1.0, border_width=0.3)
    x, y = augment_slices(images, masks, policy, seed=0)
    for i in range(len(x)):
        black = (x[i, 0] <= -1.0).all(dim=1)  # whole rows
        black_cols = (x[i, 0] <= -1.0).all(dim=0)
        band_rows = torch.nonzero(black).flatten()
        band_cols = torch.nonzero(black_cols).flatten()
        assert len(band_rows) or len(band_cols)
        if len(band_rows):
            assert (y[i][band_rows] == 0).all()
        if len(band_cols):
            assert (y[i][:, band_cols] == 0).all()


def test_zooming_out_shrinks_the_labelled_area_consistently():
    images, masks = _discs()
    x, y = augment_slices(images, masks, AugmentPolicy(scale=(0.6, 0.6)), seed=0)
    assert y.sum() < masks.sum() * 0.5
    # Where the label says disc, the image is bright (the discs are +0.6, the rest -0.6).
    assert x[:, 0][y == 1].mean() > 0.2 and x[:, 0][y == 0].mean() < 0


def test_opacities_brighten_only_inside_the_structure_and_keep_its_labels():
    from scipy.ndimage import binary_dilation

    images, masks = _discs()
    images = -images  # a dark structure in bright surroundings, as a lung on a radiograph
    x, y = augment_slices(images, masks, AugmentPolicy(opacity=1.0, opacity_strength=(0.8, 0.8)), seed=0)
    assert torch.equal(y, masks)
    change = (x - images)[:, 0]
    assert (change >= 0).all() and x.max() <= images.max()  # towards the surroundings' brightness, no further
    near = torch.from_numpy(binary_dilation(masks.numpy(), np.ones((1, 7, 7), bool)))
    assert (change[~near] == 0).all()
    assert change[masks == 1].mean() > 0.05
    assert torch.equal(augment_slices(images, masks, AugmentPolicy(opacity=0.0), seed=0)[0], images)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown augmentation"):
        resolve_policy("sideways")
    assert resolve_policy(None) == AUGMENT_POLICIES["none"]


def test_fit_with_augmentation_records_it(tiny_backbone_dir):
    from tedm_core.model.checkpoint import load_backbone
    from tedm_core.pipelines.fit import fit_bundle

    images, masks = synthetic_disc_images(2, size=32, seed=2)
    bundle = fit_bundle(
        load_backbone(tiny_backbone_dir),
        images,
        masks,
        "tedm",
        ["background", "disc"],
        steps=3,
        device="cpu",
        show_progress=False,
        augment="framing+intensity",
        noise_draws=3,
    )
    assert bundle.training["augment"] == "framing+intensity"
    assert bundle.training["noise_draws"] == 3
    assert bundle.training["feature_precision"] in ("fp32", "bf16")  # what `auto` chose, recorded
    assert np.isfinite(sum(float(p.detach().sum()) for p in bundle.head.parameters()))
