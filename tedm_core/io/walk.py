"""Walking an input tree the way users lay out patients' folders: links to folders followed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple


def walk_following_links(
    root: Path,
    admit_folder: Callable[[Path], bool] = lambda path: True,
    on_repeat: Optional[Callable[[Path, str], None]] = None,
) -> Iterator[Tuple[Path, List[str]]]:
    """``(folder, its file names)`` for ``root`` and every folder under it, names sorted, hidden
    files and folders left out.

    Links to folders are followed (patients' folders are often links into an archive, and
    ``Path.rglob`` does not follow them), each real folder once, so a link loop ends and a folder
    reached by two paths is searched once (``on_repeat(path, real)`` is told of the others).
    ``admit_folder`` may leave a folder out, or refuse it by raising.
    """
    seen = {os.path.realpath(root)}
    for top, dirnames, filenames in os.walk(root, followlinks=True):
        top_path = Path(top)
        kept = []
        for name in sorted(dirnames):
            path = top_path / name
            if name.startswith("."):
                continue
            real = os.path.realpath(path)
            if real in seen:
                if on_repeat is not None:
                    on_repeat(path, real)
                continue
            seen.add(real)
            if admit_folder(path):
                kept.append(name)
        dirnames[:] = kept
        yield top_path, sorted(name for name in filenames if not name.startswith("."))
