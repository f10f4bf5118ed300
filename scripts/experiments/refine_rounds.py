#!/usr/bin/env python
"""Rounds of correct-and-refine on one labelled volume, to compare code versions or seeds.

Two episodes through :class:`~tedm_core.pipelines.interactive.InteractiveSession` (what the
worker, and so the Slicer module, runs), one thread:

- ``loaded``: Segment with the model, then ``--rounds`` rounds of Refine;
- ``fitted``: a head fitted in the session on three labelled slices (at 30, 50 and 70 % of the
  slices holding labels; Refine then keeps anchors), then the same rounds.

Each round corrects the two slices whose labels agree least with the reference (mean Dice over
the classes, among slices holding labels and not yet learnt from) and refines; with ``--correction
erase-false-positives`` it erases, on the two slices with the most of them, only the voxels
labelled where the reference has background. Prints Dice against the reference and Refine's time
per round. ``--pull`` (``--pull-decay``) and ``--loaded-anchors`` try guards against forgetting
for the loaded model (docs/results/REFINE_VALIDATION.md, session 18); ``--save`` keeps every
round's labels and ``--compare A.npz B.npz`` prints the Dice between two such runs, round by round.

    python scripts/experiments/refine_rounds.py --model tedm_demo/bundle \\
        --image tedm_demo/train/images/mni152.nii.gz --labels tedm_demo/train/labels/mni152.nii.gz --save a.npz
    python scripts/experiments/refine_rounds.py --compare a.npz b.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from tedm_core.bundle import load_bundle
from tedm_core.io.volumes import read_volume
from tedm_core.pipelines import fit, interactive
from tedm_core.pipelines.interactive import InteractiveSession, SessionResult
from tedm_core.slicing import reassemble, slice_layout, to_slices

FITTED_AT = (0.3, 0.5, 0.7)


def mean_dice(a: np.ndarray, b: np.ndarray, classes: int) -> float:
    scores = [2 * ((a == c) & (b == c)).sum() / max(1, (a == c).sum() + (b == c).sum()) for c in range(1, classes)]
    return float(np.mean(scores))


def correct(current: np.ndarray, truth: np.ndarray, classes: int, exclude: List[int], how: str) -> List[int]:
    """Correct two slices of ``current`` (N, H, W) in place, as ``how`` says; returns which."""
    if how == "worst":
        candidates = [n for n in range(len(current)) if truth[n].any() and n not in exclude]
        chosen = sorted(sorted(candidates, key=lambda n: mean_dice(current[n], truth[n], classes))[:2])
        current[chosen] = truth[chosen]
        return chosen
    false_positives = ((current > 0) & (truth == 0)).reshape(len(current), -1).sum(axis=1)
    false_positives[list(exclude)] = 0
    chosen = sorted(int(n) for n in np.argsort(-false_positives, kind="stable")[:2])
    current[chosen] = np.where(truth[chosen] == 0, 0, current[chosen])
    return chosen


def run_rounds(
    session: InteractiveSession,
    result: SessionResult,
    truth: np.ndarray,
    classes: int,
    rounds: int,
    name: str,
    how: str = "worst",
    steps: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    saved = {f"{name}_r0": result.labels}
    print(f"{name}: Dice {100 * mean_dice(result.labels, truth, classes):.2f}", flush=True)
    truth_slices = to_slices(truth, session.layout)
    labels = result.labels
    for round_ in range(1, rounds + 1):
        current = to_slices(labels, session.layout)
        worst = correct(current, truth_slices, classes, session.training_slices, how)
        tic = time.perf_counter()
        labels = session.refine(reassemble(current, session.layout), steps=steps).labels
        seconds = time.perf_counter() - tic
        saved[f"{name}_r{round_}"] = labels
        print(
            f"{name} round {round_}: corrected {worst}, Dice {100 * mean_dice(labels, truth, classes):.2f}, "
            f"refine {seconds:.1f} s",
            flush=True,
        )
    return saved


def compare(first: Path, second: Path) -> None:
    a, b = np.load(first), np.load(second)
    for key in a.files:
        if key in b.files:
            classes = int(max(a[key].max(), b[key].max())) + 1
            differing = int((a[key] != b[key]).sum())
            print(f"{key}: Dice between the two {mean_dice(a[key], b[key], classes):.4f}, voxels differing {differing}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model bundle folder")
    parser.add_argument("--image", type=Path, help="the volume")
    parser.add_argument("--labels", type=Path, help="its reference labels (class indices)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--correction", choices=("worst", "erase-false-positives"), default="worst")
    parser.add_argument("--steps", type=int, default=None, help="Refine's steps (default: the core's)")
    parser.add_argument("--seed", type=int, default=None, help="Refine's random draws from this seed (default 0)")
    parser.add_argument(
        "--pull", type=float, help="Refine's pull to its start weights when it keeps no anchors (L2-SP)"
    )
    parser.add_argument("--pull-decay", action="store_true", help="--pull x 2 / the slices Refine learns from")
    parser.add_argument(
        "--loaded-anchors",
        type=float,
        metavar="WEIGHT",
        help="anchors for the loaded model too, their loss weighted so",
    )
    parser.add_argument("--episodes", nargs="+", choices=("loaded", "fitted"), default=["loaded", "fitted"])
    parser.add_argument("--save", type=Path, help="keep every round's labels here (.npz)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two saved runs")
    args = parser.parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return 0
    if not (args.model and args.image and args.labels):
        parser.error("--model, --image and --labels are needed (or --compare)")
    if args.pull_decay and args.pull is None:
        parser.error("--pull-decay needs --pull")
    torch.set_num_threads(1)
    if args.seed is not None:  # the session passes no seed: Refine's random draws from this one
        refine_bundle = interactive.refine_bundle
        interactive.refine_bundle = lambda *a, **k: refine_bundle(*a, **{**k, "seed": args.seed})
    if args.pull is not None:  # at every Refine, not only the core's first (0: no pull, as before session 18)
        fit.REFINE_PULL_TO_START, fit.REFINE_PULL_UNTIL_SLICES = args.pull, sys.maxsize
    if args.pull_decay:
        refine = interactive.refine_bundle

        def refine_with_decaying_pull(bundle, slices, *rest, **options):
            fit.REFINE_PULL_TO_START = args.pull * 2 / len(slices)
            return refine(bundle, slices, *rest, **options)

        interactive.refine_bundle = refine_with_decaying_pull
    if args.loaded_anchors is not None:
        fit.REFINE_ANCHOR_WEIGHT = args.loaded_anchors
    bundle = load_bundle(args.model)
    volume = read_volume(args.image)
    truth = read_volume(args.labels, allow_constant=True).array.astype(np.uint8)
    truth = truth.reshape(truth.shape[-3:])
    classes = bundle.num_classes
    saved: Dict[str, np.ndarray] = {}
    if "loaded" in args.episodes:
        session = InteractiveSession(volume)
        segmented = session.segment(bundle, device="cpu")
        session.fitted_here = args.loaded_anchors is not None
        saved.update(run_rounds(session, segmented, truth, classes, args.rounds, "loaded", args.correction, args.steps))
    if "fitted" in args.episodes:
        layout = slice_layout(volume.ijk_to_ras, volume.shape, bundle.axis)
        truth_slices = to_slices(truth, layout)
        holding = [n for n in range(len(truth_slices)) if truth_slices[n].any()]
        picked = [holding[int(len(holding) * f)] for f in FITTED_AT]
        drawn = np.zeros_like(truth_slices)
        drawn[picked] = truth_slices[picked]
        session = InteractiveSession(volume)
        fitted = session.fit(
            bundle, reassemble(drawn, layout), list(bundle.class_names), axis=bundle.axis, device="cpu"
        )
        saved.update(run_rounds(session, fitted, truth, classes, args.rounds, "fitted", args.correction, args.steps))
    if args.save:
        np.savez_compressed(args.save, **saved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
