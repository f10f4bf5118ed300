"""The worker: answers protocol requests, runs one job at a time in its own thread.

It holds the loaded models and one :class:`InteractiveSession` per open volume, so a Refine
re-uses the decoder features of the last Segment. Requests arrive on any thread (one per
connection); quick ones are answered at once, jobs (segment, fit, refine, save_model,
load_model, pretrain) run in the job thread, so ``cancel`` and ``status`` are answered while a
job runs. Nothing a request does can stop the worker: every failure becomes an error event.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import __version__
from ..choices import AUTO, HEAD_METHODS
from ..errors import Cancelled, TEDMError
from .protocol import PROTOCOL_VERSION, Arrays, ProtocolError, decode_message, encode_message

log = logging.getLogger(__name__)

Reply = Callable[[Dict[str, Any], Optional[Arrays]], None]
PROGRESS_INTERVAL_S = 0.1  # at most this often per job, so a fast loop does not flood the client
_REQUIRED = object()


class RequestError(ProtocolError):
    """A request whose fields or arrays are missing or of the wrong kind."""


@dataclass
class RunningJob:
    request_id: str
    op: str
    session: Optional[str]
    # The connection that asked for it (None through the pipes, which have one client): only it
    # may cancel the job. Request IDs are each client's own counter, so two Slicer sessions on
    # one network worker send the same IDs, and one's Cancel once stopped the other's job.
    owner: Any = None
    # Its session, closed by a client while the job ran: closed by the job's thread when it ends
    # (its segmenter's GPU copy of the model freed then), not under the job's feet.
    closed_session: Any = None
    thread: Optional[threading.Thread] = None
    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)


def _field(request: Dict[str, Any], name: str, kind: Any, default: Any = _REQUIRED) -> Any:
    """``request[name]`` checked against ``kind`` (a type or tuple of types)."""
    if name not in request or request[name] is None:
        if default is _REQUIRED:
            raise RequestError(f"'{request.get('op')}' needs the field '{name}'")
        return default
    value = request[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise RequestError(f"field '{name}' must be {expected}, got {type(value).__name__}")
    return value


def _positive_int(request: Dict[str, Any], name: str, default: Any = None) -> Optional[int]:
    value = _field(request, name, int, default)
    if value is not None and value <= 0:
        raise RequestError(f"field '{name}' must be a positive integer, got {value}")
    return value


def _array(arrays: Arrays, name: str, ndims: Tuple[int, ...], op: str) -> np.ndarray:
    if name not in arrays:
        raise RequestError(f"'{op}' needs the array '{name}'")
    array = arrays[name]
    if array.ndim not in ndims:
        raise RequestError(f"array '{name}' must have {' or '.join(map(str, ndims))} dimensions, got {array.ndim}")
    return array


class Worker:
    """The request handler, independent of the transport (pipes or network)."""

    def __init__(self) -> None:
        self.sessions: Dict[str, Any] = {}  # session id -> InteractiveSession
        self._owners: Dict[str, Any] = {}  # session id -> the connection that opened it (network)
        self._models: Dict[str, Tuple[float, Any]] = {}
        self._used: Dict[str, float] = {}  # session id -> when a job last used it
        # Each session caps its own feature cache; this caps them all together (a Slicer user
        # segments one volume after another, each into a new node: each keeps a session open).
        self.feature_budget_bytes: Optional[int] = None  # None: the session's own default share of memory
        self._job: Optional[RunningJob] = None
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._quick = {
            "hello": self._hello,
            "status": self._status,
            "open_session": self._open_session,
            "close_session": self._close_session,
            "uncertain_slices": self._uncertain_slices,
            "next_uncertain_slice": self._next_uncertain_slice,
            "shutdown": self._shutdown,
        }
        self._jobs = {
            "load_model": self._load_model,
            "segment": self._segment,
            "fit": self._fit,
            "refine": self._refine,
            "save_model": self._save_model,
            "pretrain": self._pretrain,
        }

    def preload(self) -> None:
        """Import what the jobs use (MONAI, the pipelines: seconds on a CPU machine) now, while the
        client waits for the worker to start, not inside the first Segment, Fit or Refine it times.
        torch._dynamo too: torch's optimizers import it when the first one is built (cProfile: 1.5-2 s
        inside the first Refine after a loaded model's Segment). Measured in session 16, one thread,
        BraTS CBICA_AAB (whole volume) with the benchmark's model, four pairs: first Refine 8.0 / 8.2 /
        8.5 / 7.7 s without, 8.0 / 6.0 / 6.2 / 7.6 s with this preload (an ad-hoc script: a loaded
        model's Segment, then Refine after two corrected slices, through InteractiveSession as the
        worker runs it; ``benchmarks/benchmark.py --refine-only`` fits its model first, so it never
        paid this import)."""
        import torch._dynamo  # noqa: F401

        from ..bundle import load_bundle  # noqa: F401
        from ..io.volumes import volume_from_array  # noqa: F401
        from ..pipelines.interactive import InteractiveSession  # noqa: F401

    # -- entry point --------------------------------------------------------------------------------
    def handle(self, message: Any, reply: Reply, owner: Any = None) -> None:
        """One incoming message (bytes, or the ProtocolError its framing raised). Never raises.
        ``owner`` (any object: the connection) owns the sessions the message opens; see
        :meth:`close_sessions_of`."""
        request_id: Optional[str] = None
        try:
            if isinstance(message, Exception):
                raise message
            request, arrays = decode_message(message)
            request_id = request.get("id") if isinstance(request.get("id"), str) else None
            op = _field(request, "op", str)
            _field(request, "id", str)
            if op == "cancel":
                reply({"event": "result", "id": request_id, "result": self._cancel(request, owner)}, None)
            elif op in self._quick:
                result = self._quick[op](request, arrays)
                if op == "open_session":
                    self._owners[result[0]["session"]] = owner
                reply({"event": "result", "id": request_id, "result": result[0]}, result[1])
            elif op in self._jobs:
                self._start_job(op, request, arrays, reply, owner)
            else:
                known = ", ".join(sorted(["cancel", *self._quick, *self._jobs]))
                raise RequestError(f"unknown op {op!r}; the worker knows {known}")
        except Exception as error:
            reply(error_event(request_id, error), None)

    def close_sessions_of(self, owner: Any) -> int:
        """Close the sessions ``owner`` opened and cancel its running job (on a session or not:
        a pretraining nobody else may cancel would hold the worker); how many sessions."""
        owned = [session_id for session_id, by in list(self._owners.items()) if by is owner]
        for session_id in owned:
            self._close_session({"op": "close_session", "session": session_id}, {})
        job = self._job
        if job is not None and job.owner is owner:
            job.cancel.set()
        return len(owned)

    def wait_for_job(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the running job's thread to end (cancelled, it ends at its
        next check); whether none runs. A process that exits under a running torch operation
        aborts ("terminate called without an active exception")."""
        job = self._job
        if job is None or job.thread is None:
            return True
        job.thread.join(timeout_s)
        return not job.thread.is_alive()

    # -- jobs ---------------------------------------------------------------------------------------
    def _start_job(self, op: str, request: Dict[str, Any], arrays: Arrays, reply: Reply, owner: Any = None) -> None:
        request_id = request["id"]
        session_id = request.get("session") if isinstance(request.get("session"), str) else None
        with self._lock:
            if self._job is not None:
                running = self._job
                raise BusyError(f"a {running.op} job ({running.request_id}) is running: wait for it or cancel it")
            job = self._job = RunningJob(request_id, op, session_id, owner)
            job.thread = threading.Thread(
                target=self._run_job, args=(job, request, arrays, reply), name=f"tedm {op}", daemon=True
            )
        job.thread.start()

    def _run_job(self, job: RunningJob, request: Dict[str, Any], arrays: Arrays, reply: Reply) -> None:
        last = [0.0]

        def progress(fraction: float, message: str) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL_S or fraction >= 1.0:
                last[0] = now
                fraction = max(0.0, min(1.0, float(fraction)))
                reply({"event": "progress", "id": job.request_id, "fraction": fraction, "message": message}, None)

        def log_line(message: str) -> None:
            reply({"event": "log", "id": job.request_id, "message": message}, None)

        from ..pipelines.interactive import Reporter

        reporter = Reporter(progress=progress, log=log_line, cancelled=job.cancel.is_set)
        try:
            result, result_arrays = self._jobs[job.op](request, arrays, reporter)
            if job.session in self.sessions:  # (not one closed while its job ran)
                self._used[job.session] = time.monotonic()
                self._keep_features_within_budget(job.session, reporter)
            event: Dict[str, Any] = {"event": "result", "id": job.request_id, "result": result}
        except Exception as error:
            event, result_arrays = error_event(job.request_id, error), None
        finally:
            with self._lock:
                self._job = None
            if job.closed_session is not None:
                try:
                    job.closed_session.close()
                except Exception:  # the job's own event must still reach its client
                    log.exception("closing session %s as its job ended failed", job.session)
        reply(event, result_arrays)

    def _keep_features_within_budget(self, active: str, reporter: Any) -> None:
        """Drop the cached decoder features of the sessions used longest ago until all sessions'
        caches fit the budget together; the active one keeps its own. A session without its cache
        still Refines: its next Refine runs the UNet over the volume again."""
        from ..pipelines.interactive import default_feature_cache_limit

        budget = default_feature_cache_limit() if self.feature_budget_bytes is None else self.feature_budget_bytes
        held = {session_id: session.feature_cache_nbytes for session_id, session in list(self.sessions.items())}
        total = sum(held.values())
        for session_id in sorted((s for s in held if s != active and held[s]), key=lambda s: self._used.get(s, 0.0)):
            if total <= budget:
                break
            session = self.sessions.get(session_id)
            if session is not None:
                session.forget_features()
                total -= held[session_id]
                reporter.log(
                    f"Freed the cached features of an earlier segmentation ({held[session_id] / 2**20:.0f} MiB) to "
                    "stay within the worker's memory budget: its next Refine runs the diffusion UNet again."
                )

    def _model(self, path: str) -> Any:
        """A bundle or a backbone, cached by path and the modification time of its metadata."""
        from ..bundle import BUNDLE_JSON, load_bundle
        from ..errors import BundleError
        from ..model.checkpoint import BACKBONE_JSON, load_backbone

        folder = Path(os.path.abspath(os.path.expanduser(path)))
        bundle_json, backbone_json = folder / BUNDLE_JSON, folder / BACKBONE_JSON
        marker = bundle_json if bundle_json.is_file() else backbone_json
        if not marker.is_file():
            raise BundleError(
                folder, f"is not a model: neither {BUNDLE_JSON} (a fitted model) nor {BACKBONE_JSON} found"
            )
        stamp = marker.stat().st_mtime
        cached = self._models.get(str(folder))
        if cached is None or cached[0] != stamp:
            model = load_bundle(folder) if marker is bundle_json else load_backbone(folder)
            cached = self._models[str(folder)] = (stamp, model)
        return cached[1]

    def _load_model(self, request: Dict[str, Any], arrays: Arrays, reporter: Any) -> Tuple[Dict[str, Any], None]:
        from ..bundle import ModelBundle

        model = self._model(_field(request, "path", str))
        is_bundle = isinstance(model, ModelBundle)
        backbone = model.backbone if is_bundle else model
        return {
            "kind": "bundle" if is_bundle else "backbone",
            "class_names": list(model.class_names) if is_bundle else [],
            "class_colours": [list(c) for c in model.class_colours] if is_bundle else [],
            "channel_names": list(backbone.channel_names),
            "axis": model.axis if is_bundle else None,
            "method": model.method if is_bundle else None,
            "image_size": int(backbone.config.image_size),
        }, None

    def _session(self, request: Dict[str, Any]) -> Any:
        session_id = _field(request, "session", str)
        if session_id not in self.sessions:
            raise UnknownSessionError(
                f"no open session {session_id!r}: open_session first (the worker may have restarted)"
            )
        return self.sessions[session_id]

    def _segment(self, request: Dict[str, Any], arrays: Arrays, reporter: Any) -> Tuple[Dict[str, Any], Arrays]:
        from ..bundle import ModelBundle
        from ..pipelines.interactive import SessionError

        session = self._session(request)
        model_path = _field(request, "model", str)
        reporter.progress(0.0, "loading the model")
        model = self._model(model_path)
        if not isinstance(model, ModelBundle):
            raise SessionError(f"{model_path} is a pretrained backbone, not a fitted model: label 1-3 slices and Fit")
        result = session.segment(
            model, _field(request, "axis", str, AUTO), _field(request, "device", str, "auto"), reporter
        )
        return _session_result(result)

    def _fit(self, request: Dict[str, Any], arrays: Arrays, reporter: Any) -> Tuple[Dict[str, Any], Arrays]:
        session = self._session(request)
        labels = _array(arrays, "labels", (3,), "fit")
        class_names = _field(request, "class_names", list)
        if len(class_names) < 2 or not all(isinstance(n, str) for n in class_names):
            raise RequestError("'class_names' must list the background and at least one structure, as strings")
        colours = _field(request, "class_colours", list, None)
        method = _field(request, "method", str, "tedm")
        if method not in HEAD_METHODS:
            raise RequestError(f"unknown method {method!r}; expected one of {', '.join(HEAD_METHODS)}")
        reporter.progress(0.0, "loading the backbone")
        result = session.fit(
            self._model(_field(request, "model", str)),
            labels,
            class_names,
            method=method,
            class_colours=colours,
            axis=_field(request, "axis", str, AUTO),
            device=_field(request, "device", str, "auto"),
            steps=_positive_int(request, "steps"),
            seed=_field(request, "seed", int, 0),
            reporter=reporter,
        )
        return _session_result(result)

    def _refine(self, request: Dict[str, Any], arrays: Arrays, reporter: Any) -> Tuple[Dict[str, Any], Arrays]:
        session = self._session(request)
        result = session.refine(
            _array(arrays, "labels", (3,), "refine"),
            steps=_positive_int(request, "steps"),
            device=_field(request, "device", str, None),
            reporter=reporter,
        )
        return _session_result(result)

    def _save_model(self, request: Dict[str, Any], arrays: Arrays, reporter: Any) -> Tuple[Dict[str, Any], None]:
        path = self._session(request).save_model(
            _field(request, "path", str), _field(request, "overwrite", bool, False)
        )
        return {"path": str(path)}, None

    def _pretrain(self, request: Dict[str, Any], arrays: Arrays, reporter: Any) -> Tuple[Dict[str, Any], None]:
        """A backbone pretrained on the open sessions' volumes (their non-empty slices)."""
        import torch

        from ..data import slices_with_enough_foreground
        from ..model.backbone import PRESETS
        from ..model.checkpoint import Backbone
        from ..pipelines.pretrain import PretrainOptions, pretrain
        from ..pipelines.volume import normalise_volume
        from ..preprocessing.intensity import NAMED
        from ..preprocessing.spatial import to_model_grid
        from ..slicing import extract_slices

        out = Path(_field(request, "out", str))
        preset = _field(request, "preset", str, "small")
        if preset not in PRESETS:
            raise RequestError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        intensity_name = _field(request, "intensity", str, "brain")
        if intensity_name not in NAMED:
            raise RequestError(f"unknown intensity {intensity_name!r}; expected one of {', '.join(NAMED)}")
        session_ids = _field(request, "sessions", list)
        sessions = [self._session({"op": "pretrain", "session": s}) for s in session_ids]
        if not sessions:
            raise RequestError("'sessions' must name at least one open session")
        steps = _positive_int(request, "steps", 1000)
        axis = _field(request, "axis", str, "axial")
        intensity = NAMED[intensity_name]
        config = PRESETS[preset].with_(in_channels=sessions[0].volume.array.shape[0])
        parts = []
        for session in sessions:
            slices, _ = extract_slices(normalise_volume(session.volume, intensity), axis)
            grid, _ = to_model_grid(
                torch.from_numpy(np.asarray(slices[slices_with_enough_foreground(slices)])), config.image_size
            )
            parts.append(grid)
        images = torch.cat(parts)
        reporter.log(f"Pretraining a {preset} backbone on {images.shape[0]} slices for {steps} steps.")

        def on_step(step: int, loss: float) -> None:
            reporter.check()
            reporter.progress(step / steps, f"pretraining step {step}/{steps}, loss {loss:.4f}")

        backbone = Backbone.new(config, intensity=intensity, channel_names=list(sessions[0].volume.channel_names))
        options = PretrainOptions(
            steps=steps,
            checkpoint_every=max(1, min(500, steps)),
            device=_field(request, "device", str, "auto"),
            show_progress=False,
        )
        pretrain(images, backbone, out, options, on_step=on_step)
        return {"path": str(out)}, None

    # -- quick requests -----------------------------------------------------------------------------
    def _hello(self, request: Dict[str, Any], arrays: Arrays) -> Tuple[Dict[str, Any], None]:
        import torch

        cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {
            "protocol": PROTOCOL_VERSION,
            "tedm_core": __version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "cuda": cuda,
            "pid": os.getpid(),
        }, None

    def _status(self, request: Dict[str, Any], arrays: Arrays) -> Tuple[Dict[str, Any], None]:
        job = self._job
        busy = None if job is None else {"id": job.request_id, "op": job.op, "seconds": time.monotonic() - job.started}
        return {"busy": busy, "sessions": sorted(self.sessions), "models": sorted(self._models)}, None

    def _open_session(self, request: Dict[str, Any], arrays: Arrays) -> Tuple[Dict[str, Any], None]:
        from ..io.volumes import volume_from_array
        from ..pipelines.interactive import InteractiveSession

        session_id = _field(request, "session", str)
        self._refuse_if_busy_with(session_id)
        volume = _array(arrays, "volume", (3, 4), "open_session")
        if volume.size == 0 or not np.isfinite(volume).all():
            raise RequestError("array 'volume' must be non-empty and finite")
        rows = _field(request, "ijk_to_ras", list)
        numbers = len(rows) == 4 and all(
            isinstance(row, list)
            and len(row) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
            for row in rows
        )
        matrix = np.asarray(rows, dtype=np.float64) if numbers else np.zeros((0,))
        if matrix.shape != (4, 4) or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
            raise RequestError("'ijk_to_ras' must be an invertible 4 x 4 matrix of finite numbers")
        channels = volume.shape[0] if volume.ndim == 4 else 1
        names = _field(request, "channel_names", list, None)
        if names is not None and (len(names) != channels or not all(isinstance(n, str) for n in names)):
            raise RequestError(f"'channel_names' must name the volume's {channels} channel(s)")
        old = self.sessions.pop(session_id, None)
        if old is not None:
            old.close()
        self.sessions[session_id] = InteractiveSession(volume_from_array(volume, matrix, names))
        return {"session": session_id, "shape": list(self.sessions[session_id].volume.array.shape)}, None

    def _close_session(self, request: Dict[str, Any], arrays: Arrays) -> Tuple[Dict[str, Any], None]:
        session_id = _field(request, "session", str)
        session = self.sessions.pop(session_id, None)
        self._owners.pop(session_id, None)
        self._used.pop(session_id, None)
        job = self._job
        if job is not None and job.session == session_id:
            job.closed_session = session
            job.cancel.set()  # its result has nowhere to go; the job's thread closes the session as it ends
        elif session is not None:
            session.close()
        return {"closed": session is not None}, None

    def _uncertain_slices(self, request: Dict[str, Any], arrays: Arrays) -> Tuple[Dict[str, Any], None]:
        self._refuse_if_busy_with(request.get("session"))
        ranked = self._session(request).uncertain_slices(_positive_int(request, "count"))
        return {"slices": [_uncertain(s) for s in ranked]}, None

    def _next_uncertain_slice(self, request: Dict[str, Any], arrays: Arrays) -> Tuple[Dict[str, Any], None]:
        self._refuse_if_busy_with(request.get("session"))
        candidate = self._session(request).next_uncertain_slice()
        return {"slice": None if candidate is None else _uncertain(candidate)}, None

    def _cancel(self, request: Dict[str, Any], owner: Any) -> Dict[str, Any]:
        """Cancel the running job if ``owner`` (the connection) started it and ``target`` names
        it (or is absent)."""
        target = _field(request, "target", str, None)
        job = self._job
        hit = job is not None and job.owner is owner and (target is None or target == job.request_id)
        if hit:
            job.cancel.set()
        return {"cancelled": bool(hit)}

    def _shutdown(self, request: Dict[str, Any], arrays: Arrays) -> Tuple[Dict[str, Any], None]:
        job = self._job
        if job is not None:
            job.cancel.set()
        self.stopping.set()
        return {"stopping": True}, None

    def _refuse_if_busy_with(self, session_id: Any) -> None:
        job = self._job
        if job is not None and job.session == session_id:
            raise BusyError(f"session {session_id!r} is in use by a running {job.op} job ({job.request_id})")


