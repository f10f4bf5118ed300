"""A bundle records the model grid its head was trained on, and a backbone's preset name must
describe its architecture: hand edits of bundle.json that contradict the weights are refused."""

from __future__ import annotations

import json
import shutil

import pytest

from tedm_core.bundle import TRAINED_IMAGE_SIZE, load_bundle
from tedm_core.errors import BundleError


def _edited(tiny_bundle_dir, tmp_path, edit):
    copy = shutil.copytree(tiny_bundle_dir, tmp_path / "copy")
    meta = json.loads((copy / "bundle.json").read_text())
    edit(meta)
    (copy / "bundle.json").write_text(json.dumps(meta))
    return copy


def test_a_bundle_records_its_model_grid_and_refuses_an_edited_image_size(tiny_bundle_dir, tmp_path):
    bundle = load_bundle(tiny_bundle_dir)
    assert bundle.training[TRAINED_IMAGE_SIZE] == bundle.image_size == 32

    def double(meta):
        meta["backbone"]["config"]["image_size"] = 64

    with pytest.raises(BundleError, match=r"image_size 64 differs from the 32 px model grid") as error:
        load_bundle(_edited(tiny_bundle_dir, tmp_path, double))
    assert len(str(error.value).splitlines()) == 1


def test_bundles_without_the_record_still_load(tiny_bundle_dir, tmp_path):
    def old(meta):
        del meta["training"][TRAINED_IMAGE_SIZE]

    assert load_bundle(_edited(tiny_bundle_dir, tmp_path, old)).image_size == 32


def test_a_preset_name_that_does_not_describe_the_weights_is_refused(tiny_bundle_dir, tmp_path):
    assert load_bundle(tiny_bundle_dir).backbone.config.preset == "tiny"

    def rename(meta):
        meta["backbone"]["config"]["preset"] = "small"

    with pytest.raises(BundleError, match="preset 'small' does not match"):
        load_bundle(_edited(tiny_bundle_dir, tmp_path, rename))

    def custom(meta):
        meta["backbone"]["config"]["preset"] = "custom"

    assert load_bundle(_edited(tiny_bundle_dir, tmp_path / "c", custom)).backbone.config.preset == "custom"
