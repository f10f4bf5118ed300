"""tedm serve --listen: a port out of range or in use is refused in one line naming host:port,
before the worker preloads (seconds of imports)."""

from __future__ import annotations

import socket

import pytest

from tedm_core.cli import main
from tedm_core.serve import worker as worker_module


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("a-token-long-enough-for-the-worker\n")
    return path


@pytest.fixture
def preloads(monkeypatch):
    """The worker preloads seen (none may happen when the address cannot be bound)."""
    seen = []
    monkeypatch.setattr(worker_module.Worker, "preload", lambda self: seen.append(self))
    return seen


def test_a_port_out_of_range_is_refused_in_one_line(token_file, preloads, capsys):
    assert main(["serve", "--listen", "99999", "--token-file", str(token_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "99999" in err and "65535" in err
    assert not preloads


def test_an_address_in_use_is_named_and_refused_before_the_preload(token_file, preloads, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--listen", f"127.0.0.1:{port}", "--token-file", str(token_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err
    assert not preloads
