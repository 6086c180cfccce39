#!/usr/bin/env bash
# One-shot GPU check: install this package against the torch already on the machine, run `make test-gpu`
# and benchmarks/gpu_layers.py, and write the logs and tables to a folder. Sized for under 8 minutes.
#
#   benchmarks/gpu_check.sh [--cpu] [--no-install] [OUT_DIR]
#
# OUT_DIR defaults to $OUT, else build/gpu_check. PYTHON picks the interpreter (default python3: on the GPU
# image that is the environment holding CUDA torch; a --system-site-packages venv made from it would not see
# its packages, so the package is installed into it directly, with --no-deps --no-build-isolation, since the
# pinned torch==2.13.0 cannot be installed there). If that install fails, the package runs from the source
# tree through PYTHONPATH, without the C++ engine. --cpu runs the same steps on CPU (NXD_TEST_DEVICE=cpu,
# the benchmark's --device cpu) to check the script on a machine without a GPU; --no-install skips the install
# (an environment that already has the package, such as make setup's .venv).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

device=cuda install=1 out=
for argument in "$@"; do
  case "$argument" in
    --cpu) device=cpu ;;
    --no-install) install=0 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $argument" >&2; exit 2 ;;
    *) out=$argument ;;
  esac
done
out=${out:-${OUT:-build/gpu_check}}
python=${PYTHON:-python3}
mkdir -p "$out" || exit 1
summary=()

# stage NAME SECONDS LOG COMMAND...: run COMMAND under a time limit, its output both shown and kept in OUT/LOG.
stage() {
  local name=$1 seconds=$2 log=$3 status
  shift 3
  echo "=== $name (limit ${seconds}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/$log"
  status=${PIPESTATUS[0]}
  summary+=("$name: exit $status in $((SECONDS - start))s$([ "$status" -eq 124 ] && echo ' (time limit)')")
  return "$status"
}

{
  echo "gpu_check $(date -u +%FT%TZ) on $(hostname), device=$device, python=$python"
  "$python" -c 'import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPUs", torch.cuda.device_count(), *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  git log -1 --format='commit %H %s' 2>/dev/null
} 2>&1 | tee "$out/environment.txt"

if [ "$install" -eq 1 ]; then
  if ! stage install 120 install.log "$python" -m pip install --no-deps --no-build-isolation --no-index -e .; then
    echo "gpu_check: the install failed; running from the source tree without the C++ engine (PYTHONPATH)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
"$python" -c 'import neuronx_distributed, neuronx_distributed.comm as c; print("package:", neuronx_distributed.__file__,
"| shared-memory engine:", c.shm_engine_available())' 2>&1 | tee -a "$out/environment.txt"

export PYTHONUNBUFFERED=1 NXD_TEST_DEVICE=$device
test_limit=270
[ "$device" = cpu ] && test_limit=1200  # CPU-only machines are far slower at the suite's many small steps
if command -v make >/dev/null; then
  stage test-gpu "$test_limit" test_gpu.log make --no-print-directory test-gpu GPU_PYTHON="$python"
else  # what the Makefile's test-gpu target runs ($1 expands in the inner shell)
  # shellcheck disable=SC2016
  stage test-gpu "$test_limit" test_gpu.log sh -c \
    '"$1" tests/gpu/device.py; s=$?; [ $s -eq 0 ] && exec "$1" -m pytest tests/gpu -q; [ $s -eq 3 ] || exit $s' sh "$python"
fi
tests=$?
if [ "$device" = cpu ]; then
  stage benchmark 120 gpu_layers.txt "$python" benchmarks/gpu_layers.py --device cpu --steps 3 --warmup 1
else
  stage benchmark 90 gpu_layers.txt "$python" benchmarks/gpu_layers.py
fi
bench=$?

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
echo "logs and tables: $out"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
