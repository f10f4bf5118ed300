#!/bin/bash
# On a machine with a CUDA GPU, in the repository's root: benchmarks/gpu.py on a model and a folder
# of cases, then the test suite with the GPU visible, every failure named even if the time runs out.
#
#   bash benchmarks/gpu_check.sh BUNDLE CASES [OUT]      (OUT: default /tmp/tedm_gpu_check)
#
# GPU_ARGS adds options to gpu.py (e.g. --compile); TEST_SECONDS and TEST_WORKERS size the test run.
# The label files it wrote are copied to OUT, to compare with a CPU run of the same model.
#
# Needs pytest-xdist and pytest-timeout. The tests run in parallel under a time limit that interrupts
# rather than kills, so pytest still prints its summary; -v names each result as it comes.
set -u
bundle=$1 cases=$2 out=${3:-${OUT:-/tmp/tedm_gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, monai; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'monai', monai.__version__)"
} > "$out/log.txt" 2>&1
timeout 300 python3 benchmarks/gpu.py --bundle "$bundle" --cases "$cases" --out /tmp/tedm_gpu --json "$out/gpu.json" \
  ${GPU_ARGS:-} >> "$out/log.txt" 2>&1
echo "gpu.py exit $?" >> "$out/log.txt"
for run in default fp32; do
  label=$(ls /tmp/tedm_gpu/labels_$run/*.nii.gz 2>/dev/null | grep -v _uncertainty | head -1)
  [ -n "$label" ] && cp "$label" "$out/labels_$run.nii.gz"
done
timeout -s INT "${TEST_SECONDS:-240}" python3 -m pytest tests -v -p no:cacheprovider -n "${TEST_WORKERS:-8}" --dist loadfile \
  --timeout 120 --tb=short -rfE --durations=10 > "$out/pytest.txt" 2>&1
echo "pytest exit $?" >> "$out/pytest.txt"
tail -3 "$out/log.txt"; grep -E "^(FAILED|ERROR)" "$out/pytest.txt"; tail -2 "$out/pytest.txt"
