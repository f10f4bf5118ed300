"""TEDM: few-shot, robust segmentation with timestep-ensembled diffusion-model features.

Layers point downwards only:
``io`` and ``preprocessing`` -> ``model`` (backbone, diffusion) -> ``features`` -> ``heads``
-> ``bundle`` -> ``pipelines`` (pretrain, fit, segment, refine, evaluate) -> faces
(``cli``, ``scripts/batch_segment.py``, the Slicer module).
"""

__version__ = "0.1.0"
