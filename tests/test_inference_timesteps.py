"""A TEDM head learns from all its timesteps but may average the predictions of a subset at
inference (ModelBundle.inference_timesteps): the default for radiograph models, recorded in
the bundle, refused when it is not a subset of a shared head's timesteps."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import synthetic_disc_images

from tedm_core.bundle import load_bundle, save_bundle
from tedm_core.errors import BundleError, SettingError
from tedm_core.pipelines.batch import BatchOptions, run_batch
from tedm_core.pipelines.fit import RADIOGRAPH_INFERENCE_TIMESTEPS, fit_bundle
from tedm_core.pipelines.segment import Segmenter
from tedm_core.preprocessing.intensity import MULTIMODAL_MRI, RADIOGRAPH


def test_radiograph_tedm_models_predict_with_the_recorded_steps(tiny_bundle_dir, tmp_path):
    backbone = load_bundle(tiny_bundle_dir).backbone
    assert backbone.intensity.kind == RADIOGRAPH.kind
    images, masks = synthetic_disc_images(2, size=32, seed=12)
    tedm = fit_bundle(backbone, images, masks, steps=2, device="cpu")
    assert tedm.inference_timesteps == RADIOGRAPH_INFERENCE_TIMESTEPS
    assert len(tedm.timesteps) == 8  # the head still learns from all eight
    loaded = load_bundle(save_bundle(tedm, tmp_path / "tedm"))
    assert loaded.inference_timesteps == RADIOGRAPH_INFERENCE_TIMESTEPS
    segmenter = Segmenter(loaded, device="cpu")
    assert segmenter.timesteps == RADIOGRAPH_INFERENCE_TIMESTEPS
    assert segmenter.provenance()["timesteps"] == list(RADIOGRAPH_INFERENCE_TIMESTEPS)
    # The same prediction as asking a model without the field for those steps.
    everything = replace(loaded, inference_timesteps=())
    assert Segmenter(everything, device="cpu").timesteps == loaded.timesteps
    subset = Segmenter(everything, device="cpu", timesteps=RADIOGRAPH_INFERENCE_TIMESTEPS).predict(images)
    np.testing.assert_allclose(segmenter.predict(images).probabilities, subset.probabilities, atol=1e-6)
    # Other methods, volumes' backbones and an explicit empty subset keep every step.
    assert fit_bundle(backbone, images, masks, "ledm", steps=2, device="cpu").inference_timesteps == ()
    brain = replace(backbone, intensity=MULTIMODAL_MRI)
    assert fit_bundle(brain, images, masks, steps=2, device="cpu").inference_timesteps == ()
    assert fit_bundle(backbone, images, masks, steps=2, device="cpu", inference_timesteps=()).inference_timesteps == ()


def test_bundles_without_the_field_use_every_step_and_a_wrong_subset_is_refused(tiny_bundle_dir, tmp_path):
    old = shutil.copytree(tiny_bundle_dir, tmp_path / "old")
    meta = json.loads((old / "bundle.json").read_text())
    meta.pop("inference_timesteps", None)
    (old / "bundle.json").write_text(json.dumps(meta))
    bundle = load_bundle(old)
    assert bundle.inference_timesteps == () and bundle.prediction_timesteps == bundle.timesteps
    meta["inference_timesteps"] = [1, 999]
    (old / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="subset"):
        load_bundle(old)


def test_one_step_has_an_uncertainty_map_only_from_several_heads(tiny_bundle_dir, tmp_path):
    backbone = load_bundle(tiny_bundle_dir).backbone
    images, masks = synthetic_disc_images(2, size=32, seed=13)
    one_step = {"steps": 2, "device": "cpu", "inference_timesteps": (1,)}
    single = Segmenter(fit_bundle(backbone, images, masks, members=1, **one_step), device="cpu")
    assert single.timesteps == (1,) and not single.gives_uncertainty
    assert float(single.predict(images).uncertainty.max()) == 0.0
    with pytest.raises(SettingError, match="uncertainty"):
        run_batch(single, tmp_path / "in", tmp_path / "out", BatchOptions(uncertainty=True))
    ensemble = Segmenter(fit_bundle(backbone, images, masks, members=3, **one_step), device="cpu")
    assert ensemble.timesteps == (1,) and ensemble.gives_uncertainty
    # The spread of the three heads' probabilities on the one step.
    assert float(ensemble.predict(images).uncertainty.max()) > 0.0
    # A concatenating head gives one map per head: a map of spread only with several heads.
    for members, spread in ((1, False), (2, True)):
        ledm = Segmenter(
            fit_bundle(backbone, images, masks, "ledm", steps=2, device="cpu", members=members), device="cpu"
        )
        assert ledm.gives_uncertainty == spread
        assert (float(ledm.predict(images).uncertainty.max()) > 0.0) == spread


def test_refine_learns_from_the_prediction_timesteps_with_or_without_cached_features(tiny_bundle_dir, monkeypatch):
    """A session caches the features of the timesteps the model predicts with (step 1 alone for a
    radiograph model); a Refine without that cache (dropped for memory) must learn from the same
    steps, not from all of the head's, so that its result does not depend on the memory left."""
    from tedm_core.pipelines import fit

    backbone = load_bundle(tiny_bundle_dir).backbone
    images, masks = synthetic_disc_images(3, size=32, seed=2)
    bundle = fit_bundle(backbone, images, masks, steps=5, device="cpu", precision="fp32")
    assert bundle.prediction_timesteps == RADIOGRAPH_INFERENCE_TIMESTEPS != bundle.timesteps
    seen = []
    real = fit.train_head
    monkeypatch.setattr(
        fit, "train_head", lambda head, features, *a, **k: seen.append(features) or real(head, features, *a, **k)
    )
    new_images, new_masks = synthetic_disc_images(1, size=32, seed=7)
    cached = Segmenter(bundle, device="cpu", precision="fp32").predict(new_images, keep_features=True).features.levels
    options = {"steps": 10, "device": "cpu", "show_progress": False, "precision": "fp32"}
    with_cache = fit.refine_bundle(bundle, new_images, new_masks, features=cached, **options)
    without = fit.refine_bundle(bundle, new_images, new_masks, **options)
    assert [features[0][0].shape[1] for features in seen] == [len(RADIOGRAPH_INFERENCE_TIMESTEPS)] * 2
    a, b = (Segmenter(r, device="cpu", precision="fp32").predict(images).probabilities for r in (with_cache, without))
    np.testing.assert_allclose(a, b, atol=2e-3)  # (the cache keeps fp32 features as float16)
