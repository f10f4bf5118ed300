#!/usr/bin/env python
"""The paper's study (and issue 10's robustness experiments) in one resumable command.

    python scripts/reproduce.py configs/paper_study.json [--smoke] [--work DIR] [--results DIR] [--only cxr brats ...]

Sections (each listed in the config, run in this order): ``pretrain`` (the backbones the config
names, resumed from their latest checkpoint), ``cxr`` (few-shot chest X-ray: methods x n x seeds,
single-step ablations, step-wise probes, the checkpoint sweep, validation variants), ``compute``
(ptflops per preset), ``brats`` (whole tumour from 1 and 3 labelled subjects, and the
correct-and-refine curve), then ``report`` (markdown tables, the probe plot, paired Wilcoxon
tests, ``summary.json``), which always runs on whatever results exist.

Every unit of work (a pretraining run, a fitted bundle, the per-image metrics of one model on one
image set, one subject's refine curve) writes its result atomically under ``--work``; a rerun
skips finished units, so an interrupted study resumes where it stopped. ``--smoke`` applies the
config's ``smoke`` overrides (tiny backbone, a few images, a few steps): the whole pipeline in
well under a minute, for the test suite.

Everything goes through the package's own APIs (``fit_bundle``, ``Segmenter``,
``segment_volume``, ``InteractiveSession``, ``dice_precision_recall``, ``paired_wilcoxon``).
Settings are chosen on validation sets only (Shenzhen pool images not used for fitting, covid_v7
images not in covid_gb, and the pool images re-framed with a detector band); the test sets are
Shenzhen test and covid_gb.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CXR_PARTS = ("variants", "main", "ablation", "probes", "sweep", "baseline")


def cxr_seeds(cxr: Dict[str, Any], method: str, n: int) -> List[int]:
    """The seeds a cxr unit runs with: the config's ``seeds`` for n <= ``seeds_up_to_n``, else
    seed 0; ``seeds_by_method`` narrows them for a method (the supervised baseline's fits cost
    ~20 min each on a shared CPU core, so a session may run it on fewer seeds than the heads)."""
    seeds = cxr["seeds"] if n <= cxr["seeds_up_to_n"] else [0]
    narrowed = cxr.get("seeds_by_method", {}).get(method)
    return [s for s in seeds if s in narrowed] if narrowed is not None else list(seeds)


log = logging.getLogger("reproduce")


# ---------------------------------------------------------------------------------------------
# configuration


def ablation_steps(entry: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    """An ablation entry of the config: one timestep (the paper's single-step rows) or a list (a subset)."""
    return (int(entry),) if isinstance(entry, int) else tuple(int(t) for t in entry)


def deep_merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    """``override`` on top of ``base``; nested dicts are merged, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: Path, smoke: bool) -> Dict[str, Any]:
    config = json.loads(Path(path).read_text())
    if smoke:
        config = deep_merge(config, config.get("smoke", {}))
    config.pop("smoke", None)
    return config


def resolve(base: Path, path: str) -> Path:
    p = Path(os.path.expandvars(path))
    return p if p.is_absolute() else base / p


# ---------------------------------------------------------------------------------------------
# small helpers: atomic JSON/CSV, timing


def write_json(path: Path, data: Any) -> None:
    from tedm_core.io.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_rows(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    from tedm_core.pipelines.evaluate import write_metrics_csv

    write_metrics_csv(path, rows)


def read_rows(path: Path) -> List[Dict[str, Any]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("dice", "precision", "recall"):
            if key in row:
                row[key] = float(row[key])
    return rows


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, Any]:
    import torch

    from tedm_core.runtime import cpu_has_native_bf16

    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        # where it is, UNet passes may run in bf16 (measured per process; a result's precision)
        "native_bf16": cpu_has_native_bf16(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ---------------------------------------------------------------------------------------------
# the study


@dataclass
class ImageSet:
    """Normalised images (N, 1, H, W), their class-index masks (N, H, W) and names."""

    name: str
    images: np.ndarray
    masks: np.ndarray
    names: List[str]


def interior_positions(count: int, keep: int) -> List[int]:
    """``keep`` of ``count`` ordered positions, evenly spaced inside the run: for 3 of 60 tumour
    slices, the quarter, middle and three-quarter slices."""
    if keep >= count:
        return list(range(count))
    return sorted({int(round((i + 1) * count / (keep + 1))) - 1 for i in range(keep)})


def reframe(
    images: np.ndarray, masks: np.ndarray, band: float = 0.2, zoom: float = 0.8
) -> Tuple[np.ndarray, np.ndarray]:
    """The pool images as another hospital frames them (issue 10's user test): the image shrunk
    to ``zoom``, centred horizontally at the top, and a black detector band filling the bottom
    ``band`` of the frame. A validation set for framing robustness, never a test set."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = images.shape
    new_h, new_w = int(round(h * zoom)), int(round(w * zoom))
    top, left = max(0, int(round(h * (1 - band))) - new_h), (w - new_w) // 2
    x = F.interpolate(
        torch.from_numpy(images), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
    )
    y = F.interpolate(torch.from_numpy(masks[:, None].astype(np.float32)), size=(new_h, new_w), mode="nearest")
    out_x = np.full_like(images, -1.0)
    out_y = np.zeros_like(masks)
    out_x[:, :, top : top + new_h, left : left + new_w] = x.numpy()
    out_y[:, top : top + new_h, left : left + new_w] = y[:, 0].numpy().astype(masks.dtype)
    out_x[:, :, int(round(h * (1 - band))) :, :] = -1.0
    out_y[:, int(round(h * (1 - band))) :, :] = 0
    return out_x, out_y


@dataclass
class CheckpointChoice:
    """What the checkpoint rule saw and chose (``Study.choose_checkpoint``)."""

    chosen: int
    seed0: Dict[int, float]  # validation mean per checkpoint, seed 0
    tied: List[int]  # checkpoints within the tie margin of the best seed-0 mean
    over_seeds: Dict[int, float]  # validation mean over the tie seeds, per tied checkpoint
    seeds_missing: bool = False  # tied, but not every tie seed scored yet


class Study:
    def __init__(self, config: Dict[str, Any], work: Path, results: Path, data: Path, smoke: bool) -> None:
        self.config = config
        self.work = work
        self.results = results
        self.data = data
        self.smoke = smoke
        self.tic = time.perf_counter()
        self._sets: Dict[Tuple[str, str], ImageSet] = {}
        self._features: Dict[Tuple[str, str, Tuple[int, ...]], Any] = {}
        self._backbones: Dict[str, Any] = {}
        self._volumes: Dict[Path, Any] = {}
        self._rows: Dict[Path, List[Dict[str, Any]]] = {}
        self._outputs: Dict[Path, str] = {}

    # -- pretraining --------------------------------------------------------------------------
    def backbone_dir(self, name: str) -> Path:
        spec = self.config["backbones"][name]
        # A named path is an existing run (relative to the repository); else the study's own.
        return resolve(REPO, spec["path"]) if "path" in spec else self.work / "backbones" / name

    def pretrain(self) -> None:
        for name, spec in self.config.get("backbones", {}).items():
            out = self.backbone_dir(name)
            if spec.get("pretrained"):
                continue  # an existing run named by path: used as it is
            done = out / "steps" / f"{int(spec['steps']):08d}" / "backbone.json"
            if done.is_file():
                log.info("pretrain %s: done (%s)", name, done.parent)
                continue
            self._pretrain_one(name, spec, out)

    def _pretrain_one(self, name: str, spec: Dict[str, Any], out: Path) -> None:
        import torch

        from tedm_core.data import load_pretraining_slices
        from tedm_core.model.backbone import PRESETS
        from tedm_core.model.checkpoint import Backbone
        from tedm_core.pipelines.pretrain import PretrainOptions, _latest_checkpoint, pretrain
        from tedm_core.preprocessing.intensity import NAMED

        intensity = NAMED[spec["intensity"]]
        channels = spec.get("channels")
        config = PRESETS[spec["preset"]].with_(
            image_size=spec.get("image_size") or PRESETS[spec["preset"]].image_size,
            in_channels=len(channels) if channels else 1,
        )
        inputs = [resolve(self.data, p) for p in spec["images"]]
        images = load_pretraining_slices(
            inputs,
            config.image_size,
            intensity,
            in_channels=config.in_channels,
            channel_names=channels,
            show_progress=False,
        )
        if spec.get("max_images"):
            images = images[: int(spec["max_images"])]
        torch.manual_seed(int(spec.get("seed", 0)))
        backbone = Backbone.new(
            config, schedule="cosine", intensity=intensity, channel_names=list(channels or ["image"])
        )
        options = PretrainOptions(
            steps=int(spec["steps"]),
            batch_size=int(spec.get("batch_size", 16)),
            learning_rate=float(spec.get("lr", 1e-4)),
            loss=spec.get("loss", "l1"),
            seed=int(spec.get("seed", 0)),
            checkpoint_every=int(spec.get("checkpoint_every", 250)),
            keep_checkpoints=0,
            max_shift=int(spec.get("shift", 4)),
            device="cpu" if self.smoke else "auto",
            show_progress=False,
        )
        tic = time.perf_counter()
        log.info("pretrain %s: %s on %d slices, %d steps", name, spec["preset"], images.shape[0], options.steps)
        pretrain(images, backbone, out, options, resume=_latest_checkpoint(out) is not None)
        write_json(
            out / "pretrain_record.json",
            {"spec": spec, "slices": int(images.shape[0]), "seconds_last_run": round(time.perf_counter() - tic, 1)},
        )

    def load_backbone(self, name: str, step: Optional[int] = None):
        from tedm_core.model.checkpoint import load_backbone

        path = self.backbone_dir(name)
        if step is not None:
            path = path / "steps" / f"{int(step):08d}"
        key = str(path)
        if key not in self._backbones:
            self._backbones = {key: load_backbone(path)}  # one at a time: they are large
        return self._backbones[key]

    def available_steps(self, name: str) -> List[int]:
        steps_dir = self.backbone_dir(name) / "steps"
        if not steps_dir.is_dir():
            return []
        return sorted(int(p.name) for p in steps_dir.iterdir() if p.name.isdigit() and (p / "backbone.json").is_file())

    # -- reading scores -----------------------------------------------------------------------
    def rows(self, path: Path) -> List[Dict[str, Any]]:
        """A unit's metrics file, read once: the tables ask it for Dice, precision and recall."""
        if path not in self._rows:
            self._rows[path] = read_rows(path)
        return self._rows[path]

    def output_post(self, bundle_dir: Path) -> str:
        """Which of a unit's rows are its output as ``tedm segment`` writes it: "rule" when its
        bundle records anatomy post-processing (``ModelBundle.component_rule``), else "none"."""
        if bundle_dir not in self._outputs:
            meta_path = bundle_dir / "bundle.json"
            meta = read_json(meta_path) if meta_path.is_file() else {}
            self._outputs[bundle_dir] = "rule" if meta.get("component_rule") else "none"
        return self._outputs[bundle_dir]

    def per_image(
        self,
        backbone: str,
        step,
        method: str,
        n: int,
        seeds: Iterable[int],
        variant: str,
        set_name: str,
        timesteps=None,
        post: Optional[str] = None,
        metric: str = "dice",
    ) -> Optional[Dict[str, float]]:
        """Per-image ``metric`` (Dice, precision, recall) averaged over seeds, on the images every
        seed scored (None when any seed's metrics are missing). ``post``: "none" (raw), "rule"
        (anatomy post-processing), or None: each unit's output (``output_post``)."""
        per_seed = []
        for seed in seeds:
            unit = self.bundle_dir(backbone, step, method, n, seed, variant)
            path = self.metrics_path(unit, set_name, timesteps)
            if not path.is_file():
                return None
            wanted = post or self.output_post(unit)
            rows = [r for r in self.rows(path) if r.get("post", "none") == wanted]
            per_seed.append({r["image"]: r[metric] for r in rows})
        images = sorted(set.intersection(*(set(d) for d in per_seed)))
        return {i: float(np.mean([d[i] for d in per_seed])) for i in images}

    def validation_mean(self, name: str, step: int, n: int, seeds: Sequence[int]) -> Optional[float]:
        """The checkpoint rule's score: TEDM's mean Dice x 100 on each validation set (seeds
        averaged per image), then the mean over the sets, each weighing the same (None until
        every set is scored for every seed)."""
        means = []
        for set_name in self.config["cxr"].get("validation_sets", []):
            scores = self.per_image(name, step, "tedm", n, seeds, "default", set_name)
            if not scores:
                return None
            means.append(100 * float(np.mean(list(scores.values()))))
        return float(np.mean(means)) if means else None

    def choose_checkpoint(self) -> Optional[CheckpointChoice]:
        """The checkpoint sweep's choice: the highest seed-0 validation mean; where other
        checkpoints come within the sweep's ``tie_margin`` of it (one fit's luck moves the mean
        by more than a few hundredths), the highest mean over ``tie_seeds`` among them."""
        c = self.config["cxr"]
        sweep = c.get("checkpoint_sweep")
        if not sweep:
            return None
        n = sweep["n"]
        first = {s: self.validation_mean(c["backbone"], s, n, [0]) for s in sweep["steps"]}
        first = {s: v for s, v in first.items() if v is not None}
        if not first:
            return None
        best = max(first, key=first.get)
        margin, seeds = float(sweep.get("tie_margin", 0.0)), list(sweep.get("tie_seeds", [0]))
        tied = sorted(s for s, v in first.items() if v >= first[best] - margin)
        if len(tied) == 1 or seeds == [0]:
            return CheckpointChoice(best, first, tied, {})
        over_seeds = {s: self.validation_mean(c["backbone"], s, n, seeds) for s in tied}
        if any(v is None for v in over_seeds.values()):
            return CheckpointChoice(best, first, tied, {}, seeds_missing=True)
        return CheckpointChoice(max(over_seeds, key=over_seeds.get), first, tied, over_seeds)

    # -- chest X-ray data -----------------------------------------------------------------------
    def cxr_names(self) -> Dict[str, List[str]]:
        from tedm_core.io.images import list_images

        c = self.config["cxr"]
        root = resolve(self.data, c["data"])
        shenzhen = [p.name for p in list_images(root / "shenzhen" / "images")]
        pool = shenzhen[: c["pool"]]
        covid_gb = [p.name for p in list_images(root / "covid_gb" / "images")]
        in_gb = set(covid_gb)
        covid_v7 = [p.name for p in list_images(root / "covid_v7" / "images") if p.name not in in_gb]
        limit = c.get("max_test_images")
        cut = (lambda names: names[:limit]) if limit else (lambda names: names)
        return {
            "pool": pool,
            "shenzhen_test": cut(shenzhen[c["pool"] :]),
            "covid_gb": cut(covid_gb),
            "covid_v7_val": covid_v7[: c.get("covid_v7_validation_images", 100)],
        }

    def fit_subset(self, n: int, seed: int) -> List[str]:
        """Seed 0: the first n pool images (``tedm fit --n``); other seeds: n drawn at random."""
        pool = self.cxr_names()["pool"]
        if seed == 0:
            return pool[:n]
        rng = np.random.default_rng(seed)
        return sorted(pool[i] for i in rng.choice(len(pool), size=n, replace=False))

    def labelled_pool_images(self, names: Sequence[str], intensity) -> Tuple[np.ndarray, np.ndarray]:
        """Pool images (normalised with ``intensity``) and their masks (0 / 255), to fit on."""
        from tedm_core.io.images import read_grey, read_label_image
        from tedm_core.preprocessing.intensity import normalise_intensity

        root = resolve(self.data, self.config["cxr"]["data"]) / "shenzhen"
        images = np.stack([normalise_intensity(read_grey(root / "images" / f), intensity) for f in names])
        masks = np.stack([read_label_image(root / "masks" / f, [0, 255]) for f in names])
        return images, masks

    def image_set(self, name: str, intensity, fit_names: Sequence[str] = ()) -> Optional[ImageSet]:
        """Test sets by name; ``validation`` (pool minus the fitted images) and ``validation_framed``
        depend on the fit subset."""
        from tedm_core.io.images import read_grey, read_label_image
        from tedm_core.preprocessing.intensity import normalise_intensity

        key = (name, self.fit_key(name, fit_names))
        if key in self._sets:
            return self._sets[key]
        root = resolve(self.data, self.config["cxr"]["data"])
        names = self.cxr_names()
        if name.startswith("validation"):
            files = [n for n in names["pool"] if n not in set(fit_names)][
                : self.config["cxr"].get("max_validation_images")
            ]
            folder = "shenzhen"
        else:
            files = names[name]
            folder = {"shenzhen_test": "shenzhen", "covid_gb": "covid_gb", "covid_v7_val": "covid_v7"}[name]
        if not files:
            return None  # e.g. validation when every pool image was used for fitting (n = 40)
        images = np.stack([normalise_intensity(read_grey(root / folder / "images" / f), intensity) for f in files])
        masks = np.stack([read_label_image(root / folder / "masks" / f, [0, 255]) for f in files])
        if name == "validation_framed":
            images, masks = reframe(images, masks)
        image_set = ImageSet(name, images.astype(np.float32), masks.astype(np.int64), list(files))
        if len(self._sets) > 6:
            self._sets.clear()
        self._sets[key] = image_set
        return image_set

    # -- fitting and scoring --------------------------------------------------------------------
    def bundle_dir(self, backbone: str, step: Optional[int], method: str, n: int, seed: int, variant: str) -> Path:
        where = f"{backbone}_{step if step is not None else 'final'}"
        suffix = "" if variant == "default" else f"_{variant}"
        return self.work / "cxr" / "bundles" / where / f"{method}_n{n}_s{seed}{suffix}"

    def fit_options(self, method: str, variant: str = "default") -> Dict[str, Any]:
        """The ``fit_bundle`` options of ``method``: the config's ``fit``, then the variant's."""
        c = self.config["cxr"]
        options = dict(c.get("fit", {}))
        options.update(c.get("variants", {}).get(variant, {}).get("fit", {}))
        if method == "baseline":
            return {"steps": options["baseline_steps"]} if "baseline_steps" in options else {}
        options.pop("baseline_steps", None)
        if method == "probe" and "probe_steps" in c:
            options["steps"] = c["probe_steps"]
        return options

    def fit(
        self,
        backbone_name: str,
        step: Optional[int],
        method: str,
        n: int,
        seed: int,
        variant: str = "default",
        timesteps=None,
    ):
        """A fitted bundle (loaded if this unit already ran)."""
        from tedm_core.bundle import load_bundle, save_bundle
        from tedm_core.pipelines.fit import fit_bundle

        path = self.bundle_dir(backbone_name, step, method, n, seed, variant)
        if (path / "bundle.json").is_file():
            return load_bundle(path)
        backbone = self.load_backbone(backbone_name, step)
        fit_names = self.fit_subset(n, seed)
        images, masks = self.labelled_pool_images(fit_names, backbone.intensity)
        options = self.fit_options(method, variant)
        if timesteps is not None:
            options["timesteps"] = tuple(timesteps)
        tic = time.perf_counter()
        bundle = fit_bundle(
            backbone,
            images,
            masks,
            method,
            ["background", "lung"],
            [0, 255],
            seed=seed,
            device="cpu" if self.smoke else "auto",
            show_progress=False,
            **options,
        )
        bundle.training["sources"] = list(fit_names)
        bundle.training["variant"] = variant
        save_bundle(bundle, path, overwrite=True)
        log.info(
            "fit %s n=%d seed=%d %s on %s@%s: %.0f s",
            method,
            n,
            seed,
            variant,
            backbone_name,
            step,
            time.perf_counter() - tic,
        )
        return bundle

    def features(self, bundle, backbone_key: str, image_set: ImageSet, timesteps: Tuple[int, ...], fit_key: str = ""):
        """Decoder features of an image set for ``timesteps`` (float16, kept while the set is in use):
        every head on one backbone and one set of timesteps reads the same features."""
        from tedm_core.pipelines.segment import Segmenter

        key = (
            backbone_key,
            image_set.name + fit_key,
            tuple(timesteps),
            bundle.test_time_flip,
            bundle.crop_dark_borders,
            bundle.head.config.levels,
        )
        if key not in self._features:
            # float16, ~4 MB per image for 8 steps of `small4`: the study's sets fit in a few GB.
            while len(self._features) >= int(self.config.get("feature_cache_entries", 8)):
                self._features.pop(next(iter(self._features)))
            segmenter = Segmenter(bundle, device="cpu" if self.smoke else "auto", timesteps=timesteps)
            tic = time.perf_counter()
            self._features[key] = segmenter.predict(image_set.images, keep_features=True).features
            log.info(
                "features of %s (%d images, %d steps): %.0f s",
                image_set.name,
                len(image_set.names),
                len(timesteps),
                time.perf_counter() - tic,
            )
        return self._features[key]

    @staticmethod
    def fit_key(set_name: str, fit_names: Sequence[str]) -> str:
        """What a set's cached features depend on beside its name: the validation sets are the pool
        images a fit did not use, so they differ with the fit subset."""
        return ",".join(fit_names) if set_name.startswith("validation") else ""

    def predict(
        self,
        bundle,
        backbone_key: str,
        image_set: ImageSet,
        timesteps: Optional[Tuple[int, ...]] = None,
        fit_key: str = "",
    ):
        """``bundle``'s prediction (``SlicePrediction``) on ``image_set``, from the study's feature
        cache: every head on one backbone and set reads the same features."""
        from tedm_core.pipelines.segment import Segmenter

        device = "cpu" if self.smoke else "auto"
        if bundle.head is None:
            return Segmenter(bundle, device=device).predict(image_set.images)
        wanted = tuple(timesteps or bundle.prediction_timesteps)
        if bundle.head.config.mode == "concat":
            cache = self.features(bundle, backbone_key, image_set, bundle.timesteps, fit_key)
        else:
            # Shared heads (TEDM, single steps, probes) read a subset of the 8 TEDM steps' features.
            from tedm_core.features import TEDM_TIMESTEPS

            base = TEDM_TIMESTEPS if set(wanted) <= set(TEDM_TIMESTEPS) else wanted
            full = self.features(bundle, backbone_key, image_set, base, fit_key)
            cache = full.select_timesteps([base.index(t) for t in wanted])
        segmenter = Segmenter(bundle, device=device, timesteps=wanted if bundle.head.config.mode == "shared" else None)
        return segmenter.predict_from_features(cache)

    def score(
        self,
        bundle,
        backbone_key: str,
        image_set: ImageSet,
        timesteps: Optional[Tuple[int, ...]] = None,
        fit_key: str = "",
        rule=None,
    ) -> List[Dict[str, Any]]:
        """Per-image Dice, precision and recall of ``bundle`` on ``image_set``: raw (post "none")
        and post-processed by the anatomy ``rule`` (post "rule": ``Study.anatomy_rule``)."""
        from tedm_core.pipelines.evaluate import dice_precision_recall

        prediction = self.predict(bundle, backbone_key, image_set, timesteps, fit_key)
        labels = prediction.labels
        variants = [("none", labels), ("rule", rule.apply(labels))]
        rows = []
        for post, predicted in variants:
            for name, p, t in zip(image_set.names, predicted, image_set.masks):
                d, pr, r = dice_precision_recall(p > 0, t > 0)
                rows.append({"image": name, "post": post, "dice": d, "precision": pr, "recall": r})
        return rows

    def anatomy_rule(self, bundle, fit_names: Sequence[str]):
        """The rule a unit's "rule" rows apply: its bundle's, or for a model that records none, the
        rule its labelled images ``fit_names`` give, so that every method's post-processing is
        measured on validation."""
        from tedm_core.postprocessing import ComponentRule

        if bundle.component_rule is not None:
            return bundle.component_rule
        return ComponentRule.learn(self.labelled_pool_images(fit_names, bundle.intensity)[1], bundle.num_classes)

    @staticmethod
    def metrics_path(bundle_path: Path, set_name: str, timesteps: Optional[Sequence[int]] = None) -> Path:
        """A unit's per-image scores on ``set_name``; with ``timesteps``, its ablation on those steps."""
        tag = "" if not timesteps else "_t" + "-".join(str(t) for t in timesteps)
        return bundle_path / "metrics" / f"{set_name}{tag}.csv"

    @staticmethod
    def scored(metrics: Path) -> bool:
        """Whether ``metrics`` holds both kinds of rows (files of studies before session 16 hold no
        "rule" rows: scored again)."""
        return metrics.is_file() and any(r.get("post") == "rule" for r in read_rows(metrics))

    def evaluate_unit(
        self, backbone_name, step, method, n, seed, variant, sets, timesteps=None, fit_timesteps=None
    ) -> None:
        """Fit (if needed) and score on every set that has no metrics file yet."""
        from tedm_core.pipelines.evaluate import sample_std

        path = self.bundle_dir(backbone_name, step, method, n, seed, variant)
        pool_left = len(self.cxr_names()["pool"]) - n
        todo = [
            s
            for s in sets
            if not self.scored(self.metrics_path(path, s, timesteps))
            and (pool_left > 0 or not s.startswith("validation"))
        ]
        if not todo:
            return
        bundle = self.fit(backbone_name, step, method, n, seed, variant, fit_timesteps)
        fit_names = self.fit_subset(n, seed)
        rule = self.anatomy_rule(bundle, fit_names)
        backbone_key = f"{backbone_name}@{step}"
        for set_name in todo:
            image_set = self.image_set(set_name, bundle.intensity, fit_names)
            if image_set is None:
                continue
            fit_key = self.fit_key(set_name, fit_names)
            tic = time.perf_counter()
            rows = self.score(bundle, backbone_key, image_set, tuple(timesteps) if timesteps else None, fit_key, rule)
            write_rows(self.metrics_path(path, set_name, timesteps), rows)
            output = "rule" if bundle.component_rule is not None else "none"
            dice = [r["dice"] for r in rows if r["post"] == output]
            log.info(
                "%s n=%d s=%d %s %s%s: Dice %.1f +- %.1f (%.0f s)",
                method,
                n,
                seed,
                variant,
                set_name,
                f" t={timesteps}" if timesteps else "",
                100 * np.mean(dice),
                100 * sample_std(dice),
                time.perf_counter() - tic,
            )

    def run_cxr(self) -> None:
        c = self.config["cxr"]
        name = c["backbone"]
        step = c.get("checkpoint")
        test_sets = c["test_sets"]
        validation = c.get("validation_sets", [])
        # 0. validation-only variants (augmentation, ...), never scored on the test sets; first,
        # because they decide the defaults the rest uses.
        parts = self.config.get("cxr_parts", CXR_PARTS)
        for variant, spec in c.get("variants", {}).items() if "variants" in parts else ():
            for method in spec.get("methods", ["tedm"]):
                for n in spec.get("n", [3]):
                    for seed in spec.get("seeds", [0]):
                        self.evaluate_unit(
                            name,
                            spec.get("checkpoint", step),
                            method,
                            n,
                            seed,
                            variant,
                            spec.get("sets", validation),
                        )
        # 1. the main grid: methods x n x seeds, on validation and test sets; the supervised
        # baseline (1,000 UNet training steps per fit) is its own part and runs last.
        for n in c["n"] if "main" in parts else ():
            for method in [m for m in c["methods"] if m != "baseline"]:
                for seed in cxr_seeds(c, method, n):
                    self.evaluate_unit(name, step, method, n, seed, "default", validation + test_sets)
        # 2. single-step ablations: the TEDM head on one step (the paper's Table 2).
        for n in c.get("ablation", {}).get("n", []) if "ablation" in parts else ():
            for steps in map(ablation_steps, c["ablation"]["timesteps"]):
                for seed in cxr_seeds(c, "tedm", n):
                    self.evaluate_unit(name, step, "tedm", n, seed, "default", validation + test_sets, timesteps=steps)
        # 3. step-wise logistic probes, one per timestep (the paper's Figure 2).
        for n in c.get("probe", {}).get("n", []) if "probes" in parts else ():
            for t in c["probe"]["timesteps"]:
                self.evaluate_unit(name, step, "probe", n, 0, f"probe{t}", test_sets, fit_timesteps=(t,))
        # 4. the checkpoint sweep: TEDM at n (seed 0) on every listed checkpoint that exists.
        sweep = c.get("checkpoint_sweep", {}) if "sweep" in parts else {}
        available = self.available_steps(name)
        for s in sweep.get("steps", []):
            if s in available:
                self.evaluate_unit(name, s, "tedm", sweep["n"], 0, "default", validation + test_sets)
            else:
                log.warning("checkpoint sweep: %s has no step %d checkpoint (yet)", name, s)
        # ... and where checkpoints tie on seed 0, the tie seeds at each of them, validation sets only.
        choice = self.choose_checkpoint() if sweep else None
        for s in choice.tied if choice and len(choice.tied) > 1 else ():
            for seed in sweep.get("tie_seeds", [0]):
                self.evaluate_unit(name, s, "tedm", sweep["n"], seed, "default", validation)

        # 5. the supervised baseline, last: by far the most expensive fits.
        for n in c["n"] if "baseline" in parts and "baseline" in c["methods"] else ():
            for seed in cxr_seeds(c, "baseline", n):
                self.evaluate_unit(name, step, "baseline", n, seed, "default", validation + test_sets)

    # -- compute ------------------------------------------------------------------------------
    def run_compute(self) -> None:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from compute_counts import count_macs

        for preset in self.config["compute"]["presets"]:
            out = self.work / "compute" / f"{preset}.json"
            if out.is_file():
                continue
            size = self.config["compute"].get("image_size", {}).get(preset)
            write_json(out, count_macs(preset, size))

    # -- BraTS --------------------------------------------------------------------------------
    def brats_subjects(self) -> List[Path]:
        b = self.config["brats"]
        root = resolve(self.data, b["data"])
        return sorted(p for p in root.iterdir() if p.is_dir())[: b.get("max_subjects")]

    def brats_volume(self, subject: Path):
        """(image volume, whole-tumour classes (K, J, I)); the last few are kept (each read takes seconds)."""
        if subject not in self._volumes:
            while len(self._volumes) >= 3:
                self._volumes.pop(next(iter(self._volumes)))
            self._volumes[subject] = self._read_brats(subject)
        return self._volumes[subject]

    def _read_brats(self, subject: Path):
        from tedm_core.io.volumes import read_case, read_volume
        from tedm_core.pipelines.volume import label_array_to_classes

        b = self.config["brats"]
        channels = b["channels"]
        volume = read_case([subject / f"{c}.nii.gz" for c in channels], channel_names=channels)
        truth = label_array_to_classes(read_volume(subject / b["label"], allow_constant=True), [0, 1])
        crop = b.get("crop_k")
        if crop:
            # Smoke runs only: a slab of axial slices (K is the axial axis of these files).
            from tedm_core.io.volumes import Volume

            ijk_to_ras = volume.ijk_to_ras.copy()
            ijk_to_ras[:3, 3] += ijk_to_ras[:3, 2] * crop[0]  # the slab's first voxel keeps its world position
            volume = Volume(volume.array[:, crop[0] : crop[1]], ijk_to_ras, volume.path, list(volume.channel_names))
            truth = truth[crop[0] : crop[1]]
        return volume, truth

    def brats_fit(
        self, method: str, n_subjects: int, per_case: Optional[int] = None, subjects: Optional[List[Path]] = None
    ):
        """``method`` fitted on the tumour slices of the first ``n_subjects`` subjects (or of
        ``subjects``, named in the bundle's folder): all of them, or ``per_case`` of each (default:
        the config's ``slices_per_case``), spread through the tumour's interior as a clinician
        would pick them (not its first and last slice, where the tumour is a sliver)."""
        from tedm_core.bundle import load_bundle, save_bundle
        from tedm_core.io.volumes import Volume
        from tedm_core.pipelines.fit import fit_bundle
        from tedm_core.pipelines.volume import labelled_slices_from_volumes

        b = self.config["brats"]
        per_case = per_case or b.get("slices_per_case")
        fitted_on = f"{n_subjects}subj" if subjects is None else "+".join(s.name for s in subjects)
        path = self.work / "brats" / "bundles" / f"{method}_{fitted_on}_{per_case or 'all'}slices"
        if (path / "bundle.json").is_file():
            return load_bundle(path)
        backbone = self.load_backbone(b["backbone"], b.get("checkpoint"))
        slices, labels = [], []
        for subject in self.brats_subjects()[:n_subjects] if subjects is None else subjects:
            volume, truth = self.brats_volume(subject)
            label_volume = Volume(truth[None].astype(np.float32), volume.ijk_to_ras, subject / b["label"])
            labelled = labelled_slices_from_volumes(
                volume, label_volume, backbone.intensity, [0, 1], channel_names=b["channels"]
            )
            keep = interior_positions(len(labelled.slices), per_case) if per_case else list(range(len(labelled.slices)))
            slices.append(labelled.slices[keep])
            labels.append(labelled.labels[keep])
        options = (
            {"steps": b["baseline_steps"]} if method == "baseline" and "baseline_steps" in b else dict(b.get("fit", {}))
        )
        bundle = fit_bundle(
            backbone,
            np.concatenate(slices),
            np.concatenate(labels),
            method,
            ["background", "tumour"],
            [0, 1],
            device="cpu" if self.smoke else "auto",
            show_progress=False,
            **options,
        )
        save_bundle(bundle, path, overwrite=True)
        return bundle

    def run_brats(self) -> None:
        from tedm_core.pipelines.evaluate import dice_precision_recall
        from tedm_core.pipelines.segment import Segmenter
        from tedm_core.pipelines.volume import segment_volume

        b = self.config["brats"]
        subjects = self.brats_subjects()
        # The correct-and-refine curve first: it is the product's own promise and no paper has it,
        # so a run cut short on a small machine should have measured it before the table.
        if b.get("refine"):
            self.run_refine_curve(subjects)
        test = subjects[max(b["n_subjects"]) :]
        for n_subjects in b["n_subjects"]:
            for method in b["methods"]:
                out = self.work / "brats" / "metrics" / f"{method}_{n_subjects}subj.csv"
                if out.is_file():
                    continue
                bundle = self.brats_fit(method, n_subjects)
                segmenter = Segmenter(bundle, device="cpu" if self.smoke else "auto")
                rows = []
                for subject in test:
                    volume, truth = self.brats_volume(subject)
                    result = segment_volume(segmenter, volume, keep_probabilities=False)
                    d, p, r = dice_precision_recall(result.labels > 0, truth > 0)
                    rows.append({"image": subject.name, "post": "none", "dice": d, "precision": p, "recall": r})
                    log.info("brats %s %d subj %s: Dice %.1f", method, n_subjects, subject.name, 100 * d)
                write_rows(out, rows)

    def run_refine_curve(self, subjects: List[Path]) -> None:
        """Issue 10 item 3: start from the 3-slice model; per round, the two worst tumour slices
        (the most wrongly labelled voxels, see ``most_wrong_slices``) are corrected to the ground
        truth and Refine runs. Controls: the corrections pasted in with no learning, and a head
        fitted from scratch on the same corrected slices."""
        from tedm_core.pipelines.evaluate import dice_precision_recall
        from tedm_core.pipelines.interactive import InteractiveSession
        from tedm_core.slicing import reassemble, to_slices

        b = self.config["brats"]
        spec = b["refine"]
        held_out = subjects[spec["fit_subjects"] :][: spec.get("max_subjects")]
        if spec.get("subjects"):  # a named share of them, e.g. for a second process on another core
            held_out = [s for s in held_out if s.name in set(spec["subjects"])]
        for subject in held_out:
            out = self.work / "brats" / "refine" / f"{subject.name}.json"
            if out.is_file():
                continue
            bundle = self.brats_fit("tedm", spec["fit_subjects"], spec.get("fit_slices"))
            backbone = self.load_backbone(b["backbone"], b.get("checkpoint"))
            tic = time.perf_counter()
            volume, truth = self.brats_volume(subject)
            session = InteractiveSession(volume)
            result = session.segment(bundle, axis="axial", device="cpu" if self.smoke else "auto")
            layout = session.layout
            truth_slices = to_slices(truth, layout)
            start = to_slices(result.labels, layout).copy()
            current = start.copy()
            corrected: List[int] = []
            record = {
                "subject": subject.name,
                "rounds": [],
                "start_dice": dice_precision_recall(result.labels > 0, truth > 0)[0],
            }
            for round_index in range(1, spec["rounds"] + 1):
                worst = most_wrong_slices(current, truth_slices, corrected, spec["slices_per_round"])
                if not worst:
                    break
                corrected += worst
                edited = current.copy()
                edited[worst] = truth_slices[worst]
                refined = session.refine(reassemble(edited, layout))
                current = to_slices(refined.labels, layout).copy()
                pasted = start.copy()
                pasted[corrected] = truth_slices[corrected]
                row = {
                    "round": round_index,
                    "corrected": list(corrected),
                    "refine_dice": dice_precision_recall(refined.labels > 0, truth > 0)[0],
                    "paste_only_dice": dice_precision_recall(reassemble(pasted, layout) > 0, truth > 0)[0],
                    "refine_seconds": round(refined.seconds, 1),
                }
                if round_index in spec.get("scratch_rounds", []):
                    scratch = self.scratch_control(session, backbone, truth_slices, corrected)
                    row["scratch_dice"] = dice_precision_recall(reassemble(scratch, layout) > 0, truth > 0)[0]
                record["rounds"].append(row)
                log.info(
                    "refine %s round %d: refine %.1f paste %.1f%s",
                    subject.name,
                    round_index,
                    100 * row["refine_dice"],
                    100 * row["paste_only_dice"],
                    f" scratch {100 * row['scratch_dice']:.1f}" if "scratch_dice" in row else "",
                )
            record["seconds"] = round(time.perf_counter() - tic, 1)
            session.close()
            write_json(out, record)

    def scratch_control(self, session, backbone, truth_slices: np.ndarray, corrected: List[int]) -> np.ndarray:
        """The curve's control: a TEDM head fitted from scratch (the study's fit settings) on the
        corrected slices alone, applied to every slice; those slices keep their correction.
        When the session kept its decoder features, the new head reads them: the backbone and
        the inference noise are the same, so they are the features a new segmentation computes."""
        from tedm_core.pipelines.fit import fit_bundle
        from tedm_core.pipelines.segment import Segmenter
        from tedm_core.pipelines.volume import nonempty_slice_mask

        b = self.config["brats"]
        device = "cpu" if self.smoke else "auto"
        options = dict(b.get("fit", {}))
        bundle = fit_bundle(
            backbone,
            session.slices[corrected],
            truth_slices[corrected],
            "tedm",
            ["background", "tumour"],
            [0, 1],
            device=device,
            show_progress=False,
            **options,
        )
        labels = np.zeros_like(truth_slices)
        segmenter = Segmenter(bundle, device=device)
        if session.features is not None:
            ran = np.flatnonzero(session.feature_rows >= 0)
            labels[ran] = segmenter.predict_from_features(session.features).labels[session.feature_rows[ran]]
        else:
            ran = np.flatnonzero(nonempty_slice_mask(session.slices))
            segmenter.predict_into(session.slices, ran, labels, np.zeros(labels.shape, np.float32))
        labels[corrected] = truth_slices[corrected]
        return labels


# ---------------------------------------------------------------------------------------------
# the report: tables, plot, statistics, summary.json


def most_wrong_slices(labels: np.ndarray, truth: np.ndarray, exclude: Sequence[int], count: int) -> List[int]:
    """The ``count`` tumour slices (N, H, W) with the most wrongly labelled voxels, ``exclude``
    left out, ties to the lower index; a slice is a tumour slice when its ground truth shows
    tumour, and slices without an error are never chosen.

    What a clinician correcting the worst slices fixes, and what moves the 3D Dice. Ranked by
    slice Dice instead, the worst slices were the tumour's first and last ones, where it is a
    sliver of a few voxels (session 4: on CBICA_AOO all ten corrections were such slices).
    Slices without tumour are left out as the protocol says ("the worst tumour slices"): on
    CBICA_AQN the two slices with the most errors held no tumour at all, only false positives."""
    wrong = ((labels > 0) != (truth > 0)).reshape(len(labels), -1).sum(axis=1)
    wrong[~(truth > 0).reshape(len(truth), -1).any(axis=1)] = 0
    wrong[list(exclude)] = 0
    ranked = sorted((int(i) for i in np.flatnonzero(wrong)), key=lambda i: (-int(wrong[i]), i))
    return ranked[:count]


def _mean_std(values: Sequence[float]) -> str:
    """Mean +- sample SD (ddof=1; 0.0 for one value) x 100 (README "Conventions")."""
    from tedm_core.pipelines.evaluate import sample_std

    return f"{100 * np.mean(values):.1f} +- {100 * sample_std(values):.1f}"


def _on_common(*scores: Dict[str, float]) -> List[Dict[str, float]]:
    """Each per-image score dict cut to the images all of them scored, so that their means
    compare like with like."""
    common = set.intersection(*(set(s) for s in scores))
    return [{k: v for k, v in s.items() if k in common} for s in scores]


class Report:
    METHOD_NAMES = {"tedm": "TEDM", "ledm": "LEDM", "ledme": "LEDMe", "baseline": "baseline"}

    def __init__(self, study: Study) -> None:
        self.study = study
        self.config = study.config
        self.out = study.results
        self.lines: List[str] = []
        self.summary: Dict[str, Any] = {}

    def tedm_scores(self, name, step, n: int, set_name: str, timesteps=None, post: Optional[str] = None):
        """TEDM's per-image Dice on one set, over the seeds the config runs it with."""
        seeds = cxr_seeds(self.config["cxr"], "tedm", n)
        return self.study.per_image(name, step, "tedm", n, seeds, "default", set_name, timesteps, post)

    def table(
        self,
        title: str,
        rows: List[Tuple[str, Dict[Any, Optional[Dict[str, float]]]]],
        columns: List[Any],
        column_name,
        unit: str = "images",
    ) -> List[str]:
        """Rows x columns of mean +- sample SD x100. Within a column every row is averaged over the
        same images: those every measured row of the column scored (rows fitted with more seeds
        score fewer images, the ones no seed fitted on); their number is in the column's header.
        Per column, the best mean and every row the paired Wilcoxon test cannot tell from it
        (p >= 0.05) in bold; where the column has too few images for the test to reach p < 0.05
        at all (n <= 5), nothing is bold and a note under the table says so."""
        from tedm_core.pipelines.evaluate import paired_wilcoxon, wilcoxon_can_reach, wilcoxon_min_p

        bold: Dict[Tuple[int, Any], bool] = {}
        shared: Dict[Any, List[str]] = {}
        notes: List[str] = []
        for c in columns:
            cells = [(i, r[1].get(c)) for i, r in enumerate(rows) if r[1].get(c)]
            if not cells:
                continue
            common = sorted(set.intersection(*(set(scores) for _, scores in cells)))
            shared[c] = common
            if not common:
                notes.append(f"{column_name(c)}: no {unit} scored by every row, so no row is compared.")
                continue
            if not wilcoxon_can_reach(len(common)):
                notes.append(
                    f"{column_name(c)}: n = {len(common)} {unit} is too small for the paired Wilcoxon test to "
                    f"reach p < 0.05 (its smallest two-sided p is {wilcoxon_min_p(len(common)):.3g}), "
                    "so no cell is bold."
                )
                continue
            best_i, best = max(cells, key=lambda item: np.mean([item[1][k] for k in common]))
            for i, scores in cells:
                p = 1.0 if i == best_i else paired_wilcoxon([scores[k] for k in common], [best[k] for k in common])
                bold[(i, c)] = p >= 0.05
        header = [column_name(c) + (f" ({len(shared[c])} {unit})" if c in shared else "") for c in columns]
        lines = [
            f"**{title}**",
            "",
            f"Each column: mean +- sample SD over the {unit} every row of it scored (their number in brackets).",
            "",
            "| | " + " | ".join(header) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for i, (label, cells) in enumerate(rows):
            out = []
            for c in columns:
                scores = cells.get(c)
                if not scores or not shared.get(c):
                    out.append("not measured" if not scores else "no common " + unit)
                    continue
                text = _mean_std([scores[k] for k in shared[c]])
                out.append(f"**{text}**" if bold.get((i, c)) else text)
            lines.append(f"| {label} | " + " | ".join(out) + " |")
        if notes:
            lines += ["", "Notes: " + " ".join(notes)]
        return lines + [""]

    def p_value(self, a: Optional[Dict[str, float]], b: Optional[Dict[str, float]]) -> Optional[float]:
        from tedm_core.pipelines.evaluate import paired_wilcoxon

        if not a or not b:
            return None
        common = sorted(set(a) & set(b))
        return paired_wilcoxon([a[k] for k in common], [b[k] for k in common])

    def cxr(self) -> None:
        c = self.config["cxr"]
        name, step = c["backbone"], c.get("checkpoint")
        sets = c.get("validation_sets", []) + c["test_sets"]
        self.lines += ["## Chest X-ray: Dice x 100 (mean +- sample SD over images; seeds averaged per image first)", ""]
        self.lines += [
            "Seeds per method and n: "
            + "; ".join(
                f"{self.METHOD_NAMES.get(m, m)} n = {n}: {', '.join(map(str, cxr_seeds(c, m, n)))}"
                for m in c["methods"]
                for n in c["n"]
            ),
            "",
        ]
        tests: List[str] = ["| set | n | method | vs TEDM: Wilcoxon p | TEDM better on |", "|---|---|---|---|---|"]
        for set_name in sets:
            rows = []
            for method in c["methods"]:
                rows.append(
                    (
                        self.METHOD_NAMES.get(method, method),
                        {
                            n: self.study.per_image(name, step, method, n, cxr_seeds(c, method, n), "default", set_name)
                            for n in c["n"]
                        },
                    )
                )
            role = "validation, never quoted as accuracy" if set_name in c.get("validation_sets", []) else "test"
            self.lines += self.table(f"{set_name} ({role})", rows, c["n"], lambda n: f"n = {n}")
            tedm = dict(rows[0][1]) if c["methods"][0] == "tedm" else {}
            for method, (_, cells) in zip(c["methods"][1:], rows[1:]):
                for n in c["n"]:
                    p = self.p_value(tedm.get(n), cells.get(n))
                    if p is not None:
                        common = sorted(set(tedm[n]) & set(cells[n]))
                        wins = sum(tedm[n][k] > cells[n][k] for k in common)
                        tests.append(f"| {set_name} | {n} | {method} | {p:.2g} | {wins} of {len(common)} |")
                        if n == 3 and set_name == "covid_gb" and method in ("baseline", "ledm"):
                            self.summary[f"p_tedm_vs_{method}_covid_gb_n3"] = p
        self.lines += (
            ["**Paired Wilcoxon signed-rank tests against TEDM** (per image, Dice averaged over seeds)", ""]
            + tests
            + [""]
        )
        for set_name, key in (("shenzhen_test", "shenzhen_tedm_n3"), ("covid_gb", "covid_gb_tedm_n3")):
            scores = self.tedm_scores(name, step, 3, set_name)
            if scores:
                self.summary[key] = round(100 * float(np.mean(list(scores.values()))), 2)
        # Post-processing, on validation sets only: the choice per method (FitOptions.postprocess).
        pp_lines = [
            "| method | set | n | Dice raw | anatomy rule: the labelled masks' regions kept, holes filled |",
            "|---|---|---|---|---|",
        ]
        for method in c["methods"]:
            for set_name in c.get("validation_sets", []):
                for n in c["n"]:
                    unit = (name, step, method, n, cxr_seeds(c, method, n), "default", set_name)
                    raw, pp = self.study.per_image(*unit, post="none"), self.study.per_image(*unit, post="rule")
                    raw, pp = _on_common(raw, pp) if raw and pp else (None, None)
                    if raw and pp:
                        difference = 100 * (np.mean(list(pp.values())) - np.mean(list(raw.values())))
                        pp_lines.append(
                            f"| {method} | {set_name} | {n} | {_mean_std(list(raw.values()))} | "
                            f"{_mean_std(list(pp.values()))} ({difference:+.2f}, p = {self.p_value(raw, pp):.2g}) |"
                        )
        self.lines += [
            "**Anatomy post-processing (validation sets only)**: the tables above show each model's output, "
            "post-processed where its bundle records the rule (by default TEDM, LEDM and LEDMe on radiographs: "
            "pipelines.fit.POSTPROCESSED_METHODS), raw otherwise.",
            "",
        ] + pp_lines + [""]  # fmt: skip
        self.ablation(name, step, sets)
        self.probes(name, step)
        self.sweep(name)
        self.variants(name, step)

    def ablation(self, name, step, sets) -> None:
        c = self.config["cxr"]
        for n in c.get("ablation", {}).get("n", []):
            rows = [
                (
                    f"step {steps[0]} alone" if len(steps) == 1 else "steps " + ", ".join(map(str, steps)),
                    {s: self.tedm_scores(name, step, n, s, steps) for s in sets},
                )
                for steps in map(ablation_steps, c["ablation"]["timesteps"])
            ]
            rows.append(
                ("TEDM (as fitted, with its inference steps)", {s: self.tedm_scores(name, step, n, s) for s in sets})
            )
            self.lines += self.table(
                f"Single-step ablation, n = {n} (the TEDM head, fitted on its 8 steps, applied to one step or a "
                "subset; paper's Table 2)",
                rows,
                sets,
                str,
            )

    def probes(self, name, step) -> None:
        c = self.config["cxr"]
        data: Dict[Tuple[int, str], List[Tuple[int, float]]] = {}
        for n in c.get("probe", {}).get("n", []):
            for set_name in c["test_sets"]:
                for t in c["probe"]["timesteps"]:
                    scores = self.study.per_image(name, step, "probe", n, [0], f"probe{t}", set_name)
                    if scores:
                        data.setdefault((n, set_name), []).append((t, float(np.mean(list(scores.values())))))
        if not data:
            return
        lines = [
            "| n | set | " + " | ".join(f"t = {t}" for t in c["probe"]["timesteps"]) + " |",
            "|---|---|" + "---|" * len(c["probe"]["timesteps"]),
        ]
        for (n, set_name), points in sorted(data.items()):
            by_t = dict(points)
            lines.append(
                f"| {n} | {set_name} | "
                + " | ".join(f"{100 * by_t[t]:.1f}" if t in by_t else "not measured" for t in c["probe"]["timesteps"])
                + " |"
            )
        self.lines += (
            [
                "**Step-wise logistic probes** (one logistic pixel classifier per timestep; paper's Figure 2), "
                "Dice x 100",
                "",
            ]
            + lines
            + ["", "![probes](probes.png)", ""]
        )
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sets = c["test_sets"]
        fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
        for ax, set_name in zip(axes[0], sets):
            for n in c.get("probe", {}).get("n", []):
                points = sorted(data.get((n, set_name), []))
                if points:
                    ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=f"n = {n}")
            ax.set_xscale("log")
            ax.set_xlabel("timestep t")
            ax.set_ylabel("Dice x 100")
            ax.set_title(set_name)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        self.out.mkdir(parents=True, exist_ok=True)
        from tedm_core.io.atomic import atomic_path

        with atomic_path(self.out / "probes.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)

    def sweep(self, name) -> None:
        c = self.config["cxr"]
        sweep = c.get("checkpoint_sweep")
        if not sweep:
            return
        validation = c.get("validation_sets", [])
        header = validation + ["mean of the validation sets"] + c["test_sets"]
        lines = ["| backbone step | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
        covid = {}
        choice = self.study.choose_checkpoint()
        validation_mean = choice.seed0 if choice else {}
        for s in sweep["steps"]:
            scores = {
                v: self.study.per_image(name, s, "tedm", sweep["n"], [0], "default", v)
                for v in validation + c["test_sets"]
            }
            means = {v: 100 * float(np.mean(list(x.values()))) for v, x in scores.items() if x}
            cell = {v: _mean_std(list(x.values())) if x else "not measured" for v, x in scores.items()}
            cell["mean of the validation sets"] = (
                f"{validation_mean[s]:.2f}" if s in validation_mean else "not measured"
            )
            cells = [cell[h] for h in header]
            if "covid_gb" in means:
                covid[s] = means["covid_gb"]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        self.lines += (
            [f"**Checkpoint sweep**: TEDM, n = {sweep['n']}, seed 0, per backbone checkpoint", ""] + lines + [""]
        )
        if choice:
            rule = f"the highest mean over {', '.join(validation)}"
            if len(choice.tied) > 1:
                seeds = ", ".join(map(str, sweep.get("tie_seeds", [0])))
                rule += (
                    f"; {', '.join(map(str, choice.tied))} came within {sweep.get('tie_margin', 0)} of the best on "
                    f"seed 0, so among them the highest mean over seeds {seeds}"
                )
                if choice.over_seeds:
                    rule += " (" + ", ".join(f"{s}: {v:.2f}" for s, v in choice.over_seeds.items()) + ")"
                elif choice.seeds_missing:
                    rule += " (not all scored yet: seed 0's best stands for now)"
            shown = choice.over_seeds.get(choice.chosen, validation_mean[choice.chosen])
            self.lines += [
                f"Chosen on validation ({rule}): step {choice.chosen} ({shown:.2f}); "
                f"the study's checkpoint is {c.get('checkpoint')}.",
                "",
            ]
            self.summary["cxr_checkpoint_chosen_on_validation"] = choice.chosen
        if covid:
            # The key is the minimum over its checkpoints (``min_from_step``: 1,500 to the
            # last), given only when every one of them was measured, never over a subset; the
            # sweep's earlier checkpoints are reported beside it but not part of it.
            goal_steps = [s for s in sweep["steps"] if s >= sweep.get("min_from_step", 0)]
            if goal_steps and all(s in covid for s in goal_steps):
                self.summary["covid_gb_tedm_n3_min_over_checkpoints"] = round(min(covid[s] for s in goal_steps), 2)
            self.summary["covid_gb_tedm_n3_min_over_measured_checkpoints"] = round(min(covid.values()), 2)
            self.summary["covid_gb_tedm_n3_checkpoints_measured"] = sorted(covid)

    def variants(self, name, step) -> None:
        c = self.config["cxr"]
        if not c.get("variants"):
            return
        sets = sorted({s for v in c["variants"].values() for s in v.get("sets", c.get("validation_sets", []))})
        lines = [
            "| variant | fit options | method | n | seeds | post-processing | " + " | ".join(sets) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(sets),
        ]
        for variant, spec in c["variants"].items():
            for method in spec.get("methods", ["tedm"]):
                for n in spec.get("n", [3]):
                    for post in ("none", "rule"):
                        cells = []
                        for set_name in sets:
                            unit = (name, spec.get("checkpoint", step), method, n, spec.get("seeds", [0]))
                            scores = self.study.per_image(*unit, variant, set_name, post=post)
                            # Against the study's defaults on the same checkpoint, seeds and images.
                            default = self.study.per_image(*unit, "default", set_name, post="none")
                            if scores and default:
                                scores, default = _on_common(scores, default)
                            p = self.p_value(scores, default)
                            against = (
                                f" ({100 * (np.mean(list(scores.values())) - np.mean(list(default.values()))):+.1f}"
                                f" vs default, p = {p:.2g}; {self._precision_recall(unit, variant, set_name, post)})"
                                if p is not None
                                else ""
                            )
                            cells.append(_mean_std(list(scores.values())) + against if scores else "not measured")
                        options = ", ".join(f"{k} = {v}" for k, v in spec.get("fit", {}).items())
                        seeds = ", ".join(map(str, spec.get("seeds", [0])))
                        lines.append(
                            f"| {variant} | {options} | {method} | {n} | {seeds} | {post} | " + " | ".join(cells) + " |"
                        )
        self.lines += [
            "## Validation experiments (choices are made here, never on the test sets)",
            "",
            "In brackets: the difference from the study's defaults (no post-processing) fitted on the same "
            "checkpoint, n and seeds, scored on the same images, and its paired Wilcoxon p; then precision "
            "and recall x 100, the variant's against the default's. covid_v7's masks include the lung behind "
            "the heart, so a variant that only predicts larger lungs gains there (recall up) while its "
            "precision falls on the pool images: such a gain is the masks' convention, not robustness.",
            "",
        ] + lines + [""]  # fmt: skip

    def _precision_recall(self, unit, variant: str, set_name: str, post: str) -> str:
        """Precision and recall x 100 of a variant against the default on the same images."""
        parts = []
        for metric in ("precision", "recall"):
            mine = self.study.per_image(*unit, variant, set_name, post=post, metric=metric)
            default = self.study.per_image(*unit, "default", set_name, post="none", metric=metric)
            common = sorted(set(mine) & set(default))
            parts.append(
                f"{metric} {100 * np.mean([mine[k] for k in common]):.1f}"
                f" vs {100 * np.mean([default[k] for k in common]):.1f}"
            )
        return ", ".join(parts)

    def compute(self) -> None:
        rows = []
        for preset in self.config.get("compute", {}).get("presets", []):
            path = self.study.work / "compute" / f"{preset}.json"
            if path.is_file():
                d = read_json(path)
                rows.append(
                    f"| {preset} | {d['image_size']} | {d['parameters_m']:.1f} | {d['unet_gmac']:.2f} | "
                    f"{d['ledm_gmac']:.2f} | {d['tedm_gmac']:.2f} | {d['ledme_gmac']:.2f} |"
                )
        if rows:
            self.lines += (
                [
                    "## Compute per image (ptflops, GMAC; the paper's Table 4)",
                    "",
                    "| preset | px | params (M) | one UNet pass | LEDM | TEDM | LEDMe |",
                    "|---|---|---|---|---|---|---|",
                ]
                + rows
                + [""]
            )

    def brats(self) -> None:
        b = self.config.get("brats")
        if not b:
            return
        rows = []
        for method in b["methods"]:
            cells = {}
            for n in b["n_subjects"]:
                path = self.study.work / "brats" / "metrics" / f"{method}_{n}subj.csv"
                if path.is_file():
                    cells[n] = {r["image"]: r["dice"] for r in read_rows(path)}
            rows.append((self.METHOD_NAMES.get(method, method), cells))
        self.lines += ["## BraTS whole tumour, 3D Dice x 100 on the held-out subjects", ""]
        if rows:  # (a curve-only config fits no methods)
            self.lines += self.table(
                "BraTS", rows, b["n_subjects"], lambda n: f"{n} labelled subject(s)", unit="held-out subjects"
            )
        refine_dir = self.study.work / "brats" / "refine"
        records = [read_json(p) for p in sorted(refine_dir.glob("*.json"))] if refine_dir.is_dir() else []
        if not records:
            return
        rounds = b["refine"]["rounds"]
        start_model = f"{b['refine'].get('fit_slices') or b.get('slices_per_case') or 'all'}-slice model"
        lines, curve = self._refine_table(records, rounds, start_model, summary=True)
        chosen_on = set(b["refine"].get("validation_subjects", []))
        untouched = [r for r in records if r["subject"] not in chosen_on]
        if chosen_on and untouched:
            lines += [
                "",
                f"The {len(untouched)} subjects not used to choose Refine's policy "
                f"(validation: {', '.join(sorted(chosen_on))}; docs/results/REFINE_VALIDATION.md):",
                "",
            ] + self._refine_table(untouched, rounds, start_model, summary=False)[0]
        lines += ["", "Per subject (Refine / pasted / from scratch, rounds 3 and 5):", ""]
        lines += ["| subject | start | round 3 | round 5 |", "|---|---|---|---|"]
        for r in records:
            cells = []
            for k in (3, 5):
                a = r["rounds"][k - 1] if len(r["rounds"]) >= k else None
                scratch = f"{100 * a['scratch_dice']:.1f}" if a and "scratch_dice" in a else "-"
                cells.append(
                    f"{100 * a['refine_dice']:.1f} / {100 * a['paste_only_dice']:.1f} / {scratch}" if a else "-"
                )
            lines.append(f"| {r['subject']} | {100 * r['start_dice']:.1f} | " + " | ".join(cells) + " |")
        self.lines += (
            [
                f"**Correct-and-refine** ({len(records)} held-out subjects; each round the two tumour slices "
                "with the most wrongly labelled voxels are corrected), whole-tumour 3D Dice x 100",
                "",
            ]
            + lines
            + ["", "![refine curve](refine_curve.png)", ""]
        )
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.6))
        start = 100 * float(np.mean([r["start_dice"] for r in records]))
        for label, key in (("Refine", "refine"), ("pasted, no learning", "paste"), ("fitted from scratch", "scratch")):
            points = [(0, start)] + curve[key] if key != "scratch" else curve[key]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xlabel("round (2 corrected slices each)")
        ax.set_ylabel("whole-tumour Dice x 100")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        from tedm_core.io.atomic import atomic_path

        with atomic_path(self.out / "refine_curve.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)

    def _refine_table(self, records, rounds: int, start_model: str, summary: bool):
        """Markdown rows of the refine curve's means (and paired Wilcoxon p of Refine against
        each control), and the curve's points; ``summary``: these are the summary.json keys."""
        from tedm_core.pipelines.evaluate import paired_wilcoxon

        lines = [
            "| round | Refine | corrections pasted, no learning | head fitted from scratch on the corrected slices |",
            "|---|---|---|---|",
            f"| 0 ({start_model}) | {_mean_std([r['start_dice'] for r in records])} | | |",
        ]
        curve: Dict[str, List[Tuple[int, float]]] = {"refine": [], "paste": [], "scratch": []}
        for k in range(1, rounds + 1):
            at = [r["rounds"][k - 1] for r in records if len(r["rounds"]) >= k]
            if not at:
                continue
            refine = [a["refine_dice"] for a in at]
            paste = [a["paste_only_dice"] for a in at]
            pairs = [(a["refine_dice"], a["scratch_dice"]) for a in at if "scratch_dice" in a]
            scratch = [p[1] for p in pairs]
            curve["refine"].append((k, 100 * float(np.mean(refine))))
            curve["paste"].append((k, 100 * float(np.mean(paste))))
            scratch_cell = "not measured"
            if scratch:
                curve["scratch"].append((k, 100 * float(np.mean(scratch))))
                wins = sum(a > b for a, b in pairs)
                p_value = paired_wilcoxon([p[0] for p in pairs], scratch)
                scratch_cell = f"{_mean_std(scratch)} (Refine better on {wins} of {len(pairs)}, p = {p_value:.2g})"
            wins = sum(a > b for a, b in zip(refine, paste))
            lines.append(
                f"| {k} | {_mean_std(refine)} | {_mean_std(paste)} (Refine better on {wins} of {len(at)}, "
                f"p = {paired_wilcoxon(refine, paste):.2g}) | {scratch_cell} |"
            )
            if summary and k in (3, 5):
                self.summary[f"brats_refine_round{k}"] = round(100 * float(np.mean(refine)), 2)
            if summary and k == 5:
                self.summary["brats_paste_only_round5"] = round(100 * float(np.mean(paste)), 2)
                if scratch:
                    self.summary["brats_scratch_round5"] = round(100 * float(np.mean(scratch)), 2)
        return lines, curve

    def write(self, argv: Sequence[str], config_path: Path) -> None:
        # Before this report writes anything into the repository (its plots are written by the
        # sections below), or every report written into docs/results would say "+dirty".
        commit = git_commit()
        self.out.mkdir(parents=True, exist_ok=True)
        for section in (self.cxr, self.compute, self.brats):
            try:
                section()
            except KeyError as error:  # a section the config does not have
                log.debug("report: no %s (%s)", section.__name__, error)
        keys = [
            "shenzhen_tedm_n3",
            "covid_gb_tedm_n3",
            "covid_gb_tedm_n3_min_over_checkpoints",
            "p_tedm_vs_baseline_covid_gb_n3",
            "p_tedm_vs_ledm_covid_gb_n3",
            "brats_refine_round3",
            "brats_refine_round5",
            "brats_paste_only_round5",
            "brats_scratch_round5",
        ]
        # One summary.json per results folder, shared by the configs that report there (the CXR
        # study, the BraTS study, ...): a key this run measured replaces the earlier value, a key
        # it did not measure keeps what an earlier run wrote, and _sources says which run wrote each.
        earlier = read_json(self.out / "summary.json") if (self.out / "summary.json").is_file() else {}
        sources = dict(earlier.get("_sources", {}))
        this_run = {"config": self.config.get("name", config_path.stem), "commit": commit}
        summary = {k: earlier.get(k) for k in keys}  # None = not measured by any run
        summary.update({k: v for k, v in earlier.items() if not k.startswith("_") and k not in summary})
        for key, value in self.summary.items():
            summary[key] = value
            sources[key] = this_run
        if "cxr" in self.config:
            summary["cxr_backbone"] = f"{self.config['cxr']['backbone']} step {self.config['cxr'].get('checkpoint')}"
            sources["cxr_backbone"] = this_run
        for key, value in summary.items():
            if value is not None and key not in sources:
                sources[key] = {"config": "an earlier run that reported here", "commit": None}
        summary["_note"] = (
            "Dice x 100, p-values as numbers; null = not measured by any run reported here; "
            "_sources names the config and commit of the run that measured each key"
        )
        summary["_sources"] = {k: sources[k] for k in summary if k in sources}
        write_json(self.out / "summary.json", summary)
        # Each config's report and config copy under its own name, so that two studies can
        # report into one folder (the first, default name keeps RESULTS.md and config.json).
        report_name = self.config.get("report_name", "RESULTS")
        config_copy = "config.json" if report_name == "RESULTS" else f"{report_name}.config.json"
        header = [
            f"# Study results ({self.config.get('name', config_path.stem)})",
            "",
            f"- command: `python scripts/reproduce.py {' '.join(argv)}`",
            f"- config: `{config_path}` (copied beside this file as `{config_copy}`)",
            f"- commit: `{commit}`",
            f"- machine: {json.dumps(machine())}",
            f"- wall time of this run: {time.perf_counter() - self.study.tic:.0f} s "
            "(units already done are skipped, so a resumed run is shorter)",
            "",
        ]
        from tedm_core.io.atomic import write_text_atomic

        write_text_atomic(self.out / f"{report_name}.md", "\n".join(header + self.lines) + "\n")
        write_json(self.out / config_copy, self.config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the whole pipeline in under a minute")
    parser.add_argument("--work", type=Path, help="where units of work are kept (default: the config's work)")
    parser.add_argument(
        "--results", type=Path, help="where tables, plots and summary.json go (default: the config's results)"
    )
    parser.add_argument("--data", type=Path, help="the shared data folder (default: the config's data, ../shared/data)")
    parser.add_argument(
        "--only", nargs="+", choices=["pretrain", "cxr", "compute", "brats", "report"], help="run only these sections"
    )
    parser.add_argument("--cxr-parts", nargs="+", choices=CXR_PARTS, help="run only these parts of the cxr section")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: the config's, else torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tedm_core").setLevel(logging.WARNING)
    config = load_config(args.config, args.smoke)
    if args.cxr_parts:
        config["cxr_parts"] = list(args.cxr_parts)
    import torch

    threads = args.threads or config.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    data = args.data or resolve(REPO, config.get("data", "../shared/data"))
    if not data.is_dir():
        print(f"reproduce: {data}: the shared data folder is missing", file=sys.stderr)
        return 2
    work = args.work or resolve(REPO, config["work"])
    results = args.results or resolve(REPO, config["results"])
    study = Study(config, work, results, data, args.smoke)
    sections = args.only or config.get("sections", ["pretrain", "cxr", "compute", "brats", "report"])
    for section in ("pretrain", "cxr", "compute", "brats"):
        if section in sections and (section == "pretrain" or section in config):
            log.info("== %s", section)
            getattr(study, section if section == "pretrain" else f"run_{section}")()
    if "report" in sections:
        Report(study).write(argv, args.config)
        log.info("report -> %s", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
