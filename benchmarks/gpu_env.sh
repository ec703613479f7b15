# Shared by the GPU scripts (gpu_check.sh, gpu_rerun.sh, gpu_optim_launch_ab.sh); sourced from the
# repository root, defines nothing it runs:
#   PY             the Python to use ($PYTHON, default python3)
#   CUDA_HOME      /usr/local/cuda when unset and nvcc is there (torch guesses /usr/local from the nvcc
#                  on PATH otherwise, and linking fails)
#   gpu_arch       prints the visible GPU's compute capability, e.g. 9.0 (nonzero without a GPU)
#   interrupt_after SECONDS CMD...
#                  runs CMD, sent SIGINT after SECONDS (then SIGKILL 15 s later); CMD's status, 124
#                  when stopped. --foreground: the interrupt goes to CMD alone, so pytest stops its
#                  xdist workers itself and still prints which tests failed (sent to the whole process
#                  group it made every running worker report a "crash"; TERM prints no summary).
PY=${PYTHON:-python3}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export PYTHONUNBUFFERED=1

gpu_arch() {
  $PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")'
}

interrupt_after() {
  local secs=$1; shift
  timeout --foreground --signal=INT --kill-after=15 "$secs" "$@"
}
