"""Where the TEDM worker runs, and how the module starts or reaches it.

The model never runs in Slicer's own process: torch and CUDA are imported by a worker process
(``python -m tedm_core.serve --stdio``) that the module starts, or by a ``tedm serve --listen``
worker on another machine. Slicer's process imports only ``tedm_core.serve.client`` (numpy and
the standard library), so the module opens instantly and a crash or an out-of-memory error in
torch never takes an unsaved segmentation down with it.

Settings (application settings, so they hold for every scene):

- ``TEDMSlicer/WorkerPython``: the Python that runs a local worker; empty = Slicer's own
  (``PythonSlicer``), where the module installs the requirements at first use. Any other
  Python (a conda environment with a CUDA build of torch, say) must have ``tedm-core``
  installed; nothing is installed into it.
- ``TEDMSlicer/WorkerEndpoint``: ``host:port`` of a remote ``tedm serve --listen`` worker;
  empty = a local worker.
- ``TEDMSlicer/WorkerTokenFile``: the file holding that worker's token. The path is saved, never
  the token itself, so the secret does not end up in Slicer's settings file.

Qt-free: the settings store is anything with ``value(key, default)`` and ``setValue(key, value)``
(``qt.QSettings`` in Slicer, a dict-backed stand-in in tests).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

SETTINGS_PYTHON = "TEDMSlicer/WorkerPython"
SETTINGS_ENDPOINT = "TEDMSlicer/WorkerEndpoint"
SETTINGS_TOKEN_FILE = "TEDMSlicer/WorkerTokenFile"


@dataclass
class WorkerSettings:
    python: str = ""  # empty: Slicer's own Python
    endpoint: str = ""  # empty: a local worker process
    token_file: str = ""

    @classmethod
    def load(cls, store: Any) -> WorkerSettings:
        def text(key: str) -> str:
            value = store.value(key, "")
            return "" if value is None else str(value).strip()

        return cls(text(SETTINGS_PYTHON), text(SETTINGS_ENDPOINT), text(SETTINGS_TOKEN_FILE))

    def save(self, store: Any) -> None:
        store.setValue(SETTINGS_PYTHON, self.python.strip())
        store.setValue(SETTINGS_ENDPOINT, self.endpoint.strip())
        store.setValue(SETTINGS_TOKEN_FILE, self.token_file.strip())

    @property
    def remote(self) -> bool:
        return bool(self.endpoint.strip())

    def worker_python(self) -> str:
        return self.python.strip() or slicer_python()

    def runs_in_slicer_python(self) -> bool:
        """Whether the worker is Slicer's own Python (then torch and the requirements are installed
        there at first use); a remote worker or another Python brings its own."""
        if self.remote:
            return False
        if not self.python.strip():
            return True
        try:
            return os.path.samefile(self.python.strip(), slicer_python())
        except OSError:
            return False

    def describe(self) -> str:
        if self.remote:
            return f"the remote worker at {self.endpoint.strip()}"
        if self.runs_in_slicer_python():
            return "a worker process in Slicer's Python"
        return f"a worker process in {self.python.strip()}"


def slicer_python() -> str:
    """Slicer's own Python interpreter: ``PythonSlicer`` (it sets Slicer's library paths), found on
    the PATH that the Slicer launcher sets; ``sys.executable`` outside Slicer (scripts, tests)."""
    found = shutil.which("PythonSlicer")
    return found or sys.executable


def tedm_core_search_path() -> Optional[str]:
    """The folder holding the ``tedm_core`` package Slicer's process imports (the extension's
    qt-scripted-modules folder, a checkout, or site-packages), so that a worker in Slicer's
    Python, or in another Python without ``tedm-core``'s own copy, runs the same code."""
    spec = importlib.util.find_spec("tedm_core")
    if spec is None or not spec.origin:
        return None
    return str(Path(spec.origin).resolve().parent.parent)


# What Slicer's launcher sets for its own Python; another interpreter started with them loads
# Slicer's standard library (a Python of another version stops at once: "No module named
# 'encodings'") or Slicer's packages before its own.
SLICER_PYTHON_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE")


def worker_environment(settings: WorkerSettings) -> Dict[str, str]:
    """Environment of a local worker. In Slicer's own Python: Slicer's, with ``tedm_core``'s
    folder first on PYTHONPATH. In another Python (a conda environment with a CUDA torch, say):
    the environment Slicer was started in, without its launcher's settings
    (``slicer.util.startupEnvironment``), so that the interpreter runs its own installation."""
    if not settings.runs_in_slicer_python():
        return environment_outside_slicer()
    env = dict(os.environ)
    folder = tedm_core_search_path()
    if folder:
        parts = [folder] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != folder]
        env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def environment_outside_slicer() -> Dict[str, str]:
    """The environment without Slicer's launcher settings: Slicer's own record of it where the
    application runs, else this process's without the variables of Slicer's Python."""
    try:
        import slicer

        return {str(k): str(v) for k, v in slicer.util.startupEnvironment().items()}
    except Exception:  # not inside the Slicer application (no slicer.app): tests, scripts
        env = dict(os.environ)
        for name in SLICER_PYTHON_VARIABLES:
            env.pop(name, None)
        return env


def worker_log_path() -> str:
    """Where a local worker's own output (stderr) goes: the user's temporary folder."""
    return os.path.join(tempfile.gettempdir(), f"TEDMSlicer-worker-{os.getpid()}.log")


def read_token(path: str) -> str:
    token_path = Path(os.path.expanduser(path.strip()))
    if not path.strip():
        raise ValueError("the remote worker needs its token: choose the token file (tedm serve --token-file)")
    if not token_path.is_file():
        raise ValueError(f"token file not found: {token_path}")
    token = token_path.read_text().strip()
    if not token:
        raise ValueError(f"token file {token_path} is empty")
    return token


def start_worker_client(settings: WorkerSettings, log_path: Optional[str] = None) -> Any:
    """A ``tedm_core.serve.client.WorkerClient`` for ``settings``: a child process over pipes, or a
    connection to a remote worker. Imports only the torch-free client into Slicer's process."""
    from tedm_core.serve.client import WorkerClient

    if settings.remote:
        return WorkerClient.connect(settings.endpoint.strip(), token=read_token(settings.token_file))
    return WorkerClient.start_local(
        python=settings.worker_python(),
        log_path=log_path or worker_log_path(),
        env=worker_environment(settings),
    )


def known_problems(settings: WorkerSettings) -> List[str]:
    """What is wrong with the settings before anything is started (shown next to the fields)."""
    problems = []
    if settings.python.strip() and not settings.remote:
        path = Path(os.path.expanduser(settings.python.strip()))
        if not path.is_file():
            problems.append(f"worker Python not found: {path}")
    if settings.remote:
        host, _, port = settings.endpoint.strip().rpartition(":")
        if not host or not port.isdigit():
            problems.append(f"the endpoint must be host:port, got {settings.endpoint.strip()!r}")
        try:
            read_token(settings.token_file)
        except ValueError as error:
            problems.append(str(error))
    return problems
