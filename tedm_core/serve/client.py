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
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .protocol import (
    CONNECTION_LENGTH,
    DEFAULT_MAX_MESSAGE_BYTES,
    FRAME_LENGTH,
    PROTOCOL_VERSION,
    ConnectionFrameReader,
    FrameReader,
    ProtocolError,
    connection_frame_header,
    decode_message,
    encode_message,
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
# Closing: an idle worker exits within this after `shutdown` (or is terminated); one still
# starting (it reads its stdin only once its imports are done) is terminated at once.
SHUTDOWN_GRACE_S = 0.5
KILL_WAIT_S = 0.5  # after SIGTERM, then after SIGKILL
EXIT_WAIT_S = 0.25  # for the exit status of a worker whose stdout ended
CONNECT_TIMEOUT_S = 5.0  # TCP connect and handshake with a remote worker, together
LOG_TAIL_LINES = 5
# Events are results of at most a few GiB; text read as a length is >= 9 << 56. The first frame is
# a `ready` of a few hundred bytes.
MAX_EVENT_BYTES = 1 << 40
MAX_READY_BYTES = 1 << 16
HEAD_BYTES = 200
QUOTE_CHARACTERS = 60


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
class _StreamConnection:
    """A byte stream read and written without blocking: requests are queued and written as the
    peer takes them, events are split into messages as they arrive. A stream that breaks the
    framing is beyond repair (where the next message starts is unknown): :attr:`failure` says
    why, and the owner stops it."""

    def __init__(self, reader: FrameReader) -> None:
        self._pending: Deque[memoryview] = collections.deque()  # framed requests not yet written
        self._reader = reader
        self._head = bytearray()  # the first bytes received, quoted when they are not the protocol
        self.eof = False
        self.failure: Optional[str] = None
        self.stopped = False  # close() was called: nothing more is read or written

    @property
    def unsent_bytes(self) -> int:
        return sum(len(part) for part in self._pending)

    def _frame_header(self, length: int) -> bytes:
        raise NotImplementedError

    def _write(self, data: memoryview) -> int:
        """Bytes written now (BlockingIOError when none fit); OSError when the peer is gone."""
        raise NotImplementedError

    def _read_available(self) -> Optional[bytes]:
        """Bytes available now, b'' at end of stream, None when nothing has arrived yet."""
        raise NotImplementedError

    def _wait(self, readable: bool, wait_s: float) -> bool:
        raise NotImplementedError

    def _peer_gone(self) -> bool:
        """True when the peer can send nothing more (checked before a read that finds nothing)."""
        return False

    def send(self, parts: Union[bytes, Sequence[memoryview]], budget_s: float = 0.0) -> None:
        """Queue one message (bytes, or the buffers of :func:`encode_message_parts`, not copied)
        and write what the peer takes within ``budget_s``; the rest goes out with the next polls."""
        parts = _buffers(parts)
        self._pending.append(memoryview(self._frame_header(sum(len(part) for part in parts))))
        self._pending.extend(part for part in parts if len(part))
        self.flush(budget_s)

    def flush(self, budget_s: float = 0.0) -> None:
        """Write queued bytes for up to ``budget_s`` (waiting for the peer to take them in
        between), never blocking longer: a GUI thread calls this from its timer."""
        deadline = time.monotonic() + budget_s
        while self._pending:
            part = self._pending[0]
            try:
                written = self._write(part[:WRITE_CHUNK])
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._wait(False, remaining):
                    return
                continue
            except OSError:  # the peer is gone; poll() reports it
                self._pending.clear()
                return
            if written == len(part):
                self._pending.popleft()
            else:
                self._pending[0] = part[written:]

    def receive(self, wait_s: float, budget_s: float) -> List[Any]:
        """Complete messages that arrived (waiting up to ``wait_s`` for bytes), reading for about
        ``budget_s``; stops at the first framing error, which :attr:`failure` then describes."""
        # Half of the poll's budget for a request still going out, the rest for events.
        started = time.monotonic()
        self.flush(budget_s / 2)
        budget_s = max(0.0, budget_s - (time.monotonic() - started))
        if self.eof or self.failure or self.stopped:
            return []
        if wait_s > 0:
            self._wait(True, wait_s)
        messages: List[Any] = []
        deadline = time.monotonic() + budget_s
        while not self.eof:
            # Asked before reading: bytes a peer wrote before it went away are read first.
            gone = self._peer_gone()
            chunk = self._read_available()
            if chunk is None:
                self.eof = gone
                break
            if not chunk:
                self.eof = True
                break
            if len(self._head) < HEAD_BYTES:
                self._head += chunk[: HEAD_BYTES - len(self._head)]
            for message in self._reader.feed(chunk):
                if isinstance(message, ProtocolError):
                    self.failure = self._describe_garbage(message)
                    return messages
                messages.append(message)
            if time.monotonic() > deadline:
                break
        return messages

    def _describe_garbage(self, error: ProtocolError) -> str:
        if self._reader.frames <= 1:
            return f"the worker wrote non-protocol output: {_quote(bytes(self._head))}"
        return f"the worker's output lost its framing ({error}): {_quote(getattr(error, 'data', b''))}"

    def refuse(self, first: bool, why: str) -> str:
        """Mark the stream broken by a message that arrived whole but is no event (``why``)."""
        if first:
            self.failure = f"the worker wrote non-protocol output: {_quote(bytes(self._head))}"
        else:
            self.failure = f"the worker sent an unreadable event ({why})"
        return self.failure

    @property
    def closed(self) -> bool:
        return self.eof or self.failure is not None


class _PipeConnection(_StreamConnection):
    """A child worker over its stdin/stdout, read and written without blocking (POSIX), its
    stderr in a log file (a pipe nobody reads would fill up and stall the worker)."""

    def __init__(self, command: Sequence[str], log_path: Path, env: Optional[Mapping[str, str]]) -> None:
        # The first frame must be a small `ready`: text a launcher printed first (read as a length of
        # ~1e18) is then refused at once, never waited for.
        super().__init__(FrameReader(max_bytes=MAX_EVENT_BYTES, first_max_bytes=MAX_READY_BYTES))
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
        if os.name == "posix":
            os.set_blocking(self._out, False)
            os.set_blocking(self._in, False)
            _grow_pipe(self._in)
            _grow_pipe(self._out)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _frame_header(self, length: int) -> bytes:
        return FRAME_LENGTH.pack(length)

    def _write(self, data: memoryview) -> int:
        return os.write(self._in, data)

    def _wait(self, readable: bool, wait_s: float) -> bool:
        if os.name == "posix":
            import select

            fds = [self._out] if readable else [self._in]
            ready = select.select(fds, [], [], wait_s) if readable else select.select([], fds, [], wait_s)
            return bool(ready[0] or ready[1])
        if readable:
            time.sleep(min(wait_s, 0.01))
            return True
        return False  # Windows pipes: the next poll writes the rest

    def _peer_gone(self) -> bool:
        return self.process.poll() is not None

    def _read_available(self) -> Optional[bytes]:
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
        # The process itself, not only its stdout: a worker that dies while nobody polls (idle,
        # between jobs) is seen before the next request is written into its dead pipe.
        return super().closed or self.process.poll() is not None

    def describe_exit(self) -> str:
        if self.failure:
            return f"The TEDM worker (pid {self.pid}) was stopped: {self.failure} (log: {self.log_path})"
        code = self.process.poll()
        if code is None:
            try:
                code = self.process.wait(EXIT_WAIT_S)  # its stdout ended: it is exiting, if not already gone
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

    def close(self, grace_s: float, shutdown: Optional[bytes] = None) -> None:
        """Stop the worker: ``shutdown`` written (when given and nothing else is half-written),
        end of its stdin, up to ``grace_s`` for it to exit by itself, then terminated and killed,
        each waited for briefly: the caller is a GUI thread."""
        if self.stopped:
            return
        self.stopped = True
        if shutdown is not None and not self._pending and self.process.poll() is None:
            try:
                os.write(self._in, FRAME_LENGTH.pack(len(shutdown)) + shutdown)  # < PIPE_BUF: whole or nothing
            except OSError:
                pass
        self._pending.clear()
        try:
            self.process.stdin.close()  # EOF: the worker exits by itself once it reads it
        except OSError:
            pass
        _stop_process(self.process, grace_s)
        self.process.stdout.close()


def _stop_process(process: subprocess.Popen, grace_s: float) -> None:
    for step in ("wait", "terminate", "kill"):
        if step == "terminate":
            process.terminate()
        elif step == "kill":
            process.kill()
        try:
            process.wait(grace_s if step == "wait" else KILL_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            pass
    # Still there after SIGKILL (stuck in the kernel): subprocess reaps it when it is gone.


class _NetworkConnection(_StreamConnection):
    """A `tedm serve --listen` endpoint; the token is the HMAC key of the handshake, done with a
    deadline (an endpoint that accepts and stays silent would otherwise hold the caller for
    ever). Then, as over pipes, requests go out and events come in without blocking."""

    def __init__(self, address: str, token: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__(ConnectionFrameReader(max_bytes=MAX_EVENT_BYTES, first_max_bytes=MAX_READY_BYTES))
        import socket

        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a worker address is HOST:PORT, got {address!r}")
        self.address = address
        self.pid = None
        deadline = time.monotonic() + timeout_s
        try:
            self.socket = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
        except socket.timeout:
            raise ConnectionError(f"no TEDM worker answered at {address} within {timeout_s:g} s") from None
        except OSError as error:
            raise ConnectionError(f"cannot reach the TEDM worker at {address}: {error.strerror or error}") from None
        try:
            _handshake(self.socket, token.encode("utf-8"), deadline, address)
            self.socket.setblocking(False)
        except BaseException:
            self.socket.close()
            raise

    def _frame_header(self, length: int) -> bytes:
        return connection_frame_header(length)

    def _write(self, data: memoryview) -> int:
        return self.socket.send(data)

    def _wait(self, readable: bool, wait_s: float) -> bool:
        import select

        ready = select.select([self.socket] if readable else [], [] if readable else [self.socket], [], wait_s)
        return bool(ready[0] or ready[1])

    def _read_available(self) -> Optional[bytes]:
        try:
            return self.socket.recv(READ_CHUNK)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    @property
    def closed(self) -> bool:
        if not super().closed and self.socket.fileno() >= 0:
            # A peek, never a read: a peer that closed its end is seen without polling.
            import socket

            try:
                self.eof = self.socket.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                pass
            except OSError:
                self.eof = True
        return super().closed

    def describe_exit(self) -> str:
        if self.failure:
            return f"The connection to the TEDM worker at {self.address} was closed: {self.failure}"
        return f"The connection to the TEDM worker at {self.address} was lost"

    def close(self, grace_s: float, shutdown: Optional[bytes] = None) -> None:
        self.stopped = True
        self.socket.close()


def _handshake(sock: Any, key: bytes, deadline: float, address: str) -> None:
    """``multiprocessing.connection``'s mutual HMAC challenge (as its ``Client`` does it), each
    read and write bounded by ``deadline``."""
    from multiprocessing.connection import answer_challenge, deliver_challenge

    framed = _BlockingFrames(sock, deadline)
    try:
        answer_challenge(framed, key)
        deliver_challenge(framed, key)
    except TimeoutError:
        raise ConnectionError(
            f"the TEDM worker at {address} did not complete the handshake in time "
            f"(is it a `tedm serve --listen` endpoint?); it sent {_quote(bytes(framed.received))}"
        ) from None
    except (AssertionError, ProtocolError, EOFError, OSError):
        framed.read_a_little_more()  # the rest of a banner says what answered
        raise ConnectionError(
            f"{address} is not a TEDM worker (no `tedm serve --listen` handshake); "
            f"it sent {_quote(bytes(framed.received))}"
        ) from None


class _BlockingFrames:
    """``send_bytes`` / ``recv_bytes`` of a ``multiprocessing.connection.Connection`` on a socket,
    each bounded by a deadline (raises TimeoutError past it)."""

    def __init__(self, sock: Any, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = bytearray()

    def _timeout(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the handshake took too long")
        return remaining

    def send_bytes(self, data: bytes) -> None:
        self.sock.settimeout(self._timeout())
        try:
            self.sock.sendall(connection_frame_header(len(data)) + bytes(data))
        except OSError as error:
            if "timed out" in str(error):
                raise TimeoutError(str(error)) from None
            raise

    def recv_bytes(self, maxlength: Optional[int] = None) -> bytes:
        (length,) = CONNECTION_LENGTH.unpack(self._exactly(CONNECTION_LENGTH.size))
        if length < 0 or (maxlength is not None and length > maxlength):
            raise ProtocolError(f"a handshake message of {length} bytes")
        return self._exactly(length)

    def read_a_little_more(self) -> None:
        try:
            self.sock.settimeout(0.1)
            self.received += self.sock.recv(HEAD_BYTES)[: HEAD_BYTES - len(self.received)]
        except OSError:
            pass

    def _exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            self.sock.settimeout(self._timeout())
            try:
                chunk = self.sock.recv(count - len(data))
            except OSError as error:
                if "timed out" in str(error):
                    raise TimeoutError(str(error)) from None
                raise
            if not chunk:
                raise EOFError("the worker closed the connection")
            data += chunk
            if len(self.received) < HEAD_BYTES:
                self.received += chunk[: HEAD_BYTES - len(self.received)]
        return bytes(data)


def _quote(data: bytes) -> str:
    """The first bytes of some output, as readable text, for a one-line message."""
    text = data.decode("utf-8", "replace")
    shown = repr(text[:QUOTE_CHARACTERS])
    return (shown[:-1] + "...'") if len(text) > QUOTE_CHARACTERS else shown if text else "nothing"


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

    Requests submitted before the worker's ``ready`` has been read (it carries the largest
    request the worker takes) wait in the client and go out, size-checked, with the poll that
    reads it. Output that is not the protocol (a launcher's text on the worker's stdout) ends
    every pending request with an error of kind ``protocol`` quoting it, and stops the worker.
    """

    def __init__(self, connect: Callable[[], Any], restartable: bool) -> None:
        self._connect = connect
        self._restartable = restartable
        self._connection: Any = None
        self._handlers: Dict[str, Optional[EventHandler]] = {}
        self._finished: Dict[str, WorkerEvent] = {}  # final events of requests someone waits for
        self._awaited: set = set()
        self._held: List[Tuple[str, str, List[memoryview]]] = []  # (id, op, message) until `ready`
        self._ready = False
        self._later: List[WorkerEvent] = []  # events made here, handed out by the next poll
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
    def connect(cls, address: str, token: str, timeout: float = CONNECT_TIMEOUT_S) -> WorkerClient:
        """A worker already serving the network (``tedm serve --listen HOST:PORT``).

        Connecting and the handshake take at most ``timeout`` seconds (:class:`ConnectionError`
        past it, or when the endpoint is not a TEDM worker); a wrong token raises
        ``multiprocessing.AuthenticationError``."""
        return cls(lambda: _NetworkConnection(address, token, timeout), restartable=False)

    # -- state --------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """False once the worker is gone, even while nobody polls (a local worker that died
        idle): the next :meth:`submit` then starts a new one (a new :attr:`generation`)."""
        return self._connection is not None and not self._connection.closed

    @property
    def pid(self) -> Optional[int]:
        return None if self._connection is None else self._connection.pid

    @property
    def pending(self) -> List[str]:
        """Requests submitted and not yet answered."""
        return list(self._handlers)

    @property
    def unsent_bytes(self) -> int:
        """Bytes of submitted requests still waiting to be written to the worker."""
        held = sum(len(part) for _, _, parts in self._held for part in parts)
        return held + (0 if self._connection is None else self._connection.unsent_bytes)

    @property
    def log_path(self) -> Optional[Path]:
        return getattr(self._connection, "log_path", None)

    def _start(self) -> None:
        self._connection = self._connect()
        self._ready = False
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
        """Send a request (without waiting) and return its id; ``on_event`` gets its events.

        A request larger than the worker takes raises :class:`WorkerError` (kind ``protocol``),
        or, when submitted before the worker said how large that is, ends with that error."""
        if not self.alive:
            if not self._restartable:
                raise ConnectionError(self._connection.describe_exit() if self._connection else "not connected")
            self._restart()
        request_id = f"{self.generation}.{next(self._ids)}"
        parts = encode_message_parts({**dict(fields or {}), "op": op, "id": request_id}, arrays)
        too_large = self._too_large(op, parts)
        if too_large:
            raise WorkerError(WorkerEvent("error", request_id, {"kind": "protocol", "message": too_large}))
        self._handlers[request_id] = on_event
        if on_event is None:
            self._awaited.add(request_id)  # nobody else will see its end: keep it for wait()
        if self._ready:
            # Only what the pipe takes now: a large request goes out over the next polls, so the
            # caller (the GUI thread) is never held while the worker reads it.
            self._connection.send(parts, budget_s=0.0)
        else:
            self._held.append((request_id, op, parts))
        return request_id

    def _too_large(self, op: str, parts: Sequence[memoryview]) -> str:
        size = sum(len(part) for part in parts)
        limit = int(self.worker_info.get("max_request_bytes", DEFAULT_MAX_MESSAGE_BYTES))
        if size <= limit:
            return ""
        return f"a {op} request of {size} bytes exceeds the worker's limit of {limit}"

    def cancel(self, request_id: Optional[str] = None) -> None:
        """Ask the worker to stop a job (default: whichever runs); its error event follows.
        A request still waiting for the worker to start is dropped here and ends at the next poll."""
        held = [entry for entry in self._held if request_id is None or entry[0] == request_id]
        for entry in held:
            self._held.remove(entry)
            message = f"{entry[1]} cancelled before the worker started"
            self._later.append(WorkerEvent("error", entry[0], {"kind": "cancelled", "message": message}))
        if held and request_id is not None:
            return
        if self.alive:
            self.submit("cancel", {"target": request_id} if request_id else {}, on_event=lambda event: None)

    def poll(self, max_seconds: float = 0.05, wait_seconds: float = 0.0) -> List[WorkerEvent]:
        """Events that arrived (waiting up to ``wait_seconds`` for the first), handlers called.

        Reads for about ``max_seconds`` at most, so a GUI timer stays responsive even while a
        large result streams in (the rest comes with the next call).
        """
        events, self._later = self._later, []
        connection = self._connection
        if connection is not None and not connection.stopped:
            for message in connection.receive(wait_seconds, max_seconds):
                events += self._read(connection, message)
                if connection.failure:
                    break
            if connection.failure:
                events += self._stop_all("protocol", connection.failure)
            elif connection.eof and (self._handlers or self._held):
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
        """Stop a local worker (told to, then terminated after ``grace_s``; at once while it is
        still starting, as it reads nothing before); disconnect a remote one. Pending requests
        end without events: whoever closes has stopped waiting for them."""
        connection, self._connection = self._connection, None
        self._handlers.clear()
        self._awaited.clear()
        self._held.clear()
        self._later.clear()
        if connection is None:
            return
        if self._restartable and self._ready and not connection.closed:
            connection.close(grace_s, shutdown=encode_message({"op": "shutdown", "id": "shutdown"}))
        else:
            connection.close(0.0)

    # -- internals ----------------------------------------------------------------------------------
    def _read(self, connection: Any, message: Any) -> List[WorkerEvent]:
        """The events of one message; marks ``connection`` broken when it is none."""
        first = not self._ready
        try:
            header, arrays = decode_message(message)
        except ProtocolError as error:
            connection.refuse(first, str(error))
            return []
        kind = str(header.pop("event", ""))
        request_id = header.pop("id", None)
        event = WorkerEvent(kind, request_id if isinstance(request_id, str) else None, header, arrays)
        if first:
            if kind != "ready":
                connection.refuse(True, f"a first event {kind!r}, not 'ready'")
                return []
            if event.fields.get("protocol") != PROTOCOL_VERSION:
                return self._refuse_incompatible(event)
            self._ready = True
            self.worker_info.update(event.fields)
            return [event, *self._send_held()]
        if kind == "error" and event.request_id is None:
            # A refusal the worker could not pin on a request (one too large to read): it is one of
            # those pending, which one is unknown, and none may wait for ever.
            return [event, *self._end_all("protocol", f"the worker refused a request: {event.message}")]
        return [event]

    def _send_held(self) -> List[WorkerEvent]:
        held, self._held = self._held, []
        refused = []
        for request_id, op, parts in held:
            too_large = self._too_large(op, parts)
            if too_large:
                refused.append(WorkerEvent("error", request_id, {"kind": "protocol", "message": too_large}))
            else:
                self._connection.send(parts, budget_s=0.0)
        return refused

    def _end_all(self, kind: str, message: str) -> List[WorkerEvent]:
        """An error event for every pending request (dispatching them ends them)."""
        self._held.clear()
        return [WorkerEvent("error", rid, {"kind": kind, "message": message}) for rid in list(self._handlers)]

    def _stop_all(self, kind: str, message: str) -> List[WorkerEvent]:
        """Every pending request ends with ``message``; the worker is stopped at once (the next
        request starts a new one), the events are handed out by the caller."""
        events = self._end_all(kind, message)
        self._connection.close(0.0)  # kept, closed: it says why (describe_exit) and is not alive
        return events

    def _refuse_incompatible(self, ready: WorkerEvent) -> List[WorkerEvent]:
        message = (
            f"the worker speaks protocol {ready.fields.get('protocol')} (tedm_core {ready.fields.get('tedm_core')}), "
            f"this client {PROTOCOL_VERSION}: install the same tedm_core version on both sides"
        )
        self._connection.failure = message
        return []

    def _worker_died(self) -> List[WorkerEvent]:
        return self._end_all("worker_died", self._connection.describe_exit())

    def _restart(self) -> None:
        """A new worker in place of one that is gone; requests it had not answered end with the
        next poll (it died while nobody polled)."""
        if self._connection is not None:
            if self._handlers or self._held:
                self._later += self._end_all("worker_died", self._connection.describe_exit())
            self._connection.close(0.0)
        self._start()

    def _dispatch(self, event: WorkerEvent) -> None:
        if event.kind == "ready":
            return
        handler = self._handlers.get(event.request_id) if event.request_id else None
        if event.final and event.request_id in self._handlers:
            del self._handlers[event.request_id]
            if event.request_id in self._awaited:
                self._finished[event.request_id] = event
        if handler is not None:
            handler(event)
