"""The worker's two transports, one protocol: pipes to a parent process, or an authenticated
network endpoint (``multiprocessing.connection``, the token as its HMAC key)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import TEDMError
from .protocol import DEFAULT_MAX_MESSAGE_BYTES, Arrays, FrameReader, frame
from .stdio import take_stdout
from .worker import Worker, error_event, ready_event, send_event

log = logging.getLogger(__name__)
READ_CHUNK = 1 << 20
MIN_TOKEN_CHARACTERS = 16
# A client that has not proven the token by then is dropped: silent connections would otherwise
# each hold a thread and a file handle until the server could accept no one.
HANDSHAKE_TIMEOUT_S = 10.0
# How long a worker told to stop (shutdown, or its parent gone) waits for a running job to end
# at its next cancel check before the process exits.
JOB_END_WAIT_S = 30.0
# accept() failures that pass (file handles or memory short for a moment), not a closed listener.
TRANSIENT_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def serve_stdio(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, protocol_fd: Optional[int] = None) -> int:
    """Serve the parent process on stdin/stdout until it says shutdown or goes away.

    The protocol owns the original stdout (``protocol_fd``: from :func:`take_stdout`, called as
    early as possible; taken here if not given). When the parent dies its end of stdin closes,
    and the worker exits: no orphan process.
    """
    if protocol_fd is None:
        protocol_fd = take_stdout()
    stdin_fd = sys.stdin.fileno()
    worker = Worker()
    lock = threading.Lock()

    def send(blob: bytes) -> None:
        data = memoryview(frame(blob))
        with lock:
            try:
                while data:
                    data = data[os.write(protocol_fd, data) :]
            except OSError:  # the parent is gone: nothing to report to
                worker.stopping.set()

    reply = _replier(send)
    reply(ready_event(max_message_bytes), None)
    # After `ready` (a client sees the worker alive at once), before the first request is read.
    worker.preload()
    reader = FrameReader(max_message_bytes)
    while not worker.stopping.is_set():
        data = os.read(stdin_fd, READ_CHUNK)
        if not data:
            break
        for message in reader.feed(data):
            worker.handle(message, reply)
    worker.close_sessions_of(None)  # (the parent is this transport's one owner: its job is cancelled)
    worker.wait_for_job(JOB_END_WAIT_S)
    return 0


class ListenError(TEDMError):
    """The address to serve on cannot be bound (in use, out of range, not this machine's)."""


def listen(host: str, port: int) -> Listener:
    """A listener on ``host:port``, or a :class:`ListenError` naming the address and why not."""
    if not 0 <= port <= 65535:
        raise ListenError(f"cannot listen on {host}:{port}: ports go from 0 to 65535")
    try:
        return Listener((host, port))
    except OverflowError as error:  # a port out of range, should one slip past the check above
        raise ListenError(f"cannot listen on {host}:{port}: {error}") from None
    except OSError as error:  # in use, an address of another machine, a host name that does not resolve
        raise ListenError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def serve_network(
    host: str,
    port: int,
    token: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    on_listening: Optional[Callable[[Tuple[str, int]], None]] = None,
) -> int:
    """Serve clients that know ``token`` on ``host:port`` until one says shutdown.

    Each connection is authenticated (an HMAC challenge in both directions, so the token never
    crosses the network) in its own thread before any request is read: a client without the
    token, or a silent one, never reaches the worker nor blocks other clients.
    """
    if len(token) < MIN_TOKEN_CHARACTERS:
        raise ValueError(f"the token must have at least {MIN_TOKEN_CHARACTERS} characters")
    key = token.encode("utf-8")
    # Bound before the preload (seconds of imports): a port in use or out of range is said at once.
    listener = listen(host, int(port))
    worker = Worker()
    worker.preload()
    address = listener.address
    log.warning("tedm serve: listening on %s:%d", address[0], address[1])
    if on_listening is not None:
        on_listening(address)

    def stop_listening() -> None:
        worker.stopping.set()
        # Closing a socket does not wake an accept() blocked in another thread; a connection does.
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=5):
            pass

    while True:
        try:
            connection = listener.accept()
        except OSError as error:
            if error.errno in TRANSIENT_ACCEPT_ERRORS:
                log.warning("tedm serve: cannot accept a connection now (%s)", error.strerror)
                time.sleep(0.5)  # (the silent connections holding the handles time out meanwhile)
                continue
            break
        if worker.stopping.is_set():
            connection.close()
            break
        threading.Thread(
            target=_serve_connection,
            args=(worker, connection, key, max_message_bytes, stop_listening),
            name="tedm connection",
            daemon=True,
        ).start()
    listener.close()
    worker.wait_for_job(JOB_END_WAIT_S)
    return 0


def _handshake(connection: Connection, key: bytes) -> None:
    """Both HMAC challenges, within :data:`HANDSHAKE_TIMEOUT_S`: past it the socket is shut
    down, which ends the blocked read (the Connection reads the descriptor itself, so a socket
    timeout would not reach it)."""
    watched = socket.socket(fileno=os.dup(connection.fileno()))
    lock, finished = threading.Lock(), [False]

    def give_up() -> None:
        with lock:
            if not finished[0]:
                watched.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(HANDSHAKE_TIMEOUT_S, give_up)
    timer.daemon = True
    timer.start()
    try:
        deliver_challenge(connection, key)
        answer_challenge(connection, key)
    finally:
        with lock:
            finished[0] = True
        timer.cancel()
        watched.close()


def _serve_connection(
    worker: Worker, connection: Connection, key: bytes, max_message_bytes: int, stop: Callable[[], None]
) -> None:
    try:
        _handshake(connection, key)
    except Exception as error:
        log.warning("tedm serve: refused a connection (%s)", type(error).__name__)
        connection.close()
        return
    lock = threading.Lock()

    def send(blob: bytes) -> None:
        with lock:
            try:
                connection.send_bytes(blob)
            except OSError:
                pass  # the client went away; its requests' results have nowhere to go

    reply = _replier(send)
    reply(ready_event(max_message_bytes), None)
    owner = object()  # this connection, as the owner of the sessions it opens
    try:
        while not worker.stopping.is_set():
            try:
                blob = connection.recv_bytes(max_message_bytes)
            except EOFError:
                break
            except OSError as error:  # above the size cap: the stream cannot be resynchronised
                reply(
                    error_event(None, ValueError(f"request refused: {error} (limit {max_message_bytes} bytes)")), None
                )
                break
            worker.handle(blob, reply, owner)
    finally:
        connection.close()
        # Nobody can reach them any more (a client that reconnects is a new worker generation to
        # it and opens its sessions again): their volumes and features would stay for ever.
        closed = worker.close_sessions_of(owner)
        if closed:
            log.warning("tedm serve: a client went away; closed its %d session(s)", closed)
        if worker.stopping.is_set():
            stop()


def _replier(send: Callable[[bytes], None]) -> Callable[[Dict[str, Any], Optional[Arrays]], None]:
    return lambda event, arrays: send_event(send, event, arrays)
