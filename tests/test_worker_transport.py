"""The worker transport's failure cases, through the real client and real processes or sockets:
output on the worker's stdout that is not the protocol, a request over the cap before `ready`,
a worker that dies while nobody polls, shutdown while the worker starts or will not stop, a remote
endpoint that never answers, a remote peer that reads slowly. The client is driven as the Slicer
module's QTimer drives it (poll(max_seconds=0.02, wait_seconds=0) every 50 ms, the event loop in
between), each loop bounded by a deadline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tedm_core.serve.client import WorkerClient, default_worker_command
from tedm_core.serve.protocol import decode_message, encode_message, frame

WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
START_S = 120  # a real worker's start-up (imports) on a loaded machine


def _ready_frame(max_request_bytes: int = 4096 << 20) -> bytes:
    header = {"event": "ready", "protocol": 1, "pid": 0, "tedm_core": "0", "max_request_bytes": max_request_bytes}
    return frame(encode_message(header))


def _stand_in(tmp_path, body: str, ready: bool = True) -> WorkerClient:
    """A client of a stand-in worker: a Python script that says ready (if ``ready``), then runs ``body``."""
    script = "import os, signal, sys, time\n"
    if ready:
        script += f"sys.stdout.buffer.write({_ready_frame()!r}); sys.stdout.flush()\n"
    script += body
    return WorkerClient.start_local(command=[sys.executable, "-c", script], log_path=tmp_path / "w.log", env=WORKER_ENV)


def _tick(client: WorkerClient) -> list:
    """One QTimer tick: a poll that never waits, then the event loop's 50 ms."""
    events = client.poll(max_seconds=0.02, wait_seconds=0.0)
    time.sleep(0.05)  # Qt's event loop between ticks
    return events


