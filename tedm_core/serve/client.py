"""A client of the TEDM worker that never blocks its caller's thread for long, and never
imports torch: it runs in 3D Slicer's own process, driven by a ``QTimer`` calling :meth:`poll`.

    client = WorkerClient.start_local()                 # a child process over pipes
    client = WorkerClient.connect("gpu-box:8765", token)  # a `tedm serve --listen` elsewhere
    rid = client.submit("segment", {"session": "s1", "model": path}, on_event=handle)
    ... every 50-100 ms, on the GUI thread: client.poll()
    client.close()

There is no thread: requests are queued and written as the pipe takes them, events are read
as they arrive, both inside :meth:`poll`. (In Slicer, PythonQt holds the GIL while the Qt event
loop waits, so a Python thread would only advance when the GUI happens to run Python.)
A worker that dies is reported as an ``error`` event of kind ``worker_died`` for every request
it had not answered; the next :meth:`submit` starts a new one (a new :attr:`generation`: the
sessions of the old one are gone).
"""

from __future__ import annotations

import collections
import itertools
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .protocol import (
    FRAME_LENGTH,
    PROTOCOL_VERSION,
    FrameReader,
    ProtocolError,
    decode_message,
    encode_message_parts,
)

EventHandler = Callable[["WorkerEvent"], None]
READ_CHUNK = 1 << 20
WRITE_CHUNK = 1 << 20
# A pipe holds 64 KiB by default on Linux: a 100 MB volume would then need ~1,600 writes, each
# waiting for the worker to drain the pipe. 1 MiB (the default cap of an unprivileged
# F_SETPIPE_SZ) lets each write move 16 times more.
PIPE_BYTES = 1 << 20
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in Python 3.10+ only (Linux)
SHUTDOWN_GRACE_S = 5.0
LOG_TAIL_LINES = 5


@dataclass
class WorkerEvent:
    """One event from the worker: ``progress``, ``log``, ``result`` or ``error`` (or ``ready``)."""

    kind: str
    request_id: Optional[str]
    fields: Dict[str, Any] = field(default_factory=dict)
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        """True for the event that ends a request (its result or its error)."""
        return self.kind in ("result", "error")

    @property
    def message(self) -> str:
        return str(self.fields.get("message", ""))

    @property
    def result(self) -> Dict[str, Any]:
        return dict(self.fields.get("result") or {})

    @property
    def error_kind(self) -> str:
        return str(self.fields.get("kind", ""))


class WorkerError(RuntimeError):
    """A request that ended in an error event (``kind``: user, cancelled, busy, protocol,
    internal, worker_died); ``str()`` is its one-line message."""

    def __init__(self, event: WorkerEvent) -> None:
        super().__init__(event.message)
        self.kind = event.error_kind
        self.details = str(event.fields.get("details", ""))
        self.event = event