class BusyError(TEDMError):
    """A job request while another job runs (one at a time: they share one GPU)."""


class UnknownSessionError(TEDMError):
    pass


def _uncertain(candidate: Any) -> Dict[str, Any]:
    return {"index": candidate.index, "score": candidate.score, "centre_ijk": list(candidate.centre_ijk)}


def _session_result(result: Any) -> Tuple[Dict[str, Any], Arrays]:
    fields = {
        "operation": result.operation,
        "class_names": result.class_names,
        "class_colours": [list(c) for c in result.class_colours],
        "axis": result.axis,
        "slices_run": result.slices_run,
        "training_slices": result.training_slices,
        "changed_slices": result.changed_slices,
        "seconds": round(result.seconds, 3),
        "notes": result.notes,
    }
    return fields, {"labels": result.labels}


def _out_of_memory(error: BaseException) -> bool:
    if not isinstance(error, (MemoryError, RuntimeError)):
        return False  # (no torch import for the errors that cannot be torch's out-of-memory)
    from ..runtime import is_out_of_memory

    return is_out_of_memory(error)


def error_kind(error: BaseException) -> str:
    if isinstance(error, Cancelled):
        return "cancelled"
    if _out_of_memory(error):
        return "user"  # too large a job for this machine, not a bug: no traceback for the user
    if isinstance(error, BusyError):
        return "busy"
    if isinstance(error, ProtocolError):
        return "protocol"
    if isinstance(error, (TEDMError, ValueError, FileNotFoundError, PermissionError, FileExistsError)):
        return "user"
    return "internal"


