"""DDPM pretraining: the CLI on PNGs, exact resume, repeatability, bf16 and DistributedDataParallel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import synthetic_disc_images, write_disc_pngs
from safetensors.torch import load_file

from tedm_core.cli import main
from tedm_core.model.backbone import PRESETS
from tedm_core.model.checkpoint import Backbone, load_backbone
from tedm_core.pipelines.pretrain import PretrainOptions, pretrain


def _pngs(folder: Path, n: int = 20) -> Path:
    return write_disc_pngs(folder, n, size=64)


def _train(out: Path, steps: int, resume: bool = False, seed: int = 0, **kwargs) -> dict:
    images, _ = synthetic_disc_images(16, size=32, seed=4)
    torch.manual_seed(123)  # the initial weights; resume must not depend on it
    backbone = Backbone.new(PRESETS["tiny"])
    options = PretrainOptions(
        steps=steps,
        batch_size=4,
        checkpoint_every=3,
        seed=seed,
        device="cpu",
        show_progress=False,
        flip=True,
        max_shift=2,
        **kwargs,
    )
    pretrain(torch.from_numpy(images), backbone, out, options, resume=resume)
    return {k: v.clone() for k, v in backbone.unet.state_dict().items()}


def test_cli_pretrains_tiny_preset_on_20_pngs(tmp_path, capsys):
    pngs = _pngs(tmp_path / "pngs")
    out = tmp_path / "ckpt"
    assert (
        main(
            [
                "pretrain",
                "--images",
                str(pngs),
                "--out",
                str(out),
                "--preset",
                "tiny",
                "--steps",
                "12",
                "--checkpoint-every",
                "6",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    backbone = load_backbone(out)
    assert backbone.steps_trained == 12 and backbone.config.preset == "tiny"
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["00000006", "00000012"]
    every = tmp_path / "every"
    assert (
        main(
            [
                "pretrain",
                "--images",
                str(pngs),
                "--out",
                str(every),
                "--preset",
                "tiny",
                "--steps",
                "12",
                "--checkpoint-every",
                "4",
                "--keep-checkpoints",
                "0",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (every / "steps").iterdir()) == ["00000004", "00000008", "00000012"]
    assert (
        main(
            [
                "pretrain",
                "--images",
                str(pngs),
                "--out",
                str(every),
                "--preset",
                "tiny",
                "--steps",
                "20",
                "--checkpoint-every",
                "4",
                "--resume",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (every / "steps").iterdir()) == ["00000016", "00000020"]  # the default keeps 2
    # A second run into the same folder must not silently overwrite it.
    assert main(["pretrain", "--images", str(pngs), "--out", str(out), "--preset", "tiny", "--steps", "12"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    straight = _train(tmp_path / "straight", steps=6)
    _train(tmp_path / "resumed", steps=3)  # "interrupted" after its step-3 checkpoint
    resumed = _train(tmp_path / "resumed", steps=6, resume=True)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resume_restores_the_ema_too(tmp_path):
    straight = _train(tmp_path / "a", steps=6, ema_decay=0.9)
    _train(tmp_path / "b", steps=3, ema_decay=0.9)
    resumed = _train(tmp_path / "b", steps=6, resume=True, ema_decay=0.9)
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=1e-6)
    assert (tmp_path / "b" / "ema.safetensors").is_file()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = _train(tmp_path / "a", steps=3, seed=5)
    b = _train(tmp_path / "b", steps=3, seed=5)
    c = _train(tmp_path / "c", steps=3, seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    weights = _train(tmp_path / "bf16", steps=2, precision="bf16")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_resume_without_checkpoint_is_refused(tmp_path):
    from tedm_core.errors import BundleError

    with pytest.raises(BundleError, match="no checkpoint to resume from"):
        _train(tmp_path / "empty", steps=2, resume=True)


@pytest.mark.slow
def test_distributed_data_parallel_with_two_cpu_processes(tmp_path):
    pngs = _pngs(tmp_path / "pngs", n=8)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tedm_core.cli",
        "pretrain",
        "--images",
        str(pngs),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "2",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_backbone(out).steps_trained == 4
    # DDP keeps the replicas identical: the saved weights are rank 0's and finite.
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "unet.safetensors")).values())


def test_a_shift_beyond_the_model_grid_is_refused_before_training(tmp_path, capsys):
    """A shift of the whole grid or more moves every image out of the frame (40 on the tiny 32 px
    grid was accepted; 10**9 overflowed torch with a traceback): one line, exit 2, nothing written."""
    pngs = _pngs(tmp_path / "pngs")
    for shift in ("32", "1000000000"):
        argv = ["pretrain", "--images", str(pngs), "--out", str(tmp_path / "ckpt"), "--preset", "tiny"]
        assert main([*argv, "--steps", "1", "--device", "cpu", "--shift", shift]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            err[-1] == f"tedm pretrain: error: argument --shift: must be below the model grid's 32 pixels "
            f"(a shift that large moves the image out of the frame), got {shift}"
        ), err
        assert not (tmp_path / "ckpt").exists()
