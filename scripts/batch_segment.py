#!/usr/bin/env python
"""Segment a whole cohort headless with a TEDM model bundle.

    python scripts/batch_segment.py --model BUNDLE --input DIR --output DIR [--labels DIR]

A thin face over ``tedm_core.pipelines.batch``; run with ``--help`` for the rules.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

EPILOG = """\
what is a case:
  single-channel model: every image or volume file under --input (searched recursively:
    .nii .nii.gz .nrrd .nhdr .mha .mhd .png .jpg .jpeg .bmp .tif .tiff) and every folder
    holding one DICOM series (.dcm/.ima files). Links to folders are followed (each real
    folder once); hidden files and folders are ignored;
    --include narrows by file name (e.g. --include '*FLAIR*').
  multi-channel model (channel_names in the bundle's bundle.json, e.g. FLAIR T1): every folder
    holding a file named after each channel, in any volume format and any case
    (case01/FLAIR.nii.gz + case01/T1.nii.gz, or a DICOM folder case01/FLAIR/). The files must
    share one grid and geometry. Other files in the folder (a ground truth, say) are ignored;
    a folder with only some of the channels fails with "missing modality ...".

  GIF, WebP, JPEG 2000 and Analyze (.hdr/.img) files fail with the reason; multi-page TIFFs too.

outputs (mirroring the inputs under --output; the same as `tedm segment`):
  in/a/b/scan.nii.gz -> out/a/b/scan.nii.gz   (NIfTI/NRRD/MHA keep their format; .mhd -> .mha,
  in/a/b/cxr.png     -> out/a/b/cxr.png        .nhdr -> .nrrd; 2D images -> PNG;
  in/a/case01/       -> out/a/case01.nii.gz    DICOM series and multi-channel case folders -> .nii.gz)
  Label files hold the bundle's label values, on exactly the input's grid and geometry; a
  one-structure model writes 0/255 into PNGs.
  --uncertainty adds <name>_uncertainty.<ext>, --probabilities <name>_prob.<ext> (one structure)
  or <name>_prob_<class>.<ext>: float32, or a 16-bit PNG of value*65535 for 2D.
  .tedm_outputs.json records the model (a hash of its files) and settings that made each output.
  summary.csv: case, status (ok | exists | failed), seconds, slices, voxels per class, error.
  --labels DIR: the ground truth of case <id> is DIR/<id>.<any suffix>, or DIR/<id>/NAME with
  --label-name NAME (e.g. BraTS: --labels DATA --label-name GT_W.nii.gz); metrics.csv then
  holds Dice, precision and recall per case and class (both empty -> 1.0), and summary.csv a
  ground_truth column (scored | missing | unusable). The mean printed says over how many cases
  it is taken; a case whose ground truth is missing or unusable is named and makes the exit
  status 1; ground truth for no case at all is a setup error (exit status 2).
  With --shard K/N the files are summary.shardKofN.csv and metrics.shardKofN.csv.

robustness:
  --output must lie apart from --input, --labels and --model, and be writable (checked first).
  Cases whose outputs exist are skipped (and still counted in summary/metrics) unless
  --overwrite, but only when their entry in .tedm_outputs.json says this model and settings
  made them: outputs of another model, or that no entry accounts for, are refused (--overwrite
  recomputes them). Two inputs that would write one file are refused.
  Outputs are written atomically, the label file last, so an interrupted run (even kill -9) is
  completed by rerunning the same command. A failing case is reported and the others go on;
  the exit status is 1 if any case failed or was not scored, 2 on a setup error (a disk full
  stops the batch).
"""


def build_parser() -> argparse.ArgumentParser:
    from tedm_core.argtypes import OneLineParser, device, positive_int, shard
    from tedm_core.choices import AXES, NO_POSTPROCESS_HELP, PRECISION_HELP, PRECISIONS

    p = OneLineParser(
        prog="batch_segment.py",
        description="Segment every case under a folder with a TEDM model bundle.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, metavar="BUNDLE", help="model bundle folder (from `tedm fit`)")
    p.add_argument("--input", required=True, type=Path, metavar="DIR", help="folder of cases, searched recursively")
    p.add_argument(
        "--output", required=True, type=Path, metavar="DIR", help="output folder (must not be inside --input)"
    )
    p.add_argument(
        "--device", type=device, default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="slices per model call (default: sized to free GPU memory, 4 on CPU)",
    )
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument(
        "--axis",
        choices=AXES,
        default=None,
        help="slicing axis (default: the one the bundle was fitted on)",
    )
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false", help=NO_POSTPROCESS_HELP)
    p.add_argument(
        "--overwrite", action="store_true", help="segment cases whose outputs already exist (also another model's)"
    )
    p.add_argument(
        "--uncertainty", action="store_true", help="also write the per-voxel spread of the per-timestep probabilities"
    )
    p.add_argument("--probabilities", action="store_true", help="also write each structure's probability map")
    p.add_argument(
        "--labels", type=Path, metavar="DIR", help="ground-truth folder: adds metrics.csv (Dice, precision, recall)"
    )
    p.add_argument(
        "--label-name",
        metavar="NAME",
        help="ground-truth file name inside each case's folder under --labels (e.g. GT_W.nii.gz)",
    )
    p.add_argument(
        "--include",
        metavar="GLOB",
        help="only files (single-channel) or case folders (multi-channel) whose name matches",
    )
    p.add_argument(
        "--shard",
        type=shard,
        default="1/1",
        metavar="K/N",
        help="process the K-th of N deterministic parts of the cohort (K from 1; e.g. $SLURM_ARRAY_TASK_ID/8)",
    )
    p.add_argument(
        "--require-3d", action="store_true", help="fail 2D images (multi-channel models always require volumes)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (logs only; also when stderr is not a terminal)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of failed cases)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.label_name and not args.labels:
        parser.error(
            "argument --label-name: names the ground truth inside each case folder under --labels; give --labels"
        )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from tedm_core.argtypes import flag_of
    from tedm_core.errors import SettingError, TEDMError

    try:
        from tedm_core.bundle import load_bundle
        from tedm_core.pipelines.batch import BatchOptions, check_output_folder, parse_shard, run_batch
        from tedm_core.pipelines.segment import Segmenter
        from tedm_core.runtime import resolve_device

        # Cheap checks first: a wrong folder or device should not cost a model load.
        resolve_device(args.device)
        check_output_folder(args.input, args.output, args.labels, args.model)
        options = BatchOptions(
            overwrite=args.overwrite,
            uncertainty=args.uncertainty,
            probabilities=args.probabilities,
            labels_dir=args.labels,
            label_name=args.label_name,
            include=args.include,
            shard=parse_shard(args.shard),
            require_3d=args.require_3d,
            axis=args.axis,
            show_progress=not args.no_progress and sys.stderr.isatty(),  # no bars in a job's log file
        )
        bundle = load_bundle(args.model)
        segmenter = Segmenter(
            bundle,
            device=args.device,
            batch_size=args.batch_size,
            precision=args.precision,
            postprocess=None if args.postprocess else False,
        )
        report = run_batch(segmenter, args.input, args.output, options)
    except SettingError as error:
        print(f"batch_segment: error: argument {flag_of(error.setting)}: {error.problem}", file=sys.stderr)
        return 2
    except TEDMError as error:
        print(f"batch_segment: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine, not the data: disk full, permissions
        where = f"{error.filename}: " if error.filename else ""
        print(f"batch_segment: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batch_segment: interrupted; rerun the same command to complete the batch", file=sys.stderr)
        return 130
    counts = report.counts()
    print(
        f"{len(report.results)} cases: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + f"; summary: {report.summary_path}"
    )
    if report.metrics_path is not None:
        print(f"{report.dice_line()}; metrics: {report.metrics_path}")
    for result in report.failed:
        print(f"FAILED {result.error}", file=sys.stderr)
    for result in report.unscored:
        print(f"NOT SCORED {result.error[len('not scored: ') :]}", file=sys.stderr)
    # A case without usable ground truth leaves the mean over a subset: the run is not clean.
    return 1 if report.failed or report.unscored else 0


if __name__ == "__main__":
    sys.exit(main())
