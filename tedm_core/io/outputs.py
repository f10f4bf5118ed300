"""Output folders that can never hurt an input: checked before any work, and labelled with the
model that filled them.

* An output folder never overlaps an input (images, labels, the model): not the same folder, not
  inside one, not holding one. Paths are compared after resolving links.
* It must be a folder we can write (not a file, not read-only), found before the first case.
* ``.tedm_outputs.json`` records which model and settings made each output; a run with another
  model (or other settings that change the outputs) never takes existing outputs for its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from ..errors import InputError
from .atomic import update_text_locked

PathLike = Union[str, "os.PathLike[str]"]

PROVENANCE_FILE = ".tedm_outputs.json"
# Records with an entry per output; those before (a folder-wide record only) cannot say which
# model made each file, since a run over part of a cohort rewrote them whole.
RECORD_VERSION = 2
# The fields of a provenance record that decide the outputs' content; the others (device, when)
# are kept for the reader only.
IDENTITY_FIELDS = ("convention", "model_sha256", "timesteps", "axis", "postprocess", "prediction_overrides")
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


def refuse_output_outside(path: PathLike, folder: PathLike) -> None:
    """Refuse an output file that a link (a mirrored subfolder, or the file itself) would put
    outside the output ``folder``: :func:`refuse_overlap` checks the folder, not what lies in it,
    and a link left in it to an input folder once had outputs written over the inputs."""
    root, real = _real(folder), _real(path)
    if root != real and root not in real.parents:
        raise InputError(
            path,
            f"leads out of the output folder {folder} through a link (to {real}); outputs are written only inside it: "
            "remove the link, or choose another output folder",
        )


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


def _parse(text: Optional[str]) -> Optional[Dict[str, Any]]:
    if text is None:
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return {}  # unreadable: treated as "another model's", never as ours
    return record if isinstance(record, dict) else {}


def read_provenance(folder: PathLike) -> Optional[Dict[str, Any]]:
    """The folder's record; ``None`` when there is none (or an empty one, as a run that stopped
    right after creating it leaves), ``{}`` when it cannot be read."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    return _parse(text if text.strip() else None)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> Tuple[str, ...]:
    """The identity fields in which two provenance records differ."""
    return tuple(key for key in IDENTITY_FIELDS if old.get(key) != new.get(key))


def maker_key(record: Mapping[str, Any]) -> str:
    """A short name for a model and settings (the identity fields), under which a record lists
    the outputs they made."""
    # Without overrides, the key is what it was before they were recorded: folders written then resume.
    fields = [key for key in IDENTITY_FIELDS if key != "prediction_overrides" or record.get(key)]
    identity = json.dumps({key: record.get(key) for key in fields}, sort_keys=True, default=str)
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


def _dump(record: Mapping[str, Any]) -> str:
    """The record as JSON: the folder-wide fields indented, one line per output. It is rewritten
    after every case, so with a large cohort its size, and the time to write it, count."""
    head = {key: value for key, value in record.items() if key != "outputs"}
    text = json.dumps(head, indent=1, sort_keys=True)
    entries = record.get("outputs") or {}
    lines = ",\n".join(f"  {json.dumps(name)}: {json.dumps(entries[name], sort_keys=True)}" for name in sorted(entries))
    body = f'"outputs": {{\n{lines}\n }}' if lines else '"outputs": {}'
    return (text[:-2] + f",\n {body}\n}}" if head else f"{{\n {body}\n}}") + "\n"


