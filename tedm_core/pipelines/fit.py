"""Fit a segmenter from a few labelled slices: a pixel-wise head on frozen DDPM features
(TEDM, LEDM, LEDMe, step-wise probe), or the supervised UNet baseline.

Head training never runs the UNet in its loop: the labelled slices' decoder features are
extracted once (for a few noise draws, draw 0 being the inference noise) at native resolution
and the head trains on them. This is what makes fitting and refining take seconds.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..bundle import BASELINE, TRAINED_IMAGE_SIZE, ModelBundle, baseline_output_channels
from ..choices import (
    DEFAULT_BASELINE_STEPS,
    DEFAULT_HEAD_STEPS,
    DEFAULT_REFINE_STEPS,
    LEARNING_RATE_SCHEDULES,
    METHODS,
    canonical_method,
)
from ..errors import Cancelled, InputError, SettingError
from ..features import DecoderFeatureExtractor, LevelFeatures
from ..heads import FeatureHead, HeadConfig, maps_per_chunk, segmentation_loss
from ..model.backbone import build_unet
from ..model.checkpoint import Backbone
from ..postprocessing import ComponentRule
from ..preprocessing.augment import DEFAULT_AUGMENT, augment_slices, resolve_policy
from ..preprocessing.framing import crop_to_content
from ..preprocessing.intensity import IntensityConfig, is_radiograph
from ..preprocessing.spatial import labels_to_model_grid, to_model_grid
from ..runtime import autocast, check_finite_loss, module_on, resolve_device, resolve_precision

log = logging.getLogger(__name__)
Progress = Callable[[int, int, float], None]  # (step, total, loss)
CancelCheck = Callable[[], bool]

# Refine (measured on a whole BraTS volume, `small` backbone, CPU): DEFAULT_REFINE_STEPS steps
# (40 until session 16) at 1e-3 with 2 random timesteps per slice and 2 of the anchor slices per
# step, their loss weighted 2x (more anchor weight kept the Dice on uncorrected slices higher);
# see benchmarks/refine_vs_segment.py.
DEFAULT_REFINE_LEARNING_RATE = 1e-3
# One timestep per slice would halve the training (a Refine 35 % shorter) but lost 3.5 / 1.9 / 0.8
# mean Dice after rounds 1 / 3 / 5 on the six validation episodes (session 23,
# docs/results/REFINE_VALIDATION.md).
REFINE_TIMESTEPS_PER_IMAGE = 2
REFINE_ANCHOR_WEIGHT = 2.0
REFINE_ANCHOR_IMAGES_PER_STEP = 2
# Refine mixes this many uncorrected slices, labelled with the previous result, into its
# training (see choose_anchor_slices): fine-tuning on two corrected slices alone made the head
# forget what it did on every other slice (Dice on the others 0.79 -> 0.00 on a BraTS volume).
REFINE_ANCHOR_SLICES = 4
# A Refine that keeps no anchors (a model loaded, not fitted on this volume) and learns from this
# many slices or fewer pulls its head back towards the weights it started from (L2-SP,
# ``train_head``'s ``pull_to_start``) with this strength: on two corrected slices alone the head
# could lose the structure everywhere else (BraTS validation episodes: mean whole-tumour Dice after
# the first Refine 58.2 without, 80.5 with; one episode 63.6 -> 0.0 without). With more corrected
# slices it learns freely: a pull kept on then cost 1.4-2.2 Dice after five rounds (session 18,
# docs/results/REFINE_VALIDATION.md). Strength 1 since session 23: on twelve validation episodes
# (two pretrainings) the mean after the first Refine was 68.2 against 58.1 with session 18's 0.1,
# and 87.9 / 90.5 against 88.3 / 90.1 after rounds 3 / 5 (0.3, on six of them, gained less and
# lost 2.0 at round 3).
REFINE_PULL_TO_START = 1.0
REFINE_PULL_UNTIL_SLICES = 2
# The logistic probe has no normalisation layer to tame raw feature scales: it needs a larger step.
DEFAULT_HEAD_LEARNING_RATES = {"probe": 1e-2}


@dataclass
class FitOptions:
    steps: Optional[int] = None  # default: 300 for heads, 1000 for the baseline
    learning_rate: Optional[float] = None  # default: 1e-3 for heads, 1e-4 for the baseline
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    noise_draws: int = 4  # feature sets per labelled slice (draw 0 = the inference noise)
    images_per_step: int = 8  # labelled slices per head step (all of them when fewer)
    timesteps: Optional[Tuple[int, ...]] = None  # override the method's default steps
    show_progress: bool = True
    # Heads only: noise draws 1.. see augmented copies of the labelled slices (draw 0 stays the
    # original with the inference noise); a name from preprocessing.augment.AUGMENT_POLICIES.
    # "framing" was chosen on validation (issue 10; docs/results/RESULTS_cxr_session4.md; TEDM n = 3, `small4`
    # backbone at 250 steps): Dice on the pool images re-framed with a detector band 76.0 -> 90.5
    # (p = 1.5e-11), on covid_v7 80.0 -> 82.1 (p = 1.3e-08), on the plain pool images 91.1 ->
    # 91.4 (p = 0.12); adding intensity changes was worse on all three (covid_v7 81.4, p = 0.007).
    augment: str = DEFAULT_AUGMENT
    # The bundle's test-time flip (ModelBundle.test_time_flip): predict each slice also mirrored
    # left-right and average. Chosen on validation (issue 10; docs/results/RESULTS_cxr_session6.md, session 5;
    # TEDM n = 3, `small4` at 500 steps, paired Wilcoxon against no flip): Dice on covid_v7
    # 82.5 -> 83.5 (p = 3.8e-06), on the re-framed pool images 89.8 -> 90.6 (p = 0.007), on the
    # plain pool images 91.7 -> 92.1 (p = 0.12). Twice the inference work; nnU-Net mirrors too.
    test_time_flip: bool = True
    # The bundle's dark-border cropping (ModelBundle.crop_dark_borders, preprocessing.framing):
    # None = on for radiograph backbones (percentile intensity), off otherwise; faces fitting on
    # the slices of a volume pass False (pipelines.volume.is_whole_2d_image). Refining: None keeps the
    # bundle's. Chosen on validation (issue 10; docs/results/INFERENCE_LEVERS.md; TEDM n = 3, `small4`
    # at 1,750 steps): the re-framed pool images 91.0 -> 91.7 (p = 0.008), covid_v7 86.0 -> 86.0
    # (2 of 100 cropped, both better), the plain pool images unchanged (none cropped).
    crop_dark_borders: Optional[bool] = None
    # The bundle's anatomy post-processing (ModelBundle.component_rule, postprocessing): learnt
    # from the labelled masks, applied to whole 2D images. None = POSTPROCESSED_METHODS on
    # radiograph backbones; refining keeps the bundle's, widened by the corrections.
    postprocess: Optional[bool] = None
    # The head's timesteps whose predictions are averaged at inference (ModelBundle.inference_timesteps);
    # the head still learns from all of them. None = RADIOGRAPH_INFERENCE_TIMESTEPS for TEDM on
    # radiograph backbones, all of them otherwise; () = all of them.
    inference_timesteps: Optional[Tuple[int, ...]] = None
    # Heads only: after fitting, replace the BatchNorm running statistics (an exponential average
    # dominated by the last ~20 steps' random draws) by their average over every draw and image.
    # Measured on validation (issue 10, session 10; RESULTS_cxr_session10.md "precisebn"; TEDM n = 3, seeds
    # 0-2): covid_v7 +0.3 Dice (p = 4e-14), the pool images +0.0; on top of the cosine schedule
    # adopted in session 12, nothing (84.6 both). Not the default.
    precise_statistics: bool = False
    # Heads only: the learning rate over the steps, "constant" or "cosine" (annealed to zero,
    # torch's CosineAnnealingLR); None = RADIOGRAPH_LEARNING_RATE_SCHEDULE for radiograph
    # backbones, constant otherwise (volumes: not yet measured).
    learning_rate_schedule: Optional[str] = None
    # Heads only: keep the equal average of the head's weights over the second half of the steps
    # (stochastic weight averaging, Izmailov et al. 2018, torch.optim.swa_utils), its BatchNorm
    # statistics recomputed as precise_statistics does. Measured with the cosine schedule's
    # variants (session 12): covid_v7 +0.75 against cosine's +1.11. Not the default.
    average_weights: bool = False
    # Heads only: the decoder levels the head reads (0 = deepest; ModelBundle.head.config.levels);
    # None = all of them.
    levels: Optional[Tuple[int, ...]] = None
    # Heads only: the widths of the head's hidden layers; None = the method's design (heads.HEAD_DESIGNS).
    hidden: Optional[Tuple[int, ...]] = None
    # Heads only: per image and step, this many random timesteps of the head's instead of all of
    # them (train_head's unbiased estimate of the same loss, what Refine uses). None =
    # RADIOGRAPH_TIMESTEPS_PER_IMAGE for TEDM on radiograph backbones, all otherwise; 0 = all.
    timesteps_per_image: Optional[int] = None
    # Heads only: how many heads to fit on the same labelled images, with the seeds seed, seed +
    # 100, seed + 200 ... (initial weights, augmented copies, batches and timesteps all follow the
    # seed), kept as one ensemble head whose members' per-step probabilities are averaged. None =
    # RADIOGRAPH_ENSEMBLE_MEMBERS for TEDM on radiograph backbones, one otherwise.
    members: Optional[int] = None


# Chosen on validation (issue 10, session 12; docs/results/ROBUSTNESS.md, "Session 12"; TEDM n = 3,
# the study's three draws, `small4` at 1,250 steps, paired Wilcoxon against the constant rate on the
# same images): covid_v7 83.47 -> 84.58 (+1.11, p = 1.4e-16, 92 of 100 images better), the pool
# images 92.50 -> 92.46 (p = 0.87), re-framed 92.12 -> 92.08 (p = 0.69). With the rate held constant
# the head ends on a noisy iterate, and out of domain that luck of the fit cost up to 2.3 points
# (docs/results/ROBUSTNESS.md, "Session 10"); the poor draw gained most (80.8 -> 83.0), every one of
# 9 heads (3 fit seeds per draw) gained on covid_v7, and over 12 backbone checkpoints (first draw)
# it gained +0.25 on average. Weight averaging (+0.75) and precise BatchNorm statistics (+0.34;
# nothing on top of cosine) did less.
RADIOGRAPH_LEARNING_RATE_SCHEDULE = "cosine"


def default_learning_rate_schedule(options: FitOptions, intensity: IntensityConfig) -> str:
    """The head's learning-rate schedule a fit with ``options`` uses and records."""
    if options.learning_rate_schedule is not None:
        return options.learning_rate_schedule
    return RADIOGRAPH_LEARNING_RATE_SCHEDULE if is_radiograph(intensity) else "constant"