# -- connections: pipes to a child process, or the network -----------------------------------------
class _PipeConnection:
    """A child worker over its stdin/stdout, read and written without blocking (POSIX), its
    stderr in a log file (a pipe nobody reads would fill up and stall the worker)."""

    def __init__(self, command: Sequence[str], log_path: Path, env: Optional[Mapping[str, str]]) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                list(command),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=dict(env) if env is not None else None,
                bufsize=0,
            )
        self._out = self.process.stdout.fileno()
        self._in = self.process.stdin.fileno()
        self._pending: Deque[memoryview] = collections.deque()  # framed requests not yet written
        self._reader = FrameReader(max_bytes=1 << 62)  # we trust our own worker's events
        self.eof = False
        if os.name == "posix":
            os.set_blocking(self._out, False)
            os.set_blocking(self._in, False)
            _grow_pipe(self._in)
            _grow_pipe(self._out)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def unsent_bytes(self) -> int:
        return sum(len(part) for part in self._pending)

    def send(self, parts: Union[bytes, Sequence[memoryview]], budget_s: float = 0.0) -> None:
        """Queue one message (bytes, or the buffers of :func:`encode_message_parts`, not copied)
        and write what the pipe takes within ``budget_s``; the rest goes out with the next polls."""
        parts = _buffers(parts)
        self._pending.append(memoryview(FRAME_LENGTH.pack(sum(len(part) for part in parts))))
        self._pending.extend(part for part in parts if len(part))
        self.flush(budget_s)

    def flush(self, budget_s: float = 0.0) -> None:
        """Write queued bytes for up to ``budget_s`` (waiting for the worker to drain the pipe
        in between), never blocking longer: a GUI thread calls this from its timer."""
        deadline = time.monotonic() + budget_s
        while self._pending:
            part = self._pending[0]
            try:
                written = os.write(self._in, part[:WRITE_CHUNK])
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._wait_writable(remaining):
                    return
                continue
            except OSError:  # the worker is gone; poll() reports it
                self._pending.clear()
                return
            if written == len(part):
                self._pending.popleft()
            else:
                self._pending[0] = part[written:]

    def _wait_writable(self, wait_s: float) -> bool:
        if os.name == "posix":
            import select

            return bool(select.select([], [self._in], [], wait_s)[1])
        return False  # Windows pipes: the next poll writes the rest

    def receive(self, wait_s: float, budget_s: float) -> List[Any]:
        # Half of the poll's budget for a request still going out, the rest for events.
        started = time.monotonic()
        self.flush(budget_s / 2)
        budget_s = max(0.0, budget_s - (time.monotonic() - started))
        if wait_s > 0 and not self._wait_readable(wait_s):
            return []
        messages: List[Any] = []
        deadline = time.monotonic() + budget_s
        while not self.eof:
            chunk = self._read_available()
            if chunk is None:
                break
            if not chunk:
                self.eof = True
                break
            messages += self._reader.feed(chunk)
            if time.monotonic() > deadline:
                break
        return messages

    def _wait_readable(self, wait_s: float) -> bool:
        if os.name == "posix":
            import select

            return bool(select.select([self._out], [], [], wait_s)[0])
        time.sleep(min(wait_s, 0.01))
        return True

    def _read_available(self) -> Optional[bytes]:
        """Bytes available now, b'' at end of stream, None when nothing has arrived yet."""
        if os.name == "posix":
            try:
                return os.read(self._out, READ_CHUNK)
            except BlockingIOError:
                return None
        import _winapi
        import msvcrt

        try:
            available = _winapi.PeekNamedPipe(msvcrt.get_osfhandle(self._out), 0)[0]
        except OSError:
            return b""
        return os.read(self._out, min(available, READ_CHUNK)) if available else None

    @property
    def closed(self) -> bool:
        # A dead worker's stdout ends (EOF) once its last bytes are read: receive() notes that.
        return self.eof

    def describe_exit(self) -> str:
        try:
            code = self.process.wait(2.0)  # its stdout ended: it is exiting, if not already gone
        except subprocess.TimeoutExpired:
            code = None
        how = "is not running" if code is None else f"exited with code {code}"
        if code is not None and code < 0:
            how = f"was killed by signal {-code}"
        tail = _log_tail(self.log_path)
        return (
            f"The TEDM worker (pid {self.pid}) {how}"
            + (f"; its last words: {tail}" if tail else "")
            + f" (log: {self.log_path})"
        )

    def close(self, grace_s: float) -> None:
        try:
            self.process.stdin.close()  # EOF: the worker exits by itself
        except OSError:
            pass
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class _NetworkConnection:
    """A `tedm serve --listen` endpoint; the token is the HMAC key of the handshake."""

    def __init__(self, address: str, token: str) -> None:
        from multiprocessing.connection import Client

        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a worker address is HOST:PORT, got {address!r}")
        self.address = address
        self.connection = Client((host.strip("[]"), int(port)), authkey=token.encode("utf-8"))
        self.eof = False
        self.pid = None

    @property
    def unsent_bytes(self) -> int:
        return 0

    def send(self, parts: Union[bytes, Sequence[memoryview]], budget_s: float = 0.0) -> None:
        parts = _buffers(parts)
        # multiprocessing's framing wants one buffer; a remote worker is reached over a network
        # far slower than this copy.
        try:
            self.connection.send_bytes(b"".join(parts))
        except OSError:
            self.eof = True

    def flush(self, budget_s: float = 0.0) -> None:
        pass

    def receive(self, wait_s: float, budget_s: float) -> List[Any]:
        messages: List[Any] = []
        deadline = time.monotonic() + budget_s
        try:
            if not self.connection.poll(wait_s):
                return messages
            while self.connection.poll(0):
                messages.append(self.connection.recv_bytes())
                if time.monotonic() > deadline:
                    break
        except (EOFError, OSError):
            self.eof = True
        return messages

    @property
    def closed(self) -> bool:
        return self.eof

    def describe_exit(self) -> str:
        return f"The connection to the TEDM worker at {self.address} was lost"

    def close(self, grace_s: float) -> None:
        self.connection.close()


