"""segment --timesteps and a bundle's inference timesteps follow one rule: timesteps the head was
trained on, each once (heads.prediction_timesteps_problem)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import write_disc_pngs

from tedm_core.bundle import load_bundle
from tedm_core.cli import main
from tedm_core.errors import BundleError


@pytest.mark.parametrize("kind", ["untrained", "repeated"])
def test_segment_refuses_timesteps_the_head_was_not_trained_on_or_repeated(tiny_bundle_dir, tmp_path, capsys, kind):
    trained = list(load_bundle(tiny_bundle_dir).timesteps)
    untrained = next(t for t in range(1000) if t not in trained)
    asked = [trained[0], untrained] if kind == "untrained" else [trained[0], trained[0]]
    images = write_disc_pngs(tmp_path / "in", 1, size=32)
    argv = ["segment", "--model", str(tiny_bundle_dir), "--input", str(images), "--output", str(tmp_path / "out")]
    assert main([*argv, "--device", "cpu", "--timesteps", *map(str, asked)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--timesteps" in err and str(trained) in err
    assert not (tmp_path / "out").exists()


def test_a_bundle_with_repeated_inference_timesteps_is_refused(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    if bundle.head.config.mode != "shared":
        pytest.skip("the tiny bundle's head does not share weights over timesteps")
    copy = shutil.copytree(tiny_bundle_dir, tmp_path / "copy")
    meta = json.loads((copy / "bundle.json").read_text())
    meta["inference_timesteps"] = [bundle.timesteps[0]] * 2
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="repeated"):
        load_bundle(copy)


def test_a_concat_heads_timesteps_in_another_order_are_read_in_its_own(tiny_backbone_dir):
    """An LEDM head concatenates its timesteps' features in the order it was trained on; the same
    set asked in another order (``--timesteps 250 50 150``) is read in the head's order, not fed
    to weights that expect other features."""
    import numpy as np
    from conftest import synthetic_disc_images

    from tedm_core.model.checkpoint import load_backbone
    from tedm_core.pipelines.fit import fit_bundle
    from tedm_core.pipelines.segment import Segmenter

    images, masks = synthetic_disc_images(2, size=32, seed=5)
    bundle = fit_bundle(load_backbone(tiny_backbone_dir), images, masks, "ledm", steps=5, device="cpu")
    trained = bundle.timesteps
    permuted = (trained[-1], *trained[:-1])
    reference = Segmenter(bundle, device="cpu").predict(images).probabilities
    segmenter = Segmenter(bundle, device="cpu", timesteps=permuted)
    assert segmenter.timesteps == trained
    np.testing.assert_array_equal(segmenter.predict(images).probabilities, reference)
