#!/usr/bin/env bash
# A targeted rerun on a GPU machine after benchmarks/gpu_check.sh (a fix, or a default changed):
# builds for this GPU's architecture only (in place; ~65 s on 16 cores), then runs pytest on what
# follows, stopped with SIGINT after SECONDS so that pytest still prints which tests failed.
#
#   bash benchmarks/gpu_rerun.sh OUT_DIR SECONDS [pytest arguments...]
#   bash benchmarks/gpu_rerun.sh "$OUT" 120 -m cuda tests/test_tiled_cuda_split_k.py -k auto
#
# Writes OUT_DIR/build.log, OUT_DIR/rerun.log (pytest -rfE: failures and errors named in its short
# summary) and OUT_DIR/rerun.xml; prints the failures and the last line. pytest-xdist workers
# (GPU_CHECK_WORKERS, default 8) when installed. Exit status: the build's, else pytest's (124: the
# time box stopped it).
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash benchmarks/gpu_rerun.sh OUT_DIR SECONDS pytest-arguments..." >&2
  exit 2
fi
OUT=$1
SECONDS_BOX=$2
shift 2
case "$SECONDS_BOX" in
  '' | *[!0-9]*) echo "gpu_rerun.sh: SECONDS must be a whole number of seconds, got '$SECONDS_BOX'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
. benchmarks/gpu_env.sh  # PY, CUDA_HOME, gpu_arch, interrupt_after
arch=$(gpu_arch) || exit 1
start=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST="$arch" PYFINETUNE_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "build for sm_${arch/./}: $(( $(date +%s) - start )) s"
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST="-n ${GPU_CHECK_WORKERS:-8}"; fi
interrupt_after "$SECONDS_BOX" $PY -m pytest -q -rfE -p no:cacheprovider $XDIST --junitxml="$OUT/rerun.xml" "$@" > "$OUT/rerun.log" 2>&1
rc=$?
[ $rc -eq 124 ] && echo "STOPPED after ${SECONDS_BOX} s (time box)" | tee -a "$OUT/rerun.log"
grep -E "^(FAILED|ERROR)" "$OUT/rerun.log" | head -40
tail -1 "$OUT/rerun.log"
echo "total $(( $(date +%s) - start )) s, pytest exit status $rc"
exit $rc
