#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU (and nvcc) from the repository root.
#   1. builds pyfinetune for this GPU's architecture (in place),
#   2. runs benchmarks/kd_gpu_quick_check.py: the distillation kernels' cases that only a GPU
#      checks (launch shapes, alignment, large logits), a minute, so a short session learns
#      them first,
#   3. runs the whole test suite, CUDA tests included,
#   4. runs compute-sanitizer memcheck over the CUDA tests of every op (caching allocator off,
#      so out-of-bounds accesses hit real allocation boundaries),
#   5. runs the benchmarks on the GPU,
# writing every log and result into one folder (default benchmarks/results/gpu-check-DATE).
# Exit status: nonzero if the build, the tests or the sanitizer failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-check-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
status=0
step() { printf '\n== %s\n' "$*" | tee -a "$OUT/summary.md"; }

{
  echo "# pyfinetune GPU check"
  echo
  echo "- date (UTC): $(date -u +%Y-%m-%dT%H:%M)"
  echo "- commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo unknown)"
  echo "- torch: $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
  echo "- nvcc: $("${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>/dev/null | tail -1)"
} > "$OUT/summary.md"

arch=$($PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")')
step "build for sm_${arch/./}"
if TORCH_CUDA_ARCH_LIST="$arch" PYFINETUNE_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep "pyfinetune build:" "$OUT/build.log" | tee -a "$OUT/summary.md"
else
  tail -40 "$OUT/build.log"; echo "BUILD FAILED" | tee -a "$OUT/summary.md"; exit 1
fi
$PY -m pyfinetune info | tee "$OUT/info.txt"

step "kd quick check (benchmarks/kd_gpu_quick_check.py)"
$PY benchmarks/kd_gpu_quick_check.py cuda > "$OUT/kd_quick_check.log" 2>&1 || status=1
grep -E "^FAIL|failed|all OK" "$OUT/kd_quick_check.log" | tee -a "$OUT/summary.md"

step "tests (all, CUDA included)"
$PY -m pytest tests -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.md"

step "compute-sanitizer memcheck over the CUDA tests"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 50 \
  $PY -m pytest tests -q -p no:cacheprovider -k "cuda" -m "not slow" > "$OUT/memcheck.log" 2>&1
rc=$?
[ $rc -eq 0 ] || status=1
grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3 | tee -a "$OUT/summary.md"
echo "memcheck exit code: $rc" | tee -a "$OUT/summary.md"

step "benchmarks"
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  $PY "$bench" --device cuda --out "$OUT" > "$OUT/$name.log" 2>&1 || status=1
  tail -25 "$OUT/$name.log" | tee -a "$OUT/summary.md"
done

step "overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
