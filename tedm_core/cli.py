"""The ``tedm`` command line: pretrain, fit, segment, refine, evaluate, serve.

A thin face over ``tedm_core.pipelines``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from . import __version__
from .argtypes import (
    OneLineParser,
    device,
    ema_decay,
    flag_of,
    label_value,
    non_negative_int,
    positive_float,
    positive_int,
    timestep,
)
from .argtypes import seed as seed_type  # (a name the commands' own arguments use)
from .choices import (
    AUGMENT_POLICY_NAMES,
    AUTO,
    AXES,
    BASELINE,
    DEFAULT_BASELINE_STEPS,
    DEFAULT_HEAD_STEPS,
    DEFAULT_PRESET,
    DEFAULT_REFINE_STEPS,
    INTENSITIES,
    LEARNING_RATE_SCHEDULES,
    LOSSES,
    METHODS,
    NO_POSTPROCESS_HELP,
    PRECISION_HELP,
    PRECISIONS,
    PRESET_NAMES,
    PRETRAIN_PRECISION_HELP,
    SCHEDULES,
)
from .errors import BundleError, SettingError, TEDMError

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
        default=DEFAULT_PRESET,
        choices=PRESET_NAMES,
        help=f"UNet size (default: {DEFAULT_PRESET}, the CPU preset)",
    )
    p.add_argument("--steps", type=positive_int, default=3000, help="total optimiser steps (default: 3000)")
    p.add_argument(
        "--image-size",
        type=positive_int,
        help="model grid in pixels, a multiple of what the preset's levels halve (default: the preset's)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--loss", choices=LOSSES, default=LOSSES[0])
    p.add_argument("--schedule", choices=SCHEDULES, default=SCHEDULES[0])
    p.add_argument(
        "--intensity",
        choices=INTENSITIES,
        default=None,
        help="intensity normalisation (default: radiograph for 2D images, brain for volumes)",
    )
    p.add_argument("--axis", default=AXES[0], choices=AXES, help=f"slicing axis for volumes (default: {AXES[0]})")
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
        "--shift",
        type=non_negative_int,
        default=4,
        help="random shifts up to this many model pixels (default: 4; 0 = off)",
    )
    p.add_argument(
        "--ema", type=ema_decay, default=None, metavar="DECAY", help="keep an EMA of the weights (e.g. 0.999)"
    )
    p.add_argument("--checkpoint-every", type=positive_int, default=250)
    p.add_argument(
        "--keep-checkpoints",
        type=non_negative_int,
        default=2,
        metavar="K",
        help="step checkpoints kept in CKPT_DIR/steps/, the newest (default: 2; 0 keeps all, "
        "to choose one on validation images)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even if --out holds a checkpoint (its checkpoints are deleted)",
    )
    _add_device_options(p, precision_help=PRETRAIN_PRECISION_HELP)
    p.add_argument("--seed", type=seed_type, default=0)
    p.set_defaults(func=_run_pretrain)


def _add_device_options(
    p: argparse.ArgumentParser, batch_size: bool = False, precision_help: str = PRECISION_HELP
) -> None:
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=precision_help)
    if batch_size:
        p.add_argument("--batch-size", type=positive_int, help="slices per model call (default: sized to memory)")


def _run_pretrain(args: argparse.Namespace) -> int:
    from .data import discover_files
    from .io.outputs import check_writable_folder, refuse_overlap
    from .model.backbone import PRESETS
    from .pipelines.pretrain import check_pretrain_folder, pretrain_folder_lock
    from .runtime import resolve_device

    # Every check before the images are read: a usage error costs nothing.
    if args.resume and args.overwrite:
        raise SettingError("resume", "--resume continues a run and --overwrite starts afresh: give one of them")
    resolve_device(args.device)
    config = PRESETS[args.preset]
    config = config.with_(
        image_size=args.image_size or config.image_size, in_channels=len(args.channels) if args.channels else 1
    )
    refuse_overlap(args.out, [("images", folder) for folder in args.images])
    _refuse_repeats(args.channels, "channels")
    check_pretrain_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    files = discover_files(args.images)
    check_writable_folder(args.out)
    # Held from here to the end (pretrain() holds it too): a second run into this folder is
    # refused now, before its images are read, not after.
    with pretrain_folder_lock(args.out):
        return _pretrain_held(args, config, files)


def _pretrain_held(args: argparse.Namespace, config: Any, files: List[Path]) -> int:
    """``tedm pretrain`` once its settings are checked and ``--out`` is held."""
    import torch

    from .data import is_volume_file, load_pretraining_slices
    from .model.checkpoint import Backbone
    from .pipelines.pretrain import PretrainOptions, check_resume, pretrain
    from .preprocessing.intensity import BRAIN_T1, NAMED, RADIOGRAPH

    torch.manual_seed(args.seed)
    intensity = NAMED.get(args.intensity or "")
    if intensity is None:
        intensity = BRAIN_T1 if any(is_volume_file(f) for f in files) else RADIOGRAPH
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
    if args.resume:  # a resume that cannot continue as asked is refused before the images are read
        check_resume(args.out, backbone, options)
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
    tic = time.perf_counter()
    pretrain(images, backbone, args.out, options, resume=args.resume, overwrite=args.overwrite)
    print(f"pretrained to step {backbone.steps_trained} in {time.perf_counter() - tic:.0f} s -> {args.out}")
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
    p.add_argument(
        "--method",
        default=METHODS[0],
        choices=METHODS,
        help="tedm, ledm, ledme, probe (the logistic probe on one timestep) or the supervised baseline",
    )
    p.add_argument(
        "--n", type=positive_int, help="use the first N labelled items in sorted file-name order (default: all)"
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        help=f"training steps (default: {DEFAULT_HEAD_STEPS} for heads, {DEFAULT_BASELINE_STEPS} for the baseline)",
    )
    p.add_argument("--lr", type=positive_float, help="learning rate (default: 1e-3 heads, 1e-2 probe, 1e-4 baseline)")
    p.add_argument("--timesteps", type=timestep, nargs="+", help="override the method's timesteps")
    p.add_argument(
        "--augment",
        choices=AUGMENT_POLICY_NAMES,
        help="heads: augmented copies of the labelled slices, one per extra noise draw (default: framing)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=LEARNING_RATE_SCHEDULES,
        help="heads: the learning rate over the steps (default: cosine for radiograph backbones, constant otherwise)",
    )
    p.add_argument(
        "--timesteps-per-image",
        type=non_negative_int,
        help="TEDM: random timesteps per image at each head step (default: 2 for radiograph backbones, all "
        "otherwise; 0 = all)",
    )
    p.add_argument(
        "--members",
        type=positive_int,
        help="heads fitted with different seeds on the same images and averaged (default: 3 for TEDM on "
        "radiograph backbones, 1 otherwise)",
    )
    p.add_argument(
        "--no-test-time-flip",
        dest="test_time_flip",
        action="store_false",
        help="the model predicts each slice once, not also mirrored left-right (half the time)",
    )
    p.add_argument(
        "--crop-dark-borders",
        action=argparse.BooleanOptionalAction,
        help="crop each image's dark border bands (detector edges) before the model sees it and paste "
        "the result back (default: on for radiograph backbones, off for volumes)",
    )
    p.add_argument(
        "--postprocess",
        action=argparse.BooleanOptionalAction,
        help="learn from the labelled masks how many connected regions each structure has and whether it "
        "has holes, and post-process whole 2D images' predictions to match (default: on for TEDM, LEDM and "
        "LEDMe on radiograph backbones)",
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
        type=label_value,
        nargs="+",
        metavar="V",
        help="mask value of each class, background first (default: 0 and non-zero for one class, else 0..K)",
    )
    p.add_argument(
        "--slices",
        type=non_negative_int,
        nargs="+",
        help="volumes only: the slice indices to learn from (default: every slice carrying labels)",
    )
    p.add_argument(
        "--slices-per-case",
        type=positive_int,
        metavar="K",
        help="volumes only: keep K of the labelled slices, spread evenly from the first to the last (one: the "
        "middle one), as a clinician labelling K slices would",
    )
    p.add_argument("--axis", default=AXES[0], choices=AXES, help=f"volumes only: slicing axis (default: {AXES[0]})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    _add_device_options(p)
    p.add_argument("--seed", type=seed_type, default=0)
    p.set_defaults(func=_run_fit)


def _refuse_repeats(values: Optional[Sequence], setting: str) -> None:
    """Two classes, channels or label values of one name are a typo, never a request."""
    seen = set()
    for value in values or []:
        key = value.lower() if isinstance(value, str) else value
        if key in seen:
            raise SettingError(setting, f"{value!r} is given twice")
        seen.add(key)


def _class_spec(args: argparse.Namespace) -> Tuple[List[str], List[int]]:
    _refuse_repeats(["background", *args.classes], "classes")
    _refuse_repeats(args.label_values, "label_values")
    names = ["background"] + list(args.classes)
    values = list(args.label_values) if args.label_values else list(range(len(names)))
    if len(values) != len(names):
        raise SettingError(
            "label_values", f"{len(values)} values for {len(names)} classes (background + {', '.join(args.classes)})"
        )
    return names, values


def _run_fit(args: argparse.Namespace) -> int:
    from .bundle import BundleExistsError, check_bundle_target, save_bundle
    from .io.outputs import check_writable_folder, refuse_overlap
    from .model.checkpoint import load_backbone
    from .pipelines.fit import fit_bundle
    from .pipelines.labelled import holds_only_2d_images, load_labelled_data
    from .runtime import resolve_device

    class_names, label_values = _class_spec(args)
    _refuse_repeats(args.timesteps, "timesteps")
    if args.timesteps and args.method == BASELINE:
        raise SettingError("timesteps", "the supervised baseline takes no timesteps (it sees the image itself)")
    if args.method == BASELINE:
        # Settings of heads on diffusion features: silently ignored by the baseline, they would
        # leave a user believing the model was trained with them.
        for setting in ("augment", "lr_schedule", "timesteps_per_image", "members"):
            if getattr(args, setting) is not None:
                raise SettingError(setting, "is a setting of the heads; the supervised baseline does not use it")
    resolve_device(args.device)
    refuse_overlap(args.out, [("images", args.images), ("masks", args.masks), ("backbone", args.backbone)])
    try:
        check_bundle_target(args.out, args.overwrite)
    except BundleExistsError:
        # The library's message says "allow overwriting"; here the way to allow it is a flag.
        raise BundleError(args.out, "already exists; choose another name or pass --overwrite to replace it") from None
    check_writable_folder(args.out.parent)
    backbone = load_backbone(args.backbone)
    slices, labels, sources = load_labelled_data(
        args.images,
        args.masks,
        backbone.intensity,
        label_values,
        backbone.channel_names,
        n=args.n,
        slices=args.slices,
        slices_per_case=args.slices_per_case,
        axis=args.axis,
        label_name=args.label_name,
    )
    log.info("fitting %s on %d labelled slices", args.method, len(slices))
    from_2d_images = len(backbone.channel_names) == 1 and holds_only_2d_images(args.images)
    bundle = fit_bundle(
        backbone,
        slices,
        labels,
        args.method,
        class_names,
        label_values,
        steps=args.steps,
        learning_rate=args.lr,
        learning_rate_schedule=args.lr_schedule,
        timesteps_per_image=args.timesteps_per_image,
        members=args.members,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        timesteps=tuple(args.timesteps) if args.timesteps else None,
        axis=args.axis,
        test_time_flip=args.test_time_flip,
        # Auto (None): the radiograph rule of fit_bundle, but never on the slices of volumes.
        crop_dark_borders=False if args.crop_dark_borders is None and not from_2d_images else args.crop_dark_borders,
        postprocess=False if args.postprocess is None and not from_2d_images else args.postprocess,
        **({"augment": args.augment} if args.augment else {}),
    )
    bundle.training["sources"] = sources
    save_bundle(bundle, args.out, overwrite=args.overwrite)
    print(f"fitted {args.method} on {len(slices)} slices in {bundle.training['seconds']} s -> {args.out}")
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment images or volumes with a model bundle (the same outputs as scripts/batch_segment.py)",
    )
    p.add_argument("--model", required=True, type=Path, metavar="BUNDLE")
    p.add_argument("--input", required=True, type=Path, metavar="DIR", help="folder of images, volumes or cases")
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="a folder apart from every input")
    p.add_argument(
        "--probabilities",
        action="store_true",
        help="also write <name>_prob[_<class>].<ext>: float32 volumes, 16-bit PNGs of probability x 65535",
    )
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write <name>_uncertainty.<ext>: spread of the per-timestep probabilities (as --probabilities)",
    )
    p.add_argument(
        "--timesteps",
        type=timestep,
        nargs="+",
        help="predict with these timesteps only (single-step ablation of a TEDM head)",
    )
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false", help=NO_POSTPROCESS_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist (also another model's)")
    _add_device_options(p, batch_size=True)
    p.set_defaults(func=_run_segment)


def _run_segment(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .pipelines.batch import BatchOptions, check_output_folder, run_batch
    from .pipelines.segment import Segmenter
    from .runtime import resolve_device

    resolve_device(args.device)
    check_output_folder(args.input, args.output, model_dir=args.model)  # before the model is loaded
    bundle = load_bundle(args.model)
    segmenter = Segmenter(
        bundle,
        device=args.device,
        batch_size=args.batch_size,
        precision=args.precision,
        timesteps=args.timesteps,
        postprocess=None if args.postprocess else False,
    )
    options = BatchOptions(
        overwrite=args.overwrite,
        uncertainty=args.uncertainty,
        probabilities=args.probabilities,
        show_progress=sys.stderr.isatty(),  # bars in a terminal, not in a log file
    )
    report = run_batch(segmenter, args.input, args.output, options)
    print(f"{report.counts()} -> {report.summary_path}")
    for failure in report.failed:
        print(f"tedm segment: error: {failure.error}", file=sys.stderr)
    return 1 if report.failed else 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice, precision and recall of predicted vs ground-truth masks")
    p.add_argument("--pred", required=True, type=Path, metavar="DIR")
    p.add_argument("--truth", required=True, type=Path, metavar="DIR")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write per-image metrics here")
    p.add_argument(
        "--label-values",
        type=label_value,
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
    from .io.outputs import check_writable_folder
    from .pipelines.evaluate import (
        compare_dice,
        evaluate_folders,
        match_predictions,
        neither_note,
        same_images,
        summarise,
        write_metrics_csv,
    )

    if args.pred.resolve() == args.truth.resolve():
        raise SettingError("pred", f"{args.pred} is also the --truth folder: every score would be a perfect 1")
    if len(args.label_values) < 2 or len(set(args.label_values)) != len(args.label_values):
        raise SettingError("label_values", f"need distinct values, background first, got {args.label_values}")
    if args.csv is not None:
        if args.csv.is_dir() or args.csv.suffix.lower() != ".csv":
            # Never a folder, and never an image that evaluate reads: only a .csv file is written.
            raise SettingError("csv", f"{args.csv} is not a .csv file path; give the path of a .csv file to write")
        check_writable_folder(args.csv.parent)
    matched = match_predictions(args.pred, args.truth)
    rows = evaluate_folders(args.pred, args.truth, args.label_values, matched)
    other = None
    if args.compare:
        other = evaluate_folders(args.compare, args.truth, args.label_values)
        same_images(rows, other, args.pred, args.compare)
    print(f"{len({r['image'] for r in rows})} images scored")
    if args.csv:
        write_metrics_csv(args.csv, rows)
    for k in sorted({int(r["class"]) for r in rows}):
        of_class = [r for r in rows if r["class"] == k]
        label = f"class {k} " if len(args.label_values) > 2 else ""
        print(
            f"{label}Dice {summarise([r['dice'] for r in of_class])}  "
            f"precision {summarise([r['precision'] for r in of_class])}  "
            f"recall {summarise([r['recall'] for r in of_class])}{neither_note(of_class)}"
        )
        if other is not None:
            comparison = compare_dice(rows, other, k)
            tests = len(args.label_values) - 1
            # One test per structure on the same patients: Bonferroni (docs/method.md, section 6).
            adjusted = f" (Bonferroni over {tests} structures: p = {min(1.0, comparison.p_value * tests):.2g})"
            print(
                f"{label}vs {args.compare}: Dice {summarise([r['dice'] for r in other if r['class'] == k])}; "
                f"{args.pred} is {comparison}{adjusted if tests > 1 else ''}"
            )
    if matched.unmatched:
        # The means above cover only the images with a prediction (a failed case, say).
        shown = ", ".join(matched.unmatched[:10]) + (", ..." if len(matched.unmatched) > 10 else "")
        count = len(matched.unmatched)
        print(
            f"tedm evaluate: {count} ground truth{'s' if count > 1 else ''} without a prediction (not scored): {shown}",
            file=sys.stderr,
        )
        return 1
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
    p.add_argument("--steps", type=positive_int, help=f"fine-tuning steps (default {DEFAULT_REFINE_STEPS})")
    p.add_argument("--axis", choices=(AUTO, *AXES), default=AUTO)
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.set_defaults(func=_run_refine)


def _run_refine(args: argparse.Namespace) -> int:
    from .bundle import check_bundle_target, load_bundle
    from .io.cases import order_channel_files
    from .io.images import IMAGE_SUFFIXES
    from .io.outputs import check_writable_folder, refuse_overlap
    from .io.volumes import (
        VOLUME_SUFFIXES,
        geometry_mismatch,
        read_case,
        read_volume,
        volume_suffix,
        write_label_volume,
    )
    from .pipelines.batch import file_label_values
    from .pipelines.interactive import InteractiveSession
    from .pipelines.volume import classes_to_label_values, label_array_to_classes

    # Every check on where the results go before the work: found after it, the refined model was
    # lost (or saved, and the segmentation then failed with a traceback).
    for path in (args.out, args.output):
        if path is not None and (path.exists() or path.is_symlink()):
            raise TEDMError(f"{path}: already exists; refine never overwrites (choose another path)")
    if args.output is not None:
        if volume_suffix(args.output) not in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
            raise SettingError(
                "output", f"{args.output}: unsupported format; use .nii.gz, .nrrd, .mha (or .png for a 2D image)"
            )
        if args.output.resolve() == args.out.resolve():
            raise SettingError("output", f"{args.output} is the --out model folder too; give each its own path")
        check_writable_folder(args.output.parent)
    refuse_overlap(args.out, [("model", args.model)])
    check_bundle_target(args.out, overwrite=False)
    check_writable_folder(args.out.parent)
    bundle = load_bundle(args.model)
    if len(args.image) == 1:
        image = read_volume(args.image[0])
    else:
        # Matched to the model's channels by file name, as segment matches a case folder's files.
        image = read_case(order_channel_files(args.image, bundle.channel_names), bundle.channel_names)
    corrected = read_volume(args.corrected, allow_constant=True)
    mismatch = geometry_mismatch(image, corrected)
    if mismatch:
        raise TEDMError(f"{args.corrected}: not on the image's voxel grid ({mismatch})")
    # Its label values too before the work: found after segmenting the whole image, a wrong value
    # cost that segmentation for nothing.
    corrected_classes = label_array_to_classes(corrected, bundle.label_values)
    session = InteractiveSession(image)
    first = session.segment(bundle, args.axis, args.device)
    print(f"segmented {first.slices_run} slices along {first.axis} in {first.seconds:.1f} s")
    refined = session.refine(corrected_classes, steps=args.steps)
    print(
        f"refined on slice(s) {', '.join(map(str, refined.changed_slices))} "
        f"({len(refined.training_slices)} training slices) in {refined.seconds:.1f} s"
    )
    print(f"model -> {session.save_model(args.out)}")
    if args.output is not None:
        # The values segment writes into the same format (0/255 for one structure in a PNG).
        labels = classes_to_label_values(refined.labels, file_label_values(args.output, bundle))
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
    parser = OneLineParser(
        prog="tedm", description="Few-shot segmentation with timestep-ensembled diffusion features (TEDM)."
    )
    parser.add_argument("--version", action="version", version=f"tedm_core {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_pretrain, _add_fit, _add_segment, _add_refine, _add_evaluate, _add_serve):
        add(sub)
    return parser


def _out_of_memory_line(error: BaseException, args: argparse.Namespace) -> str:
    """Where memory ran out and what this command's options can change about it."""
    from .runtime import out_of_memory_on_gpu

    on_gpu = out_of_memory_on_gpu(error)
    ways = ["a smaller --batch-size"] if hasattr(args, "batch_size") else []
    if on_gpu and hasattr(args, "device"):
        ways.append("--device cpu")
    if not on_gpu:
        ways.append("fewer or smaller inputs")
    return f"out of {'GPU ' if on_gpu else ''}memory (try {', or '.join(ways)})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    prog = f"tedm {args.command}"
    try:
        return int(args.func(args) or 0)
    except SettingError as error:
        # The core names the setting as its API does; here it is the option the user typed.
        print(f"{prog}: error: argument {flag_of(error.setting)}: {error.problem}", file=sys.stderr)
        return 2
    except TEDMError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine, not the data: disk full, permissions, a vanished folder
        where = f"{error.filename}: " if error.filename else ""
        print(f"{prog}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        # torch reports memory running out as a RuntimeError (torch.OutOfMemoryError on CUDA, the
        # CPU allocator's "can't allocate memory"), rarely as MemoryError: one line, not a traceback.
        from .runtime import is_out_of_memory

        if not is_out_of_memory(error):
            raise
        print(f"{prog}: error: {_out_of_memory_line(error, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
