"""The interfaces the Qt-free logic is written against (structural: any object with these
methods fits, so the widget, scripts and tests inject their own).

The worker client is ``tedm_core.serve.client.WorkerClient`` in the application; the tests
drive the logic with a real worker process and, for the lifecycle cases that need exact timing
(a scene closed between a request and its result), with a scripted client of the same shape.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

try:  # Python 3.8+: typing.Protocol. Slicer 5.8 and older ship 3.9, newer ones 3.12.
    from typing import Protocol, runtime_checkable
except ImportError:  # pragma: no cover
    from typing_extensions import Protocol, runtime_checkable  # type: ignore


@runtime_checkable
class WorkerEventLike(Protocol):
    """One event from the worker (``tedm_core.serve.client.WorkerEvent``)."""

    kind: str  # 'progress', 'log', 'result' or 'error'
    request_id: str
    fields: Dict[str, Any]
    arrays: Dict[str, Any]


@runtime_checkable
class WorkerClientLike(Protocol):
    """What the logic needs of a worker client: submit without blocking, poll from a timer.

    ``poll`` calls each request's ``on_event`` for every event read, on the caller's thread (the
    GUI thread in Slicer), so MRML is only ever touched there. A worker that dies answers every
    pending request with an ``error`` event whose ``fields['kind']`` is ``worker_died``; the
    next ``submit`` starts a new one and bumps ``generation`` (sessions of an older generation
    are gone). ``alive`` is False as soon as the worker has ended, even if nobody polled since.
    Cancel is sent as a ``cancel`` request naming its ``target``, so that its answer shows that the
    worker still reads requests. ``close(grace_s=0)`` stops the worker at once (a hung one
    included). Optional: ``pending`` (requests not yet answered) and ``unsent_bytes`` (requests not
    yet handed to the pipe or socket), which keep the widget's timer polling.
    """

    generation: int

    @property
    def alive(self) -> bool: ...

    def submit(
        self,
        op: str,
        fields: Dict[str, Any],
        arrays: Optional[Dict[str, Any]] = None,
        on_event: Optional[Callable[[Any], None]] = None,
    ) -> str: ...

    def poll(self, max_seconds: float = 0.05, wait_seconds: float = 0.0) -> List[Any]: ...

    def cancel(self, request_id: str) -> None: ...

    def close(self, grace_s: float = 5.0) -> None: ...


class OperationListener(Protocol):
    """How the logic reports to its user (the widget, a script, a test). Called on the thread that
    calls ``poll`` (the GUI thread in Slicer)."""

    def progress(self, fraction: float, message: str) -> None: ...

    def log(self, message: str) -> None: ...

    def finished(self, operation: Any) -> None:
        """``operation`` is a :class:`TEDMSlicerLib.logic.FinishedOperation`."""

    def about_to_write_in_place(self, segmentation_node: Any) -> None:
        """A result is about to be written into a segmentation already in the scene (Segment again,
        Fit, Refine): the widget saves the Segment Editor's undo state, so that Undo takes back the
        result as a whole rather than the user's last stroke under it (after which the next Refine
        would take TEDM's earlier result for corrections)."""