def _drive_until(client: WorkerClient, done, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"nothing came within {seconds} s"
        _tick(client)


def _wait_for(condition, seconds: float) -> None:
    """For something outside the client (a signal delivered, a server thread done)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.01)


# -- output that is not the protocol -----------------------------------------------------------------
def test_text_on_the_worker_stdout_before_the_protocol_ends_the_request_in_one_line(tmp_path):
    """A launcher that prints before it starts the worker (conda activation, a wrapper script): the
    request ends with a protocol error quoting the text, and the worker is stopped, at once."""
    command = ["sh", "-c", f"echo 'activating env'; exec {sys.executable} -m tedm_core.serve --stdio"]
    client = WorkerClient.start_local(command=command, log_path=tmp_path / "w.log", env=WORKER_ENV)
    process = client._connection.process
    events = []
    client.submit("status", on_event=events.append)
    _drive_until(client, lambda: events, 30)
    assert events[-1].kind == "error" and events[-1].error_kind == "protocol"
    assert events[-1].message == "the worker wrote non-protocol output: 'activating env\\n'"
    assert not client.alive and not client.pending
    _wait_for(lambda: process.poll() is not None, 5)  # stopped, not left reading its stdin
    generation = client.generation
    events.clear()
    client.submit("status", on_event=events.append)  # the next request tries a new worker
    assert client.generation == generation + 1
    _drive_until(client, lambda: events, 30)
    assert "activating env" in events[-1].message
    client.close()


def test_an_undecodable_event_after_ready_ends_every_pending_request(tmp_path):
    garbage = frame(b"\x00\x00\x00\x05{oops")
    answer = f"sys.stdin.buffer.read(1); sys.stdout.buffer.write({garbage!r}); sys.stdout.flush()\n"
    client = _stand_in(tmp_path, answer)
    process = client._connection.process
    events = []
    client.submit("status", on_event=events.append)
    client.submit("status", on_event=events.append)
    _drive_until(client, lambda: len(events) == 2, 30)
    assert {e.error_kind for e in events} == {"protocol"}
    assert events[0].message.startswith("the worker sent an unreadable event (")
    _wait_for(lambda: process.poll() is not None, 5)
    assert not client.alive


def test_a_frame_length_out_of_all_proportion_after_ready_is_not_waited_for(tmp_path):
    client = _stand_in(tmp_path, "sys.stdin.buffer.read(1); print('a stray print', flush=True); time.sleep(60)\n")
    events = []
    client.submit("status", on_event=events.append)
    _drive_until(client, lambda: events, 30)
    assert events[-1].error_kind == "protocol" and "a stray print" in events[-1].message
    assert not client.alive


def test_the_worker_gives_the_protocol_its_own_stdout_and_prints_to_stderr():
    code = (
        "import os; from tedm_core.serve.stdio import take_stdout; fd = take_stdout(); print('library noise');"
        " os.system('echo from a child process'); os.write(fd, b'protocol')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=WORKER_ENV, timeout=60)
    assert out.stdout == b"protocol"
    assert b"library noise" in out.stderr and b"from a child process" in out.stderr


# -- requests before `ready` --------------------------------------------------------------------------
def test_a_first_request_over_the_cap_ends_with_an_error_without_hello(tmp_path):
    """The first request after a start goes out only once `ready` (with the worker's cap) is read."""
    command = [*default_worker_command(), "--max-request-mb", "1"]
    client = WorkerClient.start_local(log_path=tmp_path / "w.log", env=WORKER_ENV, command=command)
    try:
        events = []
        client.submit("status", None, {"blob": np.zeros(2 << 20, np.uint8)}, on_event=events.append)
        _drive_until(client, lambda: events, START_S)
        assert events[-1].error_kind == "protocol", events[-1].fields
        assert "exceeds the worker's limit of 1048576" in events[-1].message
        assert client.alive and client.unsent_bytes == 0  # nothing of it was written
        assert client.request("status", timeout=START_S).result["busy"] is None
    finally:
        client.close()


def test_a_refusal_without_a_request_id_ends_the_pending_requests(tmp_path):
    refusal = frame(encode_message({"event": "error", "id": None, "kind": "protocol", "message": "too big"}))
    client = _stand_in(
        tmp_path,
        f"sys.stdin.buffer.read(1); sys.stdout.buffer.write({refusal!r}); sys.stdout.flush()\n"
        "sys.stdin.buffer.read()\n",
    )
    events = []
    client.submit("status", on_event=events.append)
    _drive_until(client, lambda: events, 30)
    assert events[-1].error_kind == "protocol" and events[-1].message == "the worker refused a request: too big"
    assert client.alive and not client.pending  # the stream is still in step: the worker goes on
    client.close()


def test_cancel_before_the_worker_started_ends_the_request_at_the_next_poll(tmp_path):
    client = _stand_in(tmp_path, "sys.stdin.buffer.read()\n", ready=False)
    events = []
    rid = client.submit("segment", {"session": "s"}, on_event=events.append)
    client.cancel(rid)
    _tick(client)
    assert [(e.request_id, e.error_kind) for e in events] == [(rid, "cancelled")]
    client.close()


# -- a worker that dies while idle ---------------------------------------------------------------------
def test_a_worker_that_dies_while_idle_is_seen_before_the_next_request(tmp_path):
    client = WorkerClient.start_local(log_path=tmp_path / "w.log", env=WORKER_ENV)
    try:
        assert client.request("status", timeout=START_S).result["busy"] is None
        pid, generation = client.pid, client.generation
        os.kill(pid, signal.SIGKILL)  # nobody polls: the module's timer runs only during an operation
        _wait_for(lambda: not client.alive, 5)
        assert client.request("status", timeout=START_S).result["busy"] is None
        assert client.generation == generation + 1 and client.pid != pid
    finally:
        client.close()


def test_requests_of_a_worker_that_died_unpolled_end_when_the_next_one_starts(tmp_path):
    client = _stand_in(tmp_path, "sys.stdin.buffer.read()\n")
    _drive_until(client, lambda: client.worker_info, 30)
    events = []
    rid = client.submit("segment", {"session": "s"}, on_event=events.append)
    os.kill(client.pid, signal.SIGKILL)
    _wait_for(lambda: not client.alive, 5)
    client.submit("status", on_event=lambda event: None)  # a new worker
    assert client.generation == 2
    _tick(client)
    assert [(e.request_id, e.error_kind) for e in events] == [(rid, "worker_died")]
    assert "killed by signal 9" in events[0].message
    client.close()


# -- shutdown ---------------------------------------------------------------------------------------------
def test_close_while_the_worker_starts_does_not_wait_for_it(tmp_path):
    client = WorkerClient.start_local(log_path=tmp_path / "w.log", env=WORKER_ENV)
    process = client._connection.process
    client.submit("status", on_event=lambda event: None)
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 1.0
    assert process.poll() is not None and not client.alive


def test_close_of_an_idle_worker_lets_it_exit_by_itself(tmp_path):
    client = WorkerClient.start_local(log_path=tmp_path / "w.log", env=WORKER_ENV)
    process = client._connection.process
    client.request("status", timeout=START_S)
    started = time.monotonic()
    client.close(grace_s=10)
    assert time.monotonic() - started < 5
    assert process.returncode == 0  # it read `shutdown` and exited, nothing killed it


def test_close_of_a_worker_that_will_not_stop_is_bounded(tmp_path):
    client = _stand_in(tmp_path, "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)\n")
    process = client._connection.process
    _drive_until(client, lambda: client.worker_info, 30)
    client.submit("segment", {"session": "s"}, on_event=lambda event: None)  # never answered
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 2.0
    assert process.returncode == -signal.SIGKILL


# -- remote workers --------------------------------------------------------------------------------------
def test_connecting_to_an_endpoint_that_never_answers_times_out():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # the kernel completes the TCP connection; nobody ever speaks
        address = f"127.0.0.1:{server.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="did not complete the handshake in time"):
            WorkerClient.connect(address, "x" * 32, timeout=0.5)
        assert time.monotonic() - started < 2.0


def test_connecting_to_something_else_is_refused_in_one_line():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def banner() -> None:
            peer, _ = server.accept()
            with peer:
                peer.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                try:
                    peer.recv(1)  # until the client gives up
                except OSError:
                    pass

        thread = threading.Thread(target=banner, daemon=True)
        thread.start()
        with pytest.raises(ConnectionError, match=r"is not a TEDM worker .*SSH-2\.0-OpenSSH"):
            WorkerClient.connect(f"127.0.0.1:{server.getsockname()[1]}", "x" * 32, timeout=5)


def test_a_remote_request_goes_out_in_pieces_and_a_peer_that_leaves_is_seen():
    """A remote worker that reads slowly (a slow link, a busy machine): submit and each poll
    return within their budget, the request arrives whole; when the peer closes, the client
    knows it without polling."""
    from multiprocessing.connection import Listener

    token = "t" * 32
    go, done = threading.Event(), threading.Event()
    received = []
    with Listener(("127.0.0.1", 0), authkey=token.encode()) as listener:

        def serve() -> None:
            with listener.accept() as peer:
                peer.send_bytes(encode_message({"event": "ready", "protocol": 1, "max_request_bytes": 1 << 30}))
                go.wait(30)
                received.append(peer.recv_bytes())
                done.wait(30)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client = WorkerClient.connect("{}:{}".format(*listener.address), token, timeout=10)
        _drive_until(client, lambda: client.worker_info, 30)
        volume = np.arange(16 << 20, dtype=np.float32).reshape(64, 512, 512)
        started = time.monotonic()
        client.submit("open_session", {"session": "s"}, {"volume": volume}, on_event=lambda event: None)
        assert time.monotonic() - started < 0.5 and client.unsent_bytes > 32 << 20
        for _ in range(3):
            started = time.monotonic()
            _tick(client)
            assert time.monotonic() - started < 0.3
        go.set()
        _drive_until(client, lambda: not client.unsent_bytes, 60)
        _wait_for(lambda: received, 30)
        header, arrays = decode_message(received[0])
        assert header["op"] == "open_session" and np.array_equal(arrays["volume"], volume)
        assert client.alive
        done.set()
        thread.join(30)
        _wait_for(lambda: not client.alive, 5)
        with pytest.raises(ConnectionError, match="was lost"):
            client.submit("status")
        client.close()
