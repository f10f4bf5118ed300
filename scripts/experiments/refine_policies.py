"""Refine policies on the BraTS correct-and-refine protocol (issue 10), for choosing them on
validation subjects: one segmentation per subject (features cached), then every policy replays
five rounds of "correct the two worst slices to the ground truth, Refine" from the same start.

    python scripts/experiments/refine_policies.py configs/brats_session.json --work runs/brats_session \
        --subjects Brats18_CBICA_AOO_1 Brats18_CBICA_AQN_1 \
        --policies tvoxels:anchors tvoxels:noanchor tvoxels:decay --out runs/refine_policies.json

A policy is ``SELECTION:VARIANT``. Selection: ``tvoxels`` (tumour slices with the most wrong
voxels: the study's rule, ``reproduce.most_wrong_slices``), ``voxels`` (any slice with the
most wrong voxels), ``dice`` (the tumour slices of lowest slice Dice: session 4's rule).
Variant (joined with ``+``): ``anchors`` (keep the earlier result on a few uncorrected slices,
weight 2), ``noanchor`` (the corrections alone), ``decay`` (anchors weighted 2 x 2 / corrected
slices), ``adabn`` (the head's BatchNorm statistics re-estimated on this volume first),
``stepsN`` (N refine steps), ``scratch`` (also the scratch control at rounds 3 and 5),
``diceloss`` (Refine's loss: binary cross-entropy plus MONAI's soft Dice per map), ``ownstats``
(after Refine, the head's BatchNorm statistics recomputed on the slices it was refined on),
``cosine`` (Refine's learning rate annealed to zero over its steps, as radiograph fits do since
session 12, instead of held constant), ``persliceN`` (N refine steps per slice trained on, at
least the default 40: 40 for the first two corrections, 120 after ten), ``pullX`` (Refine's head
pulled back to its start weights with L2-SP strength X at every Refine that keeps no anchors;
session 18, whose adopted rule, ``pullfirst0.1``, is today's Refine; ``nopull``: none, as before),
``pulldecayX`` (the same with strength X x 2 / the slices corrected so far: a prior that yields as
corrections accumulate), ``pullfirstX`` (strength X for the first two corrected slices, none after),
``weightX`` (the anchors' loss weight X instead of 2), ``tpiN`` (N random timesteps per slice and
Refine step instead of ``fit.REFINE_TIMESTEPS_PER_IMAGE``, 2), ``seedN`` (Refine's random draws from
seed N instead of 0: how far another random path alone moves a curve), ``fp32train`` (Refine's head
trained in fp32 where the session's passes, and so since session 24 its Refine, run in bf16).
``--fit-subject`` starts from a 3-slice model of another subject than the config's first (more
validation episodes from the same validation subjects: session 16).
Results: docs/results/REFINE_VALIDATION.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SCRIPTS))
import reproduce  # noqa: E402

from tedm_core import heads  # noqa: E402
from tedm_core.pipelines import fit as fit_module  # noqa: E402
from tedm_core.pipelines.evaluate import dice_precision_recall  # noqa: E402
from tedm_core.pipelines.interactive import InteractiveSession  # noqa: E402
from tedm_core.pipelines.segment import Segmenter  # noqa: E402
from tedm_core.slicing import reassemble, to_slices  # noqa: E402


def adapt_statistics(head, cache, rows) -> None:
    """Re-estimate the head's BatchNorm statistics on these cached slices (AdaBN)."""
    norms = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the slices
    head.train()
    with torch.no_grad():
        for r in rows:
            head.logits([level[r : r + 1].float() for level in cache.levels], (cache.transform.size,) * 2)
    for m in norms:
        m.momentum = 0.1
    head.eval()


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice, per map (the ``diceloss`` variant)."""
    from monai.losses import DiceLoss

    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets.float())
    return bce + DiceLoss(sigmoid=True)(logits, targets[:, None].float())


def number_of(parts, prefix: str, default=None):
    """The number of the part named ``prefix`` + a number (``steps120`` -> 120.0), else ``default``."""
    values = (p[len(prefix) :] for p in parts if p.startswith(prefix))
    return next((float(value) for value in values if value[:1].isdigit()), default)


class RefineVariant:
    """A policy's changes to one Refine call (its loss, the anchor weight, the head's statistics
    after it), undone when the call returns."""

    def __init__(self, parts, corrected_count: int) -> None:
        self.dice = "diceloss" in parts
        self.own_stats = "ownstats" in parts
        self.cosine = "cosine" in parts
        self.anchor_weight = 2.0 * 2 / corrected_count if "decay" in parts else fit_module.REFINE_ANCHOR_WEIGHT
        self.anchor_weight = number_of(parts, "weight", self.anchor_weight)
        # This call's pull at any number of slices (None: the core's rule, a pull for the first
        # REFINE_PULL_UNTIL_SLICES slices only, whose strength ``pullfirstX`` sets).
        self.pull = 0.0 if "nopull" in parts else number_of(parts, "pull")
        decaying = number_of(parts, "pulldecay")
        if decaying is not None:
            self.pull = decaying * 2 / corrected_count
        self.first_pull = number_of(parts, "pullfirst")
        self.timesteps_per_image = number_of(parts, "tpi")
        self.seed = number_of(parts, "seed")
        self.fp32_training = "fp32train" in parts
        self.trained_in = None  # the precision the head's training ran in, once it has

    # What a policy may change for one Refine call: (module, attribute), restored on exit.
    PATCHED = (
        (heads, "segmentation_loss"),
        (fit_module, "train_head"),
        (fit_module, "REFINE_ANCHOR_WEIGHT"),
        (fit_module, "REFINE_PULL_TO_START"),
        (fit_module, "REFINE_PULL_UNTIL_SLICES"),
        (fit_module, "REFINE_TIMESTEPS_PER_IMAGE"),
    )

    def __enter__(self):
        self.saved = [getattr(module, name) for module, name in self.PATCHED]
        original = fit_module.train_head

        def train_head(head, features, targets, steps, *args, **kwargs):
            if self.seed is not None:
                kwargs["seed"] = int(self.seed)
            if self.fp32_training:
                kwargs["precision"] = "fp32"
            self.trained_in = kwargs.get("precision", "fp32")
            if self.cosine:
                kwargs["learning_rate_schedule"] = "cosine"
            head = original(head, features, targets, steps, *args, **kwargs)
            if self.own_stats:
                size = tuple((targets if isinstance(targets, torch.Tensor) else targets[0]).shape[-2:])
                fit_module.recompute_statistics(head, features, fit_module.FitOptions().images_per_step, size)
            return head.eval()

        if self.dice:
            heads.segmentation_loss = dice_bce_loss
        fit_module.train_head = train_head
        fit_module.REFINE_ANCHOR_WEIGHT = self.anchor_weight
        if self.pull is not None:
            fit_module.REFINE_PULL_TO_START, fit_module.REFINE_PULL_UNTIL_SLICES = self.pull, sys.maxsize
        elif self.first_pull is not None:
            fit_module.REFINE_PULL_TO_START = self.first_pull
        if self.timesteps_per_image is not None:
            fit_module.REFINE_TIMESTEPS_PER_IMAGE = int(self.timesteps_per_image)
        return self

    def __exit__(self, *exc) -> None:
        for (module, name), value in zip(self.PATCHED, self.saved):
            setattr(module, name, value)


def worst_slices(selection: str, current, truth, corrected, count: int = 2):
    if selection == "tvoxels":
        return reproduce.most_wrong_slices(current, truth, corrected, count)
    if selection == "voxels":
        wrong = ((current > 0) != (truth > 0)).reshape(len(truth), -1).sum(axis=1)
        wrong[corrected] = 0
        return sorted((int(i) for i in np.flatnonzero(wrong)), key=lambda i: (-int(wrong[i]), i))[:count]
    tumour = [int(i) for i in np.flatnonzero(truth.reshape(len(truth), -1).any(axis=1)) if i not in corrected]
    dice = {i: dice_precision_recall(current[i] > 0, truth[i] > 0)[0] for i in tumour}
    return sorted(dice, key=lambda i: (dice[i], i))[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="the study's work folder (backbone, 3-slice model)")
    parser.add_argument("--data", type=Path, default=reproduce.REPO.parent / "shared" / "data")
    parser.add_argument("--subjects", nargs="+", required=True)
    parser.add_argument("--policies", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fit-subject", help="the start model's subject (default: the config's first)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = reproduce.load_config(args.config, False)
    study = reproduce.Study(config, args.work, args.work / "unused_results", args.data, False)
    spec = config["brats"]["refine"]
    fit_on = [s for s in study.brats_subjects() if s.name == args.fit_subject] if args.fit_subject else None
    if fit_on == [] or (args.fit_subject and args.fit_subject in args.subjects):
        parser.error(f"--fit-subject {args.fit_subject}: not a subject of the data, or among --subjects")
    bundle = study.brats_fit("tedm", spec["fit_subjects"], spec.get("fit_slices"), subjects=fit_on)
    backbone = study.load_backbone(config["brats"]["backbone"], config["brats"].get("checkpoint"))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for subject in (s for s in study.brats_subjects() if s.name in args.subjects):
        volume, truth = study.brats_volume(subject)
        session = InteractiveSession(volume)
        tic = time.perf_counter()
        segmented = session.segment(bundle, axis="axial", device="cpu")
        layout = session.layout
        truth_slices = to_slices(truth, layout)
        start = to_slices(segmented.labels, layout).copy()
        ran = np.flatnonzero(session.feature_rows >= 0)
        saved = (session.bundle, session.written.copy(), session.scores.copy())
        record = results.setdefault(subject.name, {})
        record["start"] = dice_precision_recall(segmented.labels > 0, truth > 0)[0]
        record["segment_seconds"] = time.perf_counter() - tic
        for policy in args.policies:
            if policy in record:
                continue
            selection, variant = policy.split(":")
            parts = variant.split("+")
            session.bundle, session.written, session.scores = copy.deepcopy(saved[0]), *(a.copy() for a in saved[1:])
            session.training_slices = []
            session.fitted_here = "anchors" in parts or "decay" in parts or number_of(parts, "weight") is not None
            steps = number_of(parts, "steps")
            steps = None if steps is None else int(steps)  # Refine's steps are a count
            per_slice = number_of(parts, "perslice")
            current = start.copy()
            if "adabn" in parts:
                adapt_statistics(session.bundle.head, session.features, ran[:: max(1, len(ran) // 24)])
                predicted = Segmenter(session.bundle, device="cpu").predict_from_features(session.features)
                current = np.zeros_like(truth_slices)
                current[ran] = predicted.labels[session.feature_rows[ran]]
                session.written = current.copy()
            rows, corrected = [], []
            for round_index in range(1, spec["rounds"] + 1):
                worst = worst_slices(selection, current, truth_slices, corrected, spec["slices_per_round"])
                corrected += worst
                edited = current.copy()
                edited[worst] = truth_slices[worst]
                if per_slice:
                    steps = max(fit_module.DEFAULT_REFINE_STEPS, int(per_slice) * len(corrected))
                with RefineVariant(parts, len(corrected)) as variant:
                    refined = session.refine(reassemble(edited, layout), steps=steps)
                current = to_slices(refined.labels, layout).copy()
                pasted = start.copy()
                pasted[corrected] = truth_slices[corrected]
                row = {
                    "round": round_index,
                    "corrected": list(corrected),
                    "truth_voxels": [int((truth_slices[i] > 0).sum()) for i in worst],
                    "refine": dice_precision_recall(refined.labels > 0, truth > 0)[0],
                    "paste": dice_precision_recall(reassemble(pasted, layout) > 0, truth > 0)[0],
                    "seconds": refined.seconds,
                    "precision": variant.trained_in,  # the head's training's
                }
                if "scratch" in parts and round_index in spec.get("scratch_rounds", []):
                    scratch = study.scratch_control(session, backbone, truth_slices, corrected)
                    row["scratch"] = dice_precision_recall(reassemble(scratch, layout) > 0, truth > 0)[0]
                rows.append(row)
                print(subject.name, policy, round_index, worst, round(100 * row["refine"], 1), flush=True)
            record[policy] = rows
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
        session.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