# Chosen on validation by the study's rule (the best mean over the validation sets), the rule that
# chose {1, 10, 25, 50} in session 7 (docs/results/ROBUSTNESS.md, "Adopted at the end of session 7":
# the one-head, 8-step fit applied to them against all 8 steps, pool +0.8, covid_v7 +0.4 at 1,250
# steps). Session 15 (docs/results/ROBUSTNESS.md, "Session 15"; TEDM n = 3 with today's three heads
# and two-timestep cosine fit, the study's three draws, `small4` at 2,500 steps, the same units'
# ablation scores paired per image, seeds averaged; scripts/experiments/compare_units.py
# --b-timesteps 1): step 1 alone against {1, 10, 25, 50}, pool 92.79 -> 92.86 (p = 0.13), re-framed
# 92.48 -> 92.53 (p = 0.22), covid_v7 85.63 -> 85.81 (+0.18, p = 1.2e-06, 79 of 100 better;
# precision 93.6 -> 92.3, recall 79.5 -> 80.8, so slightly larger masks); at 1,250 steps +0.09 /
# +0.10 / -0.02. Under it the rule still picks the 2,500-step checkpoint (three seeds,
# compare_units' means: 90.40 against 90.31 at 2,250, 90.12 at 1,250). A quarter of the UNet passes
# of {1, 10, 25, 50}; the three heads' spread on that step is the uncertainty map
# (Segmenter.gives_uncertainty). The head still learns from all 8 steps: it is the shared training
# that carries the method's robustness (a head *fitted* on low steps only lost 1.2 out of domain,
# session 7). Not measured on brain MRI, so volumes keep all 8 steps.
RADIOGRAPH_INFERENCE_TIMESTEPS = (1,)


def default_inference_timesteps(
    options: FitOptions, method: str, intensity: IntensityConfig, timesteps: Sequence[int]
) -> Tuple[int, ...]:
    """The inference subset a model fitted with ``options`` records (empty: all its timesteps)."""
    if options.inference_timesteps is not None:
        return tuple(int(t) for t in options.inference_timesteps)
    if method == "tedm" and is_radiograph(intensity) and set(RADIOGRAPH_INFERENCE_TIMESTEPS) <= set(timesteps):
        return RADIOGRAPH_INFERENCE_TIMESTEPS
    return ()