class OutputRecord:
    """``.tedm_outputs.json`` of one output folder: which model and settings made each output.

    The folder-wide fields say which run wrote last (and, as ``earlier_runs``, where and in
    which precision the runs before it ran). Under ``outputs``, each case's label file has an
    entry naming its maker (a key into ``makers``), its files with their sizes, and whether
    they are complete (``done``) or being written (``writing``, recorded before the first file
    is replaced). An output is taken as this model's only when its own entry says so: a run
    over part of a cohort (``--include``, ``--shard``, one stopped early) vouches for nothing
    it did not write. Entries are updated under a lock, so shards sharing the folder keep each
    other's.
    """

    def __init__(self, folder: PathLike, record: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.record = dict(record)
        self.key = maker_key(record)

    @property
    def path(self) -> Path:
        return self.folder / PROVENANCE_FILE

    def _name(self, path: Path) -> str:
        return Path(path).relative_to(self.folder).as_posix()

    def claim(self, cases: Sequence[Tuple[Path, Sequence[Path]]], overwrite: bool) -> Set[Path]:
        """Make the folder this run's, refusing it (unless ``overwrite``) when it holds outputs of
        another model or settings, or outputs no entry accounts for, among this run's.

        ``cases``: each case's label file and every file it writes (the label file among them).
        Returns the label files of the cases whose outputs are complete and this model's, to be
        skipped as done (none with ``overwrite``, which recomputes every output of the run).
        """
        old = read_provenance(self.folder)
        done: Set[Path] = set()
        foreign: List[Tuple[Path, str]] = []
        for label, outputs in cases:
            verdict, reason = self._account(old, label, outputs)
            if verdict == "done":
                done.add(label)
            elif verdict == "foreign":
                foreign.append((label, reason))
        if not overwrite:
            if old and differences(old, self.record):
                made_by = old.get("model", "an unknown model")
                raise InputError(
                    self.folder,
                    f"holds outputs made by {made_by} with other {', '.join(differences(old, self.record))}; "
                    "write to another folder, or overwrite them to replace them",
                )
            if foreign:
                label, reason = foreign[0]
                more = f" (and {len(foreign) - 1} more cases' outputs)" if len(foreign) > 1 else ""
                raise InputError(
                    self.folder,
                    f"already holds {self._name(label)}{more}, {reason}; write to another folder, or overwrite them",
                )
        this_run = {self._name(label) for label, _ in cases}
        # Every case to be segmented is marked as being written by this model before its first
        # file is replaced (one update for the run, not one per case): a run stopped part-way
        # leaves this model's unfinished work, never another's finished.
        skipped = set() if overwrite else done
        writing = {
            self._name(label): self._entry(outputs, "writing") for label, outputs in cases if label not in skipped
        }
        update_text_locked(self.path, lambda text: self._claimed(_parse(text), this_run, overwrite, writing))
        return skipped

    def _account(self, old: Optional[Mapping[str, Any]], label: Path, outputs: Sequence[Path]) -> Tuple[str, str]:
        """``done`` (complete, this model's), ``redo`` (nothing another model's: segment it) or
        ``foreign`` with the reason (an output this model's entry does not vouch for)."""
        present = [p for p in outputs if p.is_file()]
        if not present:
            return "redo", ""
        current = old is not None and old.get("record_version") == RECORD_VERSION
        entries = old.get("outputs") if current and isinstance(old.get("outputs"), dict) else {}
        entry = entries.get(self._name(label))
        entry = entry if isinstance(entry, dict) else None
        mine = entry is not None and entry.get("maker") == self.key
        files = entry.get("files") if mine and isinstance(entry.get("files"), dict) else {}
        writing = mine and entry.get("state") != "done"

        def vouched(path: Path) -> bool:
            name = self._name(path)
            return name in files and (writing or files[name] == path.stat().st_size)

        if mine and not writing and len(present) == len(outputs) and all(vouched(p) for p in outputs):
            return "done", ""
        unaccounted = [p for p in present if not (mine and vouched(p))]
        if not unaccounted:
            return "redo", ""  # this model's own unfinished work (a stopped run, an added map)
        if entry is None and old and not current:
            return "foreign", (
                f"recorded by an earlier TEDM version whose {PROVENANCE_FILE} cannot say which model made each output"
            )
        if entry is None:
            return "foreign", f"with no {PROVENANCE_FILE} entry saying which model made it"
        if not mine:
            makers = old.get("makers") if isinstance(old.get("makers"), dict) else {}
            maker = makers.get(entry.get("maker"))
            maker = maker if isinstance(maker, dict) else {}
            changed = ", ".join(differences(maker, self.record)) or "settings"
            return "foreign", f"made by {maker.get('model', 'an unknown model')} with other {changed}"
        name = self._name(unaccounted[0])
        if name not in files:
            return "foreign", f"beside {name}, which this model did not write"
        return "foreign", f"whose {name} has changed since this model wrote it"

    def _entry(self, outputs: Sequence[Path], state: str) -> Dict[str, Any]:
        names = {self._name(p): (p.stat().st_size if state == "done" else None) for p in outputs}
        return {"maker": self.key, "state": state, "files": names}

    def _claimed(
        self,
        old: Optional[Dict[str, Any]],
        this_run: Set[str],
        overwrite: bool,
        writing: Optional[Mapping[str, Any]] = None,
    ) -> str:
        current = old is not None and old.get("record_version") == RECORD_VERSION
        entries = dict(old.get("outputs", {})) if current and isinstance(old.get("outputs"), dict) else {}
        makers = dict(old.get("makers", {})) if current and isinstance(old.get("makers"), dict) else {}
        record: Dict[str, Any] = dict(self.record)
        # The runs whose outputs stay keep their device and precision on record.
        others_stay = bool(entries) and (not overwrite or any(name not in this_run for name in entries))
        if old and others_stay:
            earlier = [run for run in old.get("earlier_runs", []) if isinstance(run, dict)]
            if any(old.get(key) != record.get(key) for key in RUN_FIELDS):
                earlier.append({key: old.get(key) for key in (*RUN_FIELDS, "written")})
            if earlier:
                record["earlier_runs"] = earlier
        makers[self.key] = {key: self.record.get(key) for key in ("model", *IDENTITY_FIELDS)}
        used = {entry.get("maker") for entry in entries.values() if isinstance(entry, dict)} | {self.key}
        record.update(record_version=RECORD_VERSION, makers={k: v for k, v in makers.items() if k in used})
        entries.update(writing or {})
        record["outputs"] = entries
        return _dump(record)

    def _mark(self, label: Path, outputs: Sequence[Path], state: str) -> None:
        entry = self._entry(outputs, state)

        def change(text: Optional[str]) -> str:
            record = _parse(text) or {}
            if record.get("record_version") != RECORD_VERSION:
                record = json.loads(self._claimed(None, set(), False))
            record.setdefault("makers", {})[self.key] = {
                key: self.record.get(key) for key in ("model", *IDENTITY_FIELDS)
            }
            record.setdefault("outputs", {})[self._name(label)] = entry
            return _dump(record)

        update_text_locked(self.path, change)

    def writing(self, label: Path, outputs: Sequence[Path]) -> None:
        """Record, before the first file is replaced, that this model is writing ``outputs``
        (:meth:`claim` does it for every case of the run at once)."""
        self._mark(label, outputs, "writing")

    def done(self, label: Path, outputs: Sequence[Path]) -> None:
        """Record that ``outputs`` (all written) are this model's, with their sizes."""
        self._mark(label, outputs, "done")


def is_output_folder(folder: PathLike) -> bool:
    """A folder that TEDM wrote outputs into (it holds a provenance record)."""
    return (Path(folder) / PROVENANCE_FILE).is_file()
