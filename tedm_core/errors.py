"""Errors a user can act on: one line naming the file and the problem."""

from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class TEDMError(Exception):
    """Base class of the errors this package raises for bad input or incompatible files."""


class InputError(TEDMError, ValueError):
    """An input file or folder cannot be used. ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: Optional[PathLike], problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


class BundleError(InputError):
    """A model bundle or backbone checkpoint is missing, damaged or of an incompatible version."""


class SettingError(TEDMError, ValueError):
    """A setting has a value that cannot be used. ``setting`` is its name in the library's API
    (``device``, ``steps``, ``learning_rate``); each face says it in its own words (the CLI as
    ``--device``), so the core never names a flag a library or Slicer user did not type."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{setting}: {self.problem}")


class TrainingDiverged(TEDMError):
    """The loss or the weights became NaN or infinite: the run stops rather than save them."""


class Cancelled(TEDMError):
    """The user cancelled a long operation (Slicer's Cancel button, Ctrl-C)."""