def _buffers(message: Union[bytes, Sequence[memoryview]]) -> List[memoryview]:
    if isinstance(message, (bytes, bytearray, memoryview)):
        return [memoryview(message)]
    return list(message)


def _grow_pipe(fd: int) -> None:
    """Best effort: a pipe of :data:`PIPE_BYTES` (Linux); elsewhere the default stays."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", F_SETPIPE_SZ), PIPE_BYTES)
    except (ImportError, OSError):
        pass


def _log_tail(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-LOG_TAIL_LINES:])[-800:]


def default_worker_command(python: Optional[str] = None) -> List[str]:
    return [python or sys.executable, "-m", "tedm_core.serve", "--stdio"]


# -- the client --------------------------------------------------------------------------------------
class WorkerClient:
    """Requests to a TEDM worker and its events, for a GUI timer or a script.

    Use :meth:`start_local` or :meth:`connect` to make one.
    """

    def __init__(self, connect: Callable[[], Any], restartable: bool) -> None:
        self._connect = connect
        self._restartable = restartable
        self._connection: Any = None
        self._handlers: Dict[str, Optional[EventHandler]] = {}
        self._finished: Dict[str, WorkerEvent] = {}  # final events of requests someone waits for
        self._awaited: set = set()
        self._ids = itertools.count(1)
        self.generation = 0
        self.worker_info: Dict[str, Any] = {}
        self._start()

    @classmethod
    def start_local(
        cls,
        python: Optional[str] = None,
        log_path: Optional[os.PathLike] = None,
        env: Optional[Mapping[str, str]] = None,
        command: Optional[Sequence[str]] = None,
    ) -> WorkerClient:
        """A worker child process (``python -m tedm_core.serve --stdio``), restarted if it dies.

        ``python``: the interpreter that runs it (default: this one), e.g. an environment with a
        CUDA build of torch. Its stderr goes to ``log_path`` (default: a file in the temp folder).
        """
        log = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"tedm-worker-{os.getpid()}.log"
        argv = list(command) if command else default_worker_command(python)
        return cls(lambda: _PipeConnection(argv, log, env), restartable=True)

    @classmethod
    def connect(cls, address: str, token: str) -> WorkerClient:
        """A worker already serving the network (``tedm serve --listen HOST:PORT``)."""
        return cls(lambda: _NetworkConnection(address, token), restartable=False)

    # -- state --------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._connection is not None and not self._connection.closed

    @property
    def pid(self) -> Optional[int]:
        return None if self._connection is None else self._connection.pid

    @property
    def pending(self) -> List[str]:
        """Requests sent and not yet answered."""
        return list(self._handlers)

    @property
    def unsent_bytes(self) -> int:
        """Bytes of submitted requests still waiting to be written to the worker."""
        return 0 if self._connection is None else self._connection.unsent_bytes

    @property
    def log_path(self) -> Optional[Path]:
        return getattr(self._connection, "log_path", None)

    def _start(self) -> None:
        self._connection = self._connect()
        self.generation += 1
        self.worker_info = {}

    # -- requests -----------------------------------------------------------------------------------
    def submit(
        self,
        op: str,
        fields: Optional[Mapping[str, Any]] = None,
        arrays: Optional[Mapping[str, np.ndarray]] = None,
        on_event: Optional[EventHandler] = None,
    ) -> str:
        """Send a request (without waiting) and return its id; ``on_event`` gets its events."""
        if not self.alive:
            if not self._restartable:
                raise ConnectionError(self._connection.describe_exit() if self._connection else "not connected")
            self._start()
        request_id = f"{self.generation}.{next(self._ids)}"
        parts = encode_message_parts({**dict(fields or {}), "op": op, "id": request_id}, arrays)
        size = sum(len(part) for part in parts)
        limit = self.worker_info.get("max_request_bytes")
        if limit is not None and size > int(limit):
            raise WorkerError(
                WorkerEvent(
                    "error",
                    request_id,
                    {
                        "kind": "protocol",
                        "message": f"a {op} request of {size} bytes exceeds the worker's limit of {limit}",
                    },
                )
            )
        self._handlers[request_id] = on_event
        if on_event is None:
            self._awaited.add(request_id)  # nobody else will see its end: keep it for wait()
        # Only what the pipe takes now: a large request goes out over the next polls, so the
        # caller (the GUI thread) is never held while the worker reads it.
        self._connection.send(parts, budget_s=0.0)
        return request_id

    def cancel(self, request_id: Optional[str] = None) -> None:
        """Ask the worker to stop a job (default: whichever runs); its error event follows."""
        if self.alive:
            self.submit("cancel", {"target": request_id} if request_id else {}, on_event=lambda event: None)

    def poll(self, max_seconds: float = 0.05, wait_seconds: float = 0.0) -> List[WorkerEvent]:
        """Events that arrived (waiting up to ``wait_seconds`` for the first), handlers called.

        Reads for about ``max_seconds`` at most, so a GUI timer stays responsive even while a
        large result streams in (the rest comes with the next call).
        """
        if self._connection is None:
            return []
        events = [self._event(message) for message in self._connection.receive(wait_seconds, max_seconds)]
        for event in events:
            if event.kind == "ready" and event.fields.get("protocol") != PROTOCOL_VERSION:
                return self._refuse_incompatible(event)
        if self._connection.closed and self._handlers:
            events += self._worker_died()
        for event in events:
            self._dispatch(event)
        return events

    def wait(self, request_id: str, timeout: Optional[float] = None) -> WorkerEvent:
        """Block until ``request_id`` ends (scripts, tests); its final event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._awaited.add(request_id)
        try:
            while request_id not in self._finished:
                if request_id not in self._handlers:
                    raise KeyError(f"request {request_id!r} is unknown or already ended")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"request {request_id} did not end within {timeout} s")
                self.poll(max_seconds=0.5, wait_seconds=0.05)
            return self._finished.pop(request_id)
        finally:
            self._awaited.discard(request_id)

    def request(
        self,
        op: str,
        fields: Optional[Mapping[str, Any]] = None,
        arrays: Optional[Mapping[str, np.ndarray]] = None,
        timeout: Optional[float] = None,
        on_event: Optional[EventHandler] = None,
    ) -> WorkerEvent:
        """Submit and wait; the result event, or :class:`WorkerError`."""
        event = self.wait(self.submit(op, fields, arrays, on_event), timeout)
        if event.kind == "error":
            raise WorkerError(event)
        return event

    def hello(self, timeout: float = 120.0) -> Dict[str, Any]:
        """The worker's versions (python, torch, tedm_core, CUDA devices). A worker of another
        protocol version never gets this far: its ``ready`` event is refused by :meth:`poll`."""
        self.worker_info.update(self.request("hello", timeout=timeout).result)
        return self.worker_info

    def close(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop a local worker (asked first, killed after ``grace_s``); disconnect a remote one."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._restartable and not connection.closed:
            try:
                connection.send(encode_message_parts({"op": "shutdown", "id": "shutdown"}))
                connection.flush(grace_s)
            except OSError:
                pass
        connection.close(grace_s)
        self._handlers.clear()
        self._awaited.clear()

    # -- internals ----------------------------------------------------------------------------------
    def _event(self, message: Any) -> WorkerEvent:
        try:
            if isinstance(message, Exception):
                raise message
            header, arrays = decode_message(message)
        except ProtocolError as error:
            return WorkerEvent(
                "error", None, {"kind": "protocol", "message": f"unreadable event from the worker: {error}"}
            )
        kind = str(header.pop("event", ""))
        request_id = header.pop("id", None)
        return WorkerEvent(kind, request_id, header, arrays)

    def _refuse_incompatible(self, ready: WorkerEvent) -> List[WorkerEvent]:
        message = (
            f"the worker speaks protocol {ready.fields.get('protocol')} (tedm_core {ready.fields.get('tedm_core')}), "
            f"this client {PROTOCOL_VERSION}: install the same tedm_core version on both sides"
        )
        events = [WorkerEvent("error", rid, {"kind": "protocol", "message": message}) for rid in list(self._handlers)]
        handlers = dict(self._handlers)
        awaited = set(self._awaited)
        self.close(grace_s=1.0)
        for event in events:
            if event.request_id in awaited:
                self._finished[event.request_id] = event
            if handlers.get(event.request_id) is not None:
                handlers[event.request_id](event)
        return events

    def _worker_died(self) -> List[WorkerEvent]:
        message = self._connection.describe_exit()
        return [WorkerEvent("error", rid, {"kind": "worker_died", "message": message}) for rid in list(self._handlers)]

    def _dispatch(self, event: WorkerEvent) -> None:
        if event.kind == "ready":
            self.worker_info.update(event.fields)
            return
        handler = self._handlers.get(event.request_id) if event.request_id else None
        if event.final and event.request_id in self._handlers:
            del self._handlers[event.request_id]
            if event.request_id in self._awaited:
                self._finished[event.request_id] = event
        if handler is not None:
            handler(event)
