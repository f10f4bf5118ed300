"""A model bundle: one self-describing folder with everything needed to segment.

    bundle.json          format, versions, method, classes (names, colours, label values),
                         preprocessing, slicing axis, head config, backbone config, training record
    backbone.safetensors the DDPM UNet (or, for the supervised baseline, the segmentation UNet)
    head.safetensors     the pixel-wise head (absent for the baseline)

Only JSON and safetensors are read: nothing is unpickled. A bundle written by an incompatible
format version, a missing file or a pickle put in a bundle's place is refused with one line
naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from . import __version__
from .choices import AXES, BASELINE, METHODS, NUM_TRAIN_TIMESTEPS, canonical_method
from .errors import BundleError
from .heads import FeatureHead, HeadConfig, in_head_order, prediction_timesteps_problem
from .io.safe import read_json, read_tensors, write_json, write_tensors
from .model.checkpoint import (
    BACKBONE_JSON,
    Backbone,
    backbone_from_metadata,
    check_backbone_description,
    check_format,
    is_count,
    is_name_list,
    require,
    state_dict_problem,
    weights_problem,
)
from .postprocessing import ComponentRule
from .preprocessing.intensity import IntensityConfig

BUNDLE_FORMAT = 1
BUNDLE_JSON = "bundle.json"
BACKBONE_WEIGHTS = "backbone.safetensors"
HEAD_WEIGHTS = "head.safetensors"
BUNDLE_FILES = (BUNDLE_JSON, BACKBONE_WEIGHTS, HEAD_WEIGHTS)
# What file browsers leave in any folder they show: no user's data.
BROWSER_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")

# Distinct, colour-blind-friendlier defaults (Okabe-Ito), background first.
DEFAULT_COLOURS: Tuple[Tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)


#: The ``training`` entry recording the model grid (pixels) a bundle's head or baseline was
#: trained on; bundles saved before it existed lack it and are not checked.
TRAINED_IMAGE_SIZE = "image_size"


def default_colours(num_classes: int) -> List[Tuple[int, int, int]]:
    return [
        DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)]
        if i < len(DEFAULT_COLOURS)
        else (37 * i % 256, 91 * i % 256, 151 * i % 256)
        for i in range(num_classes)
    ]


@dataclass
class ModelBundle:
    """A trained segmenter: a backbone and a head (or, for ``baseline``, a supervised UNet alone)."""

    method: str
    backbone: Backbone
    head: Optional[FeatureHead]
    class_names: List[str]
    label_values: List[int]
    class_colours: List[Tuple[int, int, int]] = field(default_factory=list)
    axis: str = "axial"
    training: Dict[str, Any] = field(default_factory=dict)
    # Predict every slice also mirrored left-right and average the two (chosen on validation in
    # issue 10: see FitOptions.test_time_flip). False for bundles written before it existed.
    test_time_flip: bool = False
    # Crop each slice's dark border bands before the model sees it, and paste the result back
    # (preprocessing.framing; issue 10: see FitOptions.crop_dark_borders). For 2D images only;
    # False for bundles written before it existed.
    crop_dark_borders: bool = False
    # The timesteps whose predictions are averaged at inference, a subset of the head's (empty:
    # all of them). The head still learns from all its timesteps (issue 10: see
    # FitOptions.inference_timesteps). Empty for bundles written before it existed.
    inference_timesteps: Tuple[int, ...] = ()
    # Anatomy post-processing learnt from the labelled masks (postprocessing.ComponentRule), for
    # whole 2D images only (issue 10: see FitOptions.postprocess). None for bundles written
    # before it existed, and for models without it.
    component_rule: Optional[ComponentRule] = None
    # Where it was loaded from and a hash of its files' bytes (None for a model made in memory):
    # outputs record which model made them (see io.outputs).
    source: Optional[Path] = None
    fingerprint: Optional[str] = None

    def __post_init__(self) -> None:
        if len(self.class_names) < 2:
            raise ValueError("class_names must include the background and at least one structure")
        if len(self.label_values) != len(self.class_names):
            raise ValueError("label_values needs one value per class")
        if not self.class_colours:
            self.class_colours = default_colours(len(self.class_names))
        if (self.head is None) != (self.method == BASELINE):
            raise ValueError("a head is needed for every method except the supervised baseline")
        self.inference_timesteps = tuple(int(t) for t in self.inference_timesteps)
        if self.inference_timesteps:
            if self.head is None or self.head.config.mode != "shared":
                shown = list(self.inference_timesteps)
                raise ValueError(f"inference timesteps {shown} must be a subset of a shared head's timesteps")
            problem = prediction_timesteps_problem(self.inference_timesteps, self.head.config)
            if problem:
                raise ValueError(f"inference timesteps {list(self.inference_timesteps)}: {problem}")
        if self.component_rule is not None and len(self.component_rule.max_regions) != len(self.class_names) - 1:
            raise ValueError("component_rule needs one entry per structure (every class but the background)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.backbone.config.image_size

    @property
    def intensity(self) -> IntensityConfig:
        return self.backbone.intensity

    @property
    def channel_names(self) -> List[str]:
        return list(self.backbone.channel_names)

    @property
    def timesteps(self) -> Tuple[int, ...]:
        """The head's timesteps (what it learnt from)."""
        return self.head.config.timesteps if self.head is not None else ()

    @property
    def prediction_timesteps(self) -> Tuple[int, ...]:
        """The timesteps a segmentation averages: the inference subset, else the head's (in the
        order a concat head reads them, :func:`~tedm_core.heads.in_head_order`)."""
        if self.head is None or not self.inference_timesteps:
            return self.timesteps
        return in_head_order(self.inference_timesteps, self.head.config)

    def describe(self) -> str:
        classes = ", ".join(self.class_names[1:])
        return (
            f"{self.method} on a {self.backbone.config.preset} backbone at {self.image_size} px; classes: "
            f"{classes}; channels: {', '.join(self.channel_names)}"
        )


