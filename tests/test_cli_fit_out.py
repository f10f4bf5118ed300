"""tedm fit onto an existing bundle names the flag that allows replacing it."""

from __future__ import annotations

import shutil

import pytest
from conftest import write_disc_pngs

from tedm_core.bundle import check_bundle_target
from tedm_core.cli import main
from tedm_core.errors import BundleError


def test_fit_onto_an_existing_bundle_names_the_overwrite_flag(tiny_bundle_dir, tiny_backbone_dir, tmp_path, capsys):
    out = shutil.copytree(tiny_bundle_dir, tmp_path / "model")
    images = write_disc_pngs(tmp_path / "images", 1, size=32)
    masks = write_disc_pngs(tmp_path / "masks", 1, size=32)
    argv = ["fit", "--backbone", str(tiny_backbone_dir), "--images", str(images), "--masks", str(masks)]
    assert main([*argv, "--out", str(out), "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out}: already exists" in err and "--overwrite" in err
    # The library, used by non-CLI callers too, keeps its own words.
    with pytest.raises(BundleError, match="allow overwriting"):
        check_bundle_target(out, overwrite=False)
