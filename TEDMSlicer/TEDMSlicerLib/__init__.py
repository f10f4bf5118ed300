"""TEDMSlicer's Qt-free logic: MRML <-> tedm_core conversion, Segment / Fit / Refine, background
tasks and dependency installation. Importable without Qt (plain pytest with ``slicer-core``)
and without torch or tedm_core (they are imported when work starts)."""

from .logic import (
    AXES,
    METHODS,
    Job,
    Outcome,
    Session,
    TEDMSlicerCoreLogic,
    UncertainSlice,
    UserInputError,
    is_cancellation,
)
from .tasks import BackgroundTask, SilentCallbacks, TaskEvent

__all__ = [
    "AXES",
    "METHODS",
    "BackgroundTask",
    "Job",
    "Outcome",
    "Session",
    "SilentCallbacks",
    "TaskEvent",
    "TEDMSlicerCoreLogic",
    "UncertainSlice",
    "UserInputError",
    "is_cancellation",
]
