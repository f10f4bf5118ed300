"""The Qt-free logic of TEDMSlicer: MRML nodes <-> arrays, and requests to the TEDM worker.

Segment, Fit from labelled slices, Refine from corrections, Next uncertain slice and Save model
are requests to a worker process (``tedm_core.serve``; protocol in ``docs/worker_protocol.md``)
that holds the model and, per volume, an interactive session (the decoder features of the last
segmentation, the labels last written, the training slices). All the numerical policy lives
there (``tedm_core.pipelines.interactive``); this module only

1. reads the MRML nodes into arrays and submits a request (``begin_*``, GUI thread);
2. returns at once: ``poll()``, called by the widget's ``QTimer`` (or a script's loop), reads
   the worker's events without blocking and reports progress and log lines;
3. writes a result into MRML after it arrives (GUI thread), one step per poll so that no
   timer tick holds the GUI for long (about 10-60 ms each for a 240x240x155 volume on a busy
   2-core machine): the poll that receives the result only keeps it; the next ones check for
   the user's edits (one segment per tick, and only if the segments' modified times changed),
   stage the node, and write one segment each, cropped to the segment's bounding box. Each
   step runs only if the nodes it belongs to are still the very nodes the request was made for.
   The operation ends (and is reported) when the last segment is written: a new segmentation
   is filled outside the scene and added whole.

The scene can close, and nodes can be deleted, at any moment: a result whose nodes are gone (or
whose node IDs now name other nodes, as after a scene close) is dropped with a log line. A
segmentation the user edited while a job ran is not overwritten: the result goes into a new
segmentation node, and the report says so. What the segmentation held at the request is read
during the job's first ticks (one segment each), not at the click; an edit made before it has
all been read counts as an edit. An output segmentation is created only when a
result arrives, so a failed or cancelled job leaves no empty node behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from tedm_core.choices import AUTO, AXES, DEFAULT_HEAD_STEPS, DEFAULT_REFINE_STEPS, DEVICES, HEAD_METHODS

from . import mrml_io
from .protocols import OperationListener, WorkerClientLike

log = logging.getLogger(__name__)

AXIS_CHOICES = (AUTO,) + tuple(AXES)
METHOD_CHOICES = tuple(HEAD_METHODS)
DEVICE_CHOICES = tuple(DEVICES)

# A worker reads Cancel on a thread of its own and answers it at once, whatever its job is doing;
# one that has not answered within this time (counted by the polls, from when the request has
# left this process) is hung, and is stopped.
CANCEL_ANSWER_TIMEOUT_S = 5.0
# A worker that has not yet answered anything of this operation may still be starting (it reads
# no request while it imports torch: 6-7 s on a busy machine, more from a cold disk) or reading
# the volume, so it gets longer before it counts as hung.
CANCEL_ANSWER_TIMEOUT_STARTING_S = 60.0


class UserInputError(ValueError):
    """Something the user can fix (wrong selection, nothing drawn, ...): shown without a traceback."""


# What a FinishedOperation's status means.
DONE = "done"  # the result was written (or, for queries, returned)
CANCELLED = "cancelled"  # the user pressed Cancel; nothing was written
FAILED = "failed"  # the worker refused or failed; nothing was written
DROPPED = "dropped"  # the result arrived for nodes that are gone; nothing was written
WORKER_DIED = "worker_died"  # the worker process ended; nothing was written


@dataclass
class UncertainSlice:
    index: int  # slice index along the session's axis
    score: float  # mean prediction disagreement in the slice
    centre_world: Tuple[float, float, float]  # RAS, parent transforms applied: where to jump


@dataclass
class WorkerSessionRecord:
    """What the worker holds for one segmentation node, and what the logic last wrote there.

    Node objects are kept, not only their IDs: after a scene close, IDs are reused by new nodes,
    and only identity tells a reused ID from the node the session belongs to.
    """

    session_id: str
    generation: Any  # the worker generation holding the session (see ``_generation_key``); None: not sent
    volume_nodes: List[Any]
    volume_state: Tuple  # every channel's voxels and geometry when the session was opened (``_volume_state``)
    segmentation_node: Any = None
    segment_ids: List[str] = field(default_factory=list)
    class_names: List[str] = field(default_factory=list)
    axis: str = ""
    training_slices: List[int] = field(default_factory=list)
    visited_uncertain: List[int] = field(default_factory=list)


@dataclass
class PendingWrite:
    """A label result going into MRML one segment per poll (a segment of a full volume costs
    50-250 ms in ``SetBinaryLabelmapToSegment``; several in one timer tick froze the GUI).

    A new segmentation is filled while outside the scene and added when complete, so nobody
    sees or edits it half-written. An existing one is written in place; a user's edit between
    two pieces is noticed (its segments' modified times), the pieces already written are put
    back as they were, and the result goes into a new segmentation instead.
    """

    result: Dict[str, Any]
    labels: np.ndarray  # (K, J, I) class indices
    class_names: List[str]
    class_colours: Any
    target: Any  # the node being written; outside the scene while ``staged``
    staged: bool
    segment_ids: List[str]
    note: str = ""
    written_to_new_node: bool = False
    done: int = 0  # segments written so far
    signature: Any = None  # the target's segment modified times after our last write (in place)
    previous: Dict[str, np.ndarray] = field(default_factory=dict)  # in place: each segment before the write
    existing: List[str] = field(default_factory=list)  # in place: the segments the node held before the result
    # After a user's edit between pieces: the segments to put back in that node, first.
    restore_node: Any = None
    restore: List[Tuple[str, int]] = field(default_factory=list)  # (segment ID, class index written there)
    restore_signature: Any = None
    # In place: the node as it was before the write, put back whole if the write cannot finish
    # (its volume deleted, MRML refusing a segment) and the user has not edited it since.
    snapshot: Optional[mrml_io.SegmentationSnapshot] = None


@dataclass
class RunningOperation:
    """One user action in flight: one or two worker requests and where their result goes."""

    operation: str  # segment, fit, refine, uncertain_slices, save_model
    title: str
    volume_nodes: List[Any]
    segmentation_node: Any  # None: a new node is created when the result arrives
    record: WorkerSessionRecord
    # The segmentation's content when the request was made: read one segment per tick during the
    # job (``digesting``); None while unread, or if an edit came first (then it counts as edited).
    segmentation_digest: Optional[str]
    started_at: float = field(default_factory=time.monotonic)
    request_id: Optional[str] = None
    generation: Any = None
    drop_reason: str = ""  # set when its nodes went away: the result is not written
    cancel_requested: bool = False
    # When the worker was last seen not yet answering the Cancel request (its clock restarts while
    # the request is still queued behind a large upload), and whether it answered.
    cancel_waiting_since: Optional[float] = None
    cancel_unsent_bytes: int = 0  # what was still to be sent when the cancel clock last restarted
    cancel_acknowledged: bool = False
    worker_answered: bool = False  # the worker answered a request of this operation: it is up and reading
    # Fit: the segments the classes were read from, so the result goes back into exactly those.
    class_segment_ids: Optional[List[str]] = None
    segmentation_signature: Any = None  # the segments' modified times at the request (None: no node)
    digesting: Optional[Iterator[None]] = None
    follow_up: Optional[Callable[[], None]] = None  # the request to send after open_session
    # A label result that arrived: checked (the user's edits) and staged one step per timer tick,
    # so that the poll receiving it does nothing else; it then sets ``write``.
    preparing: Optional[Iterator[None]] = None
    write: Optional[PendingWrite] = None  # the result being written into MRML, piece by piece
    # The input volumes at the request (``_volume_state``): a result is only written onto the voxels it was made from.
    volume_state: Tuple = field(init=False)

    def __post_init__(self) -> None:
        self.volume_state = _volume_state(self.volume_nodes)

    @property
    def applying(self) -> bool:
        """A result is being checked or written: the job itself is over."""
        return self.preparing is not None or self.write is not None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started_at


@dataclass
class FinishedOperation:
    """What became of one user action (reported through ``OperationListener.finished``)."""

    operation: str
    title: str
    status: str  # DONE, CANCELLED, FAILED, DROPPED or WORKER_DIED
    message: str
    seconds: float
    segmentation_node: Any = None  # where the result was written
    written_to_new_node: bool = False  # the user edited the target meanwhile: a new node got it
    changed_slices: List[int] = field(default_factory=list)
    training_slices: List[int] = field(default_factory=list)
    uncertain_slice: Optional[UncertainSlice] = None
    saved_path: str = ""
    worker_seconds: float = 0.0  # the job's own time in the worker (without transfers and MRML)
    error_kind: str = ""  # the worker's error kind: user, cancelled, busy, protocol, internal
    details: str = ""
    during_shutdown: bool = False  # finished by shutdown (exit, Reload, restart): report it, open nothing

    @property
    def ok(self) -> bool:
        return self.status == DONE


class LoggingListener:
    """A listener for scripts and tests: progress and log lines to ``logging``, results kept."""

    def __init__(self) -> None:
        self.finished_operations: List[FinishedOperation] = []
        self.lines: List[str] = []

    def progress(self, fraction: float, message: str) -> None:
        pass

    def log(self, message: str) -> None:
        self.lines.append(message)
        log.info("TEDMSlicer: %s", message)

    def finished(self, operation: FinishedOperation) -> None:
        self.finished_operations.append(operation)

    def about_to_write_in_place(self, segmentation_node: Any) -> None:
        pass  # no Segment Editor outside Slicer


def _ignore_event(event: Any) -> None:
    """For requests whose answer nobody needs (close_session): the client then keeps nothing."""


def node_is_alive(node: Any) -> bool:
    """The node is still in a scene under its ID (an ID reused by another node does not count)."""
    if node is None:
        return False
    scene = node.GetScene()
    node_id = node.GetID()
    return scene is not None and node_id is not None and scene.GetNodeByID(node_id) is node


@contextlib.contextmanager
def _as_user_error() -> Iterator[None]:
    """``mrml_io`` refuses what the user can change (a 4D series, volumes under different
    transforms, a surface-only segmentation) with ValueError: shown as one line, not a traceback."""
    try:
        yield
    except UserInputError:
        raise
    except ValueError as error:
        raise UserInputError(str(error)) from None


@dataclass
class WrittenResult:
    """What TEDM last wrote into a segmentation: its segments' modified times just after, and the
    class labels written, so that a later Segment can tell the user's corrections from TEDM's own
    output and keep them (kept across worker restarts: the node, not the worker, holds them).
    One byte per voxel per segmentation TEDM wrote."""

    node: Any
    signature: Tuple
    segment_ids: List[str]
    class_names: List[str]
    labels: np.ndarray  # (K, J, I) class indices: class k is segment_ids[k - 1]
    reference: Any  # the volume whose grid ``labels`` are in
    ijk_to_ras: np.ndarray


@dataclass
class Corrections:
    """The voxels of a segmentation the user changed since TEDM last wrote it (``changed``), and
    what they hold now (``labels``, class indices). ``mergeable``: the new result has the same
    classes, so the corrections can be kept inside it; else it goes into a new segmentation."""

    labels: Optional[np.ndarray]
    changed: Optional[np.ndarray]
    mergeable: bool


def _volume_state(volume_nodes: Sequence[Any]) -> Tuple:
    """What a worker session's copy of the volumes depends on, per channel: the image object
    (replacing a node's image keeps its node), the voxels' modified time (a filter writing into
    it) and the IJK-to-RAS (spacing, origin, directions change nothing in the image)."""
    state = []
    for node in volume_nodes:
        image = node.GetImageData()
        address = image.GetAddressAsString("vtkImageData") if image is not None else ""
        mtime = int(image.GetMTime()) if image is not None else -1
        matrix = tuple(float(v) for v in mrml_io.ijk_to_ras_of(node).reshape(-1))
        state.append((address, mtime, matrix))
    return tuple(state)


class StepTimings:
    """The longest wall time of each GUI-thread step (reading the volume, sending, polling,
    writing a piece of a result...), so a benchmark can name the step that held the GUI."""

    def __init__(self) -> None:
        self.longest: Dict[str, float] = {}
        self.total: Dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.longest[name] = max(seconds, self.longest.get(name, 0.0))
            self.total[name] = self.total.get(name, 0.0) + seconds

    def report(self) -> Dict[str, Dict[str, float]]:
        """``{step: {"longest_ms", "total_ms"}}``."""
        return {
            name: {"longest_ms": round(1000 * self.longest[name], 1), "total_ms": round(1000 * self.total[name], 1)}
            for name in sorted(self.longest)
        }


class TEDMWorkerLogic:
    """Segment / fit / refine on MRML nodes through a TEDM worker.

    Args:
        client_factory: returns a started worker client (``WorkerClientLike``); called at the
            first request, and again after ``shutdown``.
        listener: receives progress, log lines and finished operations.
    """

    def __init__(
        self, client_factory: Callable[[], WorkerClientLike], listener: Optional[OperationListener] = None
    ) -> None:
        self._client_factory = client_factory
        self.client: Optional[WorkerClientLike] = None
        self.listener: OperationListener = listener or LoggingListener()
        self.records: Dict[int, WorkerSessionRecord] = {}  # id(segmentation node) -> record
        self.running: Optional[RunningOperation] = None
        self._dead_generations: set = set()  # worker generations that ended (their sessions are gone)
        # Clients made by the factory so far: a new client counts its generations from 1 again, so a
        # generation is only known with the client it belongs to.
        self._clients_made = 0
        self.timings = StepTimings()  # the longest time each GUI-thread step took (benchmarks)
        self.written: Dict[int, WrittenResult] = {}  # id(segmentation node) -> what TEDM last wrote there
        self._shutting_down = False  # shutdown finishes a write: its report must not pop up dialogs

    # -- the worker --------------------------------------------------------------------------
    def _generation_key(self, client: Optional[WorkerClientLike] = None) -> Any:
        client = client or self.client
        return None if client is None else (self._clients_made, client.generation)

    def _note_dead_worker(self, read: bool = False) -> None:
        """A worker that ended while nobody polled (it died between jobs) is only seen by asking the
        client: its sessions are gone, and the next request starts a new worker. ``read``: first
        read what the worker sent, without waiting (a client may only notice the end of its pipe so)."""
        client = self.client
        if client is None:
            return
        if read and self.running is None:
            try:
                client.poll(max_seconds=0.0, wait_seconds=0.0)
            except Exception as error:
                log.debug("reading the idle worker failed: %s", error)
        if client.alive:
            return
        self._dead_generations.add(self._generation_key(client))
        if self.running is not None:
            return  # its poll reports the death to the running operation
        self.client = None
        try:
            client.close(grace_s=0.0)  # reaps the process; a remote worker is reconnected by the factory
        except Exception as error:
            log.debug("closing a dead worker client failed: %s", error)

    def _worker(self) -> WorkerClientLike:
        self._note_dead_worker()
        if self.client is None:
            self.client = self._client_factory()
            self._clients_made += 1
        return self.client

    @property
    def busy(self) -> bool:
        return self.running is not None

    def needs_polling(self) -> bool:
        """Whether ``poll`` has something to do: a running operation, or requests of no operation
        whose answers are still to be read (a worker's description, close_session) or sent. The
        widget's timer runs while this holds."""
        if self.running is not None:
            return True
        client = self.client
        if client is None:
            return False
        return bool(getattr(client, "pending", None)) or bool(getattr(client, "unsent_bytes", 0))

    def poll(self, max_seconds: float = 0.05, wait_seconds: float = 0.0) -> None:
        """Read the worker's events and act on them: reading stops after about ``max_seconds``
        (a large result streams in over several polls) and waits at most ``wait_seconds`` for a
        first event. The widget's QTimer calls this with no waiting; a script's loop may wait,
        as Qt's event loop waits between timer ticks."""
        running = self.running
        if running is not None and running.cancel_requested and (running.digesting is not None or running.applying):
            running.cancel_waiting_since = time.monotonic()  # the client is not read in this tick
        if running is not None and running.digesting is not None and not running.applying:
            # Reading what the segmentation holds at the request takes this tick (the client's
            # reads and writes wait for the next one; the job runs for seconds or minutes).
            with self.timings.step("read segmentation at request"):
                if running.drop_reason or self._nodes_gone(running):
                    running.digesting = None
                else:
                    try:
                        next(running.digesting)
                    except StopIteration:
                        running.digesting = None
            return
        if running is not None and running.applying:
            # One piece of MRML work per timer tick, and nothing else in that tick: the events
            # of other requests (a close_session's answer) wait for the next one.
            with self.timings.step("prepare result" if running.write is None else "write result piece"):
                self._advance_write(running)
            return
        if self.client is not None:
            with self.timings.step("poll worker"):
                self.client.poll(max_seconds=max_seconds, wait_seconds=wait_seconds)
        running = self.running
        if running is not None and running.cancel_requested and not running.cancel_acknowledged:
            self._check_cancel_answered(running)

    def wait(self, timeout: float = 600.0, poll_seconds: float = 0.05) -> Optional[FinishedOperation]:
        """Poll until the running operation finishes (scripts and tests; the widget uses a timer).
        Returns the last finished operation."""
        deadline = time.monotonic() + timeout
        while self.running is not None and time.monotonic() < deadline:
            self.poll(max_seconds=poll_seconds, wait_seconds=poll_seconds)
        if self.running is not None:
            raise TimeoutError(f"{self.running.title} did not finish within {timeout:.0f} s")
        finished = getattr(self.listener, "finished_operations", None)
        return finished[-1] if finished else None

    def shutdown(self, reason: str = "the TEDM worker was stopped") -> None:
        """Stop the worker (module cleanup, Reload, application exit, *Apply and restart worker*):
        no orphan process. The worker's sessions are closed first (a remote worker outlives this
        connection and would keep them), and a running operation is reported as ended.

        A result that has already arrived is written to the end first: it needs no worker, and a
        write into the user's segmentation stopped halfway would leave it half old, half new. This
        holds the GUI for the rest of the write (about 50-250 ms per segment of a full volume), once."""
        self._shutting_down = True
        try:
            self._complete_arrived_result()
        finally:
            self._shutting_down = False
        running, self.running = self.running, None
        client, self.client = self.client, None
        if client is not None:
            if running is not None and running.request_id is not None and not running.applying:
                self._send_quietly(client, "cancel", {"target": running.request_id})
            if client.alive:
                key = self._generation_key(client)
                sessions = {id(r): r for r in self.records.values()}
                if running is not None:
                    sessions[id(running.record)] = running.record
                for record in sessions.values():
                    if record.generation == key:
                        self._send_quietly(client, "close_session", {"session": record.session_id})
        self.records.clear()
        try:
            if client is not None:
                client.close()
        finally:
            if running is not None:
                running.drop_reason = running.drop_reason or reason
                running.digesting = None
                message = f"{running.title} stopped: {running.drop_reason}; nothing was written."
                self._finish(running, CANCELLED, message)

    def _complete_arrived_result(self) -> None:
        running = self.running
        # Each step writes a segment, reads one, or ends the write: bounded by a few per segment.
        for _step in range(10_000):
            if running is None or self.running is not running or not running.applying:
                return
            self._advance_write(running)

    @staticmethod
    def _send_quietly(client: WorkerClientLike, op: str, fields: Dict[str, Any]) -> None:
        # Requests whose answer nobody waits for, sent without waiting (the client queues what the
        # pipe or socket does not take at once).
        try:
            client.submit(op, fields, None, on_event=_ignore_event)
        except Exception as error:  # a worker that just died: its sessions and jobs are gone anyway
            log.debug("%s failed: %s", op, error)

    def cancel(self) -> None:
        """Ask the worker to stop the running job at its next check (within a second). Pressed
        again, or unanswered by the worker for ``CANCEL_ANSWER_TIMEOUT_S``, it stops the worker
        itself (a hung worker never reads the request); the next request starts a new one."""
        running = self.running
        if running is None or running.applying:
            return  # a result being written is finished within a few ticks; stopping would leave half of it
        if running.cancel_requested:
            self._stop_worker(running, "Cancel was pressed again")
            return
        self._request_cancel()

    def _request_cancel(self) -> None:
        """Ask the worker to stop the running job, once (a scene closed after the user's Cancel
        must not count as a second press)."""
        running = self.running
        if running is None or running.applying or running.cancel_requested:
            return
        running.cancel_requested = True
        running.cancel_waiting_since = time.monotonic()
        if running.request_id is None or self.client is None:
            running.cancel_acknowledged = True  # nothing was sent yet: nothing to wait for
            return

        def on_answer(event: Any) -> None:
            running.cancel_acknowledged = True

        try:
            self.client.submit("cancel", {"target": running.request_id}, None, on_event=on_answer)
        except Exception as error:  # the worker is gone: its death is reported by the next poll
            log.debug("cancel failed: %s", error)

    def _check_cancel_answered(self, running: RunningOperation) -> None:
        now = time.monotonic()
        unsent = getattr(self.client, "unsent_bytes", 0) if self.client is not None else 0
        if unsent and unsent != running.cancel_unsent_bytes:
            # Queued behind an upload the worker is reading: it cannot have read the cancel yet.
            # An upload that does not move (a worker that never started, or stopped reading)
            # leaves the clock running, or one Cancel would never stop such a worker.
            running.cancel_unsent_bytes = unsent
            running.cancel_waiting_since = now
            return
        timeout = CANCEL_ANSWER_TIMEOUT_S if running.worker_answered else CANCEL_ANSWER_TIMEOUT_STARTING_S
        if running.cancel_waiting_since is not None and now - running.cancel_waiting_since > timeout:
            self._stop_worker(running, f"the worker did not answer Cancel within {timeout:.0f} s")

    def _stop_worker(self, running: RunningOperation, why: str) -> None:
        """End the running operation without the worker: stop (or disconnect from) the worker, whose
        sessions then count as gone."""
        client, self.client = self.client, None
        if client is not None:
            self._dead_generations.add(self._generation_key(client))
            try:
                client.close(grace_s=0.0)  # killed at once: a hung worker would not read a shutdown request
            except Exception as error:
                log.debug("stopping the worker failed: %s", error)
        status = DROPPED if running.drop_reason else CANCELLED
        reason = f" ({running.drop_reason})" if running.drop_reason else ""
        self._finish(
            running,
            status,
            f"{running.title} stopped after {running.elapsed:.1f} s{reason}: {why}, so the TEDM worker was stopped; "
            "nothing was written. The next request starts a new worker.",
        )

    # -- scene events ------------------------------------------------------------------------
    def on_scene_closed(self) -> None:
        """The scene is closing: every node goes (and IDs will be reused). Results in flight are
        dropped, the worker's sessions are closed and the running job is cancelled."""
        if self.running is not None and not self.running.drop_reason:
            self.running.drop_reason = "the scene was closed"
            self._request_cancel()
        for record in list(self.records.values()):
            self._close_session(record)
        self.records.clear()
        self.written.clear()

    def on_node_removed(self, node: Any) -> None:
        """A node left the scene: drop what refers to it (a result in flight, a cached session)."""
        if node is None:
            return
        running = self.running
        if running is not None and not running.drop_reason:
            if node is running.segmentation_node:
                running.drop_reason = f"segmentation '{node.GetName()}' was deleted"
            elif any(node is volume for volume in running.volume_nodes):
                running.drop_reason = f"volume '{node.GetName()}' was deleted"
            if running.drop_reason:
                self._request_cancel()
        written = self.written.get(id(node))
        if written is not None and written.node is node:
            del self.written[id(node)]
        for key, record in list(self.records.items()):
            if node is record.segmentation_node or any(node is v for v in record.volume_nodes):
                if running is None or running.record is not record:
                    self._close_session(record)
                del self.records[key]

    def _close_session(self, record: WorkerSessionRecord) -> None:
        # Frees the worker's copy of the volume and its decoder features (can be GBs). A session
        # of an older worker generation died with that worker.
        client = self.client
        if client is not None and record.generation == self._generation_key(client) and client.alive:
            self._send_quietly(client, "close_session", {"session": record.session_id})

    # -- queries -----------------------------------------------------------------------------
    def record_for(self, segmentation_node: Any) -> Optional[WorkerSessionRecord]:
        """The live worker session behind this segmentation's last result, if any."""
        if segmentation_node is None:
            return None
        record = self.records.get(id(segmentation_node))
        if record is None or record.segmentation_node is not segmentation_node:
            return None
        self._note_dead_worker()
        if record.generation in self._dead_generations or record.generation != self._generation_key():
            return None  # that worker died or was restarted: its sessions are gone
        return record

    def has_result(self, segmentation_node: Any) -> bool:
        return self.record_for(segmentation_node) is not None

    def _require_record(self, segmentation_node: Any) -> WorkerSessionRecord:
        if segmentation_node is None:
            raise UserInputError("select the segmentation that TEDM wrote")
        stale = self.records.get(id(segmentation_node))
        record = self.record_for(segmentation_node)
        if record is None:
            if stale is not None:
                raise UserInputError(
                    "the TEDM worker was restarted since this result (its state is gone): press Segment again, then "
                    "Refine; Segment keeps the corrections made here since TEDM's last result, and Refine learns them"
                )
            raise UserInputError(
                f"'{segmentation_node.GetName()}' was not segmented in this session: press Segment (or Fit) first, "
                "correct some slices with the Segment Editor, then Refine"
            )
        return record

    # -- requests ----------------------------------------------------------------------------
    def _check_idle(self) -> None:
        if self.running is not None:
            raise UserInputError(f"{self.running.title} is still running: wait for it, or press Cancel")
        self._note_dead_worker(read=True)  # before any session is chosen for reuse

    def _watch_for_edits(self, running: RunningOperation) -> None:
        """Note the segmentation as it is at the request (its segments' modified times now, its
        voxels over the next ticks), to find the user's edits when the result arrives. Reading
        every segment at the click held the GUI 20-70 ms per segment of a full volume."""
        node = running.segmentation_node
        if node is None:
            return
        running.segmentation_signature = mrml_io.segments_signature(node)
        running.digesting = self._request_digest_steps(running)

    def _request_digest_steps(self, running: RunningOperation) -> Iterator[None]:
        """Sets ``running.segmentation_digest``, one segment per step, unless the segments change
        before all are read (the content at the request is then unknown: treated as edited)."""
        node = running.segmentation_node
        steps = self._digest_steps(node, running.volume_nodes[0], None)
        while mrml_io.segments_signature(node) == running.segmentation_signature:
            try:
                next(steps)
            except StopIteration as done:
                running.segmentation_digest = done.value
                return
            yield

    def _digest_steps(
        self, segmentation_node: Any, reference_node: Any, masks: Optional[Dict[str, np.ndarray]]
    ) -> Generator[None, None, Optional[str]]:
        """The segmentation's content in the volume's grid (every segment) and its segment IDs, one
        segment per step (a segment of a full volume is read in 10-30 ms, more under load): the
        generator's value is the digest, None if a segment cannot be read in the volume's grid (its
        content is then unknown, so it cannot be shown unchanged). ``masks``, if given, receives
        each readable segment's voxels."""
        segmentation = segmentation_node.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        digest = hashlib.sha1(repr(ids).encode())
        readable = True
        if ids and reference_node.GetImageData() is not None:
            # Each segment separately: a merged labelmap would hide an edit where segments overlap.
            for segment_id in ids:
                with self.timings.step("segmentation digest"):
                    try:
                        labels = mrml_io.read_class_labels(segmentation_node, reference_node, [segment_id])
                    except (mrml_io.GeometryError, RuntimeError):
                        # Not readable in the volume's grid (another transform): the write will say so.
                        labels = None
                        readable = False
                    if labels is not None:
                        if masks is not None:
                            masks[segment_id] = labels
                        digest.update(np.packbits(labels.reshape(-1) > 0).tobytes())
                yield
        return digest.hexdigest() if readable else None

    def _new_record(self, volume_nodes: Sequence[Any], segmentation_node: Any) -> WorkerSessionRecord:
        return WorkerSessionRecord(
            session_id=f"slicer-{uuid.uuid4().hex[:12]}",
            generation=None,
            volume_nodes=list(volume_nodes),
            volume_state=_volume_state(volume_nodes),
            segmentation_node=segmentation_node,
        )

    def _reusable_record(self, volume_nodes: Sequence[Any], segmentation_node: Any) -> Optional[WorkerSessionRecord]:
        """The worker session of this segmentation, if it holds these very volumes, unchanged
        (Segment again with another model need not send the volume again)."""
        record = self.record_for(segmentation_node)
        if record is None or len(record.volume_nodes) != len(volume_nodes):
            return None
        if any(a is not b for a, b in zip(record.volume_nodes, volume_nodes)):
            return None
        if _volume_state(volume_nodes) != record.volume_state:
            return None  # the worker's copy is stale: a new session gets the volumes as they are now
        return record

    def _submit(self, running: RunningOperation, op: str, fields: Dict[str, Any], arrays=None) -> None:
        client = self._worker()
        with self.timings.step("submit request"):
            running.request_id = client.submit(
                op, fields, arrays, on_event=lambda event: self._on_event(running, event)
            )
        running.generation = self._generation_key(client)
        if running.record.generation is None:
            running.record.generation = running.generation

    def _start(self, running: RunningOperation, op: str, fields: Dict[str, Any], arrays=None) -> RunningOperation:
        self.running = running
        try:
            self._submit(running, op, fields, arrays)
        except Exception:
            self.running = None
            raise
        self.listener.progress(0.0, f"{running.title}: sent to the worker")
        return running

    def _open_then(
        self, running: RunningOperation, reuse: bool, volume_arrays: mrml_io.VolumeArrays, follow_up
    ) -> RunningOperation:
        """Open the worker session (sending the volume) unless it is reused, then send the job."""
        if reuse:
            self._start(running, follow_up[0], follow_up[1], follow_up[2])
            return running
        running.follow_up = lambda: self._submit(running, *follow_up)
        fields = {
            "session": running.record.session_id,
            "ijk_to_ras": volume_arrays.ijk_to_ras.tolist(),
            "channel_names": list(volume_arrays.channel_names),
        }
        return self._start(running, "open_session", fields, {"volume": volume_arrays.array})

    def begin_segment(
        self,
        volume_nodes: Sequence[Any],
        model_path: str,
        segmentation_node: Any = None,
        axis: str = AUTO,
        device: str = "auto",
    ) -> RunningOperation:
        """Segment the volume(s) (channels, in the model's order). With ``segmentation_node``
        None, a new segmentation is created when the result arrives."""
        self._check_idle()
        if not model_path:
            raise UserInputError("choose a model folder (a fitted model holds bundle.json)")
        with self.timings.step("read volume"), _as_user_error():
            arrays = mrml_io.volume_arrays_from_nodes(volume_nodes)
        axis, device = self._checked_axis(axis), self._checked_device(device)
        if segmentation_node is not None:
            with _as_user_error():
                mrml_io.require_voxel_source(segmentation_node)
        reuse = self._reusable_record(volume_nodes, segmentation_node)
        record = reuse or self._new_record(volume_nodes, segmentation_node)
        running = RunningOperation(
            "segment",
            "Segment",
            list(volume_nodes),
            segmentation_node,
            record,
            None,
        )
        self._watch_for_edits(running)
        fields = {"session": record.session_id, "model": os.path.abspath(os.path.expanduser(model_path))}
        fields.update(axis=axis, device=device)
        return self._open_then(running, reuse is not None, arrays, ("segment", fields, None))

    def begin_fit(
        self,
        volume_nodes: Sequence[Any],
        model_path: str,
        segmentation_node: Any,
        axis: str = AUTO,
        device: str = "auto",
        method: str = "tedm",
        steps: Optional[int] = DEFAULT_HEAD_STEPS,
        seed: int = 0,
    ) -> RunningOperation:
        """Fit a new model from the slices labelled in ``segmentation_node`` (one segment per
        class) and segment every other slice; the labelled slices stay exactly as drawn.
        ``model_path`` is a pretrained backbone, or a bundle whose backbone is reused."""
        self._check_idle()
        if segmentation_node is None:
            raise UserInputError("select the segmentation in which you labelled 1-3 slices")
        if method not in METHOD_CHOICES:
            raise UserInputError(f"unknown method {method!r}; expected one of {METHOD_CHOICES}")
        if not model_path:
            raise UserInputError("choose a backbone folder (holding backbone.json) or a fitted model")
        with self.timings.step("read volume"), _as_user_error():
            arrays = mrml_io.volume_arrays_from_nodes(volume_nodes)
        axis, device = self._checked_axis(axis), self._checked_device(device)
        reference = volume_nodes[0]
        # Every segment is a class, in the Segment Editor's order, whoever made it: a segment the user
        # added to a segmentation TEDM wrote is a new structure to learn, not background.
        segment_ids = mrml_io.all_segment_ids(segmentation_node)
        if not segment_ids:
            raise UserInputError(
                f"'{segmentation_node.GetName()}' has no segments: add one segment per structure "
                "and paint it on 1-3 slices"
            )
        with _as_user_error():
            mrml_io.require_voxel_source(segmentation_node)
            drawn = mrml_io.read_class_labels(segmentation_node, reference, segment_ids)
        if not drawn.any():
            raise UserInputError(
                f"nothing is painted in '{segmentation_node.GetName()}': paint every structure on 1-3 slices first"
            )
        class_names = mrml_io.class_names_of(segmentation_node, segment_ids=segment_ids)
        colours = [
            [int(round(255 * c)) for c in colour]
            for colour in mrml_io.class_colours_of(segmentation_node, segment_ids=segment_ids)
        ]
        present = set(np.unique(drawn).tolist())
        unpainted = [name for index, name in enumerate(class_names[1:], start=1) if index not in present]
        reuse = self._reusable_record(volume_nodes, segmentation_node)
        record = reuse or self._new_record(volume_nodes, segmentation_node)
        running = RunningOperation(
            "fit",
            "Fit from labelled slices",
            list(volume_nodes),
            segmentation_node,
            record,
            None,
        )
        running.class_segment_ids = list(segment_ids)
        self._watch_for_edits(running)
        fields = {
            "session": record.session_id,
            "model": os.path.abspath(os.path.expanduser(model_path)),
            "method": method,
            "class_names": class_names,
            "class_colours": colours,
            "axis": axis,
            "device": device,
            "steps": int(steps) if steps else None,
            "seed": int(seed),
        }
        started = self._open_then(running, reuse is not None, arrays, ("fit", fields, {"labels": drawn}))
        learnt = ", ".join(class_names[1:])
        self.listener.log(f"Fit learns {len(class_names) - 1} structure(s), one per segment: {learnt}.")
        if unpainted:
            self.listener.log(
                f"Segment(s) {', '.join(unpainted)} have no painted voxel (or are hidden under later segments): "
                "Fit learns them from nothing. Paint them, or delete them, and Fit again."
            )
        return started

    def begin_refine(
        self,
        segmentation_node: Any,
        reference_volume_node: Any,
        steps: Optional[int] = DEFAULT_REFINE_STEPS,
        device: str = "auto",
    ) -> RunningOperation:
        """Learn from the slices corrected since the last Segment/Fit/Refine of this node (the
        worker compares the labels with what it last wrote)."""
        self._check_idle()
        record = self._require_record(segmentation_node)
        if reference_volume_node is None or reference_volume_node is not record.volume_nodes[0]:
            raise UserInputError("the input volume changed since this segmentation was made: press Segment again")
        if _volume_state(record.volume_nodes) != record.volume_state:
            raise UserInputError(
                "the input volumes' voxels or geometry changed since this segmentation was made: press Segment again"
            )
        segmentation = segmentation_node.GetSegmentation()
        missing = [
            name
            for name, segment_id in zip(record.class_names[1:], record.segment_ids)
            if segmentation.GetSegment(segment_id) is None
        ]
        if missing:
            raise UserInputError(
                f"segment(s) {', '.join(missing)} were removed since the last result: press Segment (or Fit) again"
            )
        with _as_user_error():
            mrml_io.require_voxel_source(segmentation_node)
            edited = mrml_io.read_class_labels(segmentation_node, reference_volume_node, record.segment_ids)
        running = RunningOperation(
            "refine",
            "Refine from corrections",
            list(record.volume_nodes),
            segmentation_node,
            record,
            None,
        )
        self._watch_for_edits(running)
        fields = {"session": record.session_id, "steps": int(steps) if steps else None}
        fields["device"] = self._checked_device(device)
        return self._start(running, "refine", fields, {"labels": edited})

    def begin_next_uncertain_slice(self, segmentation_node: Any) -> RunningOperation:
        """Ask for the slices ranked by prediction disagreement; the result's ``uncertain_slice`` is
        the most uncertain one not yet offered since the last result (then it starts over)."""
        self._check_idle()
        record = self._require_record(segmentation_node)
        running = RunningOperation(
            "uncertain_slices", "Next uncertain slice", list(record.volume_nodes), segmentation_node, record, None
        )
        return self._start(running, "uncertain_slices", {"session": record.session_id, "count": None})

    def begin_save_model(self, segmentation_node: Any, path: str, overwrite: bool = False) -> RunningOperation:
        """Save the model behind this segmentation's last result (fitted or refined) as a bundle folder."""
        self._check_idle()
        record = self._require_record(segmentation_node)
        if not path:
            raise UserInputError("choose a folder to save the model in")
        running = RunningOperation(
            "save_model", "Save model", list(record.volume_nodes), segmentation_node, record, None
        )
        fields = {"session": record.session_id, "path": os.path.abspath(os.path.expanduser(path))}
        fields["overwrite"] = bool(overwrite)
        return self._start(running, "save_model", fields)

    def begin_pretrain(
        self, volume_nodes: Sequence[Any], out: str, preset: str = "tiny", steps: int = 200, axis: str = "axial"
    ) -> RunningOperation:
        """Pretrain a backbone on the volume(s) in the worker (the self-test makes its model this
        way, so that torch never enters Slicer's process). The result's ``saved_path`` is the folder."""
        self._check_idle()
        with self.timings.step("read volume"), _as_user_error():
            arrays = mrml_io.volume_arrays_from_nodes(volume_nodes)
        record = self._new_record(volume_nodes, None)
        running = RunningOperation("pretrain", "Pretrain a backbone", list(volume_nodes), None, record, None)
        fields = {"out": os.path.abspath(os.path.expanduser(out)), "preset": preset, "steps": int(steps)}
        fields.update(axis=self._checked_axis(axis), sessions=[record.session_id])
        return self._open_then(running, False, arrays, ("pretrain", fields, None))

    def describe_worker(self, on_description: Callable[[str], None]) -> None:
        """Ask the worker who it is (starting it if needed); ``on_description`` gets one line
        (its pid, torch version and devices) when the answer arrives through ``poll``."""

        def on_event(event: Any) -> None:
            if event.kind == "result":
                result = event.fields.get("result", event.fields) or {}
                cuda = result.get("cuda") or []
                devices = ", ".join(str(d) for d in cuda) if cuda else "no CUDA GPU: the CPU"
                on_description(
                    f"Worker pid {result.get('pid', '?')}: tedm_core {result.get('tedm_core', '?')}, "
                    f"torch {result.get('torch', '?')}, running on {devices}."
                )
            elif event.kind == "error":
                on_description(f"Worker: {event.fields.get('message', 'not available')}")

        self._worker().submit("hello", {}, None, on_event=on_event)

    @staticmethod
    def _checked_axis(axis: str) -> str:
        axis = (axis or AUTO).lower()
        if axis not in AXIS_CHOICES:
            raise UserInputError(f"unknown slicing axis {axis!r}; expected one of {AXIS_CHOICES}")
        return axis

    @staticmethod
    def _checked_device(device: str) -> str:
        device = (device or "auto").lower()
        device = {"gpu": "cuda"}.get(device, device)
        if device not in DEVICE_CHOICES:
            raise UserInputError(f"unknown device {device!r}; expected one of {DEVICE_CHOICES}")
        return device

    # -- events ------------------------------------------------------------------------------
    def _on_event(self, running: RunningOperation, event: Any) -> None:
        if running is not self.running or event.request_id != running.request_id:
            return  # a late event of an operation already finished (or of its open_session)
        running.worker_answered = True
        if event.kind == "progress":
            fraction = float(event.fields.get("fraction", 0.0))
            self.listener.progress(max(0.0, min(1.0, fraction)), f"{running.title}: {event.fields.get('message', '')}")
        elif event.kind == "log":
            self.listener.log(str(event.fields.get("message", "")))
        elif event.kind == "error":
            self._finish_with_error(running, event)
        elif event.kind == "result":
            if running.follow_up is not None:  # open_session answered: send the job itself
                follow_up, running.follow_up = running.follow_up, None
                if running.drop_reason or running.cancel_requested:
                    self._finish(running, DROPPED if running.drop_reason else CANCELLED, self._dropped_text(running))
                    return
                try:
                    follow_up()
                except Exception as error:
                    self._finish(running, FAILED, f"{running.title} could not be sent to the worker: {error}")
                return
            self._finish_with_result(running, event)

    def _close_unused_session(self, running: RunningOperation) -> None:
        """Close the worker session of a dropped operation unless a live record still uses it."""
        if all(record is not running.record for record in self.records.values()):
            self._close_session(running.record)

    def _dropped_text(self, running: RunningOperation) -> str:
        if running.drop_reason:
            return f"{running.title}: the result was dropped because {running.drop_reason}; nothing was written."
        return f"{running.title} cancelled after {running.elapsed:.1f} s; nothing was changed."

    def _finish(self, running: RunningOperation, status: str, message: str, **details: Any) -> FinishedOperation:
        self.running = None
        if status in (FAILED, CANCELLED, DROPPED):
            # A session opened for this operation and never used by a result would hold the
            # volume (and features) in the worker until it exits.
            self._close_unused_session(running)
        finished = FinishedOperation(running.operation, running.title, status, message, running.elapsed, **details)
        finished.during_shutdown = self._shutting_down
        if status in (DROPPED, WORKER_DIED, CANCELLED):
            self.listener.log(message)
        self.listener.finished(finished)
        return finished

    def _finish_with_error(self, running: RunningOperation, event: Any) -> None:
        kind = str(event.fields.get("kind", "internal"))
        message = str(event.fields.get("message", "")) or kind
        details = str(event.fields.get("details", "") or "")
        if kind == "worker_died":
            # Every session of that worker is gone; the next request starts a new worker.
            self._dead_generations.add(running.generation)
            self._finish(
                running,
                WORKER_DIED,
                f"The TEDM worker stopped during {running.title} ({message}); nothing was changed. "
                "It restarts with the next request.",
                error_kind=kind,
                details=details,
            )
        elif running.drop_reason:
            self._finish(running, DROPPED, self._dropped_text(running), error_kind=kind)
        elif kind == "cancelled":
            self._finish(running, CANCELLED, self._dropped_text(running), error_kind=kind)
        else:  # nothing was written, and no output node was created (that happens with a result)
            self._finish(running, FAILED, f"{running.title} failed: {message}", error_kind=kind, details=details)

    def _nodes_gone(self, running: RunningOperation) -> str:
        for volume in running.volume_nodes:
            if not node_is_alive(volume):
                return "its input volume is no longer in the scene"
        if running.segmentation_node is not None and not node_is_alive(running.segmentation_node):
            return "its segmentation is no longer in the scene"
        return ""

    def _finish_with_result(self, running: RunningOperation, event: Any) -> None:
        result = event.fields.get("result", event.fields) or {}
        gone = running.drop_reason or self._nodes_gone(running)
        if gone:
            running.drop_reason = gone
            self._finish(running, DROPPED, self._dropped_text(running))
            return
        try:
            if running.operation in ("segment", "fit", "refine"):
                # Nothing more in the poll that received it: the next ticks check and write it.
                running.preparing = self._prepare_write(running, result, event.arrays)
            elif running.operation == "uncertain_slices":
                self._apply_uncertain_slices(running, result)
            elif running.operation in ("save_model", "pretrain"):
                self._close_unused_session(running)
                path = str(result.get("path", ""))
                self._finish(running, DONE, f"{running.title}: saved to {path}", saved_path=path)
        except Exception as error:  # MRML refused the result: say so, keep the GUI alive
            self._fail_writing(running, error)

    def _prepare_write(
        self, running: RunningOperation, result: Dict[str, Any], arrays: Dict[str, Any]
    ) -> Iterator[None]:
        """Check the result and where it goes, one step per timer tick, then set ``running.write``
        (the segments are written by the ticks after). Between steps, ``_advance_write`` checks
        that the nodes are still there."""
        reference = running.volume_nodes[0]
        labels = np.asarray(arrays["labels"], dtype=np.uint8)
        changed = [
            node.GetName()
            for node, now, then in zip(running.volume_nodes, _volume_state(running.volume_nodes), running.volume_state)
            if now[:2] != then[:2]  # another image or other voxels; a new IJK-to-RAS keeps the voxels labelled
        ]
        if changed:
            raise UserInputError(
                f"'{', '.join(changed)}' changed while {running.title} ran (another frame, a filter or an edit of the "
                f"voxels): the result, made from the earlier voxels, was not written; press {running.title} again"
            )
        expected = tuple(reversed(reference.GetImageData().GetDimensions()))
        if labels.shape != expected:
            raise mrml_io.GeometryError(
                f"the worker returned labels of shape {labels.shape}, expected {expected} (KJI)"
            )
        class_names = [str(n) for n in result.get("class_names") or running.record.class_names]
        target = running.segmentation_node
        edited = False
        if target is not None and running.segmentation_signature is not None:
            running.digesting = None
            if mrml_io.segments_signature(target) != running.segmentation_signature:
                # Something touched the segments (an edit, or only a new representation such as
                # the 3D surface): compare the voxels, one segment per tick. An edit while they are
                # read counts as an edit during the job. Untouched segments need no voxel read.
                edited = running.segmentation_digest is None
                if not edited:
                    signature = mrml_io.segments_signature(target)
                    digest = yield from self._digest_steps(target, reference, None)
                    edited = digest != running.segmentation_digest or mrml_io.segments_signature(target) != signature
        moved = (
            target is not None
            and target.GetTransformNodeID() != reference.GetTransformNodeID()
            and target.GetSegmentation().GetNumberOfSegments() > 0
        )
        corrections: Optional[Corrections] = None
        if running.operation == "segment" and target is not None and not edited and not moved:
            corrections = yield from self._corrections_since_written(target, reference, class_names)
        corrected = corrections is not None and not corrections.mergeable
        kept_note = ""
        if corrections is not None and corrections.mergeable:
            # Segment again over corrected slices (a worker restart, which loses the session, sends
            # users here): the user's voxels stay as they are, the rest takes the new result, and
            # the next Refine finds the corrections against the worker's new result and learns them.
            labels = labels.copy()
            labels[corrections.changed] = corrections.labels[corrections.changed]
            kept_note = (
                f" Your corrections in '{target.GetName()}' since TEDM's last result there "
                f"({int(corrections.changed.sum())} voxels) were kept over the new result: Refine learns from them."
            )
        if target is not None and not edited and not moved and not corrected:
            about_to_write = getattr(self.listener, "about_to_write_in_place", None)
            if about_to_write is not None and not self._shutting_down:
                about_to_write(target)
            segmentation = target.GetSegmentation()
            existing = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
            snapshot = mrml_io.snapshot_segmentation(target)
            ids = mrml_io.prepare_segmentation_node(
                target, reference, class_names, result.get("class_colours"), running.class_segment_ids
            )
            write = PendingWrite(result, labels, class_names, result.get("class_colours"), target, False, ids)
            write.existing, write.snapshot = existing, snapshot
            write.signature = mrml_io.segments_signature(target)
            write.note = kept_note
        else:
            write = self._staged_write(running, result, labels, class_names)
            if edited:
                # The user painted while the job ran: keep their work, put the result beside it.
                write.written_to_new_node = True
                write.note = (
                    f" '{target.GetName()}' was edited while {running.title} ran, so the result went into a new "
                    "segmentation instead of overwriting your edits."
                )
            elif corrected:
                # Corrections of other classes than the new result's (another model): left as they are.
                write.written_to_new_node = True
                write.note = (
                    f" '{target.GetName()}' holds changes made since TEDM's last result there (your corrections), "
                    "for other structures than this model's or in another volume's grid, so the new result went into "
                    "a new segmentation and yours was left as it is."
                )
            elif moved:
                # The result lives in the volume's coordinates; taking the segmentation under the
                # volume's transform would move the user's own segments in the world.
                write.written_to_new_node = True
                write.note = (
                    f" '{target.GetName()}' is under another transform than '{reference.GetName()}', so the result "
                    "went into a new segmentation under the volume's transform (yours was not moved)."
                )
        running.write = write

    def _corrections_since_written(
        self, node: Any, reference: Any, class_names: Sequence[str]
    ) -> Generator[None, None, Optional[Corrections]]:
        """What the user changed in the class segments TEDM last wrote into ``node``: None when
        nothing (no voxel is read unless the segments' modified times moved: a 3D surface made for
        display moves them without changing a voxel). One segment read per step."""
        written = self.written.get(id(node))
        if written is None or written.node is not node or mrml_io.segments_signature(node) == written.signature:
            return None
        same_grid = (
            written.reference is reference
            and reference.GetImageData() is not None
            and tuple(reversed(reference.GetImageData().GetDimensions())) == written.labels.shape
            and np.allclose(mrml_io.ijk_to_ras_of(reference), written.ijk_to_ras, atol=mrml_io.GEOMETRY_TOLERANCE_MM)
        )
        if not same_grid:
            # What TEDM wrote is in another grid (another volume, or this one moved): the user's
            # changes cannot be told from it, so the node is kept as it is.
            return Corrections(None, None, mergeable=False)
        segmentation = node.GetSegmentation()
        current = np.zeros_like(written.labels)
        for index, segment_id in enumerate(written.segment_ids, start=1):
            if segmentation.GetSegment(segment_id) is None:
                # Deleted whole: not a correction of voxels (Segment makes the class a new segment).
                current[written.labels == index] = index
                continue
            with self.timings.step("segmentation digest"):
                try:
                    mask = mrml_io.read_class_labels(node, reference, [segment_id]) > 0
                except (mrml_io.GeometryError, RuntimeError):
                    return Corrections(None, None, mergeable=False)  # content unknown: keep it apart
            current[mask] = index  # the later class wins, as where segments overlap elsewhere
            yield
        changed = current != written.labels
        if not changed.any():
            return None
        return Corrections(current, changed, mergeable=list(written.class_names) == [str(n) for n in class_names])

    def _staged_write(
        self, running: RunningOperation, result: Dict[str, Any], labels: np.ndarray, class_names: List[str]
    ) -> PendingWrite:
        """A write into a new segmentation node, outside the scene until it is complete."""
        import slicer

        reference = running.volume_nodes[0]
        node = slicer.vtkMRMLSegmentationNode()
        node.SetName(reference.GetScene().GenerateUniqueName(f"{reference.GetName()} TEDM"))
        ids = mrml_io.prepare_segmentation_node(node, reference, class_names, result.get("class_colours"))
        return PendingWrite(result, labels, class_names, result.get("class_colours"), node, True, ids)

    def _advance_write(self, running: RunningOperation) -> None:
        """One piece of the result: a segment written (or put back), or the write completed."""
        write = running.write
        reference = running.volume_nodes[0]
        gone = running.drop_reason or self._nodes_gone(running)
        if gone:
            # A staged node was never in the scene: dropping it leaves nothing behind. A node
            # written in place is put back as it was, unless it was deleted too (or its scene
            # closed) or the user has edited it since.
            running.drop_reason = gone
            running.preparing = None
            running.write = None
            left = self._put_back(write) if write is not None else ""
            self._finish(
                running,
                DROPPED,
                self._dropped_text(running)
                if not left
                else f"{running.title}: the result was dropped because {gone};{left}",
            )
            return
        try:
            if running.preparing is not None:
                try:
                    next(running.preparing)
                except StopIteration:
                    running.preparing = None  # ``write`` is set: the next tick starts writing
            elif write.restore:
                node = write.restore_node
                if mrml_io.segments_signature(node) == write.restore_signature:
                    segment_id, index = write.restore.pop()
                    current = mrml_io.read_class_labels(node, reference, [segment_id])
                    if np.array_equal(current > 0, write.labels == index):  # still exactly what was written
                        self._write_segment(node, reference, segment_id, write.previous[segment_id])
                    write.restore_signature = mrml_io.segments_signature(node)
                else:  # the user is editing it again: what is left is theirs to decide
                    write.restore = []
            elif not write.staged and write.signature != mrml_io.segments_signature(write.target):
                running.write = self._rewrite_after_edit(running)
            elif write.done < len(write.segment_ids):
                index = write.done + 1
                segment_id = write.segment_ids[write.done]
                if not write.staged and segment_id in write.existing and segment_id not in write.previous:
                    # In place: the segment as it is now, read in a tick of its own, to put it back
                    # if the user edits the segmentation before the last segment is written.
                    write.previous[segment_id] = mrml_io.read_class_labels(write.target, reference, [segment_id])
                    return
                self._write_segment(write.target, reference, segment_id, write.labels == index)
                write.done = index
                if not write.staged:
                    write.signature = mrml_io.segments_signature(write.target)
            else:
                running.write = None
                self._complete_write(running, write)
        except Exception as error:  # MRML refused the result: say so, keep the GUI alive
            running.preparing = None
            running.write = None
            self._fail_writing(running, error, write)

    def _put_back(self, write: PendingWrite) -> str:
        """Put a node that an unfinished in-place write has changed back as it was; "" when it
        was (or nothing had been changed), else what the user will find in it, said in a clause."""
        if write.staged or write.snapshot is None:
            return ""
        node = write.target
        if not node_is_alive(node):
            return ""  # deleted, or its scene closed: nothing left to keep whole
        if mrml_io.segments_signature(node) != write.signature:
            return (
                f" '{node.GetName()}' was edited while the result was being written into it, so it was left as it is "
                f"({write.done} of the result's {len(write.segment_ids)} segments written)."
            )
        mrml_io.restore_segmentation(node, write.snapshot)
        return ""

    def _fail_writing(self, running: RunningOperation, error: Exception, write: Optional[PendingWrite] = None) -> None:
        if self.running is not running:
            return
        left = ""
        if write is not None:
            try:
                left = self._put_back(write)
            except Exception:  # MRML refused that too: the failure below is still the news
                log.exception("TEDMSlicer: putting the segmentation back failed")
                left = f" '{write.target.GetName()}' could not be put back as it was."
        if isinstance(error, (UserInputError, mrml_io.GeometryError)):  # the scene's state, said in one line
            self._finish(running, FAILED, f"{running.title}: {error}{left}", error_kind="user")
            return
        import traceback

        log.exception("TEDMSlicer: writing the result failed")
        message = f"{running.title}: writing the result failed: {error}{left}"
        self._finish(running, FAILED, message, details=traceback.format_exc())

    def _write_segment(self, node: Any, reference: Any, segment_id: str, mask: np.ndarray) -> None:
        import slicer

        # Only the mask's bounding box: the write's cost follows the image's size, not the volume's.
        image = mrml_io.cropped_oriented_image_from_mask(mask, mrml_io.ijk_to_ras_of(reference))
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(image, node, segment_id, logic.MODE_REPLACE):
            raise RuntimeError(f"could not write segment {segment_id!r} into '{node.GetName()}'")

    def _rewrite_after_edit(self, running: RunningOperation) -> PendingWrite:
        """The user edited the segmentation between two pieces of an in-place write: the segments
        already written that the user did not touch since are put back as they were (one per tick,
        each checked to still hold exactly what was written), and the whole result goes into a new
        segmentation, as for an edit made while the job ran."""
        write = running.write
        restore = []
        for index, segment_id in enumerate(write.segment_ids[: write.done], start=1):
            if segment_id not in write.previous or write.target.GetSegmentation().GetSegment(segment_id) is None:
                continue  # created by this result, or removed by the user since
            restore.append((segment_id, index))
        staged = self._staged_write(running, write.result, write.labels, write.class_names)
        staged.written_to_new_node = True
        staged.note = (
            f" '{write.target.GetName()}' was edited while the result was being written into it, so the result "
            "went into a new segmentation and yours was left as you edited it."
        )
        staged.previous, staged.restore, staged.restore_node = write.previous, restore, write.target
        staged.restore_signature = mrml_io.segments_signature(write.target)
        return staged

    def _complete_write(self, running: RunningOperation, write: PendingWrite) -> None:
        reference = running.volume_nodes[0]
        target = write.target
        if write.staged:
            reference.GetScene().AddNode(target)
            target.CreateDefaultDisplayNodes()
        self.written[id(target)] = WrittenResult(
            target,
            mrml_io.segments_signature(target),
            list(write.segment_ids),
            list(write.class_names),
            write.labels,
            reference,
            mrml_io.ijk_to_ras_of(reference),
        )
        record = running.record
        if write.written_to_new_node and self.records.get(id(running.segmentation_node)) is record:
            # The job ran in the session of the node it was asked for: that session's state is now
            # the new node's result. A node whose result came from another session keeps it.
            del self.records[id(running.segmentation_node)]
        record.segment_ids = list(write.segment_ids)
        record.class_names = list(write.class_names)
        record.segmentation_node = target
        result = write.result
        record.axis = str(result.get("axis", record.axis))
        record.training_slices = [int(i) for i in result.get("training_slices", record.training_slices) or []]
        record.visited_uncertain = []
        replaced = self.records.get(id(target))
        if replaced is not None and replaced is not record:
            self._close_session(replaced)  # a new session took over this node (e.g. the volume changed)
        self.records[id(target)] = record
        seconds = float(result.get("seconds", running.elapsed))
        changed = [int(i) for i in result.get("changed_slices", []) or []]
        message = f"{running.title} done in {running.elapsed:.1f} s (worker {seconds:.1f} s).{write.note}"
        for line in result.get("notes", []) or []:
            self.listener.log(str(line))
        if write.note:
            self.listener.log(write.note.strip())
        self._finish(
            running,
            DONE,
            message,
            segmentation_node=target,
            written_to_new_node=write.written_to_new_node,
            changed_slices=changed,
            training_slices=list(record.training_slices),
            worker_seconds=seconds,
        )

    def _apply_uncertain_slices(self, running: RunningOperation, result: Dict[str, Any]) -> None:
        record = running.record
        ranked = [s for s in result.get("slices", []) or [] if int(s["index"]) not in set(record.training_slices)]
        if not ranked:
            self._finish(running, DONE, "Every slice was labelled or corrected.")
            return
        chosen = next((s for s in ranked if int(s["index"]) not in record.visited_uncertain), None)
        if chosen is None:  # every slice offered once: start over from the most uncertain
            record.visited_uncertain = []
            chosen = ranked[0]
        record.visited_uncertain.append(int(chosen["index"]))
        centre = mrml_io.world_from_ijk(record.volume_nodes[0], chosen["centre_ijk"])
        uncertain = UncertainSlice(int(chosen["index"]), float(chosen["score"]), centre)
        message = (
            f"Slice {uncertain.index}: prediction disagreement {uncertain.score:.3f}. "
            "Correct it if needed, then Refine."
        )
        self._finish(running, DONE, message, uncertain_slice=uncertain)
