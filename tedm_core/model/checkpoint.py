"""A pretrained DDPM on disk: ``backbone.json`` (config, schedule, preprocessing, versions) and
``unet.safetensors`` (weights; ``ema.safetensors`` too when EMA was on)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from .. import __version__
from ..choices import SCHEDULES
from ..errors import BundleError
from ..io.safe import read_json, read_tensors, write_json, write_tensors
from ..preprocessing.intensity import IntensityConfig
from .backbone import PRESETS, BackboneConfig, build_unet
from .diffusion import NoiseSchedule

BACKBONE_FORMAT = 1
BACKBONE_JSON = "backbone.json"
UNET_WEIGHTS = "unet.safetensors"
EMA_WEIGHTS = "ema.safetensors"


@dataclass
class Backbone:
    """A noise-predicting UNet with what it was trained on: schedule, intensity convention, channels."""

    config: BackboneConfig
    unet: torch.nn.Module
    schedule: str = "cosine"
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    channel_names: List[str] = field(default_factory=lambda: ["image"])
    steps_trained: int = 0

    @property
    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.schedule)

    def metadata(self) -> Dict[str, Any]:
        return {
            "format": BACKBONE_FORMAT,
            "tedm_core_version": __version__,
            "torch_version": torch.__version__.split("+")[0],
            "config": self.config.to_dict(),
            "schedule": self.schedule,
            "intensity": self.intensity.to_dict(),
            "channel_names": list(self.channel_names),
            "steps_trained": int(self.steps_trained),
        }

    @classmethod
    def new(cls, config: BackboneConfig, **kwargs: Any) -> Backbone:
        return cls(config=config, unet=build_unet(config), **kwargs)


def save_backbone(
    directory: Union[str, Path], backbone: Backbone, ema_state: Optional[Dict[str, torch.Tensor]] = None
) -> Path:
    """Write ``backbone`` into ``directory``, over an earlier save there.

    The description is removed first and written last: a save interrupted half-way (a kill, a
    full disk) leaves a folder refused as incomplete, never one whose description, weights and
    EMA come from different steps. An earlier save's EMA is removed when this one has none, or
    loading would prefer those stale weights to the ones just saved.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / BACKBONE_JSON).unlink(missing_ok=True)
    write_tensors(directory / UNET_WEIGHTS, backbone.unet.state_dict())
    if ema_state is not None:
        write_tensors(directory / EMA_WEIGHTS, ema_state)
    else:
        (directory / EMA_WEIGHTS).unlink(missing_ok=True)
    write_json(directory / BACKBONE_JSON, backbone.metadata())  # last: its presence marks a complete save
    return directory


def check_format(path: Path, data: Dict[str, Any], expected: int, what: str) -> None:
    found = data.get("format")
    if found != expected:
        raise BundleError(
            path,
            f"{what} format {found!r} is not supported by tedm_core {__version__} (expects format {expected}; "
            f"it was written by tedm_core {data.get('tedm_core_version', 'unknown')})",
        )


def is_count(value: Any, minimum: int = 1) -> bool:
    """An integer (not a bool, which JSON and Python would both accept as one) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_name_list(value: Any) -> bool:
    """A non-empty list of distinct, non-empty strings (class or channel names)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, str) and v.strip() for v in value)
        and len({v.lower() for v in value}) == len(value)
    )


def require(path: Path, condition: bool, problem: str) -> None:
    """Refuse a model description one of whose fields is wrong, naming the field."""
    if not condition:
        raise BundleError(path, problem)


