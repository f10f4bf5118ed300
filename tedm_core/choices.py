"""The user-facing choices and defaults of every face (CLI, batch script, Slicer module, worker).

Torch-free on purpose: the Slicer module imports this in Slicer's own process, where torch is
never imported (the model runs in the worker process), so its menus and defaults come from the
same source as the CLI's.
"""

from __future__ import annotations

# Fitting methods: the pixel-wise heads on diffusion features, then the supervised baseline.
BASELINE = "baseline"
HEAD_METHODS = ("tedm", "ledm", "ledme", "step")
METHODS = HEAD_METHODS + (BASELINE,)

# Slicing axes: anatomical planes resolved from the voxel-to-world matrix, or the array's k axis.
AXES = ("axial", "coronal", "sagittal", "k")
AUTO = "auto"  # the model's own axis (a bundle records the plane it was fitted in)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")

# Training steps of the pixel-wise head when fitting, of the supervised baseline, and of a
# warm-started Refine (measured on a whole BraTS volume: see benchmarks/refine_vs_segment.py).
DEFAULT_HEAD_STEPS = 300
DEFAULT_BASELINE_STEPS = 1000
DEFAULT_REFINE_STEPS = 40
