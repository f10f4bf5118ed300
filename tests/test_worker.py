"""The worker protocol against real worker processes (`python -m tedm_core.serve`): segment, fit,
refine and uncertain slices; cancel mid-volume; kill -9 mid-job; malformed requests; the
network endpoint and its token. The client is driven by polling, as the Slicer module's QTimer
drives it: nothing here sleeps in Python to let a thread run."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import affine_zoo, assert_labels_agree_across_processes

WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 240


def _volume(slices: int = 12, size: int = 40):
    k, j, i = np.mgrid[:slices, :size, :size]
    sphere = ((k - slices / 2) ** 2 * 4 + (j - size / 2) ** 2 + (i - size / 2) ** 2) < (size * 0.3) ** 2
    array = np.where(sphere, 200.0, 20.0) + np.random.default_rng(0).normal(0, 5, sphere.shape)
    return array.astype(np.int16), sphere.astype(np.uint8)


@pytest.fixture
def client(tmp_path):
    from tedm_core.serve.client import WorkerClient

    worker = WorkerClient.start_local(log_path=tmp_path / "worker.log", env=WORKER_ENV)
    yield worker
    worker.close()
    assert not worker.alive


def _open(client, name: str, array: np.ndarray, matrix=None) -> None:
    matrix = affine_zoo()["oblique"] if matrix is None else matrix
    client.request("open_session", {"session": name, "ijk_to_ras": matrix.tolist()}, {"volume": array}, TIMEOUT)


def test_segment_fit_refine_uncertain_through_the_worker(client, tiny_bundle_dir, tiny_backbone_dir):
    from tedm_core.bundle import load_bundle
    from tedm_core.io.volumes import volume_from_array
    from tedm_core.pipelines.interactive import InteractiveSession

    array, sphere = _volume()
    assert client.hello()["protocol"] == 1
    _open(client, "s1", array)

    events = []
    segmented = client.request(
        "segment",
        {"session": "s1", "model": str(tiny_bundle_dir), "axis": "k", "device": "cpu"},
        None,
        TIMEOUT,
        events.append,
    )
    expected = InteractiveSession(volume_from_array(array, affine_zoo()["oblique"])).segment(
        load_bundle(tiny_bundle_dir), axis="k", device="cpu"
    )
    assert_labels_agree_across_processes(segmented.arrays["labels"], expected.labels)
    assert segmented.result["class_names"] == ["background", "disc"]
    assert any(e.kind == "progress" for e in events) and any(e.kind == "log" for e in events)

    drawn = np.zeros_like(sphere)
    drawn[[4, 8]] = sphere[[4, 8]]
    fitted = client.request(
        "fit",
        {
            "session": "s1",
            "model": str(tiny_backbone_dir),
            "class_names": ["background", "sphere"],
            "axis": "k",
            "steps": 20,
        },
        {"labels": drawn},
        TIMEOUT,
    )
    labels = fitted.arrays["labels"]
    assert fitted.result["training_slices"] == [4, 8]
    np.testing.assert_array_equal(labels[[4, 8]], sphere[[4, 8]])

    edited = labels.copy()
    edited[6] = sphere[6]
    edited[6, 0, 0] = 1 - edited[6, 0, 0]
    refined = client.request("refine", {"session": "s1", "steps": 5}, {"labels": edited}, TIMEOUT)
    assert refined.result["changed_slices"] == [6]
    np.testing.assert_array_equal(refined.arrays["labels"][[4, 6, 8]], edited[[4, 6, 8]])

    ranked = client.request("uncertain_slices", {"session": "s1", "count": 3}, None, TIMEOUT).result["slices"]
    assert len(ranked) == 3 and {r["index"] for r in ranked}.isdisjoint({4, 6, 8})
    assert ranked[0]["centre_ijk"][2] == pytest.approx(ranked[0]["index"])

    saved = client.request(
        "save_model", {"session": "s1", "path": str(client.log_path.parent / "refined")}, None, TIMEOUT
    )
    assert os.path.isfile(os.path.join(saved.result["path"], "bundle.json"))
    assert client.request("close_session", {"session": "s1"}).result == {"closed": True}


def test_cancel_mid_volume_stops_within_a_second(client, tiny_bundle_dir):
    array, _ = _volume(slices=400, size=64)
    _open(client, "big", array, np.eye(4))
    started = []
    rid = client.submit(
        "segment",
        {"session": "big", "model": str(tiny_bundle_dir), "axis": "k", "device": "cpu"},
        on_event=lambda e: started.append(e) if e.kind == "progress" and "slice" in e.message else None,
    )
    while not started:  # a few slices done: the UNet is busy in the middle of the volume
        client.poll(wait_seconds=0.05)
    tic = time.monotonic()
    client.cancel(rid)
    event = client.wait(rid, TIMEOUT)
    latency = time.monotonic() - tic
    assert event.kind == "error" and event.error_kind == "cancelled", event.fields
    assert latency < 1.0, f"cancel took {latency:.2f} s"
    assert client.request("status").result["busy"] is None  # ready for the next job

    # Closing the session a job works on (Slicer's scene closed) cancels the job too.
    events = []
    client.submit(
        "segment",
        {"session": "big", "model": str(tiny_bundle_dir), "axis": "k", "device": "cpu"},
        on_event=events.append,
    )
    while not any(e.kind == "progress" and "slice" in e.message for e in events):
        client.poll(wait_seconds=0.05)
    assert client.request("close_session", {"session": "big"}).result == {"closed": True}
    while not events[-1].final:
        client.poll(wait_seconds=0.05)
    assert events[-1].error_kind == "cancelled"
    assert client.request("status").result == {"busy": None, "sessions": [], "models": [str(tiny_bundle_dir)]}


def test_kill_minus_nine_mid_job_is_reported_and_the_worker_restarts(client, tiny_bundle_dir):
    array, _ = _volume(slices=400, size=64)
    _open(client, "big", array, np.eye(4))
    rid = client.submit("segment", {"session": "big", "model": str(tiny_bundle_dir), "axis": "k", "device": "cpu"})
    first_pid, generation = client.pid, client.generation
    client.poll(wait_seconds=0.5)
    os.kill(first_pid, signal.SIGKILL)
    event = client.wait(rid, TIMEOUT)
    assert event.kind == "error" and event.error_kind == "worker_died"
    assert "killed by signal 9" in event.message
    assert not client.alive
    # The next request starts a new worker; the old one's sessions are gone, said in one line.
    status = client.request("status", timeout=TIMEOUT).result
    assert client.generation == generation + 1 and client.pid != first_pid
    assert status["sessions"] == []
    from tedm_core.serve.client import WorkerError

    with pytest.raises(WorkerError, match="no open session 'big'"):
        client.request("uncertain_slices", {"session": "big"}, timeout=TIMEOUT)


def _raw(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(header)) + header + payload


MALFORMED = {
    "not a message": b"\x00\x01",
    "header length beyond the message": struct.pack(">I", 999) + b"{}",
    "header not JSON": _raw(b"{op: segment"),
    "header not UTF-8": _raw(b"\xff\xfe{}"),
    "header a JSON list": _raw(b'["op", "status"]'),
    "no op": _raw(b'{"id": "x1"}'),
    "unknown op": _raw(b'{"id": "x2", "op": "format_disk"}'),
    "op not a string": _raw(b'{"id": "x3", "op": 7}'),
    "no id": _raw(b'{"op": "status"}'),
    "missing field": _raw(b'{"id": "x4", "op": "segment", "model": "m"}'),
    "field of the wrong type": _raw(b'{"id": "x5", "op": "uncertain_slices", "session": 12}'),
    "unknown session": _raw(b'{"id": "x6", "op": "refine", "session": "nobody"}'),
    "object dtype array": _raw(
        b'{"id": "x7", "op": "status", "arrays": [{"name": "a", "dtype": "|O", "shape": [1]}]}', b"x" * 8
    ),
    "array longer than the payload": _raw(
        b'{"id": "x8", "op": "status", "arrays": [{"name": "a", "dtype": "<f4", "shape": [100]}]}', b"\x00" * 16
    ),
    "negative shape": _raw(b'{"id": "x9", "op": "status", "arrays": [{"name": "a", "dtype": "<f4", "shape": [-1]}]}'),
    "bytes after the arrays": _raw(b'{"id": "x10", "op": "status"}', b"trailing"),
    "volume with 2 dimensions": _raw(
        b'{"id": "x11", "op": "open_session", "session": "s", "ijk_to_ras": [[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]],'
        b' "arrays": [{"name": "volume", "dtype": "<f4", "shape": [2, 2]}]}',
        b"\x00" * 16,
    ),
    "singular ijk_to_ras": _raw(
        b'{"id": "x12", "op": "open_session", "session": "s", "ijk_to_ras": [[0,0,0,0],[0,0,0,0],[0,0,0,0],[0,0,0,1]],'
        b' "arrays": [{"name": "volume", "dtype": "<f4", "shape": [1, 2, 2]}]}',
        b"\x00" * 16,
    ),
    "steps not positive": _raw(b'{"id": "x13", "op": "refine", "session": "s0", "steps": -5}'),
}


def test_malformed_requests_get_an_error_event_and_the_worker_keeps_serving(client):
    client.hello()
    _open(client, "s0", _volume(slices=3, size=8)[0])
    for name, blob in MALFORMED.items():
        client._connection.send(blob)
        errors = []
        while not errors:
            errors = [e for e in client.poll(wait_seconds=0.1) if e.kind == "error"]
        assert errors[0].error_kind in ("protocol", "user"), (name, errors[0].fields)
        assert "\n" not in errors[0].message, name
        assert client.request("status", timeout=TIMEOUT).result["busy"] is None, name  # still serving
    assert client.alive


def _error_without_id(client):
    while True:
        errors = [e for e in client.poll(wait_seconds=0.1) if e.kind == "error" and e.request_id is None]
        if errors:
            return errors[0]


def test_a_request_above_the_size_cap_is_refused_and_the_stream_stays_in_step(tmp_path):
    from tedm_core.serve.client import WorkerClient, WorkerError, default_worker_command
    from tedm_core.serve.protocol import encode_message

    command = [*default_worker_command(), "--max-request-mb", "1"]
    client = WorkerClient.start_local(log_path=tmp_path / "w.log", env=WORKER_ENV, command=command)
    try:
        client.hello()
        big = {"blob": np.zeros(2 << 20, np.uint8)}
        with pytest.raises(WorkerError, match="exceeds the worker's limit"):  # the client knows the cap
            client.request("status", None, big, timeout=TIMEOUT)
        client._connection.send(encode_message({"op": "status", "id": "big"}, big))  # a client that does not
        assert "exceeds the limit" in _error_without_id(client).message
        assert client.request("status", timeout=TIMEOUT).result["busy"] is None
    finally:
        client.close()


@pytest.fixture
def network_worker(tmp_path):
    token = "correct-horse-battery-staple-0123"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tedm_core.serve",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            str(token_file),
            "--max-request-mb",
            "1",
        ],
        stderr=subprocess.PIPE,
        env=WORKER_ENV,
        text=True,
    )
    line = process.stderr.readline()  # "tedm serve: listening on 127.0.0.1:PORT"
    assert "listening on" in line, line
    address = line.split("listening on")[1].strip()
    yield address, token, process
    process.kill()
    process.wait()


def test_network_endpoint_refuses_a_missing_or_wrong_token(network_worker):
    from multiprocessing.connection import AuthenticationError

    from tedm_core.serve.client import WorkerClient

    address, token, process = network_worker
    with pytest.raises(AuthenticationError):
        WorkerClient.connect(address, "wrong-token-wrong-token-wrong")
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as raw:  # no token at all: a bare request
        raw.sendall(struct.pack("!i", 40) + _raw(b'{"id": "r", "op": "shutdown"}').ljust(40))
        raw.settimeout(30)
        try:
            while raw.recv(4096):
                pass  # the challenge, then the connection closes without any request read
        except OSError:
            pass
    client = WorkerClient.connect(address, token)
    try:
        assert client.hello()["protocol"] == 1
        from tedm_core.serve.protocol import encode_message

        client._connection.send(encode_message({"op": "status", "id": "big"}, {"blob": np.zeros(2 << 20, np.uint8)}))
        assert "request refused" in _error_without_id(client).message
    finally:
        client.close()
    assert process.poll() is None  # refused connections never stop the worker
    later = WorkerClient.connect(address, token)
    assert later.request("shutdown", timeout=TIMEOUT).result == {"stopping": True}
    later.close()
    assert process.wait(30) == 0


def test_a_remote_client_that_goes_away_leaves_no_session_behind(network_worker):
    """Sessions hold a volume and its features (GBs on a shared GPU machine): a client that
    disconnects, whatever it forgot to close, leaves none; those of other clients stay."""
    from tedm_core.serve.client import WorkerClient

    address, token, _ = network_worker
    volume = _volume(slices=3, size=8)[0]
    staying = WorkerClient.connect(address, token)
    leaving = WorkerClient.connect(address, token)
    try:
        _open(staying, "stays", volume)
        _open(leaving, "leaves", volume)
        assert staying.request("status", timeout=TIMEOUT).result["sessions"] == ["leaves", "stays"]
        leaving.close()  # without close_session
        deadline = time.monotonic() + 10  # the server notices as its connection thread reads EOF
        while staying.request("status", timeout=TIMEOUT).result["sessions"] != ["stays"]:
            assert time.monotonic() < deadline, "the session of the client that left is still open"
            staying.poll(wait_seconds=0.05)
    finally:
        staying.close()
        leaving.close()


def test_the_client_never_imports_torch():
    code = "import sys; import tedm_core.serve.client, tedm_core.choices; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pretrain_a_backbone_on_the_open_volumes(client, tmp_path):
    from tedm_core.model.checkpoint import load_backbone

    array, _ = _volume(slices=6, size=32)
    _open(client, "a", array)
    _open(client, "b", array[::-1].copy())
    out = tmp_path / "backbone"
    fields = {"sessions": ["a", "b"], "out": str(out), "preset": "tiny", "steps": 3, "intensity": "brain", "axis": "k"}
    events = []
    assert client.request("pretrain", fields, None, TIMEOUT, events.append).result == {"path": str(out)}
    backbone = load_backbone(out)
    assert backbone.steps_trained == 3 and backbone.channel_names == ["image"]
    assert any(e.kind == "progress" and "pretraining step 3/3" in e.message for e in events)


def test_a_worker_of_another_protocol_version_is_refused_in_one_line(tmp_path):
    """A stand-in worker that announces protocol 99 (e.g. an older tedm_core in another Python)."""
    from tedm_core.serve.client import WorkerClient, WorkerError

    script = (
        "import sys, json, struct; h = json.dumps({'event': 'ready', 'protocol': 99, 'tedm_core': '9.9', 'arrays': []})"
        ".encode(); m = struct.pack('>I', len(h)) + h; sys.stdout.buffer.write(struct.pack('>Q', len(m)) + m);"
        " sys.stdout.flush(); sys.stdin.read()"
    )
    client = WorkerClient.start_local(log_path=tmp_path / "w.log", command=[sys.executable, "-c", script])
    with pytest.raises(WorkerError, match="speaks protocol 99 .*this client 1") as error:
        client.request("status", timeout=TIMEOUT)
    assert error.value.kind == "protocol" and not client.alive


def test_a_large_request_goes_out_in_pieces_without_blocking_the_caller(tmp_path):
    """A GUI thread submits a 96 MB volume to a worker busy elsewhere (here: one that reads
    nothing yet): submit and every poll return within their budget, and the request is written
    as the worker reads it, arriving whole."""
    from tedm_core.serve.client import WorkerClient
    from tedm_core.serve.protocol import FrameReader, decode_message

    # A stand-in worker that says ready, then reads nothing until the test creates a file (a job
    # in its way).
    go = tmp_path / "go"
    out = tmp_path / "received.bin"
    script = (
        "import os, sys, time\n"
        f"sys.stdout.buffer.write({_ready_frame()!r}); sys.stdout.flush()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "data = sys.stdin.buffer.read()\n"
        f"open({str(out)!r}, 'wb').write(data)\n"
    )
    worker = WorkerClient.start_local(
        command=[sys.executable, "-c", script], log_path=tmp_path / "w.log", env=WORKER_ENV
    )
    volume = np.arange(24 << 20, dtype=np.float32).reshape(96, 512, 512)
    while not worker.worker_info:  # its `ready` read: requests go out at once
        worker.poll(max_seconds=0.02, wait_seconds=0.05)
    started = time.monotonic()
    worker.submit("open_session", {"session": "s"}, {"volume": volume}, on_event=lambda event: None)
    assert time.monotonic() - started < 0.5, "submit returned without waiting for the worker"
    assert worker.unsent_bytes > 90 << 20
    for _ in range(3):
        started = time.monotonic()
        worker.poll(max_seconds=0.02)
        assert time.monotonic() - started < 0.25, "a poll never waits long for the pipe"
    go.touch()
    polls = 0
    while worker.unsent_bytes and polls < 5000:
        worker.poll(max_seconds=0.02, wait_seconds=0.0)
        polls += 1
    assert worker.unsent_bytes == 0, "the request went out over the polls"
    worker.close(grace_s=30)
    message, shutdown = FrameReader(1 << 40).feed(out.read_bytes())  # then close() said shutdown
    header, arrays = decode_message(message)
    assert header["op"] == "open_session" and np.array_equal(arrays["volume"], volume)


def _ready_frame(max_request_bytes: int = 4096 << 20) -> bytes:
    from tedm_core.serve.protocol import encode_message, frame

    header = {"event": "ready", "protocol": 1, "pid": 0, "tedm_core": "0", "max_request_bytes": max_request_bytes}
    return frame(encode_message(header))


def test_the_frame_reader_hands_over_a_whole_buffered_message_without_copying():
    """A large result that ends the buffered bytes is handed over as the reader's own buffer (no
    copy on the GUI thread); what the reader reads next never changes it, and messages split
    across feeds or sharing one feed still come out whole and in order."""
    from tedm_core.serve.protocol import FrameReader, decode_message, encode_message, frame

    labels = np.arange(3 << 20, dtype=np.uint32).reshape(3, 1024, 1024)
    big = frame(encode_message({"event": "result", "id": "1"}, {"labels": labels}))
    small = [frame(encode_message({"event": "log", "id": str(n)})) for n in range(3)]
    reader = FrameReader(1 << 40)
    stream = small[0] + big + small[1] + small[2]
    messages = []
    for start in range(0, len(stream), 1 << 20):  # 1 MiB reads, as the client's
        messages += reader.feed(stream[start : start + (1 << 20)])
    decoded = [decode_message(m) for m in messages]
    assert [h["id"] for h, _ in decoded] == ["0", "1", "1", "2"]
    assert np.array_equal(decoded[1][1]["labels"], labels)

    reader = FrameReader(1 << 40)
    first, handed = reader.feed(small[0][:5]) + reader.feed(small[0][5:] + big[:100]) + reader.feed(big[100:])
    assert decode_message(first)[0]["id"] == "0"
    assert isinstance(handed, memoryview), "the last message of the buffer is not copied"
    header, arrays = decode_message(handed)
    reader.feed(small[1] + small[2][:7])  # the reader goes on in a buffer of its own
    assert header["id"] == "1" and np.array_equal(arrays["labels"], labels)


def test_sessions_share_one_feature_budget_and_the_oldest_cache_goes_first(tiny_bundle_dir):
    """Segmenting volume after volume (each into a new node in Slicer) keeps a session each; their
    feature caches together stay within the worker's budget, the oldest dropped first, and a
    session whose cache was dropped still Refines (the UNet runs again)."""
    import queue

    from tedm_core.serve.protocol import encode_message
    from tedm_core.serve.worker import Worker

    worker = Worker()
    events: queue.Queue = queue.Queue()

    def call(op, fields, arrays=None):
        request_id = f"{op}-{events.qsize()}-{time.monotonic()}"
        worker.handle(encode_message({"id": request_id, "op": op, **fields}, arrays), lambda e, a: events.put((e, a)))
        logs = []
        while True:
            event, result_arrays = events.get(timeout=TIMEOUT)
            if event.get("id") != request_id:
                continue
            if event["event"] == "log":
                logs.append(event["message"])
            elif event["event"] in ("result", "error"):
                assert event["event"] == "result", event
                return event["result"], result_arrays, logs

    array, _ = _volume()
    for name in ("a", "b", "c"):
        call("open_session", {"session": name, "ijk_to_ras": affine_zoo()["oblique"].tolist()}, {"volume": array})
    _, _, logs = call("segment", {"session": "a", "model": str(tiny_bundle_dir), "axis": "k", "device": "cpu"})
    one = worker.sessions["a"].feature_cache_nbytes
    assert one > 0 and not any("Freed" in line for line in logs)
    worker.feature_budget_bytes = int(2.5 * one)  # room for two sessions' caches
    call("segment", {"session": "b", "model": str(tiny_bundle_dir), "axis": "k", "device": "cpu"})
    _, _, logs = call("segment", {"session": "c", "model": str(tiny_bundle_dir), "axis": "k", "device": "cpu"})
    held = {name: worker.sessions[name].feature_cache_nbytes for name in "abc"}
    assert held["a"] == 0 and held["b"] > 0 and held["c"] > 0, held
    assert any(line.startswith("Freed the cached features of an earlier segmentation") for line in logs), logs
    result, arrays, _ = call("segment", {"session": "a", "model": str(tiny_bundle_dir), "axis": "k", "device": "cpu"})
    labels = arrays["labels"].copy()
    labels[6, :3, :3] = 1 - labels[6, :3, :3]
    result, _, _ = call("refine", {"session": "a", "steps": 2}, {"labels": labels})
    assert result["changed_slices"] == [6]
    assert worker.sessions["b"].feature_cache_nbytes == 0, "the least recently used one went"


def _worker_whose_segment_waits_for_cancel():
    """A worker in this process whose segment job is a stand-in that waits to be cancelled, and
    the event it sets when it has started."""
    import threading

    from tedm_core.errors import Cancelled
    from tedm_core.serve.worker import Worker

    worker = Worker()
    started = threading.Event()

    def waits_for_cancel(request, arrays, reporter):
        started.set()
        if not worker._job.cancel.wait(TIMEOUT):
            raise AssertionError("never cancelled")
        raise Cancelled("cancelled")

    worker._jobs["segment"] = waits_for_cancel
    return worker, started


def test_a_cancel_reaches_only_the_job_of_its_own_connection():
    """Two Slicer sessions on one network worker: request IDs are each client's own counter, so
    both send "1.2"; one user's Cancel (with or without a target) must not stop the other's job."""
    import threading

    from tedm_core.serve.protocol import encode_message

    worker, started = _worker_whose_segment_waits_for_cancel()
    ended = threading.Event()
    events = {"a": [], "b": []}

    def reply_to(name):
        def reply(event, arrays):
            events[name].append(event)
            if event.get("id") == "1.2" and event["event"] != "progress":
                ended.set()

        return reply

    first, second = object(), object()  # the two connections (server.py passes one object per connection)
    worker.handle(encode_message({"op": "segment", "id": "1.2"}), reply_to("a"), first)
    assert started.wait(TIMEOUT)
    worker.handle(encode_message({"op": "cancel", "id": "1.3", "target": "1.2"}), reply_to("b"), second)
    worker.handle(encode_message({"op": "cancel", "id": "1.4"}), reply_to("b"), second)
    assert [event["result"] for event in events["b"]] == [{"cancelled": False}] * 2
    assert not ended.is_set() and not worker._job.cancel.is_set(), "the other connection's job runs on"
    worker.handle(encode_message({"op": "cancel", "id": "1.3", "target": "1.2"}), reply_to("a"), first)
    assert ended.wait(TIMEOUT)
    assert events["a"][0]["result"] == {"cancelled": True}
    assert events["a"][-1]["event"] == "error" and events["a"][-1]["kind"] == "cancelled"


def test_a_session_closed_while_its_job_runs_is_closed_when_the_job_ends():
    """Its segmenter holds a GPU copy of the model: the job's thread closes the session (which
    frees it) as the job ends, rather than leaving it to the garbage collector's timing."""
    import threading

    from tedm_core.serve.protocol import encode_message

    worker, started = _worker_whose_segment_waits_for_cancel()
    ended = threading.Event()

    def reply(event, arrays):
        if event.get("id") == "job" and event["event"] == "error":
            ended.set()

    volume = _volume(slices=3, size=8)[0]
    opened = {"op": "open_session", "id": "open", "session": "s", "ijk_to_ras": np.eye(4).tolist()}
    worker.handle(encode_message(opened, {"volume": volume}), reply)
    session, closed = worker.sessions["s"], []
    real_close = session.close
    session.close = lambda: closed.append(threading.current_thread().name) or real_close()
    worker.handle(encode_message({"op": "segment", "id": "job", "session": "s"}), reply)
    assert started.wait(TIMEOUT)
    worker.handle(encode_message({"op": "close_session", "id": "close", "session": "s"}), reply)
    assert ended.wait(TIMEOUT) and "s" not in worker.sessions
    assert closed == ["tedm segment"], "closed once, by the job's thread as it ended"