# Chosen on validation (issue 10, session 13; docs/results/VALIDATION_session13.md; TEDM n = 3, the
# study's three draws, `small4` at 1,250 steps, paired Wilcoxon against all 8 timesteps per image on
# the same images): covid_v7 84.58 -> 85.35 (+0.77, p = 2.9e-17, 95 of 100 images better, its
# precision up too: not the masks' convention), the pool images 92.46 -> 92.35 (-0.11, p = 0.008),
# re-framed 92.08 -> 91.97 (-0.11, p = 0.005); and the fit 6-9x faster (15-23 s against 146 s on one
# core). The gain is the lighter fit, not the sampling itself: 1,200 such steps (as many maps as
# before) gave the old numbers back (pool -0.10, covid_v7 +0.01). Unlike 150 steps over every
# timestep (pool -1.3, larger masks), it leaves the masks' size alone (precision on covid_v7 89.6 ->
# 89.8, recall 81.5 -> 82.5). Over the rest of the grid (docs/results/ROBUSTNESS.md, "Session 13")
# the out-of-domain gain held at n = 1 and 40, not at 6 and 12 (covid_v7 -0.1, -0.7), and in domain
# it cost 0.1-0.6 at every n: kept for the few-shot end (n <= 3) and the fit's speed. Not yet
# measured on brain MRI, so volumes keep every timestep.
RADIOGRAPH_TIMESTEPS_PER_IMAGE = 2


def default_timesteps_per_image(options: FitOptions, method: str, intensity: IntensityConfig) -> Optional[int]:
    """Timesteps per image and step a head fit with ``options`` trains on (None: all of them)."""
    if options.timesteps_per_image is not None:
        if options.timesteps_per_image < 0:
            raise SettingError("timesteps_per_image", f"must be 0 (all) or more, got {options.timesteps_per_image}")
        return int(options.timesteps_per_image) or None
    return RADIOGRAPH_TIMESTEPS_PER_IMAGE if method == "tedm" and is_radiograph(intensity) else None


# Chosen on validation (issue 10, session 14; docs/results/FIT_SEEDS_session14.md; TEDM n = 3, the
# study's three draws, `small4` at 1,250 steps, with the two-timestep cosine fit above, paired
# Wilcoxon of the three-head ensemble against its first head alone, which is the one-head fit):
# covid_v7 85.37 -> 85.78 (+0.41, p = 1.1e-06 over the 300 image-draws; -0.1 / +0.8 / +0.6 per draw,
# precision 89.8 -> 90.7, so not larger masks), the pool images and re-framed pool images +0.01 /
# +0.02 (p = 0.32 / 0.24), +0.25 against a head of any one seed; at the 2,500 steps the study then
# chose (FIT_SEEDS_session14_2500.md) pool +0.32, covid_v7 +0.64 (p = 1.3e-15), and five heads
# another +0.28 on covid_v7 (p = 3.1e-15; not adopted yet, docs/results/ROBUSTNESS.md, "Session
# 14"). Heads fitted on the same images with other seeds differ by up to 1.4 points out of domain
# (2.3 with the constant rate, session 10): the ensemble takes out that luck of one fit. Three times
# the head's share of fitting, Refine and prediction (docs/results/PERFORMANCE.md, "Session 14":
# tedm segment on radiographs 1.17x); not yet measured on brain MRI, so volumes keep one head.
RADIOGRAPH_ENSEMBLE_MEMBERS = 3
MEMBER_SEED_STRIDE = 100


def default_members(options: FitOptions, method: str, intensity: IntensityConfig) -> int:
    """How many heads a fit with ``options`` averages (its ``HeadConfig.members``)."""
    if options.members is not None:
        if isinstance(options.members, bool) or not isinstance(options.members, int) or options.members < 1:
            raise SettingError("members", f"must be a whole number of at least 1, got {options.members!r}")
        return options.members
    return RADIOGRAPH_ENSEMBLE_MEMBERS if method == "tedm" and is_radiograph(intensity) else 1


# Anatomy post-processing (at most as many regions per structure as the labelled masks had, holes
# filled where they had none: for the Shenzhen lungs, the two largest regions and no holes) was
# chosen on validation (issue 10, session 16; docs/results/RESULTS_cxr_session16.md, "Anatomy
# post-processing": the study's units at 2,500 steps, seeds averaged per image, paired Wilcoxon
# against the raw output). TEDM at n = 1 / 3 / 6 / 12: covid_v7 +0.03 / +0.15 / +0.20 / +0.45
# (p <= 9e-05), the pool images +0.02 to +0.09; LEDM and LEDMe +0.01 to +0.19 on every set and n;
# none of the three lower anywhere. The supervised baseline lost out of domain (covid_v7 -0.9 /
# -1.0 at n = 1 / 3: its fragmented lungs lose real regions), so it keeps its raw output; the
# probes are a diagnostic and stay raw too.
POSTPROCESSED_METHODS = ("tedm", "ledm", "ledme")


def learns_component_rule(options: FitOptions, method: str, intensity: IntensityConfig) -> bool:
    """Whether a model fitted with ``options`` records an anatomy post-processing rule."""
    if options.postprocess is not None:
        return bool(options.postprocess)
    return method in POSTPROCESSED_METHODS and is_radiograph(intensity)


def crops_dark_borders(options: FitOptions, intensity: IntensityConfig) -> bool:
    """Whether a model fitted with ``options`` on a backbone with ``intensity`` crops dark borders."""
    if options.crop_dark_borders is not None:
        return bool(options.crop_dark_borders)
    return is_radiograph(intensity)


#: Labelled slices: one (N, C, H, W) array, or a sequence of (C, H, W) slices of different sizes.
SliceSet = Union[np.ndarray, Sequence[np.ndarray]]
#: Their labels: one (N, H, W) array, or a sequence of (H, W) label slices matching the slices.
LabelSet = Union[np.ndarray, Sequence[np.ndarray]]


def labels_max(labels: LabelSet) -> int:
    """The largest class index in ``labels`` (one array or a sequence of slices of different sizes)."""
    if isinstance(labels, np.ndarray):
        return int(labels.max())
    return max(int(np.asarray(label).max()) for label in labels)


