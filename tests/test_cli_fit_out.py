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


def test_overwrite_replaces_only_a_folder_that_is_a_bundle_and_nothing_more(tiny_bundle_dir, tmp_path):
    """``fit --overwrite`` replaces the folder whole: a folder holding a file named bundle.json
    beside the user's own files, or a bundle the user kept notes in, is refused and left as it
    is; a bare bundle (with what a file browser leaves) is replaced."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "bundle.json").write_text("{}")
    (project / "thesis.tex").write_text("months of work")
    with pytest.raises(BundleError, match=r"holds thesis\.tex besides a model bundle's files"):
        check_bundle_target(project, overwrite=True)
    (project / "thesis.tex").unlink()
    with pytest.raises(BundleError, match="is not a model bundle's description"):
        check_bundle_target(project, overwrite=True)
    noted = shutil.copytree(tiny_bundle_dir, tmp_path / "noted")
    (noted / "predictions").mkdir()
    (noted / "notes.txt").write_text("which cases")
    with pytest.raises(BundleError, match=r"holds notes\.txt, predictions besides"):
        check_bundle_target(noted, overwrite=True)
    assert (noted / "notes.txt").read_text() == "which cases"
    bare = shutil.copytree(tiny_bundle_dir, tmp_path / "bare")
    (bare / ".DS_Store").write_bytes(b"\0")
    check_bundle_target(bare, overwrite=True)