class BundleExistsError(BundleError):
    """A bundle would be written where something already is and overwriting was not allowed;
    front ends name their own way of allowing it (the CLI's ``--overwrite``)."""


def check_bundle_target(path: Path, overwrite: bool) -> None:
    """Refuse to write a bundle where it would replace anything but a bundle (with ``overwrite``)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise BundleError(path, f"is a link to {os.readlink(path)}, which does not exist; give the folder itself")
    if path.exists() and not overwrite:
        raise BundleExistsError(path, "already exists; choose another name or allow overwriting")
    if path.exists() and not (path / BUNDLE_JSON).is_file():
        # Overwriting replaces the whole folder: only ever a model bundle, never a folder of data.
        raise BundleError(
            path, "is not a model bundle (no bundle.json), so it is not replaced; choose a new folder for the model"
        )
    if path.exists():
        # A file named bundle.json is not enough: the folder must hold a bundle's files and
        # nothing else, or replacing it whole would delete what a user kept there.
        kept = BUNDLE_FILES + BROWSER_FILES
        others = sorted(p.name for p in Path(os.path.realpath(path)).iterdir() if p.name not in kept)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise BundleError(
                path,
                f"holds {shown} besides a model bundle's files, which replacing it would delete; "
                "move them out, or choose a new folder for the model",
            )
        meta = read_json(path / BUNDLE_JSON)
        if not isinstance(meta, dict) or meta.get("format") is None or "method" not in meta:
            raise BundleError(path / BUNDLE_JSON, "is not a model bundle's description, so the folder is not replaced")


def save_bundle(bundle: ModelBundle, path: Union[str, Path], overwrite: bool = False) -> Path:
    """Write ``bundle`` to the folder ``path``: staged beside it, then renamed into place whole."""
    path = Path(path)
    check_bundle_target(path, overwrite)
    given = path
    if path.is_symlink():
        # A link to a bundle (models/current -> models/v3): the bundle it points to is replaced and
        # the link kept, rather than the link turned into a folder beside a stale bundle.
        path = Path(os.path.realpath(path))
    staging, previous = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.previous")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed save
    staging.mkdir(parents=True)
    try:
        _write_bundle_files(bundle, staging)
        # The old bundle is moved aside, not deleted, until the new one is in place.
        shutil.rmtree(previous, ignore_errors=True)
        if path.exists():
            path.rename(previous)
        try:
            staging.rename(path)
        except BaseException:
            if previous.exists() and not path.exists():
                previous.rename(path)  # the old bundle back where it was
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written stays behind
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return given


def _write_bundle_files(bundle: ModelBundle, folder: Path) -> None:
    write_tensors(folder / BACKBONE_WEIGHTS, bundle.backbone.unet.state_dict())
    if bundle.head is not None:
        write_tensors(folder / HEAD_WEIGHTS, bundle.head.state_dict())
    meta = {
        "format": BUNDLE_FORMAT,
        "tedm_core_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": bundle.method,
        "class_names": list(bundle.class_names),
        "label_values": [int(v) for v in bundle.label_values],
        "class_colours": [list(map(int, c)) for c in bundle.class_colours],
        "axis": bundle.axis,
        "test_time_flip": bool(bundle.test_time_flip),
        "crop_dark_borders": bool(bundle.crop_dark_borders),
        "inference_timesteps": [int(t) for t in bundle.inference_timesteps],
        "component_rule": bundle.component_rule.to_dict() if bundle.component_rule is not None else None,
        "head": bundle.head.config.to_dict() if bundle.head is not None else None,
        "backbone": bundle.backbone.metadata(),
        "training": bundle.training,
    }
    write_json(folder / BUNDLE_JSON, meta)


def load_bundle(path: Union[str, Path]) -> ModelBundle:
    """Load a bundle folder; refuse anything incomplete, incompatible or not made of JSON + safetensors."""
    path = Path(path)
    if not path.exists():
        previous = path.with_name(f".{path.name}.previous")
        if (previous / BUNDLE_JSON).is_file():
            # save_bundle moved it aside and was stopped before the new one was renamed into place.
            raise BundleError(
                path,
                f"model bundle not found: a save replacing it was interrupted; the earlier bundle is {previous} "
                "(rename it back, or save the model again)",
            )
        raise BundleError(path, "model bundle not found")
    if path.is_dir() and not (path / BUNDLE_JSON).exists() and (path / BACKBONE_JSON).is_file():
        raise BundleError(path, "is a pretrained backbone, not a fitted model; fit a model with it first")
    if path.is_file():
        # A single file where a bundle folder belongs: say what it is rather than trying to read it.
        read_json(path)  # raises a clear error for pickles and non-JSON files
        raise BundleError(path, "is a file; a model bundle is a folder holding bundle.json and .safetensors weights")
    meta_path = path / BUNDLE_JSON
    meta = read_json(meta_path)
    check_format(meta_path, meta, BUNDLE_FORMAT, "bundle")
    check_bundle_description(meta_path, meta)
    method = canonical_method(meta["method"])
    backbone_meta, head_meta = meta["backbone"], meta.get("head")
    num_classes = len(meta["class_names"])
    weights = read_tensors(path / BACKBONE_WEIGHTS)
    if method == BASELINE:
        backbone = backbone_from_metadata(
            meta_path, backbone_meta, weights, out_channels=baseline_output_channels(num_classes)
        )
        head = None
    else:
        backbone = backbone_from_metadata(meta_path, backbone_meta, weights)
        try:
            head = FeatureHead(HeadConfig.from_dict(head_meta))
        except (TypeError, ValueError, AttributeError) as error:
            raise BundleError(meta_path, f"head description is invalid ({error})") from None
        head_weights = read_tensors(path / HEAD_WEIGHTS)
        try:
            head.load_state_dict(head_weights)
        except RuntimeError as error:
            raise BundleError(
                path / HEAD_WEIGHTS, f"weights do not match the described head ({state_dict_problem(error)})"
            ) from None
        problem = weights_problem(head, head_weights)
        if problem:
            raise BundleError(path / HEAD_WEIGHTS, f"weights do not match the described head ({problem})")
        head.eval()
    try:
        return ModelBundle(
            method=method,
            backbone=backbone,
            head=head,
            class_names=list(meta["class_names"]),
            label_values=[int(v) for v in meta["label_values"]],
            class_colours=[tuple(c) for c in meta.get("class_colours", [])],
            axis=meta.get("axis", "axial"),
            training=dict(meta.get("training", {})),
            test_time_flip=bool(meta.get("test_time_flip", False)),
            crop_dark_borders=bool(meta.get("crop_dark_borders", False)),
            inference_timesteps=tuple(meta.get("inference_timesteps", [])),
            component_rule=ComponentRule.from_dict(meta["component_rule"]) if meta.get("component_rule") else None,
            source=path,
            fingerprint=_files_sha256([meta_path, path / BACKBONE_WEIGHTS, path / HEAD_WEIGHTS]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(meta_path, f"invalid bundle description ({error})") from None


def _files_sha256(paths: List[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def model_fingerprint(bundle: ModelBundle) -> str:
    """The hash of the bundle's files when it was loaded, else of its weights and description."""
    if bundle.fingerprint:
        return bundle.fingerprint
    described = (bundle.method, bundle.class_names, bundle.label_values, bundle.axis, bundle.test_time_flip)
    if bundle.crop_dark_borders:  # (so that the fingerprints of bundles without it do not change)
        described += ("crop_dark_borders",)
    if bundle.inference_timesteps:
        described += tuple(bundle.inference_timesteps)
    if bundle.component_rule is not None:
        described += (bundle.component_rule,)
    digest = hashlib.sha256(repr(described).encode())
    for module in (bundle.backbone.unet, bundle.head):
        for name, tensor in module.state_dict().items() if module is not None else []:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_bundle_description(meta_path: Path, meta: Dict[str, Any]) -> None:
    """Every field of ``bundle.json`` checked against the others before any weight is read: an
    edited description that contradicts itself (3 classes and a 1-output head, an unknown axis,
    impossible label values) is refused naming the field, never turned into silent garbage."""
    _check_model_description(meta_path, meta)
    if meta.get("component_rule") is not None:
        try:
            rule = ComponentRule.from_dict(meta["component_rule"])
        except ValueError as error:
            raise BundleError(meta_path, f"component_rule is invalid ({error})") from None
        structures = len(meta["class_names"]) - 1
        require(
            meta_path,
            len(rule.max_regions) == structures,
            f"component_rule needs one entry per structure ({structures}), got {len(rule.max_regions)}",
        )


