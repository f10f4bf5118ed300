"""The worker's stdout, taken over for the protocol. Standard library only: ``tedm serve --stdio``
takes it over before it imports torch, MONAI or the worker, so that nothing they print reaches
the protocol (only numpy comes before, with the protocol's limits: its import prints nothing)."""

from __future__ import annotations

import os
import sys


def take_stdout() -> int:
    """Give the protocol the original stdout (a new descriptor, returned) and point descriptor 1
    and ``sys.stdout`` at stderr: anything else that writes to stdout (a library's print, a
    warning, a C extension) then goes to the log, where it cannot corrupt a message."""
    sys.stdout.flush()
    protocol_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return protocol_fd
