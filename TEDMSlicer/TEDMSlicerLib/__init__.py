"""TEDMSlicer's Qt-free logic: MRML <-> arrays, and the requests to the TEDM worker process.

Importable without Qt (plain pytest with ``slicer-core``) and without torch: the model runs in
the worker (``tedm_core.serve``), and Slicer's process imports only the torch-free parts of
``tedm_core`` (``choices`` and ``serve.client``).
"""

import importlib.util
import sys
from pathlib import Path

# Used from a source checkout (Additional module paths = <checkout>/TEDMSlicer), tedm_core sits
# beside the module folder; a built extension ships it in qt-scripted-modules (already on the path).
if importlib.util.find_spec("tedm_core") is None:
    _checkout = Path(__file__).resolve().parents[2]
    if (_checkout / "tedm_core" / "__init__.py").is_file():
        sys.path.append(str(_checkout))

from .logic import (
    CANCELLED,
    DONE,
    DROPPED,
    FAILED,
    WORKER_DIED,
    FinishedOperation,
    LoggingListener,
    RunningOperation,
    TEDMWorkerLogic,
    UncertainSlice,
    UserInputError,
    WorkerSessionRecord,
    node_is_alive,
)

__all__ = [
    "CANCELLED",
    "DONE",
    "DROPPED",
    "FAILED",
    "WORKER_DIED",
    "FinishedOperation",
    "LoggingListener",
    "RunningOperation",
    "TEDMWorkerLogic",
    "UncertainSlice",
    "UserInputError",
    "WorkerSessionRecord",
    "node_is_alive",
]
