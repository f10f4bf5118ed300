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


def assert_labels_agree_across_processes(actual, expected) -> None:
    """Labels from another process (the worker) against this process's, for the same model.

    Each process measures for itself whether bf16 passes pay on this CPU
    (runtime.resolve_inference_precision); under load the two can decide differently, and a voxel
    at p ~ 0.5 may then flip (seen: 2 of 19,200). A geometry or model error changes far more."""
    import numpy as np

    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    differ = actual != expected
    assert differ.mean() <= 1e-3, f"{int(differ.sum())} of {differ.size} voxels differ"


def require_shared_data(*parts: str) -> Path:
    """The path under ../shared/data, or skip with the reason (CI has the data; a user's clone may not)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing on CI, where ../shared/data must be present")
        pytest.skip(
            f"real data not available: {path} does not exist (it lives in ../shared/data beside the repository)"
        )
    return path


def synthetic_disc_images(n: int, size: int = 48, seed: int = 0):
    """Noisy images with one bright disc each, and the disc masks: (n, 1, size, size) float32 in [-1, 1],
    (n, size, size) int64."""
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


def write_disc_pngs(folder: Path, n: int, size: int, seed: int = 3) -> Path:
    """``n`` 8-bit PNGs of :func:`synthetic_disc_images` (img_00.png ...) in ``folder``, created if needed."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images, _ = synthetic_disc_images(n, size=size, seed=seed)
    for i, image in enumerate(images):
        Image.fromarray(((image[0] + 1) * 127.5).astype(np.uint8)).save(folder / f"img_{i:02d}.png")
    return folder


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
    pretrain(
        torch.from_numpy(images),
        backbone,
        out,
        PretrainOptions(
            steps=40, batch_size=8, learning_rate=1e-3, checkpoint_every=40, device="cpu", show_progress=False
        ),
    )
    return out


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_backbone_dir, tmp_path_factory) -> Path:
    """A TEDM bundle fitted on 3 synthetic disc images with the tiny backbone."""
    from tedm_core.bundle import save_bundle
    from tedm_core.model.checkpoint import load_backbone
    from tedm_core.pipelines.fit import fit_bundle

    images, masks = synthetic_disc_images(3, size=32, seed=2)
    bundle = fit_bundle(
        load_backbone(tiny_backbone_dir),
        images,
        masks,
        "tedm",
        ["background", "disc"],
        [0, 1],
        steps=60,
        device="cpu",
        show_progress=False,
    )
    return save_bundle(bundle, tmp_path_factory.mktemp("bundles") / "tiny_tedm")


# --- volumes, slicing and batch segmentation (issue 3) -------------------------------------------


class ThresholdSegmenter:
    """A stand-in for ``Segmenter`` with no model: foreground where the normalised first channel
    is above ``threshold``. Pixel-wise, so geometry tests see exactly where voxels go."""

    def __init__(self, channel_names=("image",), threshold: float = 0.0, axis: str = "axial") -> None:
        from types import SimpleNamespace

        from tedm_core.preprocessing.intensity import IntensityConfig

        self.threshold = threshold
        self.calls = 0
        self.slices_seen = 0
        # "fixed" 0..100: raw 0 is the background (-1), raw 50 the threshold (0).
        self.bundle = SimpleNamespace(
            channel_names=list(channel_names),
            intensity=IntensityConfig("fixed", 0.0, 100.0),
            class_names=["background", "sphere"],
            label_values=[0, 1],
            axis=axis,
        )

    def provenance(self):
        return {"model": "threshold", "model_sha256": f"threshold {self.threshold}", "timesteps": []}

    def predict(self, slices, progress=None, cancel=None):
        from types import SimpleNamespace

        self.calls += 1
        self.slices_seen += len(slices)
        fg = (np.asarray(slices)[:, 0] > self.threshold).astype(np.float32)
        if progress is not None:
            progress(len(slices), len(slices))
        return SimpleNamespace(
            probabilities=np.stack([1 - fg, fg], axis=1), uncertainty=np.abs(np.asarray(slices)[:, 0]) * 0.1
        )

    def predict_into(self, slices, rows, labels, uncertainty, progress=None, cancel=None):
        """``Segmenter.predict_into``'s contract: ``labels[rows]`` and ``uncertainty[rows]`` written."""
        prediction = self.predict(np.asarray(slices)[rows], progress=progress, cancel=cancel)
        labels[rows] = prediction.probabilities.argmax(axis=1)
        uncertainty[rows] = prediction.uncertainty


@pytest.fixture
def threshold_segmenter() -> ThresholdSegmenter:
    return ThresholdSegmenter()


def sphere_volume_array(
    shape_kji, ijk_to_ras, centre_ras, radius_mm: float, inside: float = 80.0, outside: float = 10.0
) -> np.ndarray:
    """``(K, J, I)`` raw intensities: ``inside`` within ``radius_mm`` of the RAS point ``centre_ras``."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4).astype(np.float64)
    ras = ijk1 @ np.asarray(ijk_to_ras, dtype=np.float64).T
    dist = np.linalg.norm(ras[:, :3] - np.asarray(centre_ras, dtype=np.float64), axis=1).reshape(shape_kji)
    return np.where(dist <= radius_mm, inside, outside).astype(np.float32)


def world_centroid(labels_kji: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS centre of mass of the non-zero voxels of a ``(K, J, I)`` array."""
    k, j, i = np.nonzero(labels_kji)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk1 @ np.asarray(ijk_to_ras, dtype=np.float64).T)[:, :3].mean(axis=0)


def affine_zoo():
    """Named voxel-to-RAS matrices: RAS, LPS, flipped, anisotropic, oblique (rotated + anisotropic + LPS-like),
    permuted, left-handed oblique."""
    from scipy.spatial.transform import Rotation

    def make(linear, origin):
        a = np.eye(4)
        a[:3, :3] = linear
        a[:3, 3] = origin
        return a

    rot = Rotation.from_euler("xyz", [17.0, -23.0, 31.0], degrees=True).as_matrix()
    return {
        "ras": make(np.eye(3), [-20.0, -25.0, -18.0]),
        "lps": make(np.diag([-1.0, -1.0, 1.0]), [20.0, 25.0, -18.0]),
        "flipped": make(np.diag([1.0, -1.0, -1.0]), [-20.0, 25.0, 18.0]),
        "anisotropic": make(np.diag([0.9, 1.3, 2.5]), [-15.0, -22.0, -30.0]),
        "oblique": make(rot @ np.diag([-1.1, -0.8, 2.2]), [14.5, 3.25, -21.0]),
        "permuted": make(np.array([[0.0, 0.0, 1.2], [-1.0, 0.0, 0.0], [0.0, -1.5, 0.0]]), [-20.0, 20.0, 25.0]),
        # Left-handed (determinant < 0, as FSL's radiological LAS storage): ITK and Slicer then
        # store the volume with K reversed, so a mistake in handedness cannot hide behind a rotation.
        "left_handed": make(rot.T @ np.diag([-0.9, 1.2, 1.7]), [10.0, -12.0, 30.0]),
    }