def _prepare(
    slices: SliceSet,
    labels: LabelSet,
    image_size: int,
    num_classes: int,
    crop_with: Optional[IntensityConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Labelled slices and labels on the model grid; with ``crop_with`` (the model's intensity
    normalisation), each slice's dark border bands cropped first, as the segmenter crops them.

    Slices of different sizes (a sequence of (C, H, W) slices) are each framed on their own, as
    the segmenter frames each image: padding them to a common size first would teach a smaller
    image at another scale and position than segmenting shows it.
    """
    if isinstance(slices, np.ndarray) or isinstance(labels, np.ndarray):
        return _prepare_stack(slices, labels, image_size, num_classes, crop_with)
    slices, labels = list(slices), list(labels)
    if len(slices) != len(labels):
        raise ValueError(f"{len(slices)} slices for {len(labels)} label slices")
    if len(slices) == 0:
        raise InputError(None, "no labelled slices to learn from")
    # Framed in groups of one size (each group as one stack, so that slices of one size are
    # framed exactly as a stack of them is), then put back in the order given.
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for index, slice_ in enumerate(slices):
        groups.setdefault(np.shape(slice_), []).append(index)
    grid = torch.empty(0)
    targets = torch.empty(0, dtype=torch.long)
    for indices in groups.values():
        group_grid, group_targets = _prepare_stack(
            np.stack([np.asarray(slices[i], dtype=np.float32) for i in indices]),
            np.stack([np.asarray(labels[i]) for i in indices]),
            image_size,
            num_classes,
            crop_with,
        )
        if grid.numel() == 0:
            grid = group_grid.new_empty((len(slices),) + tuple(group_grid.shape[1:]))
            targets = group_targets.new_empty((len(slices),) + tuple(group_targets.shape[1:]))
        grid[indices] = group_grid
        targets[indices] = group_targets
    return grid, targets


def _prepare_stack(
    slices: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    num_classes: int,
    crop_with: Optional[IntensityConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_prepare` for one (N, C, H, W) stack of slices of one size."""
    slices = np.asarray(slices, dtype=np.float32)
    labels = np.asarray(labels)
    if slices.ndim != 4 or labels.shape != (slices.shape[0],) + slices.shape[2:]:
        raise ValueError(f"expected slices (N, C, H, W) and labels (N, H, W); got {slices.shape} and {labels.shape}")
    if len(slices) == 0:
        raise InputError(None, "no labelled slices to learn from")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InputError(
            None, f"labels must be class indices in [0, {num_classes - 1}], found {labels.min()}..{labels.max()}"
        )
    if not np.isfinite(slices).all():
        raise InputError(None, "the labelled slices hold NaN or infinite values")
    if crop_with is not None:
        slices, labels, _ = crop_to_content(slices, crop_with, labels)
    grid, transform = to_model_grid(torch.from_numpy(slices), image_size)
    targets = labels_to_model_grid(torch.from_numpy(labels.astype(np.int64)), transform)
    return grid, targets


@torch.no_grad()
def extract_training_features(
    extractor: DecoderFeatureExtractor,
    grid: Union[torch.Tensor, Sequence[torch.Tensor]],
    timesteps: Sequence[int],
    draws: int,
    device: torch.device,
    precision: str,
    chunk: int = 4,
    first_draw: int = 0,
) -> List[LevelFeatures]:
    """Per noise draw, per level: (N, S, C_l, h_l, w_l) features of the labelled slices, on ``device``.

    ``grid`` is one (N, C, S, S) tensor for every draw, or one per draw (augmented copies).
    ``first_draw``: start there (the earlier draws' features are known already).
    """
    out: List[LevelFeatures] = []
    for draw in range(first_draw, draws):
        slices = grid if isinstance(grid, torch.Tensor) else grid[draw]
        parts = []
        for start in range(0, slices.shape[0], chunk):
            with autocast(device, precision):
                parts.append(
                    [f.float() for f in extractor(slices[start : start + chunk].to(device), timesteps, draw=draw)]
                )
        out.append([torch.cat(level) for level in zip(*parts)])
    return out


def augmented_draws(
    grid: torch.Tensor, targets: torch.Tensor, draws: int, augment: str, seed: int
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The labelled slices and labels seen by each noise draw: draw 0 the originals (the inference
    noise on the real image), draws 1.. an augmented copy each under ``augment`` (or the originals)."""
    policy = resolve_policy(augment)
    grids, labels = [grid], [targets]
    for draw in range(1, draws):
        if policy.changes_anything:
            g, t = augment_slices(grid, targets, policy, seed=seed * 1_000_003 + draw)
        else:
            g, t = grid, targets
        grids.append(g)
        labels.append(t)
    return grids, labels


@dataclass
class Anchor:
    """Images the head must keep predicting as before while it learns from corrections.

    Fine-tuning on two corrected slices alone lets the head forget everything else it knew;
    mixing a few uncorrected images, labelled with the previous prediction, into every step
    keeps it close to its old behaviour away from the corrections.

    features: per level (A, S, C_l, h_l, w_l) (any float dtype); labels: (A, H, W) class
    indices on the model grid.
    """

    features: LevelFeatures
    labels: torch.Tensor
    weight: float = 1.0  # of the anchor loss, relative to the labelled images' loss
    images_per_step: int = 2


def _gather(
    features: LevelFeatures, rows: torch.Tensor, timesteps_per_image: Optional[int], generator: torch.Generator
) -> LevelFeatures:
    """The features of images ``rows``, each with ``timesteps_per_image`` random timesteps (None:
    all): per level (B, count, C_l, h_l, w_l). One copy of just those maps: selecting the images
    first copied every timestep of them (0.14 s of a Refine, session 17)."""
    if timesteps_per_image is None:
        return [f.index_select(0, rows) for f in features]
    s = features[0].shape[1]
    chosen = torch.stack([torch.randperm(s, generator=generator)[:timesteps_per_image] for _ in range(len(rows))]).to(
        features[0].device
    )
    return [f[rows[:, None], chosen] for f in features]


def choose_anchor_slices(
    labels: np.ndarray,
    uncertainty: np.ndarray,
    candidates: Sequence[int],
    count: int = REFINE_ANCHOR_SLICES,
) -> List[int]:
    """The slices whose previous result a Refine should keep (its :class:`Anchor`).

    ``labels`` (N, H, W) are the previous result of every slice, ``uncertainty`` (N,) its mean
    prediction disagreement per slice, ``candidates`` the slices that may serve (ran through the
    model, not labelled or corrected by the user). Spread evenly over the candidates, half of
    them among those where the previous result shows a structure, so that Refine neither
    forgets a structure nor starts painting it everywhere. Within each stretch: among the
    former, the slice showing the most structure (a slice showing a few voxels teaches little
    more than background); among the others, the slice the model was most sure of.
    """
    area = (np.asarray(labels) > 0).reshape(len(labels), -1).sum(axis=1)
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    showing = [int(i) for i in candidates if area[i] > 0]
    empty = [int(i) for i in candidates if area[i] == 0]

    def spread(pool: List[int], k: int, score: np.ndarray) -> List[int]:
        """The best-scoring (lowest) slice of each of ``k`` even stretches of ``pool``."""
        if k <= 0 or not pool:
            return []
        stretches = np.array_split(np.asarray(pool), min(k, len(pool)))
        return [int(part[np.argmin(score[part])]) for part in stretches]

    chosen = spread(showing, count - count // 2 if empty else count, -area)
    chosen += spread(empty, count - len(chosen), uncertainty)
    if len(chosen) < count:  # too few empty slices: take more of the others
        chosen += spread([i for i in showing if i not in chosen], count - len(chosen), -area)
    return sorted(set(chosen))


def _accumulate_loss(
    head: FeatureHead, features: LevelFeatures, targets: torch.Tensor, weight: float, chunk: Optional[int]
) -> float:
    """``weight`` x the loss of a batch, back-propagated a few maps at a time; returns its value.

    Exact only with frozen normalisation statistics: then the loss is a mean over independent
    (image, timestep) maps, so chunks weighted by their share of the maps sum to it. A chunk's
    hidden maps stay in the CPU cache (measured 3x faster per map than one pass over 16 maps).
    """
    b, s = features[0].shape[:2]
    if head.config.mode == "shared":
        # Every (image, timestep) map as an image with one timestep: the same mean loss.
        features = [f.reshape(b * s, 1, *f.shape[2:]) for f in features]
        targets = targets.repeat_interleave(s, dim=0)
    units = features[0].shape[0]
    maps_per_unit = features[0].shape[1] if head.config.mode == "shared" else 1
    step = max(1, (chunk or units * maps_per_unit) // maps_per_unit)
    total = 0.0
    for start in range(0, units, step):
        stop = min(units, start + step)
        part = head.loss([f[start:stop] for f in features], targets[start:stop]) * (weight * (stop - start) / units)
        part.backward()
        total += float(part.detach())
    return total


def train_head(
    head: FeatureHead,
    features: List[LevelFeatures],
    targets: Union[torch.Tensor, Sequence[torch.Tensor]],
    steps: int,
    learning_rate: float = 1e-3,
    images_per_step: int = 8,
    seed: int = 0,
    progress: Optional[Progress] = None,
    cancel: Optional[CancelCheck] = None,
    show_progress: bool = False,
    anchor: Optional[Anchor] = None,
    freeze_statistics: bool = False,
    timesteps_per_image: Optional[int] = None,
    precise_statistics: bool = False,
    learning_rate_schedule: str = "constant",
    average_weights: bool = False,
    pull_to_start: float = 0.0,
    precision: str = "fp32",
) -> FeatureHead:
    """Adam on the mean-over-timesteps loss; each step sees one noise draw and up to ``images_per_step`` slices.

    anchor: images mixed into every step (``anchor.images_per_step`` of them) with their own
        loss weight, against forgetting when fine-tuning on a few corrected slices.
    freeze_statistics: keep the BatchNorm running statistics as they are and normalise with
        them (a warm-started head keeps what it learnt about the feature scales, rather than
        replacing them with those of a couple of slices); also lets each step run a few maps
        at a time, which is much faster on the CPU.
    timesteps_per_image: per image and step, this many random timesteps instead of all of them
        (shared-timestep heads): an unbiased estimate of the same loss at a fraction of the cost.
    targets: (N, H, W), or one such tensor per noise draw (augmented copies have their own labels).
    learning_rate_schedule, average_weights: see :class:`FitOptions` (averaging implies
        recomputing the statistics, which the averaged weights' running statistics do not match).
    pull_to_start: the strength ``lambda`` of L2-SP (Li et al., ICML 2018): the loss gains
        ``lambda / 2`` x the squared distance of the weights from those training started from, so
        a fine-tuned head moves only as far from its old behaviour as the new labels ask for.
    precision: ``fp32``, or ``bf16``: the head's forward and backward under bf16 autocast, its
        weights, Adam and the loss kept in fp32 (Refine where the session's passes run in bf16,
        :func:`refine_bundle`).
    """
    if learning_rate_schedule not in LEARNING_RATE_SCHEDULES:
        choices = ", ".join(LEARNING_RATE_SCHEDULES)
        raise SettingError("learning_rate_schedule", f"must be one of {choices}, got {learning_rate_schedule!r}")
    if precision not in ("fp32", "bf16"):
        raise SettingError("precision", f"the head trains in fp32 or bf16, got {precision!r}")
    device = features[0][0].device
    head.to(device)
    head.eval() if freeze_statistics else head.train()
    per_draw = (
        [targets.to(device)] * len(features) if isinstance(targets, torch.Tensor) else [t.to(device) for t in targets]
    )
    if len(per_draw) != len(features):
        raise ValueError(f"{len(per_draw)} target sets for {len(features)} noise draws")
    targets = per_draw[0]
    if anchor is not None:
        # Its labels come from the CPU (and its features may): the rows chosen each step are an
        # index on ``device``, which CUDA refuses to apply to a tensor elsewhere.
        anchor = replace(anchor, features=[f.to(device) for f in anchor.features], labels=anchor.labels.to(device))
    optimiser = torch.optim.Adam(head.parameters(), lr=learning_rate)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, steps))
        if learning_rate_schedule == "cosine"
        else None
    )
    averaged = torch.optim.swa_utils.AveragedModel(head) if average_weights else None
    start = [p.detach().clone() for p in head.parameters()] if pull_to_start > 0 else None
    generator = torch.Generator().manual_seed(seed)
    n = targets.shape[0]
    sample_timesteps = (
        timesteps_per_image is not None
        and head.config.mode == "shared"
        and timesteps_per_image < features[0][0].shape[1]
    )
    chunk = maps_per_chunk(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    bar = tqdm(range(steps), desc="fitting head", unit="step", disable=not show_progress)
    for step in bar:
        if cancel is not None and cancel():
            raise Cancelled("cancelled")
        draw = int(torch.randint(0, len(features), (1,), generator=generator))
        index = torch.randperm(n, generator=generator)[: min(n, images_per_step)].to(device)
        selected = [(features[draw], per_draw[draw], index, 1.0)]
        if anchor is not None:
            chosen = torch.randperm(anchor.labels.shape[0], generator=generator)[: anchor.images_per_step].to(device)
            selected.append((anchor.features, anchor.labels, chosen, float(anchor.weight)))
        count = int(timesteps_per_image) if sample_timesteps else None
        parts = [(_gather(f, rows, count, generator), t.index_select(0, rows), w) for f, t, rows, w in selected]
        optimiser.zero_grad(set_to_none=True)
        with autocast(device, precision):  # (the loss itself is computed in fp32: loss_from_logits)
            if freeze_statistics:
                loss = sum(_accumulate_loss(head, f, t, w, chunk) for f, t, w in parts)
            else:
                # BatchNorm in training mode normalises with the statistics of the whole batch: one pass.
                sizes = [t.shape[0] for _, t, _ in parts]
                logits = head.logits(
                    [torch.cat(level) for level in zip(*[f for f, _, _ in parts])], tuple(targets.shape[-2:])
                )
                total = sum(w * head.loss_from_logits(part, t) for part, (_, t, w) in zip(logits.split(sizes), parts))
                total.backward()
                loss = float(total.detach())
        check_finite_loss(loss, step + 1, "fitting the head", before_raising=bar.close)
        if start is not None:
            # The penalty's gradient added once per step (the loss above may be several backwards).
            for weight, origin in zip(head.parameters(), start):
                if weight.grad is not None:
                    weight.grad.add_(weight.detach() - origin, alpha=pull_to_start)
        optimiser.step()
        if schedule is not None:
            schedule.step()
        if averaged is not None and step >= steps // 2:
            averaged.update_parameters(head)
        bar.set_postfix(loss=f"{loss:.4f}")
        if progress is not None:
            progress(step + 1, steps, loss)
    if averaged is not None and int(averaged.n_averaged) > 0:
        with torch.no_grad():
            for mine, mean in zip(head.parameters(), averaged.module.parameters()):
                mine.copy_(mean)
    if (precise_statistics or averaged is not None) and not freeze_statistics:
        recompute_statistics(head, features, images_per_step, tuple(targets.shape[-2:]))
    return head.eval()


def recompute_statistics(
    head: FeatureHead, features: List[LevelFeatures], images_per_step: int, size: Tuple[int, int]
) -> None:
    """Set the head's BatchNorm running statistics to the mean of their batch statistics over
    every noise draw and labelled image, in batches of ``images_per_step`` images as training
    saw them ("precise BatchNorm", Wu & Johnson 2021). The exponential running average keeps
    mostly the last ~20 steps, so which random draws (augmented copies) came last would
    otherwise decide how the head normalises every image it predicts."""
    norms = [m for m in head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    head.train()
    with torch.no_grad():
        for levels in features:
            for start in range(0, levels[0].shape[0], images_per_step):
                head.logits([f[start : start + images_per_step] for f in levels], size)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def train_baseline(
    unet: torch.nn.Module,
    grid: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    learning_rate: float,
    device: torch.device,
    precision: str,
    seed: int = 0,
    batch_size: int = 8,
    progress: Optional[Progress] = None,
    cancel: Optional[CancelCheck] = None,
    show_progress: bool = False,
) -> torch.nn.Module:
    """The supervised baseline: the DDPM's UNet architecture, timestep fixed at 0, trained from scratch."""
    unet.to(device).train()
    optimiser = torch.optim.Adam(unet.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    grid, targets = grid.to(device), targets.to(device)
    bar = tqdm(range(steps), desc="training baseline", unit="step", disable=not show_progress)
    for step in bar:
        if cancel is not None and cancel():
            raise Cancelled("cancelled")
        index = torch.randint(0, grid.shape[0], (min(batch_size, grid.shape[0]),), generator=generator).to(device)
        x, y = grid.index_select(0, index), targets.index_select(0, index)
        with autocast(device, precision):
            logits = unet(x, torch.zeros(x.shape[0], dtype=torch.long, device=device)).float()
        loss = segmentation_loss(logits, y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.item())
        check_finite_loss(value, step + 1, "training the baseline", before_raising=bar.close)
        optimiser.step()
        bar.set_postfix(loss=f"{value:.4f}")
        if progress is not None:
            progress(step + 1, steps, value)
    return unet.eval()


def fit_bundle(
    backbone: Backbone,
    slices: SliceSet,
    labels: LabelSet,
    method: str = "tedm",
    class_names: Sequence[str] = ("background", "foreground"),
    label_values: Optional[Sequence[int]] = None,
    options: Optional[FitOptions] = None,
    axis: str = "axial",
    progress: Optional[Progress] = None,
    cancel: Optional[CancelCheck] = None,
    class_colours: Optional[Sequence[Sequence[int]]] = None,
    **option_overrides,
) -> ModelBundle:
    """Fit ``method`` on labelled slices and return a bundle ready to segment.

    ``slices`` (N, C, H, W) are normalised with ``backbone.intensity``; ``labels`` (N, H, W)
    (or sequences of (C, H, W) slices and (H, W) labels of different sizes, each framed on its own)
    hold class indices into ``class_names`` (background first). ``label_values`` are the values
    the classes have in label files (default 0..K-1). ``class_colours`` are 0-255 RGB triples, one
    per class (default: the bundle's palette). Options may be given as keywords
    (``steps=``, ``seed=``, ``device=`` ...) instead of a :class:`FitOptions`.
    """
    method = canonical_method(method)
    if method not in METHODS:
        raise SettingError("method", f"unknown method {method!r}; expected one of {METHODS}")
    options = _options_with(options or FitOptions(), option_overrides)
    class_names = list(class_names)
    label_values = list(label_values) if label_values is not None else list(range(len(class_names)))
    colours: List[Tuple[int, int, int]] = []
    if class_colours is not None:
        colours = [tuple(int(round(float(v))) for v in colour[:3]) for colour in class_colours]  # type: ignore[misc]
        if len(colours) != len(class_names) or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colours):
            raise ValueError(
                f"class_colours needs one 0-255 RGB triple per class ({len(class_names)}), got {list(class_colours)}"
            )
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    torch.manual_seed(options.seed)
    crop = crops_dark_borders(options, backbone.intensity)
    grid, targets = _prepare(
        slices, labels, backbone.config.image_size, len(class_names), backbone.intensity if crop else None
    )
    if labels_max(labels) == 0:
        # (Refining may learn from all-background corrections; a model from nothing but background may not.)
        raise InputError(None, "every labelled pixel is background: there is no structure to learn")
    tic = time.perf_counter()
    training = {
        "labelled_slices": int(grid.shape[0]),
        "seed": options.seed,
        "backbone_steps": backbone.steps_trained,
        # The model grid the head (or baseline) learnt on: loading refuses a bundle whose
        # backbone image_size was edited away from it (the head learnt the features of this grid).
        TRAINED_IMAGE_SIZE: int(backbone.config.image_size),
    }

    inference_timesteps: Tuple[int, ...] = ()
    if method == BASELINE:
        steps = _setting_or_default(options.steps, DEFAULT_BASELINE_STEPS, "steps")
        learning_rate = _setting_or_default(options.learning_rate, 1e-4, "learning_rate")
        unet = build_unet(backbone.config, out_channels=baseline_output_channels(len(class_names)))
        train_baseline(
            unet,
            grid,
            targets,
            steps,
            learning_rate,
            device,
            precision,
            options.seed,
            progress=progress,
            cancel=cancel,
            show_progress=options.show_progress,
        )
        fitted = Backbone(
            config=backbone.config,
            unet=unet.cpu(),
            schedule=backbone.schedule,
            intensity=backbone.intensity,
            channel_names=list(backbone.channel_names),
            steps_trained=0,
        )
        head = None
    else:
        steps = _setting_or_default(options.steps, DEFAULT_HEAD_STEPS, "steps")
        learning_rate = _setting_or_default(
            options.learning_rate, DEFAULT_HEAD_LEARNING_RATES.get(method, 1e-3), "learning_rate"
        )
        # The backbone's UNet as it is on its device, else a copy on ``device``: it may be shared
        # (a segmenter, the worker's model cache), so it is not moved under its other users.
        extractor = DecoderFeatureExtractor(module_on(backbone.unet, device), backbone.noise_schedule, options.levels)
        members = default_members(options, method, backbone.intensity)
        config = HeadConfig.for_method(
            method,
            extractor.level_channels,
            len(class_names),
            options.timesteps,
            levels=None if options.levels is None else extractor.levels,
            hidden=options.hidden,
            members=members,
        )
        timesteps_per_image = default_timesteps_per_image(options, method, backbone.intensity)
        precision = extractor.pass_precision(options.precision, device, backbone.config.image_size, config.timesteps)
        extractor = extractor.in_precision(precision)  # the passes as the segmenter runs them
        training["augment"] = options.augment
        training["noise_draws"] = options.noise_draws
        # What `auto` chose: a timing, which can tip either way between runs on one machine, so
        # two fits of the same data and seed are the same only in the same precision (say it).
        training["feature_precision"] = precision
        inference_timesteps = default_inference_timesteps(options, method, backbone.intensity, config.timesteps)
        schedule = default_learning_rate_schedule(options, backbone.intensity)
        member_seeds = [options.seed + MEMBER_SEED_STRIDE * k for k in range(members)]
        # Draw 0 (the slices as labelled, the inference noise) is the same for every member.
        originals = extract_training_features(extractor, grid, config.timesteps, 1, device, precision)[0]
        fitted = []
        for k, seed in enumerate(member_seeds):
            # Each member is the one-head fit with its own seed: its augmented copies, then its weights.
            grids, draw_targets = augmented_draws(grid, targets, options.noise_draws, options.augment, seed)
            features = [originals] + extract_training_features(
                extractor, grids, config.timesteps, options.noise_draws, device, precision, first_draw=1
            )
            torch.manual_seed(seed)
            fitted.append(
                train_head(
                    FeatureHead(replace(config, members=1)),
                    features,
                    draw_targets,
                    steps,
                    learning_rate,
                    options.images_per_step,
                    seed,
                    _member_progress(progress, k, members),
                    cancel,
                    options.show_progress,
                    precise_statistics=options.precise_statistics,
                    learning_rate_schedule=schedule,
                    average_weights=options.average_weights,
                    timesteps_per_image=timesteps_per_image,
                )
            )
            del features
        del originals
        head = fitted[0] if members == 1 else FeatureHead(config).load_members(fitted).eval()
        training["members"] = members
        training["member_seeds"] = member_seeds
        training["timesteps_per_image"] = timesteps_per_image
        training["precise_statistics"] = options.precise_statistics
        training["learning_rate_schedule"] = schedule
        training["average_weights"] = options.average_weights
        head.cpu()
        fitted = backbone
        del extractor  # its UNet copy on a GPU is freed now (the backbone's own UNet never moved)
    training.update(method=method, steps=steps, seconds=round(time.perf_counter() - tic, 1))
    log.info("fitted %s on %d slices in %.1f s", method, grid.shape[0], training["seconds"])
    rule = (
        ComponentRule.learn(labels, len(class_names))
        if learns_component_rule(options, method, backbone.intensity)
        else None
    )
    return ModelBundle(
        method=method,
        backbone=fitted,
        head=head,
        class_names=class_names,
        label_values=label_values,
        class_colours=colours,
        axis=axis,
        training=training,
        test_time_flip=options.test_time_flip,
        crop_dark_borders=crop,
        inference_timesteps=inference_timesteps,
        component_rule=rule,
    )


def refine_bundle(
    bundle: ModelBundle,
    slices: SliceSet,
    labels: LabelSet,
    options: Optional[FitOptions] = None,
    progress: Optional[Progress] = None,
    cancel: Optional[CancelCheck] = None,
    features: Optional[LevelFeatures] = None,
    anchor_slices: Optional[np.ndarray] = None,
    anchor_labels: Optional[np.ndarray] = None,
    anchor_features: Optional[LevelFeatures] = None,
    **option_overrides,
) -> ModelBundle:
    """Fine-tune a bundle's head, warm-started, on (corrected) labelled slices; the backbone is shared.

    Pass every slice the head should respect (the original labelled ones and the corrections):
    a few steps from the current head keep what it knew and take in the corrections.
    ``features``, when given, are these slices' cached inference features (per level
    (N, S, C_l, h_l, w_l), e.g. ``FeatureCache.select(...).levels``): then no UNet pass runs at all.

    ``anchor_slices`` / ``anchor_labels`` (A, C, H, W) / (A, H, W): a few slices nobody corrected,
    labelled with the previous prediction, mixed into every step so that the head does not
    forget what it did elsewhere (see :class:`Anchor`); ``anchor_features`` are their cached
    features (else they are extracted once, with the inference noise).

    The head learns from the timesteps the bundle predicts with (``prediction_timesteps``: all
    of its own unless it records an inference subset). Its normalisation statistics stay frozen
    and each step sees a couple of random timesteps per slice: with the defaults, refining costs
    ~100x fewer head evaluations than fitting. A several-head model's heads learn together, from the same steps.

    The head trains in the precision of the UNet passes behind its features (bf16 where they
    measured bf16 faster, :func:`~tedm_core.runtime.resolve_inference_precision`): with
    ``features`` given, ``precision`` names it (a session passes its segmenter's; ``auto`` is
    fp32 on the CPU). bf16 training was chosen on validation episodes (docs/results/
    REFINE_VALIDATION.md, session 24).
    """
    if bundle.head is None:
        raise ValueError("the supervised baseline cannot be refined; fit it again with the new labels")
    if (anchor_slices is None) != (anchor_labels is None):
        raise ValueError("anchor_slices and anchor_labels go together")
    options = _options_with(options or FitOptions(), option_overrides)
    device = resolve_device(options.device)
    # The bundle's cropping, unless the caller turns it off (the slices of a volume).
    crop = bundle.crop_dark_borders if options.crop_dark_borders is None else bool(options.crop_dark_borders)
    crop_with = bundle.intensity if crop else None
    grid, targets = _prepare(slices, labels, bundle.image_size, bundle.num_classes, crop_with)
    tic = time.perf_counter()
    extractor: Optional[DecoderFeatureExtractor] = None
    # Cached features: the precision the caller's passes ran in (a session's segmenter's); else
    # the passes' own measured choice, below. The head trains in it too (train_head).
    precision = resolve_precision(options.precision, device)
    # The timesteps the model predicts with, which are what a session caches: a refined head is
    # judged by those, and a Refine must learn the same whether the cache was kept or not (a
    # radiograph model predicting with step 1 alone once learnt from step 1 with the cache, from
    # all eight without it).
    timesteps = bundle.prediction_timesteps

    def features_of(
        grid_: torch.Tensor, cached: Optional[LevelFeatures], draws_: int, what: str
    ) -> List[LevelFeatures]:
        """The cached features when given (one draw: the inference noise), else ``draws_`` extracted."""
        nonlocal extractor, precision
        if cached is not None:
            if cached[0].shape[0] != grid_.shape[0]:
                raise ValueError(f"{cached[0].shape[0]} cached feature sets for {grid_.shape[0]} {what}")
            return [[f.to(device, torch.float32) for f in cached]]
        if extractor is None:
            extractor = DecoderFeatureExtractor(  # (module_on: the bundle's UNet is shared, never moved)
                module_on(bundle.backbone.unet, device), bundle.backbone.noise_schedule, bundle.head.config.levels
            )
            precision = extractor.pass_precision(options.precision, device, bundle.image_size, timesteps)
            extractor = extractor.in_precision(precision)  # the passes as the segmenter runs them
        return extract_training_features(extractor, grid_, timesteps, draws_, device, precision)

    anchor = None
    labelled_features = features_of(grid, features, options.noise_draws, "slices")
    if anchor_slices is not None:
        anchor_grid, anchor_targets = _prepare(
            anchor_slices, anchor_labels, bundle.image_size, bundle.num_classes, crop_with
        )
        # Draw 0 only: the anchor labels are the prediction made with the inference noise.
        levels = features_of(anchor_grid, anchor_features, 1, "anchor slices")[0]
        anchor = Anchor(
            levels, anchor_targets, weight=REFINE_ANCHOR_WEIGHT, images_per_step=REFINE_ANCHOR_IMAGES_PER_STEP
        )
    head = copy.deepcopy(bundle.head)
    steps = _setting_or_default(options.steps, DEFAULT_REFINE_STEPS, "steps")
    pull = REFINE_PULL_TO_START if anchor is None and grid.shape[0] <= REFINE_PULL_UNTIL_SLICES else 0.0
    train_head(
        head,
        labelled_features,
        targets,
        steps,
        learning_rate=_setting_or_default(options.learning_rate, DEFAULT_REFINE_LEARNING_RATE, "learning_rate"),
        images_per_step=options.images_per_step,
        seed=options.seed,
        progress=progress,
        cancel=cancel,
        show_progress=options.show_progress,
        anchor=anchor,
        freeze_statistics=True,
        timesteps_per_image=REFINE_TIMESTEPS_PER_IMAGE,
        pull_to_start=pull,
        precision=precision,
    )
    training = dict(
        bundle.training,
        refined_on_slices=int(grid.shape[0]),
        refine_steps=steps,
        refine_pull_to_start=pull,
        refine_precision=precision,
        refine_seconds=round(time.perf_counter() - tic, 1),
    )
    if anchor is not None:
        training["refine_anchor_slices"] = int(anchor.labels.shape[0])
    rule = bundle.component_rule
    if rule is not None and options.postprocess is not False:
        # The corrections are true anatomy too: a structure drawn with more regions widens the rule.
        # (Not the slices of a volume, where the rule is never applied: the model keeps its own.)
        rule = rule.merged(ComponentRule.learn(labels, bundle.num_classes))
    return ModelBundle(
        bundle.method,
        bundle.backbone,
        head.cpu(),
        list(bundle.class_names),
        list(bundle.label_values),
        list(bundle.class_colours),
        bundle.axis,
        training,
        bundle.test_time_flip,
        bundle.crop_dark_borders,
        bundle.inference_timesteps,
        component_rule=rule,
    )


def _member_progress(progress: Optional[Progress], member: int, members: int) -> Optional[Progress]:
    """``progress`` over all members' steps, for the fit of member ``member`` (0-based)."""
    if progress is None or members == 1:
        return progress
    return lambda step, total, loss: progress(member * total + step, members * total, loss)


def _options_with(options: FitOptions, overrides: dict) -> FitOptions:
    """``options`` with the fields given as keywords replaced (``fit_bundle(..., steps=50)``)."""
    unknown = set(overrides) - set(FitOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown fit options: {sorted(unknown)}")
    return FitOptions(**{**options.__dict__, **overrides})


def _setting_or_default(value, default, setting: str):
    """``value`` unless it is None (then the method's default); a count or rate must be positive and finite.

    ``0`` is an error rather than "the default": ``steps=0`` asked for an untrained model.
    """
    if value is None:
        return default
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise SettingError(setting, f"must be a positive number, got {value!r}")
    return value
