"""The ``tedm`` command line: pretrain, fit, segment, evaluate. A thin face over ``tedm_core.pipelines``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from . import __version__
from .errors import TEDMError

log = logging.getLogger("tedm")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a DDPM backbone on unlabelled images or volumes")
    p.add_argument("--images", nargs="+", required=True, metavar="DIR", help="folders or files: PNG/JPG images, NIfTI/NRRD/MHA volumes (searched recursively)")
    p.add_argument("--out", required=True, type=Path, metavar="CKPT_DIR", help="checkpoint folder")
    p.add_argument("--preset", default="small", choices=["tiny", "small", "paper"], help="UNet size (default: small, the CPU preset)")
    p.add_argument("--steps", type=int, default=3000, help="total optimiser steps (default: 3000)")
    p.add_argument("--image-size", type=int, help="model grid in pixels (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss", choices=["l1", "mse"], default="l1")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    p.add_argument("--intensity", choices=["radiograph", "brain", "zscore"], default=None, help="intensity normalisation (default: radiograph for 2D images, brain for volumes)")
    p.add_argument("--axis", default="axial", help="slicing axis for volumes: axial, coronal, sagittal or k (default: axial)")
    p.add_argument("--channels", nargs="+", metavar="NAME", help="modalities per case, as file name stems (e.g. FLAIR T1); default: one channel per file")
    p.add_argument("--flip", action="store_true", help="random left-right flips (off by default: anatomy is not symmetric)")
    p.add_argument("--shift", type=int, default=4, help="random shifts up to this many model pixels (default: 4; 0 = off)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights (e.g. 0.999)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    import torch

    from .data import discover_files, is_volume_file, load_pretraining_slices
    from .model.backbone import PRESETS
    from .model.checkpoint import BACKBONE_JSON, Backbone
    from .pipelines.pretrain import PretrainOptions, pretrain
    from .preprocessing.intensity import BRAIN_T1, MULTIMODAL_MRI, RADIOGRAPH

    if (args.out / BACKBONE_JSON).exists() and not (args.resume or args.overwrite):
        raise TEDMError(f"{args.out}: already holds a checkpoint; pass --resume to continue it or --overwrite to start again")
    torch.manual_seed(args.seed)
    files = discover_files(args.images)
    intensity = {"radiograph": RADIOGRAPH, "brain": BRAIN_T1, "zscore": MULTIMODAL_MRI}.get(args.intensity or "")
    if intensity is None:
        intensity = BRAIN_T1 if any(is_volume_file(f) for f in files) else RADIOGRAPH
    config = PRESETS[args.preset]
    config = config.with_(image_size=args.image_size or config.image_size, in_channels=len(args.channels) if args.channels else 1)
    images = load_pretraining_slices(args.images, config.image_size, intensity, axis=args.axis, in_channels=config.in_channels, channel_names=args.channels)
    log.info("pretraining %s preset (%d px) on %d slices from %d files", args.preset, config.image_size, images.shape[0], len(files))
    backbone = Backbone.new(config, schedule=args.schedule, intensity=intensity, channel_names=list(args.channels or ["image"]))
    options = PretrainOptions(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, loss=args.loss, precision=args.precision,
        seed=args.seed, checkpoint_every=args.checkpoint_every, ema_decay=args.ema, flip=args.flip, max_shift=args.shift, device=args.device,
    )
    tic = time.perf_counter()
    pretrain(images, backbone, args.out, options, resume=args.resume)
    print(f"pretrained {args.steps} steps in {time.perf_counter() - tic:.0f} s -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tedm", description="Few-shot segmentation with timestep-ensembled diffusion features (TEDM).")
    parser.add_argument("--version", action="version", version=f"tedm_core {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_pretrain,):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except TEDMError as error:
        print(f"tedm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tedm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
