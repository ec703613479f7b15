#!/usr/bin/env bash
# The optimizer's launch-size comparison, on a machine with an NVIDIA GPU, from the repository root:
#
#   bash benchmarks/gpu_optim_launch_ab.sh [OUT_DIR]
#
# builds pyfinetune for this GPU twice, with 32 KB kernel arguments (the default with nvcc 12.1+:
# one launch per list) and with PYFINETUNE_MTA_ARG_BYTES=4096 (the classic limit: ten launches for
# the 134M-parameter case), and runs `bench_optim.py --device cuda --case large resnet50` with each
# (torch's contenders and the device copy in the same runs). Each build is checked by the optimizer
# tests against torch on the GPU before it is timed. Leaves the 32 KB build in place.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-optim-launch-ab-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
. benchmarks/gpu_env.sh  # PY, CUDA_HOME, gpu_arch
arch=$(gpu_arch)
REPS=${AB_REPS:-10}
status=0
{
  echo "# optimizer launch-size comparison"
  echo "- commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo unknown)"
  echo "- torch: $($PY -c 'import torch; print(torch.__version__)')"
} > "$OUT/summary.md"
for bytes in 4096 32764; do
  echo "== ${bytes}-byte kernel arguments" | tee -a "$OUT/summary.md"
  if ! TORCH_CUDA_ARCH_LIST="$arch" PYFINETUNE_FORCE_CUDA=1 PYFINETUNE_MTA_ARG_BYTES=$bytes \
      MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY setup.py build_ext --inplace > "$OUT/build_$bytes.log" 2>&1; then
    tail -20 "$OUT/build_$bytes.log"; echo "build failed" | tee -a "$OUT/summary.md"; status=1; continue
  fi
  grep "pyfinetune build:" "$OUT/build_$bytes.log" | tee -a "$OUT/summary.md"
  $PY -m pytest tests/test_optim_vs_torch.py -q -p no:cacheprovider -k cuda > "$OUT/tests_$bytes.log" 2>&1 || status=1
  tail -1 "$OUT/tests_$bytes.log" | tee -a "$OUT/summary.md"
  mkdir -p "$OUT/$bytes"
  $PY benchmarks/bench_optim.py --device cuda --case large resnet50 --reps "$REPS" --out "$OUT/$bytes" \
    > "$OUT/bench_$bytes.log" 2>&1 || status=1
  grep -iE "copy|target|MET" "$OUT/bench_$bytes.log" | head -20 | tee -a "$OUT/summary.md"
done
exit $status
