"""Pipelines: pretrain, fit, segment, refine, evaluate. The faces (CLI, batch script, Slicer) call these."""
