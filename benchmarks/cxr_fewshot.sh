#!/usr/bin/env bash
# The chest X-ray few-shot study (issue 2): fit on the first N Shenzhen pool images, segment the
# 19 Shenzhen test images (in-domain) and the 100 covid_gb images (other hospitals), evaluate.
# The pool images after the first N are the validation set: choose backbones and settings on it,
# never on the two test sets. Each method after the first is compared with the first, per image.
#   bash benchmarks/cxr_fewshot.sh BACKBONE_DIR [N=3] [WORK=runs/cxr_fewshot] [METHODS="tedm baseline"]
# Reads ../shared/data (the data README's fixed split: first 40 Shenzhen files are the label pool).
set -euo pipefail
backbone=${1:?usage: cxr_fewshot.sh BACKBONE_DIR [N] [WORK] [METHODS]}
n=${2:-3}
work=${3:-runs/cxr_fewshot}
methods=${4:-tedm baseline}
data="$(cd "$(dirname "$0")/.." && pwd)/../shared/data/cxr"
[ -d "$data/shenzhen" ] || { echo "cxr_fewshot.sh: $data/shenzhen not found (../shared/data is needed)" >&2; exit 2; }
mkdir -p "$work/pool" "$work/validation" "$work/shenzhen_test"
# The fixed split, as folders of links: pool = first 40 by name (validation = the pool after the first N), test = the remaining 19.
link() { while read -r f; do ln -sf "$data/shenzhen/images/$f" "$1/$f"; done; }
names=$(ls "$data/shenzhen/images" | sort)
head -40 <<<"$names" | link "$work/pool"
head -40 <<<"$names" | tail -n +$((n + 1)) | link "$work/validation"
tail -n +41 <<<"$names" | link "$work/shenzhen_test"
first=""
for method in $methods; do
  bundle="$work/${method}_n${n}"
  start=$(date +%s)
  tedm fit --backbone "$backbone" --images "$work/pool" --masks "$data/shenzhen/masks" --n "$n" --method "$method" --classes lung --out "$bundle" --overwrite
  echo "fit $method n=$n: $(( $(date +%s) - start )) s"
  for test in validation shenzhen_test covid_gb; do
    if [ "$test" = covid_gb ]; then input="$data/covid_gb/images"; truth="$data/covid_gb/masks"; else input="$work/$test"; truth="$data/shenzhen/masks"; fi
    start=$(date +%s)
    tedm segment --model "$bundle" --input "$input" --output "$work/pred_${method}_n${n}_$test" --overwrite
    echo "segment $method $test: $(( $(date +%s) - start )) s"
    echo "== $method n=$n $test"
    compare=()
    [ -n "$first" ] && compare=(--compare "$work/pred_${first}_n${n}_$test")
    tedm evaluate --pred "$work/pred_${method}_n${n}_$test" --truth "$truth" --csv "$work/metrics_${method}_n${n}_$test.csv" "${compare[@]}"
  done
  first=${first:-$method}
done
