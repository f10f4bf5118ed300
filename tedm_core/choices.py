"""The user-facing choices and defaults of every face (CLI, batch script, Slicer module, worker).

Torch-free on purpose: the Slicer module imports this in Slicer's own process, where torch is
never imported (the model runs in the worker process), so its menus and defaults come from the
same source as the CLI's.
"""

from __future__ import annotations

from typing import Dict

# Fitting methods: the pixel-wise heads on diffusion features, then the supervised baseline.
# ``probe`` is the paper's logistic probe on one timestep's features.
BASELINE = "baseline"
HEAD_METHODS = ("tedm", "ledm", "ledme", "probe")
METHODS = HEAD_METHODS + (BASELINE,)
# Old names still read from bundles written before a rename (a bundle records its method).
METHOD_ALIASES: Dict[str, str] = {"step": "probe"}


def canonical_method(name: str) -> str:
    """``name`` with an old alias replaced by today's method name (``step`` -> ``probe``)."""
    return METHOD_ALIASES.get(name, name)


# Slicing axes: anatomical planes resolved from the voxel-to-world matrix, or the array's k axis.
AXES = ("axial", "coronal", "sagittal", "k")
AUTO = "auto"  # the model's own axis (a bundle records the plane it was fitted in)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_HELP = (
    "auto: bf16 on CUDA cards with native bf16 (compute capability 8.0+), else fp32; on a CPU fp32, "
    "except gradient-free UNet passes (segmenting, features to fit on), "
    "which run in bf16 where this CPU has native bf16 and measures it >= 1.2x faster; "
    "a refine trains its head in the precision of its passes"
)
PRETRAIN_PRECISION_HELP = "auto: fp32 on every device (TF32 convolutions on CUDA); bf16: autocast, on request"
NO_POSTPROCESS_HELP = (
    "whole 2D images keep the model's raw labels, without the anatomy post-processing its bundle records "
    "(at most as many regions per structure as its labelled masks had, holes filled where they had none)"
)
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")  # of the UNet's activations
PRESET_NAMES = ("tiny", "small", "small4", "paper")  # model.backbone.PRESETS, kept torch-free here (checked there)
DEFAULT_PRESET = "small"
INTENSITIES = ("radiograph", "radiograph-equalised", "brain", "zscore")  # preprocessing.intensity's named conventions
LOSSES = ("l1", "mse")
SCHEDULES = ("cosine", "linear")

# The DDPM's number of noise levels: every timestep a head or a user names lies in [0, T - 1].
NUM_TRAIN_TIMESTEPS = 1000

# Training steps of the pixel-wise head when fitting, of the supervised baseline, and of a
# warm-started Refine. Refine's 120 were chosen on validation (issue 10, session 16;
# docs/results/REFINE_VALIDATION.md): six BraTS episodes (a 3-slice model of one of three
# validation subjects, five rounds of corrections on each of the other two), mean whole-tumour
# Dice after 3 / 5 rounds 89.0 / 91.2 against 87.4 / 89.0 for 40 steps and 85.0 / 89.0 for a head
# fitted from scratch on the same corrections. It costs about 3x the seconds of 40 steps.
DEFAULT_HEAD_STEPS = 300
DEFAULT_BASELINE_STEPS = 1000
DEFAULT_REFINE_STEPS = 120
# The head's learning rate over its steps (pipelines.fit.FitOptions.learning_rate_schedule).
LEARNING_RATE_SCHEDULES = ("constant", "cosine")

# Head-fitting augmentation policies (preprocessing.augment.AUGMENT_POLICIES, checked there).
AUGMENT_POLICY_NAMES = ("none", "framing", "intensity", "framing+intensity", "framing+opacity")
