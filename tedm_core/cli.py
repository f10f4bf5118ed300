"""The ``tedm`` command line: pretrain, fit, segment, refine, evaluate, serve.

A thin face over ``tedm_core.pipelines``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from . import __version__
from .choices import AUTO, AXES, DEFAULT_REFINE_STEPS, DEVICES
from .errors import TEDMError

log = logging.getLogger("tedm")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a DDPM backbone on unlabelled images or volumes")
    p.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="DIR",
        help="folders or files: PNG/JPG images, NIfTI/NRRD/MHA volumes (searched recursively)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="CKPT_DIR", help="checkpoint folder")
    p.add_argument(
        "--preset",
        default="small",
        choices=["tiny", "small", "small4", "paper"],
        help="UNet size (default: small, the CPU preset)",
    )
    p.add_argument("--steps", type=int, default=3000, help="total optimiser steps (default: 3000)")
    p.add_argument("--image-size", type=int, help="model grid in pixels (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss", choices=["l1", "mse"], default="l1")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    p.add_argument(
        "--intensity",
        choices=["radiograph", "brain", "zscore"],
        default=None,
        help="intensity normalisation (default: radiograph for 2D images, brain for volumes)",
    )
    p.add_argument(
        "--axis", default="axial", help="slicing axis for volumes: axial, coronal, sagittal or k (default: axial)"
    )
    p.add_argument(
        "--channels",
        nargs="+",
        metavar="NAME",
        help="modalities per case, as file name stems (e.g. FLAIR T1); default: one channel per file",
    )
    p.add_argument(
        "--flip", action="store_true", help="random left-right flips (off by default: anatomy is not symmetric)"
    )
    p.add_argument(
        "--shift", type=int, default=4, help="random shifts up to this many model pixels (default: 4; 0 = off)"
    )
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights (e.g. 0.999)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        metavar="K",
        help="step checkpoints kept in CKPT_DIR/steps/, the newest (default: 2; 0 keeps all, to choose one on validation images)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    import torch

    from .data import discover_files, is_volume_file, load_pretraining_slices
    from .model.backbone import PRESETS
    from .model.checkpoint import BACKBONE_JSON, Backbone
    from .pipelines.pretrain import PretrainOptions, pretrain
    from .preprocessing.intensity import BRAIN_T1, INTENSITY_CONVENTIONS, RADIOGRAPH

    if (args.out / BACKBONE_JSON).exists() and not (args.resume or args.overwrite):
        raise TEDMError(
            f"{args.out}: already holds a checkpoint; pass --resume to continue it or --overwrite to start again"
        )
    torch.manual_seed(args.seed)
    files = discover_files(args.images)
    intensity = INTENSITY_CONVENTIONS.get(args.intensity or "")
    if intensity is None:
        intensity = BRAIN_T1 if any(is_volume_file(f) for f in files) else RADIOGRAPH
    config = PRESETS[args.preset]
    config = config.with_(
        image_size=args.image_size or config.image_size, in_channels=len(args.channels) if args.channels else 1
    )
    images = load_pretraining_slices(
        args.images,
        config.image_size,
        intensity,
        axis=args.axis,
        in_channels=config.in_channels,
        channel_names=args.channels,
    )
    log.info(
        "pretraining %s preset (%d px) on %d slices from %d files",
        args.preset,
        config.image_size,
        images.shape[0],
        len(files),
    )
    backbone = Backbone.new(
        config, schedule=args.schedule, intensity=intensity, channel_names=list(args.channels or ["image"])
    )
    options = PretrainOptions(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        loss=args.loss,
        precision=args.precision,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        ema_decay=args.ema,
        flip=args.flip,
        max_shift=args.shift,
        device=args.device,
    )
    tic = time.perf_counter()
    pretrain(images, backbone, args.out, options, resume=args.resume)
    print(f"pretrained {args.steps} steps in {time.perf_counter() - tic:.0f} s -> {args.out}")
    return 0


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a segmentation head (or the supervised baseline) on a few labelled images")
    p.add_argument(
        "--backbone",
        required=True,
        type=Path,
        metavar="CKPT_DIR",
        help="a pretrained backbone folder (from tedm pretrain)",
    )
    p.add_argument("--images", required=True, type=Path, metavar="DIR", help="labelled images (PNG/JPG) or volumes")
    p.add_argument(
        "--masks", type=Path, metavar="DIR", help="masks/label maps named like the images (2D) or cases (volumes)"
    )
    p.add_argument(
        "--label-name",
        metavar="FILE",
        help="volumes: the label file inside each case folder instead of --masks (e.g. GT_W.nii.gz)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="BUNDLE", help="the model bundle folder to write")
    p.add_argument("--method", default="tedm", choices=["tedm", "ledm", "ledme", "baseline", "step"])
    p.add_argument("--n", type=int, help="use the first N labelled items in sorted file-name order (default: all)")
    p.add_argument("--steps", type=int, help="training steps (default: 300 for heads, 1000 for the baseline)")
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-3 heads, 1e-4 baseline)")
    p.add_argument("--timesteps", type=int, nargs="+", help="override the method's timesteps")
    p.add_argument(
        "--augment",
        choices=["none", "framing", "intensity", "framing+intensity"],
        help="heads: augmented copies of the labelled slices, one per extra noise draw (default: framing)",
    )
    p.add_argument(
        "--classes",
        nargs="+",
        default=["foreground"],
        metavar="NAME",
        help="structure names, background excluded (default: foreground)",
    )
    p.add_argument(
        "--label-values",
        type=int,
        nargs="+",
        metavar="V",
        help="mask value of each class, background first (default: 0 and non-zero for one class, else 0..K)",
    )
    p.add_argument(
        "--slices",
        type=int,
        nargs="+",
        help="volumes only: the slice indices to learn from (default: every slice carrying labels)",
    )
    p.add_argument(
        "--slices-per-case",
        type=int,
        metavar="K",
        help="volumes only: keep K of the labelled slices, spread evenly (simulates a clinician labelling K slices)",
    )
    p.add_argument("--axis", default=None, help="volumes only: slicing axis (default: the backbone's, axial)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_fit)


def _class_spec(args: argparse.Namespace) -> Tuple[List[str], List[int]]:
    names = ["background"] + list(args.classes)
    values = list(args.label_values) if args.label_values else list(range(len(names)))
    if len(values) != len(names):
        raise TEDMError(
            f"--label-values: {len(values)} values for {len(names)} classes (background + {', '.join(args.classes)})"
        )
    return names, values


def _run_fit(args: argparse.Namespace) -> int:
    from .bundle import save_bundle
    from .model.checkpoint import load_backbone
    from .pipelines.fit import fit_bundle
    from .pipelines.labelled import load_labelled_data

    if args.out.exists() and not args.overwrite:
        raise TEDMError(f"{args.out}: already exists; pass --overwrite to replace it")
    backbone = load_backbone(args.backbone)
    class_names, label_values = _class_spec(args)
    slices, labels, sources = load_labelled_data(
        args.images,
        args.masks,
        backbone.intensity,
        label_values,
        backbone.channel_names,
        n=args.n,
        slices=args.slices,
        slices_per_case=args.slices_per_case,
        axis=args.axis or "axial",
        label_name=args.label_name,
    )
    log.info("fitting %s on %d labelled slices", args.method, len(slices))
    bundle = fit_bundle(
        backbone,
        slices,
        labels,
        args.method,
        class_names,
        label_values,
        steps=args.steps,
        learning_rate=args.lr,
        seed=args.seed,
        device=args.device,
        timesteps=tuple(args.timesteps) if args.timesteps else None,
        axis=args.axis or "axial",
        **({"augment": args.augment} if args.augment else {}),
    )
    bundle.training["sources"] = sources
    save_bundle(bundle, args.out, overwrite=args.overwrite)
    print(f"fitted {args.method} on {len(slices)} slices in {bundle.training['seconds']} s -> {args.out}")
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment images (PNG/JPG -> mask PNGs) or volumes (-> label volumes, as scripts/batch_segment.py) with a model bundle",
    )
    p.add_argument("--model", required=True, type=Path, metavar="BUNDLE")
    p.add_argument("--input", required=True, type=Path, metavar="DIR")
    p.add_argument("--output", required=True, type=Path, metavar="DIR")
    p.add_argument("--probabilities", action="store_true", help="also write <name>_prob[_<class>].png (0-255 for 0-1)")
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write <name>_uncertainty.png: spread of the per-timestep probabilities (0-255 for 0-0.5)",
    )
    p.add_argument(
        "--timesteps",
        type=int,
        nargs="+",
        help="predict with these of the head's timesteps only (single-step ablation)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.set_defaults(func=_run_segment)


def _run_segment(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .pipelines.image_segment import segment_image_folder
    from .pipelines.segment import Segmenter

    bundle = load_bundle(args.model)
    segmenter = Segmenter(
        bundle, device=args.device, batch_size=args.batch_size, precision=args.precision, timesteps=args.timesteps
    )
    if len(bundle.channel_names) > 1 or not _holds_only_2d_images(args.input):
        from .pipelines.batch import BatchOptions, run_batch

        batch = run_batch(
            segmenter, args.input, args.output, BatchOptions(overwrite=args.overwrite, uncertainty=args.uncertainty)
        )
        print(f"{batch.counts()} -> {batch.summary_path}")
        return 1 if batch.failed else 0
    report = segment_image_folder(
        segmenter,
        args.input,
        args.output,
        probabilities=args.probabilities,
        uncertainty=args.uncertainty,
        overwrite=args.overwrite,
    )
    print(report.summary_line())
    for failure in report.failures:
        print(f"tedm segment: error: {failure}", file=sys.stderr)
    return 1 if report.failures else 0


def _holds_only_2d_images(folder: Path) -> bool:
    from .pipelines.labelled import holds_only_2d_images

    return folder.is_dir() and holds_only_2d_images(folder)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice, precision and recall of predicted vs ground-truth masks")
    p.add_argument("--pred", required=True, type=Path, metavar="DIR")
    p.add_argument("--truth", required=True, type=Path, metavar="DIR")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write per-image metrics here")
    p.add_argument(
        "--label-values",
        type=int,
        nargs="+",
        default=[0, 255],
        metavar="V",
        help="pixel value of each class, background first (default: 0 255; any non-zero is foreground for one class)",
    )
    p.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="another method's predictions of the same images: per-image wins and a paired Wilcoxon test on Dice",
    )
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .pipelines.evaluate import compare_dice, evaluate_folders, summarise, write_metrics_csv

    rows = evaluate_folders(args.pred, args.truth, args.label_values)
    other = evaluate_folders(args.compare, args.truth, args.label_values) if args.compare else None
    print(f"{len({r['image'] for r in rows})} images scored")
    if args.csv:
        write_metrics_csv(args.csv, rows)
    for k in sorted({int(r["class"]) for r in rows}):
        of_class = [r for r in rows if r["class"] == k]
        label = f"class {k} " if len(args.label_values) > 2 else ""
        print(
            f"{label}Dice {summarise([r['dice'] for r in of_class])}  precision {summarise([r['precision'] for r in of_class])}  recall {summarise([r['recall'] for r in of_class])}"
        )
        if other is not None:
            print(
                f"{label}vs {args.compare}: Dice {summarise([r['dice'] for r in other if r['class'] == k])}; {args.pred} is {compare_dice(rows, other, k)}"
            )
    return 0


def _add_refine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "refine",
        help="learn from corrected slices of one volume: segment it, find the slices that differ in the "
        "corrected labels, fine-tune the head on them (as the Slicer module's Refine) and save the new model",
    )
    p.add_argument("--model", required=True, type=Path, metavar="BUNDLE")
    p.add_argument(
        "--image", required=True, type=Path, nargs="+", metavar="FILE", help="the volume (one file per channel)"
    )
    p.add_argument(
        "--corrected",
        required=True,
        type=Path,
        metavar="LABELS",
        help="the model's segmentation of the image with some slices corrected (the bundle's label values)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="NEW_BUNDLE")
    p.add_argument("--output", type=Path, metavar="FILE", help="also write the refined segmentation here")
    p.add_argument("--steps", type=_positive_int, help=f"fine-tuning steps (default {DEFAULT_REFINE_STEPS})")
    p.add_argument("--axis", choices=(AUTO, *AXES), default=AUTO)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.set_defaults(func=_run_refine)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _run_refine(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .io.volumes import geometry_mismatch, read_case, read_volume, write_label_volume
    from .pipelines.interactive import InteractiveSession
    from .pipelines.volume import classes_to_label_values, label_array_to_classes

    for path in (args.out, args.output):
        if path is not None and path.exists():
            raise TEDMError(f"{path}: already exists; refine never overwrites (choose another path)")
    bundle = load_bundle(args.model)
    image = read_volume(args.image[0]) if len(args.image) == 1 else read_case(args.image, bundle.channel_names)
    corrected = read_volume(args.corrected, allow_constant=True)
    mismatch = geometry_mismatch(image, corrected)
    if mismatch:
        raise TEDMError(f"{args.corrected}: not on the image's voxel grid ({mismatch})")
    session = InteractiveSession(image)
    first = session.segment(bundle, args.axis, args.device)
    print(f"segmented {first.slices_run} slices along {first.axis} in {first.seconds:.1f} s")
    refined = session.refine(label_array_to_classes(corrected, bundle.label_values), steps=args.steps)
    print(
        f"refined on slice(s) {', '.join(map(str, refined.changed_slices))} "
        f"({len(refined.training_slices)} training slices) in {refined.seconds:.1f} s"
    )
    print(f"model -> {session.save_model(args.out)}")
    if args.output is not None:
        labels = classes_to_label_values(refined.labels, bundle.label_values)
        print(f"segmentation -> {write_label_volume(args.output, labels, image)}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .serve.__main__ import add_arguments, run

    p = sub.add_parser(
        "serve", help="run the worker process the 3D Slicer module talks to (pipes, or the network with a token)"
    )
    add_arguments(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tedm", description="Few-shot segmentation with timestep-ensembled diffusion features (TEDM)."
    )
    parser.add_argument("--version", action="version", version=f"tedm_core {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_pretrain, _add_fit, _add_segment, _add_refine, _add_evaluate, _add_serve):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
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
