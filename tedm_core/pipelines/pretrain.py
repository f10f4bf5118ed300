"""DDPM pretraining on unlabelled slices: eps prediction, L1 or MSE, Adam, optional EMA, bf16,
checkpoints that resume exactly, and DistributedDataParallel under ``torchrun``.

Every step's randomness (which images, flips, shifts, timesteps, noise) is drawn from a
generator seeded by (seed, step, rank), so a resumed run repeats the uninterrupted one exactly
once weights and optimiser state are restored, whatever happened before the interruption.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ..choices import LOSSES
from ..errors import BundleError, SettingError, TrainingDiverged
from ..io.safe import read_tensors
from ..model.checkpoint import BACKBONE_JSON, EMA_WEIGHTS, UNET_WEIGHTS, Backbone, load_backbone, save_backbone
from ..model.diffusion import NoiseSchedule
from ..preprocessing.intensity import NAMED
from ..runtime import autocast, check_finite_loss, count_non_finite, resolve_device, resolve_pretraining_precision

try:
    import fcntl
except ImportError:  # Windows: no flock (concurrent runs into one folder go unnoticed there)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
LOCK_FILE = ".pretrain.lock"
TRAINER_STATE = "trainer_state.pt"
STEPS_DIR = "steps"
BUNDLE_JSON = "bundle.json"  # (bundle.BUNDLE_JSON: a fitted model, never a place to pretrain)


@dataclass
class PretrainOptions:
    steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 1e-4
    loss: str = "l1"
    precision: str = "auto"
    seed: int = 0
    checkpoint_every: int = 500
    # Step checkpoints kept in out/steps/ (the oldest are deleted; 0 keeps all, e.g. to choose
    # a backbone on validation images afterwards). One `small` checkpoint is 32 MB, `paper` ~0.5 GB.
    keep_checkpoints: int = 2
    ema_decay: Optional[float] = None
    flip: bool = False
    max_shift: int = 0  # pixels on the model grid
    device: str = "auto"
    show_progress: bool = True


class _Distributed:
    """The torchrun environment, or a single process; under torchrun on CUDA each process is
    bound to its own GPU, ``cuda:LOCAL_RANK`` (``self.device``)."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        self.device = device
        if self.enabled and device.type == "cuda":
            # Made the current device before NCCL starts: otherwise every rank's communicator and
            # barrier() use cuda:0 (NCCL's "Duplicate GPU detected", or a hang at the first checkpoint).
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if self.enabled and not dist.is_initialized():
            if self.device.type == "cuda":
                # device_id (torch >= 2.3) also binds the process group to the GPU at once.
                bound = {"device_id": self.device} if _accepts_device_id(dist.init_process_group) else {}
                dist.init_process_group(backend="nccl", **bound)
            else:
                dist.init_process_group(backend="gloo")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DistributedDataParallel when distributed (on CUDA: on this process's GPU only)."""
        if not self.enabled:
            return module
        if self.device.type == "cuda":
            return torch.nn.parallel.DistributedDataParallel(module, device_ids=[self.device.index])
        return torch.nn.parallel.DistributedDataParallel(module)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _accepts_device_id(init_process_group: Callable[..., Any]) -> bool:
    parameters = inspect.signature(init_process_group).parameters.values()
    return any(p.name == "device_id" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _augment(batch: torch.Tensor, options: PretrainOptions, generator: torch.Generator) -> torch.Tensor:
    if options.flip:
        flip = torch.rand(batch.shape[0], generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    if options.max_shift > 0:
        s = options.max_shift
        padded = F.pad(batch, (s, s, s, s), value=-1.0)
        h, w = batch.shape[-2:]
        offsets = torch.randint(0, 2 * s + 1, (batch.shape[0], 2), generator=generator).tolist()
        batch = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
    return batch


def _step_checkpoints(out: Path) -> List[Path]:
    """The complete step checkpoints in ``out/steps/``, oldest first (names are zero-padded steps)."""
    if not (out / STEPS_DIR).is_dir():
        return []
    return sorted(p for p in (out / STEPS_DIR).glob("[0-9]*") if (p / TRAINER_STATE).is_file())


def _latest_checkpoint(out: Path) -> Optional[Path]:
    steps = _step_checkpoints(out)
    return steps[-1] if steps else None


def check_pretrain_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: ``out`` must be a folder, hold a checkpoint to resume, or hold none
    unless starting afresh over it is asked for."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(out, "is a file; a checkpoint folder is needed")
    if (out / BUNDLE_JSON).is_file():
        # Pretraining into a fitted model would mix a backbone into it (and --overwrite delete its weights).
        raise BundleError(out, "is a fitted model bundle, not a pretraining checkpoint folder; choose another folder")
    holds = (out / BACKBONE_JSON).is_file() or bool(_step_checkpoints(out))
    if resume and _latest_checkpoint(out) is None:
        raise BundleError(out, "holds no checkpoint to resume from")
    if holds and not (resume or overwrite):
        raise BundleError(out, "already holds a checkpoint; resume it, or overwrite it to start again")


# The checkpoint folders this process holds the lock of: taking it again (the CLI holds it from
# before reading the images, pretrain() takes it too) is a no-op, where flock would refuse.
_LOCKED: set = set()


@contextlib.contextmanager
def pretrain_folder_lock(out: Path) -> Iterator[None]:
    """Hold ``out`` for one pretraining run: a second run into the same folder (which would save
    its checkpoints among this one's) is refused with :class:`BundleError` at once, not queued.

    A non-blocking ``flock`` on ``out/.pretrain.lock``, released when the run ends or its process
    dies. Only the process that writes checkpoints (rank 0 under torchrun) takes it. The lock file
    is removed on release, and ``out`` too if this created it and nothing was written in it.
    """
    out = Path(out)
    key = os.path.realpath(out)
    if fcntl is None or key in _LOCKED or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    if out.exists() and not out.is_dir():
        raise BundleError(out, "is a file; a checkpoint folder is needed")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BundleError(
                out, "is being written by another pretraining run; wait for it to end, or choose another folder"
            ) from None
        except OSError as error:  # a file system without locks (some NFS mounts): run, unguarded
            os.close(fd)
            log.warning("cannot lock %s (%s): another run into this folder would go unnoticed", path, error)
            yield
            return
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the run before removed this file as it ended: lock the one in place now
    _LOCKED.add(key)
    try:
        yield
    finally:
        _LOCKED.discard(key)
        path.unlink(missing_ok=True)  # still locked: a run that opened it meanwhile sees it gone, retries
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run saved checkpoints
                out.rmdir()


def _clear_checkpoints(out: Path) -> None:
    """Starting afresh over an earlier run: remove its checkpoints (and only those), so that a
    later resume or the retention policy never mistakes them for this run's."""
    for folder in (out / STEPS_DIR).glob("[0-9]*") if (out / STEPS_DIR).is_dir() else []:
        if (folder / BACKBONE_JSON).is_file():
            shutil.rmtree(folder)
    for name in (BACKBONE_JSON, UNET_WEIGHTS, EMA_WEIGHTS):
        (out / name).unlink(missing_ok=True)


def _load_trainer_state(checkpoint: Path, device: torch.device) -> dict:
    path = checkpoint / TRAINER_STATE
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        step = int(state["step"])
        if step < 0:
            raise ValueError("step")
        optimiser = state["optimiser"]
        recorded = state.get("options")  # (absent from checkpoints written before it was recorded)
        if recorded is not None and not isinstance(recorded, dict):
            raise TypeError("options")
    except Exception as error:  # a torn or foreign file: torch raises many types
        raise BundleError(
            path,
            f"cannot be read as a trainer state ({type(error).__name__}); "
            "delete this step folder to resume from the one before",
        ) from None
    return {"step": step, "optimiser": optimiser, "options": recorded, "images": state.get("images")}


# The options that decide what each step does: a resumed run repeats the uninterrupted one only
# with the same ones (the optimiser state restored would also keep the old learning rate unseen).
RESUMED_OPTIONS = ("loss", "learning_rate", "batch_size", "seed", "flip", "max_shift", "ema_decay")


def _recorded_options(options: PretrainOptions) -> Dict[str, Any]:
    return {name: getattr(options, name) for name in RESUMED_OPTIONS}


def _images_record(images: torch.Tensor) -> Dict[str, Any]:
    """What the run learnt from: its slices' shape and a hash of their values."""
    digest = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return {"shape": list(images.shape), "sha256": digest}


def _intensity_name(backbone: Backbone) -> str:
    named = [name for name, config in NAMED.items() if config == backbone.intensity]
    config = backbone.intensity
    return named[0] if named else f"{config.kind} {config.lower:g}..{config.upper:g}"


def _differences(asked: Dict[str, Any], saved: Dict[str, Any]) -> List[str]:
    return [f"{key} {saved[key]!r} (now {asked[key]!r})" for key in asked if key in saved and asked[key] != saved[key]]


def check_resume(out: Path, backbone: Backbone, options: Optional[PretrainOptions] = None) -> Path:
    """Before any work: the latest checkpoint in ``out`` continues as asked, with the same model,
    schedule, intensity convention, channels and learning options; returns it.

    Continuing with any of them changed would save a backbone whose description is not what its
    weights learnt (another schedule, another intensity convention), or a run that repeats neither
    the interrupted one nor any other. Each difference is named with its value in the checkpoint.
    """
    checkpoint = _latest_checkpoint(Path(out))
    if checkpoint is None:
        raise BundleError(out, "holds no checkpoint to resume from")
    saved = load_backbone(checkpoint, use_ema=False)

    def described(b: Backbone) -> Dict[str, Any]:
        config = b.config.to_dict()
        if b.config.preset != "custom" and saved.config.preset != backbone.config.preset:
            config = {key: config[key] for key in ("preset", "image_size", "in_channels")}  # not each level
        return {**config, "schedule": b.schedule, "intensity": _intensity_name(b), "channel_names": b.channel_names}

    model = _differences(described(backbone), described(saved))
    if model:
        raise BundleError(
            checkpoint,
            f"was trained with {'; '.join(model)}: resume with the same settings, or start afresh with overwrite",
        )
    if options is not None:
        recorded = _load_trainer_state(checkpoint, torch.device("cpu"))["options"] or {}
        changed = _differences(_recorded_options(options), recorded)
        if changed:
            name = next(key for key in RESUMED_OPTIONS if key in recorded and recorded[key] != getattr(options, key))
            raise SettingError(
                name,
                f"{checkpoint} was trained with {'; '.join(changed)}: a resumed run continues exactly with the "
                "same options; give the same ones, or start afresh with overwrite",
            )
    return checkpoint


def _save_checkpoint(
    out: Path,
    backbone: Backbone,
    optimiser: torch.optim.Optimizer,
    ema: Optional[AveragedModel],
    step: int,
    keep: int,
    record: Optional[Dict[str, Any]] = None,
) -> None:
    """A complete checkpoint in ``out/steps/<step>/`` (renamed into place whole), mirrored at ``out/``.

    Only finite weights are saved, and retention deletes only checkpoints of earlier steps than
    this one, after it is in place: the last good checkpoint always survives.
    """
    bad = count_non_finite(backbone.unet.state_dict().values())
    if bad:
        raise TrainingDiverged(
            f"pretraining diverged: {bad} weights are NaN or infinite at step {step}; not saved, the last "
            f"checkpoint in {out} is kept (a smaller learning rate usually helps)"
        )
    backbone.steps_trained = step
    ema_state = ema.module.state_dict() if ema is not None else None
    final = out / STEPS_DIR / f"{step:08d}"
    staging = out / STEPS_DIR / f".{step:08d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    save_backbone(staging, backbone, ema_state)
    torch.save({"step": step, "optimiser": optimiser.state_dict(), **(record or {})}, staging / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    save_backbone(out, backbone, ema_state)  # the loadable copy at the top level
    _keep_last_checkpoints(out, final, keep)


def _keep_last_checkpoints(out: Path, final: Path, keep: int) -> None:
    """Delete all but the ``keep`` last checkpoints up to ``final`` (0: keep every one)."""
    if keep > 0:
        for old in [p for p in _step_checkpoints(out) if p.name < final.name][: -(keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)


def pretrain(
    images: torch.Tensor,
    backbone: Backbone,
    out: Path,
    options: PretrainOptions,
    resume: bool = False,
    on_step: Optional[Callable[[int, float], None]] = None,
    overwrite: bool = False,
) -> Backbone:
    """Train ``backbone.unet`` to predict eps on ``images`` ((N, C, S, S) in [-1, 1]); returns it.

    With ``resume``, weights, optimiser state, EMA and step come from the latest checkpoint in
    ``out`` and training continues to ``options.steps`` in total. Otherwise ``out`` must hold no
    checkpoint, or ``overwrite`` removes the earlier run's. A NaN or infinite loss stops the run
    with :class:`TrainingDiverged`; the checkpoints saved before stay as they are.
    """
    out = Path(out)
    for name in ("steps", "batch_size", "checkpoint_every"):
        if not int(getattr(options, name)) >= 1:
            raise SettingError(name, f"must be at least 1, got {getattr(options, name)}")
    if not (math.isfinite(options.learning_rate) and options.learning_rate > 0):
        raise SettingError("learning_rate", f"must be a positive finite number, got {options.learning_rate}")
    if options.ema_decay is not None and not 0 < options.ema_decay < 1:
        raise SettingError("ema_decay", f"must lie in (0, 1), got {options.ema_decay}")
    if options.keep_checkpoints < 0 or options.max_shift < 0:
        raise SettingError("keep_checkpoints" if options.keep_checkpoints < 0 else "max_shift", "must be at least 0")
    if options.max_shift >= min(images.shape[-2:]):
        raise SettingError(
            "max_shift",
            f"must be below the model grid's {min(images.shape[-2:])} pixels (a shift that large moves the image "
            f"out of the frame), got {options.max_shift}",
        )
    check_pretrain_folder(out, resume, overwrite)
    if not torch.isfinite(images).all():
        raise SettingError("images", "the training images hold NaN or infinite values")
    if options.loss not in LOSSES:
        raise SettingError("loss", f"unknown loss {options.loss!r}; expected one of {LOSSES}")
    with pretrain_folder_lock(out):
        # Again under the lock: a run that ended since the check above may have left a checkpoint.
        check_pretrain_folder(out, resume, overwrite)
        return _pretrain(images, backbone, out, options, resume, on_step, overwrite)


def _pretrain(
    images: torch.Tensor,
    backbone: Backbone,
    out: Path,
    options: PretrainOptions,
    resume: bool,
    on_step: Optional[Callable[[int, float], None]],
    overwrite: bool,
) -> Backbone:
    """:func:`pretrain` once its settings are checked and ``out`` is held."""
    ddp = _Distributed(resolve_device(options.device))
    device = ddp.device
    precision = resolve_pretraining_precision(options.precision, device)  # (of this process's GPU)

    unet = backbone.unet.to(device).train()
    schedule = NoiseSchedule(backbone.schedule)
    optimiser = torch.optim.Adam(unet.parameters(), lr=options.learning_rate)
    record = {"options": _recorded_options(options), "images": _images_record(images)}
    start, ema_state = 0, None
    if resume:
        checkpoint = check_resume(out, backbone, options)
        restored = load_backbone(checkpoint, use_ema=False)
        state = _load_trainer_state(checkpoint, device)
        start = state["step"]
        if start == options.steps and not (out / BACKBONE_JSON).is_file():
            # The run was stopped while copying its last checkpoint to the top level, the copy
            # that loads: finish that save (what the refusal to load the folder asked for).
            if ddp.is_main:
                ema = checkpoint / EMA_WEIGHTS
                save_backbone(out, restored, read_tensors(ema) if ema.is_file() else None)
                _keep_last_checkpoints(out, checkpoint, options.keep_checkpoints)
                log.info("finished saving step %d of %s at the top level of %s", start, checkpoint, out)
            ddp.barrier()
            return load_backbone(out)
        if start >= options.steps:
            raise SettingError("steps", f"{options.steps}: {checkpoint} is already at step {start}; ask for more")
        if state["images"] is not None and state["images"] != record["images"]:
            log.warning(
                "the training images differ from those %s was trained on (%s slices then, %s now): the resumed "
                "run continues on these, so it will not repeat an uninterrupted one",
                checkpoint,
                state["images"].get("shape", ["?"])[0],
                images.shape[0],
            )
        unet.load_state_dict(restored.unet.state_dict())
        try:
            optimiser.load_state_dict(state["optimiser"])
            # load_state_dict checks the parameter groups' sizes, not the moments' shapes: another
            # model's state of as many parameters loaded, then failed at the first step.
            for parameter in unet.parameters():
                for name, moment in optimiser.state.get(parameter, {}).items():
                    if torch.is_tensor(moment) and moment.ndim and moment.shape != parameter.shape:
                        raise ValueError(f"its {name} of shape {tuple(moment.shape)} is for another weight")
        except (ValueError, KeyError, RuntimeError) as error:
            raise BundleError(
                checkpoint / TRAINER_STATE, f"optimiser state does not fit this model ({error})"
            ) from None
        if options.ema_decay and (checkpoint / EMA_WEIGHTS).is_file():
            ema_state = read_tensors(checkpoint / EMA_WEIGHTS)
        log.info("resumed from %s at step %d", checkpoint, start)
    elif overwrite and ddp.is_main:
        _clear_checkpoints(out)
    # The EMA starts from the weights training continues from (made after they are restored).
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(options.ema_decay)) if options.ema_decay else None
    if ema is not None and ema_state is not None:
        ema.module.load_state_dict(ema_state)
        ema.n_averaged.fill_(start)
    if ddp.is_main and (out / STEPS_DIR).is_dir():
        for stale in (out / STEPS_DIR).glob(".*.partial"):  # staged by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    model = ddp.wrap(unet)

    local_batch = max(1, options.batch_size // ddp.world)
    bar = tqdm(
        total=options.steps,
        initial=start,
        desc="pretraining",
        unit="step",
        disable=not (options.show_progress and ddp.is_main),
    )
    seen, tic = 0, time.perf_counter()
    try:  # the bar is closed on an error too, so that the error starts its own line
        for step in range(start, options.steps):
            generator = torch.Generator().manual_seed((options.seed * 1_000_003 + step) * max(1, ddp.world) + ddp.rank)
            index = torch.randint(0, images.shape[0], (local_batch,), generator=generator)
            x0 = _augment(images[index], options, generator).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            t = torch.randint(0, schedule.num_train_timesteps, (local_batch,), generator=generator).to(device)
            x_t = schedule.add_noise(x0, noise, t)
            with autocast(device, precision):
                predicted = model(x_t, t)
            error = predicted.float() - noise
            loss = error.abs().mean() if options.loss == "l1" else error.pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            value = float(loss.item())
            check_finite_loss(value, step + 1, "pretraining")
            optimiser.step()
            if ema is not None:
                ema.update_parameters(unet)
            seen += local_batch * ddp.world
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{seen / (time.perf_counter() - tic):.1f}")
            if on_step is not None:
                on_step(done, value)
            if done % options.checkpoint_every == 0 or done == options.steps:
                if ddp.is_main:
                    _save_checkpoint(out, backbone, optimiser, ema, done, options.keep_checkpoints, record)
                ddp.barrier()
    finally:
        bar.close()
    unet.eval()
    if ema is not None:
        unet.load_state_dict(ema.module.state_dict())
    return backbone