def check_backbone_description(path: Path, meta: Dict[str, Any]) -> None:
    """Every field of a backbone description, checked before anything is built from it: an edited
    file that contradicts itself is refused here rather than producing silent garbage later."""
    config = meta.get("config")
    require(path, isinstance(config, dict), "backbone 'config' must be an object")
    channels, attention = config.get("channels"), config.get("attention_levels")
    require(
        path,
        isinstance(channels, list) and len(channels) >= 2 and all(is_count(c) for c in channels),
        f"backbone channels must be a list of at least 2 positive integers, got {channels!r}",
    )
    require(
        path,
        isinstance(attention, list) and len(attention) == len(channels) and all(isinstance(a, bool) for a in attention),
        f"backbone attention_levels must be one true/false per level ({len(channels)}), got {attention!r}",
    )
    for key in ("num_res_blocks", "norm_num_groups", "num_head_channels", "in_channels", "image_size"):
        require(path, is_count(config.get(key)), f"backbone {key} must be a positive integer, got {config.get(key)!r}")
    groups = config["norm_num_groups"]
    require(
        path,
        all(c % groups == 0 for c in channels),
        f"backbone channels {channels} are not all divisible by norm_num_groups {groups}",
    )
    preset = config.get("preset", "custom")
    if isinstance(preset, str) and preset in PRESETS:
        # A preset names an architecture (its grid and input channels may be chosen): a preset
        # name that does not describe these weights would be reported, and reused, as a lie.
        expected = PRESETS[preset].to_dict()
        differing = [
            key
            for key in ("channels", "attention_levels", "num_res_blocks", "norm_num_groups", "num_head_channels")
            if config.get(key) != expected[key]
        ]
        require(
            path,
            not differing,
            f"backbone preset {preset!r} does not match its config ({', '.join(differing)} differ from the "
            f'preset\'s); set preset to "custom" for an architecture of your own',
        )
    names = meta.get("channel_names", ["image"])
    require(path, is_name_list(names), f"channel_names must be a list of distinct names, got {names!r}")
    require(
        path,
        len(names) == config["in_channels"],
        f"{len(names)} channel_names {names} for a UNet with in_channels {config['in_channels']}",
    )
    schedule = meta.get("schedule", "cosine")
    require(path, schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    require(path, is_count(meta.get("steps_trained", 0), 0), "steps_trained must be a whole number >= 0")
    intensity = meta.get("intensity", {})
    require(path, isinstance(intensity, dict), "intensity must be an object")
    for key in ("lower", "upper", "zscore_scale", "clip_min", "clip_max"):
        value = intensity.get(key, None if key.startswith("clip") else 1.0)
        require(
            path,
            (value is None and key.startswith("clip")) or is_finite_number(value),
            f"intensity {key} must be a finite number{' or null' if key.startswith('clip') else ''}, got {value!r}",
        )
    require(
        path,
        intensity.get("lower", 0.0) < intensity.get("upper", 1.0),
        "intensity lower must be below upper",
    )
    # Checked here, not when the first image fails: a bad value is the model's fault, not the image's.
    if intensity.get("kind", "percentile") in ("percentile", "foreground_percentile"):
        require(
            path,
            0 <= intensity.get("lower", 0.0) and intensity.get("upper", 100.0) <= 100,
            f"intensity lower and upper are percentiles in 0..100, got {intensity.get('lower')!r} and "
            f"{intensity.get('upper')!r}",
        )
    require(path, intensity.get("zscore_scale", 1.0) > 0, "intensity zscore_scale must be above 0")
    clip_min, clip_max = intensity.get("clip_min"), intensity.get("clip_max")
    require(
        path,
        clip_min is None or clip_max is None or clip_min < clip_max,
        f"intensity clip_min {clip_min!r} must be below clip_max {clip_max!r}",
    )


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def state_dict_problem(error: RuntimeError) -> str:
    """What ``load_state_dict`` found wrong, in one short line (its first line says only that
    something was: the next ones name the missing, unexpected or differently shaped weights)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
    return detail if len(detail) <= 240 else detail[:237] + "..."


def weights_problem(module: torch.nn.Module, weights: Dict[str, torch.Tensor]) -> Optional[str]:
    """What makes ``weights`` wrong for ``module`` beyond names and shapes (which
    ``load_state_dict`` checks): integer or boolean values where the module holds real numbers
    (``load_state_dict`` would cast them silently) or the other way round, and a normalisation
    layer's negative variance. None when there is nothing."""
    own = module.state_dict()
    for name, tensor in weights.items():
        mine = own.get(name)
        if mine is not None and mine.is_floating_point() != tensor.is_floating_point():
            kind = str(tensor.dtype).replace("torch.", "")
            return f"{name} holds {kind} values where the model has {str(mine.dtype).replace('torch.', '')}"
        if name.endswith("running_var") and tensor.is_floating_point() and bool((tensor < 0).any()):
            return f"{name} holds a negative variance"
    return None


def backbone_from_metadata(
    path: Path, meta: Dict[str, Any], weights: Dict[str, torch.Tensor], out_channels: Optional[int] = None
) -> Backbone:
    """Rebuild a backbone from its JSON description and weights.

    ``out_channels`` other than the input channels rebuilds the same architecture as a
    segmentation network (the supervised baseline).
    """
    check_format(path, meta, BACKBONE_FORMAT, "backbone")
    check_backbone_description(path, meta)
    try:
        config = BackboneConfig.from_dict(meta["config"])
        backbone = Backbone(
            config=config,
            unet=build_unet(config, out_channels=out_channels),
            schedule=meta.get("schedule", "cosine"),
            intensity=IntensityConfig.from_dict(meta.get("intensity", {})),
            channel_names=list(meta.get("channel_names", ["image"])),
            steps_trained=int(meta.get("steps_trained", 0)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(path, f"backbone description is invalid ({error})") from None
    try:
        backbone.unet.load_state_dict(weights)
    except RuntimeError as error:
        raise BundleError(path, f"weights do not match the described UNet ({state_dict_problem(error)})") from None
    problem = weights_problem(backbone.unet, weights)
    if problem:
        raise BundleError(path, f"weights do not match the described UNet ({problem})")
    backbone.unet.eval()
    return backbone


def load_backbone(directory: Union[str, Path], use_ema: bool = True) -> Backbone:
    """Load a pretrained backbone (EMA weights when present and ``use_ema``); nothing is unpickled."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(
            directory,
            "backbone checkpoint folder not found" if not directory.exists() else "is not a backbone checkpoint folder",
        )
    if not (directory / BACKBONE_JSON).exists() and (directory / "bundle.json").is_file():
        raise BundleError(directory, "is a fitted model bundle, not a pretrained backbone")
    if not (directory / BACKBONE_JSON).exists() and (directory / UNET_WEIGHTS).is_file():
        steps = sorted(p for p in (directory / "steps").glob("[0-9]*") if (p / BACKBONE_JSON).is_file())
        raise BundleError(
            directory / BACKBONE_JSON,
            "missing: the pretraining that writes this folder was stopped while saving, so its weights are "
            "incomplete; resume the pretraining to finish the save"
            + (f", or use its last complete checkpoint {steps[-1]}" if steps else ""),
        )
    meta = read_json(directory / BACKBONE_JSON)
    weights_file = (
        directory / EMA_WEIGHTS if use_ema and (directory / EMA_WEIGHTS).is_file() else directory / UNET_WEIGHTS
    )
    return backbone_from_metadata(directory / BACKBONE_JSON, meta, read_tensors(weights_file))
