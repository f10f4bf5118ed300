"""Shared fixtures: a tiny backbone trained on the spot, synthetic labelled images, the real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Two cores: one intra-op thread per test process avoids OpenMP oversubscription, which was
# measured to slow small models by >10x when another process also computes.
torch.set_num_threads(int(os.environ.get("TEDM_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def require_shared_data(*parts: str) -> Path:
    """The path under ../shared/data, or skip with the reason (CI has the data; a user's clone may not)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing on CI, where ../shared/data must be present")
        pytest.skip(f"real data not available: {path} does not exist (it lives in ../shared/data beside the repository)")
    return path


def synthetic_disc_images(n: int, size: int = 48, seed: int = 0):
    """Noisy images with one bright disc each, and the disc masks: (n, 1, size, size) float32 in [-1, 1], (n, size, size) int64."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        r = rng.uniform(size * 0.12, size * 0.25)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
        image = np.where(mask, 0.6, -0.6) + rng.normal(0, 0.15, (size, size))
        images.append(np.clip(image, -1, 1)[None])
        masks.append(mask.astype(np.int64))
    return np.stack(images).astype(np.float32), np.stack(masks)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A tiny DDPM pretrained for 40 steps on synthetic disc images (seconds), saved as a checkpoint folder."""
    from tedm_core.model.backbone import PRESETS
    from tedm_core.model.checkpoint import Backbone
    from tedm_core.pipelines.pretrain import PretrainOptions, pretrain
    from tedm_core.preprocessing.intensity import IntensityConfig

    out = tmp_path_factory.mktemp("tiny_backbone")
    images, _ = synthetic_disc_images(32, size=32, seed=1)
    torch.manual_seed(0)
    backbone = Backbone.new(PRESETS["tiny"], intensity=IntensityConfig("percentile", 0.5, 99.5))
    pretrain(torch.from_numpy(images), backbone, out, PretrainOptions(steps=40, batch_size=8, learning_rate=1e-3, checkpoint_every=40, device="cpu", show_progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_backbone_dir, tmp_path_factory) -> Path:
    """A TEDM bundle fitted on 3 synthetic disc images with the tiny backbone."""
    from tedm_core.bundle import save_bundle
    from tedm_core.model.checkpoint import load_backbone
    from tedm_core.pipelines.fit import fit_bundle

    images, masks = synthetic_disc_images(3, size=32, seed=2)
    bundle = fit_bundle(load_backbone(tiny_backbone_dir), images, masks, "tedm", ["background", "disc"], [0, 1], steps=60, device="cpu", show_progress=False)
    return save_bundle(bundle, tmp_path_factory.mktemp("bundles") / "tiny_tedm")
