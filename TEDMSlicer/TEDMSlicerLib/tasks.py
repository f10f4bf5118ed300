"""Long work off the GUI thread, without Qt.

The widget starts a :class:`BackgroundTask`: the compute function runs in a worker thread and
only ever touches numpy arrays and torch tensors; what it reports (progress, log lines, the
result or the error) goes into a thread-safe queue. The GUI thread drains the queue with
:meth:`BackgroundTask.poll` from a ``QTimer`` and does every MRML and Qt update itself, because
neither MRML nor Qt may be touched from another thread.

A thread (rather than a ``QProcess``) keeps the model and the decoder features of the last
segmentation in memory, which is what makes Refine a fraction of a full segmentation; torch
releases the GIL inside its kernels, so the GUI stays responsive.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from .protocols import TaskCallbacks


@dataclass
class TaskEvent:
    """One message from the worker. ``kind`` is ``progress``, ``log``, ``done`` or ``error``."""

    kind: str
    fraction: float = 0.0
    message: str = ""
    result: Any = None
    error: Optional[BaseException] = None
    details: str = ""


class SilentCallbacks:
    """Callbacks for scripts and tests: no display, optional logging function, never cancelled."""

    def __init__(self, log: Optional[Callable[[str], None]] = None) -> None:
        self._log = log

    def progress(self, fraction: float, message: str = "") -> None:
        pass

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def cancelled(self) -> bool:
        return False


class QueueCallbacks:
    """Callbacks usable from the worker thread: they only put events into a queue."""

    def __init__(self, events: queue.Queue[TaskEvent], cancel_event: threading.Event) -> None:
        self._events = events
        self._cancel_event = cancel_event

    def progress(self, fraction: float, message: str = "") -> None:
        self._events.put(TaskEvent("progress", fraction=max(0.0, min(1.0, float(fraction))), message=message))

    def log(self, message: str) -> None:
        self._events.put(TaskEvent("log", message=message))

    def cancelled(self) -> bool:
        return self._cancel_event.is_set()


class BackgroundTask:
    """Runs ``compute(callbacks)`` in a daemon thread; the GUI polls for its events.

    Usage (GUI thread)::

        task = BackgroundTask("Segment", job.compute)
        task.start()
        ... every 100 ms: for event in task.poll(): handle(event)
        ... on Cancel: task.cancel()
    """

    def __init__(self, title: str, compute: Callable[[TaskCallbacks], Any]) -> None:
        self.title = title
        self._compute = compute
        self._events: queue.Queue[TaskEvent] = queue.Queue()
        self._cancel_event = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.started_at: Optional[float] = None
        self.finished = False

    @property
    def callbacks(self) -> QueueCallbacks:
        return QueueCallbacks(self._events, self._cancel_event)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("task already started")
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"TEDMSlicer {self.title}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            result = self._compute(self.callbacks)
        except BaseException as error:
            self._events.put(
                TaskEvent(
                    "error", message=str(error) or type(error).__name__, error=error, details=traceback.format_exc()
                )
            )
        else:
            self._events.put(TaskEvent("done", fraction=1.0, result=result))

    def cancel(self) -> None:
        """Ask the worker to stop at its next check (between slice batches or training steps)."""
        self._cancel_event.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_event.is_set()

    @property
    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> List[TaskEvent]:
        """Events reported since the last poll, in order. Call from the GUI thread."""
        events: List[TaskEvent] = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            events.append(event)
            if event.kind in ("done", "error"):
                self.finished = True
        return events

    def wait(self, timeout: Optional[float] = None) -> List[TaskEvent]:
        """Block until the worker ends (scripts and tests), then return all its events."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.poll()
