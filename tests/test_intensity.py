"""Intensity conventions: what each promises the model about its inputs."""

from __future__ import annotations

import numpy as np
import pytest

import tedm_core.preprocessing.intensity as intensity
from tedm_core.pipelines.fit import (
    RADIOGRAPH_INFERENCE_TIMESTEPS,
    RADIOGRAPH_LEARNING_RATE_SCHEDULE,
    RADIOGRAPH_TIMESTEPS_PER_IMAGE,
    FitOptions,
    crops_dark_borders,
    default_inference_timesteps,
    default_learning_rate_schedule,
    default_timesteps_per_image,
)
from tedm_core.preprocessing.intensity import (
    MULTIMODAL_MRI,
    NAMED,
    RADIOGRAPH,
    RADIOGRAPH_EQUALISED,
    IntensityConfig,
    is_radiograph,
    normalise_intensity,
)


def _radiograph_like(seed: int = 0, size: int = 128) -> np.ndarray:
    """An 8-bit grey image with a smooth body and texture: every grey level used, not uniformly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    body = 120 + 80 * np.sin(3 * x) * np.cos(2 * y) + rng.normal(0, 12, (size, size))
    return np.clip(body, 0, 255).round().astype(np.float32)[None]


def test_equalise_spans_the_unit_range_and_keeps_the_order_of_grey_levels():
    image = _radiograph_like()
    out = normalise_intensity(image, RADIOGRAPH_EQUALISED)
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    order = np.argsort(image.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)  # monotone: brighter never maps darker
    # equalised: each quarter of the range holds about a quarter of the pixels
    quarters = np.histogram(out, bins=4, range=(-1, 1))[0] / out.size
    assert np.all(np.abs(quarters - 0.25) < 0.05), quarters


def test_equalise_is_blind_to_a_hospitals_tone_curve_where_percentiles_are_not():
    """Another scanner's look-up table (a gamma curve) leaves equalised inputs nearly unchanged."""
    image = _radiograph_like(1)
    toned = 255 * (image / 255) ** 0.6
    equalised = np.abs(
        normalise_intensity(toned, RADIOGRAPH_EQUALISED) - normalise_intensity(image, RADIOGRAPH_EQUALISED)
    )
    percentile = np.abs(normalise_intensity(toned, RADIOGRAPH) - normalise_intensity(image, RADIOGRAPH))
    assert equalised.mean() < 0.02 and percentile.mean() > 5 * equalised.mean(), (equalised.mean(), percentile.mean())


def test_equalise_maps_a_black_band_to_minus_one_and_the_content_nearly_as_without_it():
    content = _radiograph_like(2)[:, :102] + 10  # above black
    banded = np.concatenate([content, np.zeros((1, 26, 128), np.float32)], axis=1)  # a band over the bottom fifth
    banded_out = normalise_intensity(banded, RADIOGRAPH_EQUALISED)
    assert np.all(banded_out[:, 102:] == -1.0)
    content = np.abs(banded_out[:, :102] - normalise_intensity(content, RADIOGRAPH_EQUALISED))
    assert content.mean() < 0.03, content.mean()


def test_equalise_of_a_volume_in_chunks_is_the_whole_mapping(monkeypatch):
    volume = np.random.default_rng(3).gamma(2.0, 50.0, (2, 12, 30, 30)).astype(np.float32)
    whole = normalise_intensity(volume, RADIOGRAPH_EQUALISED)
    monkeypatch.setattr(intensity, "NORMALISE_CHUNK_VOXELS", 900)  # one slice per chunk
    assert np.array_equal(normalise_intensity(volume, RADIOGRAPH_EQUALISED), whole)
    assert np.all(normalise_intensity(np.full((1, 4, 4), 7.0, np.float32), RADIOGRAPH_EQUALISED) == -1.0)


def test_named_conventions_round_trip_and_equalised_takes_the_radiograph_defaults():
    for name, config in NAMED.items():
        assert IntensityConfig.from_dict(config.to_dict()) == config, name
    assert NAMED["radiograph-equalised"] == RADIOGRAPH_EQUALISED
    options = FitOptions()
    for config in (RADIOGRAPH, RADIOGRAPH_EQUALISED):
        assert is_radiograph(config) and crops_dark_borders(options, config)
        assert default_learning_rate_schedule(options, config) == RADIOGRAPH_LEARNING_RATE_SCHEDULE
        timesteps = (1, 10, 25, 50, 200, 400, 600, 800)
        assert default_inference_timesteps(options, "tedm", config, timesteps) == RADIOGRAPH_INFERENCE_TIMESTEPS
        assert default_timesteps_per_image(options, "tedm", config) == RADIOGRAPH_TIMESTEPS_PER_IMAGE
        assert default_timesteps_per_image(options, "ledm", config) is None
    assert not is_radiograph(MULTIMODAL_MRI) and not crops_dark_borders(options, MULTIMODAL_MRI)
    assert default_timesteps_per_image(options, "tedm", MULTIMODAL_MRI) is None
    with pytest.raises(ValueError, match="unknown intensity"):
        IntensityConfig("histogram")


@pytest.mark.parametrize("convention", ["brain", "zscore"])
def test_one_voxel_below_zero_leaves_a_skull_stripped_volumes_normalisation_as_it_was(convention):
    """A skull-stripped MRI's background is 0; one voxel of interpolation ringing below zero made
    the minimum negative, so the whole zero background counted as signal: the brain's values moved
    by 0.4-0.7 and the background no longer mapped to -1 (so no slice was skipped)."""
    rng = np.random.default_rng(0)
    volume = np.zeros((1, 6, 20, 20), np.float32)
    volume[0, 1:5, 5:15, 5:15] = rng.uniform(50, 400, (4, 10, 10))
    ringing = volume.copy()
    ringing[0, 0, 0, 0] = -0.5
    config = NAMED[convention]
    clean, rung = normalise_intensity(volume, config), normalise_intensity(ringing, config)
    assert np.array_equal(clean[volume != 0], rung[volume != 0])
    assert (rung[(volume == 0)] == -1).all()
