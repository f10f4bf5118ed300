#!/usr/bin/env bash
# The BraTS study (issue 3): fit TEDM on labelled slices of ONE subject (3 slices spread over
# its tumour, and all its tumour slices), batch-segment every subject with the whole-tumour
# ground truth, report 3D Dice per subject. The fit subject is the first by name and is
# reported apart from the others (it is not a test subject).
#   bash benchmarks/brats_study.sh BACKBONE_DIR [WORK=runs/brats_study]
# The backbone is pretrained on FLAIR + T1 of the first 6 subjects, e.g.
#   tedm pretrain --images $(ls -d ../shared/data/brain/brats/Brats* | head -6) --channels FLAIR T1 \
#                 --intensity zscore --preset small --steps 1000 --out runs/brats_small
set -euo pipefail
backbone=${1:?usage: brats_study.sh BACKBONE_DIR [WORK]}
work=${2:-runs/brats_study}
brats="$(cd "$(dirname "$0")/.." && pwd)/../shared/data/brain/brats"
[ -d "$brats" ] || { echo "brats_study.sh: $brats not found (../shared/data is needed)" >&2; exit 2; }
mkdir -p "$work"
for variant in 3 all; do
  bundle="$work/tedm_1subject_${variant}slices"
  per_case=(); [ "$variant" = all ] || per_case=(--slices-per-case "$variant")
  start=$(date +%s)
  tedm fit --backbone "$backbone" --images "$brats" --label-name GT_W.nii.gz --n 1 "${per_case[@]}" \
           --classes whole_tumour --out "$bundle" --overwrite
  echo "fit ($variant labelled slices): $(( $(date +%s) - start )) s"
  start=$(date +%s)
  python "$(dirname "$0")/../scripts/batch_segment.py" --model "$bundle" --input "$brats" --output "$work/pred_${variant}" \
         --labels "$brats" --label-name GT_W.nii.gz --overwrite || true
  echo "batch ($variant labelled slices): $(( $(date +%s) - start )) s"
  python - "$work/pred_${variant}/metrics.csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
fit_subject = sorted(r["case"] for r in rows)[0]
test = [r for r in rows if r["case"] != fit_subject]
for r in rows:
    print(f"  {r['case']:24s} Dice {100 * float(r['dice']):5.1f}{'  (fit subject)' if r['case'] == fit_subject else ''}")
d = [100 * float(r["dice"]) for r in test]
print(f"  mean over the {len(d)} other subjects: {statistics.mean(d):.1f} +- {statistics.pstdev(d):.1f}")
PY
done
