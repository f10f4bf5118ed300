"""How much of a TEDM head's out-of-domain accuracy is its fit's randomness rather than its labelled
images (issue 10), on the validation sets only.

    python scripts/experiments/fit_seeds.py configs/issue10_session.json --out docs/results/FIT_SEEDS

For each of the study's draws of n labelled pool images (seed 0: the first n; seeds 1, 2: drawn
at random), one-head TEDM models fitted on the same images with the draw's seed (the study's own
model, or its first head since session 14) and with other fit seeds (head initialisation, augmented
copies, noise draws and batch order all follow the fit seed) are scored alone and as ensembles
of their first k heads for each k of ``--sizes`` (probabilities averaged before the 0.5
threshold; default: all of them). Never run on a test set: the sets come from the config's
``validation_sets``. Writes ``OUT.json`` (per-image Dice) and ``OUT.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
from scipy.stats import wilcoxon

SCRIPTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SCRIPTS))
import reproduce  # noqa: E402

from tedm_core.pipelines.evaluate import dice_precision_recall  # noqa: E402
from tedm_core.pipelines.fit import fit_bundle  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--n", type=int, default=3, help="labelled pool images per draw")
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2], help="the study's seeds (draws)")
    parser.add_argument("--extra-seeds", type=int, default=2, help="fit seeds per draw beside the study's own")
    parser.add_argument("--work", type=Path, help="the study's work folder (default: the config's)")
    parser.add_argument(
        "--variant", default="default", help="one of the config's cxr variants: its fit options for every head"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="ensembles of the first k heads, for each k (default: all heads)"
    )
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()

    config = reproduce.load_config(args.config, smoke=False)
    repo = reproduce.REPO
    study = reproduce.Study(
        config,
        args.work or reproduce.resolve(repo, config["work"]),
        repo / "docs" / "results",
        reproduce.resolve(repo, config["data"]),
        smoke=False,
    )
    c = config["cxr"]
    name, step = c["backbone"], c.get("checkpoint")
    key = f"{name}@{step}"
    results: Dict[str, Dict[str, List[float]]] = {}
    # What the study's own bundle was fitted with, one head each (the study's bundle is the first
    # head's ensemble since session 14; its first head is the fit with the draw's seed).
    options = {**study.fit_options("tedm", args.variant), "members": 1}
    sizes = args.sizes or [args.extra_seeds + 1]
    rows = []
    for draw in args.draws:
        fit_names = study.fit_subset(args.n, draw)
        backbone = study.load_backbone(name, step)
        images, masks = study.labelled_pool_images(fit_names, backbone.intensity)
        seeds = [draw] + [100 * k + draw for k in range(1, args.extra_seeds + 1)]
        classes, values = ["background", "lung"], [0, 255]
        bundles = [
            fit_bundle(backbone, images, masks, "tedm", classes, values, seed=s, show_progress=False, **options)
            for s in seeds
        ]
        for set_name in c["validation_sets"]:
            image_set = study.image_set(set_name, backbone.intensity, fit_names)
            fit_key = study.fit_key(set_name, fit_names)
            probabilities = [study.predict(b, key, image_set, fit_key=fit_key).probabilities for b in bundles]
            scored = {f"fit seed {s}": p for s, p in zip(seeds, probabilities)}
            scored.update({f"ensemble of {k}": np.mean(probabilities[:k], axis=0) for k in sizes})
            dice = {
                label: [dice_precision_recall(y > 0, t > 0)[0] for y, t in zip(p.argmax(axis=1), image_set.masks)]
                for label, p in scored.items()
            }
            results[f"draw {draw} / {set_name}"] = {"images": image_set.names, **dice}
            singles = [np.mean(dice[f"fit seed {s}"]) for s in seeds]
            own_dice = np.asarray(dice[f"fit seed {draw}"])
            cells = []
            for k in sizes:
                ensemble = np.asarray(dice[f"ensemble of {k}"])
                cells.append(
                    f"{100 * ensemble.mean():.1f} ({100 * (ensemble - own_dice).mean():+.1f}, "
                    f"p = {wilcoxon(ensemble, own_dice).pvalue:.2g})"
                )
            rows.append(
                f"| {draw} | {set_name} | " + " / ".join(f"{100 * v:.1f}" for v in singles)
                + f" | {100 * (max(singles) - min(singles)):.1f} | " + " | ".join(cells) + " |"
            )  # fmt: skip
            print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results))
    header = (
        f"# TEDM heads on the same labelled images, other fit seeds (validation sets only)\n\n"
        f"`python scripts/experiments/fit_seeds.py {args.config} --variant {args.variant} "
        f"--extra-seeds {args.extra_seeds} --sizes {' '.join(map(str, sizes))} --out {args.out}`; "
        f"backbone {key}, n = {args.n}; fit options: {options or 'the defaults'}; "
        f"commit `{reproduce.git_commit()}`. Dice x 100; the first fit seed of each draw is the "
        f"study's own (first) head; ensemble of k = the first k heads' probabilities averaged, in brackets "
        f"its difference from the study's head and the paired Wilcoxon p.\n\n"
        "| draw | set | Dice per fit seed | spread | "
        + " | ".join(f"ensemble of {k}" for k in sizes)
        + " |\n|---|---|---|---|"
        + "---|" * len(sizes)
        + "\n"
    )
    args.out.with_suffix(".md").write_text(header + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
