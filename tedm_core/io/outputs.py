"""Output folders that can never hurt an input: checked before any work, and labelled with the
model that filled them.

* An output folder never overlaps an input (images, labels, the model): not the same folder, not
  inside one, not holding one. Paths are compared after resolving links.
* It must be a folder we can write (not a file, not read-only), found before the first case.
* ``.tedm_outputs.json`` records which model and settings made the outputs; a run with another
  model (or other settings that change the outputs) never takes existing outputs for its own.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

from ..errors import InputError
from .atomic import write_text_atomic

PathLike = Union[str, "os.PathLike[str]"]

PROVENANCE_FILE = ".tedm_outputs.json"
# The fields of a provenance record that decide the outputs' content; the others (device, when)
# are kept for the reader only.
IDENTITY_FIELDS = ("convention", "model_sha256", "timesteps", "axis", "postprocess")
# Reader-only fields in which the runs writing one folder may differ: a resumed batch on another
# machine, or one whose `auto` precision was measured the other way (a timing can tip between
# processes). Its record keeps the earlier runs' values, so it never passes the outputs already
# there off as made its way.
RUN_FIELDS = ("device", "precision")


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def refuse_overlap(output: PathLike, sources: Iterable[Tuple[str, Optional[PathLike]]]) -> None:
    """Refuse an output folder that is, lies inside, or holds one of ``sources``, given as
    ``(what, path)`` pairs (``("labels", path)``; a ``None`` path is skipped).

    Inside an input, outputs would be read back as inputs on the next run; the same as a label
    folder, they would replace the ground truth and be scored against themselves; holding an
    input, a mirrored output could land on it.
    """
    out = _real(output)
    for what, source in sources:
        if source is None:
            continue
        src = _real(source)
        if out == src:
            problem = f"is the {what} folder"
        elif src in out.parents:
            problem = f"is inside the {what} folder {source}"
        elif out in src.parents:
            problem = f"holds the {what} {source}"
        else:
            continue
        raise InputError(output, f"the output folder {problem}; outputs must go to a folder apart from every input")


def check_writable_folder(folder: PathLike) -> Path:
    """Prove, before any work, that ``folder`` can hold outputs: it is a folder we can create
    files in, or it can be created (a file is made and removed in it, or in the nearest folder
    that exists). Nothing is left behind, so a refusal found later leaves no empty folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "is a file, not a folder; outputs need a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(folder, f"cannot be written ({existing} is a file, not a folder)")
    try:
        probe = existing / f".tedm_write_test.{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(folder, f"cannot be written ({error.strerror or error})") from None
    return folder


def read_provenance(folder: PathLike) -> Optional[Dict[str, Any]]:
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}  # unreadable: treated as "another model's", never as ours
    return record if isinstance(record, dict) else {}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> Tuple[str, ...]:
    """The identity fields in which two provenance records differ."""
    return tuple(key for key in IDENTITY_FIELDS if old.get(key) != new.get(key))


def claim_output_folder(
    folder: PathLike, record: Mapping[str, Any], existing_outputs: Sequence[Path], overwrite: bool
) -> None:
    """Make ``folder`` this run's: refuse it when it holds outputs of another model or settings
    (or outputs no record accounts for) unless ``overwrite``; then write ``record``.

    ``existing_outputs``: this run's output files that are already there. Without a record
    saying this model made them, skipping them as done would pass them off as this model's.
    """
    folder = Path(folder)
    old = read_provenance(folder)
    if not overwrite:
        if old is not None and differences(old, record):
            made_by = old.get("model", "an unknown model")
            changed = ", ".join(differences(old, record))
            raise InputError(
                folder,
                f"holds outputs made by {made_by} with other {changed}; write to another folder, "
                "or overwrite them to replace them",
            )
        if old is None and existing_outputs:
            raise InputError(
                folder,
                f"already holds {existing_outputs[0].name} (and {len(existing_outputs) - 1} more outputs) with no "
                f"{PROVENANCE_FILE} saying which model made them; write to another folder, or overwrite them",
            )
    record = dict(record)
    if old and existing_outputs and not overwrite:
        earlier = [run for run in old.get("earlier_runs", []) if isinstance(run, dict)]
        if any(old.get(key) != record.get(key) for key in RUN_FIELDS):
            earlier.append({key: old.get(key) for key in (*RUN_FIELDS, "written")})
        if earlier:
            record["earlier_runs"] = earlier
    if old != record:
        write_text_atomic(folder / PROVENANCE_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def is_output_folder(folder: PathLike) -> bool:
    """A folder that TEDM wrote outputs into (it holds a provenance record)."""
    return (Path(folder) / PROVENANCE_FILE).is_file()
