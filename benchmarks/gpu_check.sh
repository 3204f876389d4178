#!/usr/bin/env bash
# On a GPU machine (a fresh checkout will do): build the CUDA path, run the CUDA tests, the op
# benchmark on the device, and profile one aggregate() under nsys, checking that every op's NVTX
# range shows. Every step runs even when an earlier one failed; the summary says which failed, and
# the exit status is non-zero if any did. Writes into $OUT if set, else benchmarks/results/gpu_check:
#   gpu_check.log (everything), summary.txt, nvtx_sum.csv, aggregate.nsys-rep, the benchmark's json.
# PYTHON picks the interpreter (default: python3 if its torch sees a GPU, else the cached CUDA venv
# of scripts/cuda_check.sh).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RES=${OUT:-$ROOT/benchmarks/results/gpu_check}
mkdir -p "$RES"
exec > >(tee "$RES/gpu_check.log") 2>&1
say() { echo "gpu-check: $*"; }
declare -a RESULTS=()
record() { RESULTS+=("$1: $2"); say "$1: $2"; }

# --- an interpreter whose torch sees the GPU ------------------------------------------------------
has_gpu() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif has_gpu python3; then
  PY=$(command -v python3)
else
  # the venv scripts/cuda_check.sh keeps once per machine (~/.cache/fedtreelora/cuda-venv-*)
  PY=$(bash scripts/cuda_check.sh --venv-only 2>/dev/null | sed -n 's/.*venv ready (\([^,]*\),.*/\1/p')
  PY=${PY:-python3}
fi
if ! has_gpu "$PY"; then
  say "FAILED: no GPU visible to torch in $PY; this script is for a machine with a CUDA device"
  exit 1
fi
"$PY" - <<'PY'
import torch
p = torch.cuda.get_device_properties(0)
print(f"gpu-check: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda})")
PY
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>/dev/null | sed 's/^/gpu-check: nvidia-smi: /'

# One build for every step: CUDA forced on, for sm_80, sm_90 and this device, in its own cache.
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST="$(printf '%s\n' 8.0 9.0 "$CAP" | sort -u | paste -sd';')+PTX"
export FEDTREELORA_WITH_CUDA=1 FEDTREELORA_REQUIRE_NATIVE=1 PYTHONUNBUFFERED=1
export FEDTREELORA_CUDA_CACHE_DIR=${FEDTREELORA_CUDA_CACHE_DIR:-$HOME/.cache/fedtreelora-gpu-check}
export FEDTREELORA_CACHE_DIR=$FEDTREELORA_CUDA_CACHE_DIR
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# --- 1. strict nvcc compile of every .cu, the CUDA build, its registrations, the CPU tests ----------
say "step 1: scripts/cuda_check.sh (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if CUDA_CHECK_PYTHON=$PY PYTEST_ARGS="--ignore=tests/cuda" bash scripts/cuda_check.sh | tee "$RES/.cuda_check"; then
  if grep -q "SKIPPED" "$RES/.cuda_check"; then
    record "cuda-check" "FAILED (nvcc was not found, so nothing was compiled: a skip is not a pass here)"
  else
    record "cuda-check" "ok"
  fi
else
  record "cuda-check" "FAILED"
fi
rm -f "$RES/.cuda_check"

# --- 2. every CUDA op against the CPU op ----------------------------------------------------------
say "step 2: tests/cuda"
"$PY" -m pytest -q -rs -p no:cacheprovider tests/cuda | tee "$RES/.cuda_tests"
status=${PIPESTATUS[0]}
if grep -q "no CUDA device" "$RES/.cuda_tests"; then
  record "tests/cuda" "FAILED (skipped as if there were no device)"
elif [ "$status" -eq 0 ]; then
  record "tests/cuda" "ok ($(tail -1 "$RES/.cuda_tests" | tr -d '='))"
else
  record "tests/cuda" "FAILED ($(tail -1 "$RES/.cuda_tests" | tr -d '='))"
fi
rm -f "$RES/.cuda_tests"

# --- 3. the op benchmark on the device ------------------------------------------------------------
say "step 3: benchmarks/bench_ops.py --device cuda"
if [ -f benchmarks/bench_ops.py ]; then
  touch "$RES/.bench_start"
  if "$PY" benchmarks/bench_ops.py --device cuda; then record "bench_ops" "ok"; else record "bench_ops" "FAILED"; fi
  # Bring the json it wrote along with the rest of this run's files.
  if [ "$RES" != "$ROOT/benchmarks/results" ]; then
    find benchmarks/results -maxdepth 1 -name '*.json' -newer "$RES/.bench_start" -exec cp {} "$RES/" \;
  fi
  rm -f "$RES/.bench_start"
else
  record "bench_ops" "SKIPPED (benchmarks/bench_ops.py is not there)"
fi

# --- 4. one aggregate() under nsys, and its NVTX ranges -------------------------------------------
say "step 4: benchmarks/profile_aggregate.py under nsys"
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1 || true)
if [ -z "$NSYS" ]; then
  if "$PY" benchmarks/profile_aggregate.py; then
    record "profile" "ran without nsys (not found): NVTX ranges NOT checked"
  else
    record "profile" "FAILED (and nsys not found)"
  fi
elif ! "$NSYS" profile -t cuda,nvtx --force-overwrite=true -o "$RES/aggregate" "$PY" benchmarks/profile_aggregate.py; then
  record "profile" "FAILED under $NSYS"
elif ! "$NSYS" stats --report nvtx_sum --format csv "$RES/aggregate.nsys-rep" > "$RES/nvtx_sum.csv"; then
  record "profile" "FAILED: nsys stats could not read $RES/aggregate.nsys-rep"
else
  cat "$RES/nvtx_sum.csv"
  missing=()
  for op in layer_distances linkage cut_tree silhouette tree_reduce; do
    grep -q "fedtreelora::$op" "$RES/nvtx_sum.csv" || missing+=("$op")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    record "profile" "ok: all five fedtreelora::* NVTX ranges in nvtx_sum"
  else
    record "profile" "FAILED: no NVTX range for ${missing[*]} in nvtx_sum"
  fi
fi

# --- summary --------------------------------------------------------------------------------------
printf '%s\n' "${RESULTS[@]}" > "$RES/summary.txt"
say "summary (also in $RES/summary.txt):"
sed 's/^/gpu-check:   /' "$RES/summary.txt"
if grep -q "FAILED" "$RES/summary.txt"; then exit 1; fi
say "OK"
