"""Inference-time levers of issue 10, on the validation sets only: cropping dark detector borders
before the model sees a radiograph, and averaging several noise draws of the features.

    python scripts/experiments/inference_levers.py configs/issue10_session.json --checkpoint 1750 \
        --levers crop draws2 draws4 --out runs/inference_levers.json

Every lever is applied to the same fitted model, the study's TEDM n = 3 seed 0 bundle at the
checkpoint (fitted by ``reproduce.Study.fit`` if that unit has not run), and scored against the
plain prediction (test-time flip, noise draw 0, no cropping) on each validation set with
a paired Wilcoxon test. Never run on a test set: the sets come from the config's
``validation_sets``.

Levers:
* ``crop``: the dark bands at the image's borders (detector edges, the black band of issue 10's
  user test) are cropped, the content stretched to the frame and renormalised, the probabilities
  resized back into the content box (``tedm_core.preprocessing.framing``), against the same model
  without it.
* ``drawsK``: the prediction averaged over K noise draws (draw 0 is the inference noise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from scipy.stats import wilcoxon

SCRIPTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SCRIPTS))
import reproduce  # noqa: E402

from tedm_core.pipelines.evaluate import dice_precision_recall  # noqa: E402
from tedm_core.pipelines.segment import Segmenter  # noqa: E402
from tedm_core.preprocessing.framing import content_box, full_box  # noqa: E402
from tedm_core.runtime import autocast  # noqa: E402


class DrawSegmenter(Segmenter):
    """A segmenter whose features use noise draw ``draw`` instead of the inference noise (draw 0)."""

    draw = 0

    @torch.no_grad()
    def _features(self, grid, cancel=None):
        with autocast(self.device, self.precision):
            return self.extractor(self._to_device(grid), self.timesteps, draw=self.draw, cancel=cancel)


def dice_of(probabilities: np.ndarray, masks: np.ndarray) -> np.ndarray:
    labels = probabilities.argmax(axis=1)
    return np.array([dice_precision_recall(p > 0, t > 0)[0] for p, t in zip(labels, masks)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--checkpoint", type=int, required=True)
    parser.add_argument("--levers", nargs="+", default=["crop", "draws2", "draws4"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--markdown", type=Path, help="also write the table here (e.g. docs/results/INFERENCE_LEVERS.md)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = reproduce.load_config(args.config, smoke=False)
    study = reproduce.Study(
        config,
        reproduce.resolve(reproduce.REPO, config["work"]),
        reproduce.resolve(reproduce.REPO, config["results"]),
        reproduce.resolve(reproduce.REPO, config["data"]),
        smoke=False,
    )
    c = config["cxr"]
    n = c.get("checkpoint_sweep", {}).get("n", 3)
    bundle = study.fit(c["backbone"], args.checkpoint, "tedm", n, 0)
    fit_names = study.fit_subset(n, 0)
    results: Dict[str, Dict[str, object]] = {}
    for set_name in c["validation_sets"]:
        image_set = study.image_set(set_name, bundle.intensity, fit_names)
        tic = time.perf_counter()
        plain = Segmenter(bundle, device="cpu", crop_dark_borders=False).predict(image_set.images).probabilities
        base = dice_of(plain, image_set.masks)
        by_draw = [plain]
        row: Dict[str, object] = {
            "plain": float(base.mean()),
            "images": len(base),
            "plain_seconds": time.perf_counter() - tic,
        }
        for lever in args.levers:
            tic = time.perf_counter()
            if lever == "crop":
                boxes = [content_box(image) for image in image_set.images]
                row["cropped_images"] = sum(box != full_box(image_set.images.shape) for box in boxes)
                segmenter = Segmenter(bundle, device="cpu", crop_dark_borders=True)
                probabilities = segmenter.predict(image_set.images).probabilities
            elif lever.startswith("draws"):
                for draw in range(len(by_draw), int(lever[5:])):  # each draw predicted once for all levers
                    segmenter = DrawSegmenter(bundle, device="cpu", crop_dark_borders=False)
                    segmenter.draw = draw
                    by_draw.append(segmenter.predict(image_set.images).probabilities)
                probabilities = np.mean(by_draw[: int(lever[5:])], axis=0)
            else:
                raise SystemExit(f"unknown lever {lever!r}")
            scores = dice_of(probabilities, image_set.masks)
            differs = not np.allclose(scores, base)
            row[lever] = float(scores.mean())
            row[f"{lever}_p"] = float(wilcoxon(scores, base).pvalue) if differs else 1.0
            row[f"{lever}_better"] = int((scores > base).sum())
            row[f"{lever}_worse"] = int((scores < base).sum())
            row[f"{lever}_seconds"] = time.perf_counter() - tic
        results[set_name] = row
        print(set_name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": args.checkpoint, "n": n, "commit": reproduce.git_commit(), "results": results}
    args.out.write_text(json.dumps(record, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(record, args))
    return 0


def markdown(record: Dict[str, object], args: argparse.Namespace) -> str:
    """The levers as a table: Dice x 100 per validation set, the paired Wilcoxon p against plain."""
    results = record["results"]
    sets = list(results)
    lines = [
        "# Inference-time levers (issue 10), validation sets only",
        "",
        f"- command: `python scripts/experiments/inference_levers.py {args.config} --checkpoint {args.checkpoint}"
        f" --levers {' '.join(args.levers)} --threads {args.threads}`",
        f"- commit: `{record['commit']}`; TEDM, n = {record['n']}, seed 0, backbone step {record['checkpoint']}",
        "- Dice x 100 (mean over images); in brackets: paired Wilcoxon p against plain, images better / worse",
        "",
        "| | " + " | ".join(f"{s} ({results[s]['images']})" for s in sets) + " |",
        "|---|" + "---|" * len(sets),
        "| plain (flip, noise draw 0, no cropping) | "
        + " | ".join(f"{100 * results[s]['plain']:.2f}" for s in sets)
        + " |",
    ]
    for lever in args.levers:
        cells = []
        for s in sets:
            r = results[s]
            extra = f", {r['cropped_images']} cropped" if lever == "crop" else ""
            better, worse = r[lever + "_better"], r[lever + "_worse"]
            cells.append(f"{100 * r[lever]:.2f} (p = {r[lever + '_p']:.2g}, {better} / {worse}{extra})")
        lines.append(f"| {lever} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