def error_event(request_id: Optional[str], error: BaseException) -> Dict[str, Any]:
    """An error event: one line for the user, the traceback as details for internal errors."""
    kind = error_kind(error)
    message = " ".join(str(error).split()) or type(error).__name__
    if kind == "user" and _out_of_memory(error):
        from ..runtime import out_of_memory_on_gpu

        # torch's report runs to several lines of allocator statistics: one line and what to change.
        message = (
            "out of GPU memory (choose the cpu device, or close other programs using the GPU)"
            if out_of_memory_on_gpu(error)
            else "out of memory (close other programs, or use a smaller image)"
        )
    if kind == "internal":
        message = f"{type(error).__name__}: {message}"
    details = "".join(traceback.format_exception(type(error), error, error.__traceback__)) if kind == "internal" else ""
    return {"event": "error", "id": request_id, "kind": kind, "message": message, "details": details}


def send_event(send: Callable[[bytes], None], event: Dict[str, Any], arrays: Optional[Arrays]) -> None:
    """Encode and send one event; an event that cannot be encoded becomes an internal error event."""
    try:
        blob = encode_message(event, arrays)
    except Exception as error:
        blob = encode_message(error_event(event.get("id"), error))
    send(blob)


def ready_event(max_request_bytes: int) -> Dict[str, Any]:
    return {
        "event": "ready",
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "tedm_core": __version__,
        "max_request_bytes": int(max_request_bytes),
    }


__all__: List[str] = ["Worker", "error_event", "ready_event", "send_event"]
