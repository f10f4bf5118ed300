"""Atomic writes: a reader never sees a half-written output, and an interrupted run leaves none.

Temporary files are named ``.<target name>.<random>.part<suffixes>`` beside their target and
created with mode 0666 minus the umask, like any file the user writes (``tempfile.mkstemp``
would make them 0600, and the rename would carry that mode to the output). A target whose
name leaves no room for that (file names are at most 255 bytes) gets the start of its name
and a hash of all of it instead: ``.<start>~<hash>.<random>.part<suffixes>``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks (job arrays sharing one folder run on POSIX clusters)
    fcntl = None  # type: ignore[assignment]

PathLike = Union[str, "os.PathLike[str]"]


NAME_MAX_BYTES = 255  # the longest file name of Linux, macOS and Windows file systems


def _temporary_prefix(target: Path) -> str:
    """What every temporary of ``target`` starts with: ``.<name>.``, or for a name too long to
    leave room for the rest, ``.<start>~<hash of the name>.`` (its own: no other target's)."""
    suffix = "".join(target.suffixes)
    room = NAME_MAX_BYTES - len(f"..{'0' * 8}.part{suffix}".encode())
    name = target.name.encode()
    if len(name) <= room:
        return f".{target.name}."
    digest = hashlib.sha256(name).hexdigest()[:16]
    start = name[: max(0, room - len(digest) - 1)].decode(errors="ignore")  # (a cut multi-byte character is dropped)
    return f".{start}~{digest}."


def _temporary_beside(target: Path) -> Path:
    suffix = "".join(target.suffixes) if target.suffixes else ""
    prefix = _temporary_prefix(target)
    while True:
        tmp = target.with_name(f"{prefix}{secrets.token_hex(4)}.part{suffix}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed over ``target``.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.png``) so that writers
    choosing a format from the file name still work. On error the temporary file is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temporary_beside(target)
    mode = tmp_path.stat().st_mode & 0o777  # the umask's, as the file was created
    try:
        yield tmp_path
        # Some writers replace the file rather than write into it (safetensors makes it 0600):
        # the output gets the mode any file the user creates would have.
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temporaries(target: PathLike) -> None:
    """Delete the temporary files a killed run left beside ``target`` (only its own: the pattern
    is ``atomic_path``'s). Call it only for targets no other process writes at the same time."""
    target = Path(target)
    if target.parent.is_dir():
        # Escaped: a name such as ``scan[1].nii.gz`` would otherwise match ``scan1``'s temporaries.
        for stale in target.parent.glob(f"{glob.escape(_temporary_prefix(target))}*.part*"):
            stale.unlink(missing_ok=True)


def write_text_atomic(target: PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _read_fd(fd: int) -> str:
    # Read through the locked descriptor: opening the file a second time and closing it would
    # release this process's POSIX lock on it.
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def update_text_locked(target: PathLike, change: Callable[[Optional[str]], Optional[str]]) -> None:
    """Read-modify-write ``target`` under an exclusive lock, replacing it atomically.

    ``change`` gets the current text (``None`` when the file is absent or empty) and returns the
    new text, or ``None`` to leave it. Processes writing one record (the shards of a job array
    sharing an output folder) each see the others' changes instead of overwriting them. The
    lock is taken on the file itself, which the atomic replace swaps for a new inode, so a
    process that waited re-opens until the file it locked is the one in place; no lock file is
    left behind. Stale temporaries of ``target`` are removed under the lock, when no other
    process can be writing one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(target)
            except FileNotFoundError:
                continue
            if (current.st_dev, current.st_ino) != (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                continue  # replaced while we waited: lock the file now in place
            remove_stale_temporaries(target)
            text = _read_fd(fd)
            new = change(text if text.strip() else None)
            if new is not None:
                write_text_atomic(target, new)
            return
        finally:
            os.close(fd)