def test_a_connection_that_goes_away_takes_its_job_with_it_and_a_stopped_worker_waits_for_it():
    """A job on no session (a pretraining) started by a network client that then went away was
    left running, and no other client may cancel it: it held the worker. The worker told to stop
    waits for the cancelled job to end (a process exiting under a torch operation aborts)."""
    from tedm_core.serve.protocol import encode_message

    worker, started = _worker_whose_segment_waits_for_cancel()
    gone, other = object(), object()
    worker.handle(encode_message({"op": "segment", "id": "1.2"}), lambda event, arrays: None, gone)
    assert started.wait(TIMEOUT)
    worker.close_sessions_of(other)
    assert not worker._job.cancel.is_set(), "another connection's leaving cancels nothing of it"
    worker.close_sessions_of(gone)
    assert worker.wait_for_job(TIMEOUT) and worker._job is None


def test_an_undecodable_message_is_a_protocol_error_whatever_breaks_it():
    """JSON nested past the parser's depth, or array sizes that overflow, raised RecursionError /
    ValueError / OverflowError out of the client's poll; every malformed message is a ProtocolError."""
    import json
    import struct

    from tedm_core.serve.protocol import ProtocolError, decode_message

    def message(header_text: str) -> bytes:
        data = header_text.encode()
        return struct.pack(">I", len(data)) + data

    nested = '{"a": ' * 5000 + "1" + "}" * 5000
    too_big = json.dumps({"id": "x", "arrays": [{"name": "a", "dtype": "uint8", "shape": [2**62, 2**62]}]})
    beyond = json.dumps({"id": "x", "arrays": [{"name": "a", "dtype": "uint8", "shape": [2**70]}]})
    for text in (nested, too_big, beyond):
        with pytest.raises(ProtocolError):
            decode_message(message(text))


def test_a_network_client_that_never_answers_the_challenge_is_dropped(monkeypatch):
    """Each silent connection held a thread and a file handle for ever, until the server could
    accept no one (and then it stopped serving). The handshake now has a deadline."""
    import socket
    from multiprocessing.connection import Connection

    from tedm_core.serve import server

    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT_S", 0.5)
    ours, silent = socket.socketpair()
    try:
        connection = Connection(os.dup(ours.fileno()))
        tic = time.monotonic()
        with pytest.raises((EOFError, OSError)):
            server._handshake(connection, b"a-token-long-enough-for-the-worker")
        assert time.monotonic() - tic < 10
        connection.close()
    finally:
        ours.close()
        silent.close()