def _check_model_description(meta_path: Path, meta: Dict[str, Any]) -> None:
    """The classes, the backbone and the head."""
    for key in ("method", "class_names", "label_values", "backbone"):
        require(meta_path, key in meta, f"missing entry {key!r}")
    method = meta["method"]
    require(
        meta_path,
        isinstance(method, str) and canonical_method(method) in METHODS,
        f"method must be one of {METHODS}, got {method!r}",
    )
    names, values = meta["class_names"], meta["label_values"]
    require(
        meta_path,
        is_name_list(names) and len(names) >= 2,
        f"class_names must list the background and at least one structure, all distinct, got {names!r}",
    )
    require(
        meta_path,
        isinstance(values, list) and len(values) == len(names) and all(is_count(v, 0) and v <= 65535 for v in values),
        f"label_values must be one whole number in 0..65535 per class ({len(names)}), got {values!r}",
    )
    require(meta_path, len(set(values)) == len(values), f"label_values {values} repeat a value")
    colours = meta.get("class_colours") or []
    require(
        meta_path,
        isinstance(colours, list)
        and (not colours or len(colours) == len(names))
        and all(isinstance(c, list) and len(c) == 3 and all(is_count(v, 0) and v <= 255 for v in c) for c in colours),
        f"class_colours must be one [r, g, b] of 0..255 per class ({len(names)})",
    )
    axis = meta.get("axis", "axial")
    require(meta_path, axis in AXES, f"axis must be one of {AXES}, got {axis!r}")
    require(meta_path, isinstance(meta.get("training", {}), dict), "training must be an object")
    trained_size = meta.get("training", {}).get(TRAINED_IMAGE_SIZE)
    if trained_size is not None:
        require(
            meta_path,
            is_count(trained_size),
            f"training {TRAINED_IMAGE_SIZE} must be a positive integer, got {trained_size!r}",
        )
        size = meta["backbone"].get("config", {}).get("image_size") if isinstance(meta["backbone"], dict) else None
        require(
            meta_path,
            size == trained_size,
            f"backbone image_size {size!r} differs from the {trained_size} px model grid the model was trained on "
            f"(training {TRAINED_IMAGE_SIZE}); its weights fit only that grid",
        )
    for flag in ("test_time_flip", "crop_dark_borders"):
        require(meta_path, isinstance(meta.get(flag, False), bool), f"{flag} must be true or false")
    inference = meta.get("inference_timesteps", [])
    require(
        meta_path,
        isinstance(inference, list) and all(is_count(t, 0) for t in inference),
        f"inference_timesteps must be a list of whole numbers, got {inference!r}",
    )
    require(meta_path, isinstance(meta["backbone"], dict), "backbone must be an object")
    check_backbone_description(meta_path, meta["backbone"])
    head = meta.get("head")
    if canonical_method(method) == BASELINE:
        require(meta_path, head is None, "a baseline bundle has no head, but 'head' is set")
        return
    require(meta_path, isinstance(head, dict), f"a {method} bundle needs a 'head' object")
    require(
        meta_path,
        canonical_method(str(head.get("method"))) == canonical_method(method),
        f"head method {head.get('method')!r} differs from the bundle's method {method!r}",
    )
    require(
        meta_path,
        head.get("num_classes") == len(names),
        f"the head has {head.get('num_classes')!r} classes but class_names lists {len(names)}",
    )
    timesteps = head.get("timesteps")
    require(
        meta_path,
        isinstance(timesteps, list)
        and bool(timesteps)
        and all(is_count(t, 0) and t < NUM_TRAIN_TIMESTEPS for t in timesteps),
        f"head timesteps must be whole numbers in 0..{NUM_TRAIN_TIMESTEPS - 1}, got {timesteps!r}",
    )
    hidden = head.get("hidden", [])
    require(
        meta_path,
        isinstance(hidden, list) and all(is_count(h) for h in hidden),
        f"head hidden widths must be positive integers, got {hidden!r}",
    )
    require(
        meta_path,
        head.get("upsample", "bilinear") in ("bilinear", "nearest"),
        "head upsample must be bilinear or nearest",
    )
    config = meta["backbone"].get("config") if isinstance(meta["backbone"], dict) else None
    channels = config.get("channels") if isinstance(config, dict) else None
    levels = head.get("levels")
    if isinstance(channels, list):
        decoder = list(reversed(channels))
        tapped = list(range(len(decoder))) if levels is None else levels
        require(
            meta_path,
            isinstance(tapped, list) and all(is_count(i, 0) and i < len(decoder) for i in tapped),
            f"head levels must lie in 0..{len(decoder) - 1}, got {levels!r}",
        )
        require(
            meta_path,
            head.get("level_channels") == [decoder[i] for i in sorted(set(tapped))],
            f"head level_channels {head.get('level_channels')!r} do not match the backbone's decoder {decoder}",
        )


def baseline_output_channels(num_classes: int) -> int:
    """The supervised baseline predicts logits like a head: 1 for a single structure, else one per class."""
    return 1 if num_classes == 2 else num_classes
