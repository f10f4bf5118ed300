"""Compare the study's per-image Dice of two sets of units, paired by image (issue 10).

``scripts/reproduce.py`` compares a variant with the default inside one work folder; this
compares units anywhere, e.g. the same head fitted on two backbones pretrained with different
intensity conventions, each in its own work folder. A unit is a fitted bundle folder of a
study (``WORK/cxr/bundles/<backbone>_<step>/<method>_n<n>_s<seed>[_<variant>]``); each side's
seeds are averaged per image first, as the study's tables do, then a paired Wilcoxon test is
run per set. Precision and recall are printed beside Dice because covid_v7's masks include the
lung behind the heart: a change that only makes the predicted lungs larger gains Dice there by
that convention (recall up, precision down) while losing it on the pool images::

    python scripts/experiments/compare_units.py \\
        --a runs/s13_pct/cxr/bundles/cxr_small4_1250/tedm_n3_s{0,1,2} \\
        --b runs/s13_eq/cxr/bundles/cxr_small4_1250/tedm_n3_s{0,1,2} \\
        --sets validation validation_framed covid_v7_val

``--a-timesteps`` / ``--b-timesteps`` read a side's single-step ablation scores instead (the
study's ``SET_t1.csv`` for ``1``, ``SET_t1-10-25-50.csv`` for ``1 10 25 50``): the same units
predicting with other timesteps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

SCRIPTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SCRIPTS))
from reproduce import Study, read_rows  # noqa: E402

from tedm_core.pipelines.evaluate import paired_wilcoxon  # noqa: E402

METRICS = ("dice", "precision", "recall")


def per_image(
    units: Sequence[Path], set_name: str, post: str = "none", timesteps: Optional[Sequence[int]] = None
) -> Dict[str, Dict[str, float]]:
    """Each metric per image on ``set_name``, averaged over ``units`` (seeds); only images every
    unit scored. ``timesteps``: the units' ablation scores on those timesteps, not their own."""
    scores: Dict[str, Dict[str, List[float]]] = {m: {} for m in METRICS}
    for unit in units:
        path = Study.metrics_path(unit, set_name, timesteps)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no metrics for {set_name} (has the unit been scored on it?)")
        for row in read_rows(path):
            if row["post"] == post:
                for m in METRICS:
                    scores[m].setdefault(row["image"], []).append(row[m])
    return {
        m: {image: float(np.mean(v)) for image, v in by_image.items() if len(v) == len(units)}
        for m, by_image in scores.items()
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", nargs="+", type=Path, required=True, help="units of the reference (seeds)")
    parser.add_argument("--b", nargs="+", type=Path, required=True, help="units of the alternative (seeds)")
    parser.add_argument("--sets", nargs="+", required=True)
    parser.add_argument("--post", default="none", help="post-processing rows to compare (default: none)")
    parser.add_argument("--a-timesteps", nargs="+", type=int, help="side A's ablation scores on these timesteps")
    parser.add_argument("--b-timesteps", nargs="+", type=int, help="side B's ablation scores on these timesteps")
    args = parser.parse_args(argv)
    print(
        "| set | images | Dice A | Dice B | B - A | p (paired Wilcoxon) | B better on "
        "| precision A / B | recall A / B |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for set_name in args.sets:
        try:
            a, b = (
                per_image(units, set_name, args.post, steps)
                for units, steps in ((args.a, args.a_timesteps), (args.b, args.b_timesteps))
            )
        except FileNotFoundError as error:
            print(f"compare_units: {error}", file=sys.stderr)
            return 1
        common = sorted(set(a["dice"]) & set(b["dice"]))
        if not common:
            print(f"compare_units: {set_name}: the two sides share no image", file=sys.stderr)
            return 1
        x, y = (np.array([side["dice"][k] for k in common]) for side in (a, b))
        print(
            f"| {set_name} | {len(common)} | {100 * x.mean():.2f} | {100 * y.mean():.2f} | {100 * (y - x).mean():+.2f} "
            f"| {paired_wilcoxon(list(y), list(x)):.2g} | {int((y > x).sum())} of {len(common)} "
            + "".join(
                f"| {100 * np.mean([a[m][k] for k in common]):.1f} / {100 * np.mean([b[m][k] for k in common]):.1f} "
                for m in ("precision", "recall")
            )
            + "|"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
