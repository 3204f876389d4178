#!/usr/bin/env bash
# On a GPU machine (a fresh checkout will do), in about 8 minutes: build the CUDA path, run the CUDA
# tests, time the kernels themselves (CUPTI device time per kernel, each op against the CPU op, and
# tree_reduce's bandwidth against a device-to-device copy), profile one aggregate() under nsys
# (checking that the kernels, not only the NVTX ranges the CPU path also emits, are in the profile),
# then the op benchmark (wall clock, against the plain torch stack). Every step runs even when an
# earlier one failed, each under its own time limit; the summary says which failed, and the exit
# status is non-zero if any did. A skipped step (nvcc or nsys missing) is not a pass. Writes into
# $OUT if set, else benchmarks/results/gpu_check: gpu_check.log (everything), summary.txt,
# kernels.json, nvtx_sum.csv, kern_sum.csv, aggregate.nsys-rep, the benchmark's json.
# PYTHON picks the interpreter (default: python3 if its torch sees a GPU, else the cached CUDA venv
# of scripts/cuda_check.sh).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
RES=${OUT:-$ROOT/benchmarks/results/gpu_check}
mkdir -p "$RES"
exec > >(tee "$RES/gpu_check.log") 2>&1
say() { echo "gpu-check: $*"; }
declare -a RESULTS=()
record() { RESULTS+=("$1: $2"); say "$1: $2"; }
STARTED=$(date +%s)
step_started=$STARTED
step() { say "step $1 (at $(( $(date +%s) - STARTED )) s)"; step_started=$(date +%s); }
took() { echo "$(( $(date +%s) - step_started )) s"; }

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
TORCH_CUDA_ARCH_LIST="$(printf '%s\n' 8.0 9.0 "$CAP" | sort -uV | paste -sd';')+PTX"  # PTX of the newest
export TORCH_CUDA_ARCH_LIST
export FEDTREELORA_WITH_CUDA=1 FEDTREELORA_REQUIRE_NATIVE=1 PYTHONUNBUFFERED=1
export FEDTREELORA_CUDA_CACHE_DIR=${FEDTREELORA_CUDA_CACHE_DIR:-$HOME/.cache/fedtreelora-gpu-check}
export FEDTREELORA_CACHE_DIR=$FEDTREELORA_CUDA_CACHE_DIR
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# --- 1. strict nvcc compile of every .cu, the CUDA build, its registrations --------------------------
# The CPU test suite is left to CPU machines (make test): this machine's minutes go to the CUDA path.
step "1: scripts/cuda_check.sh (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
if CUDA_CHECK_PYTHON=$PY CUDA_CHECK_TESTS=none timeout 300 bash scripts/cuda_check.sh | tee "$RES/.cuda_check"; then
  if grep -q "SKIPPED" "$RES/.cuda_check"; then
    record "cuda-check" "FAILED (nvcc was not found, so nothing was compiled: a skip is not a pass here)"
  else
    record "cuda-check" "ok ($(took))"
  fi
else
  record "cuda-check" "FAILED or timed out ($(took))"
fi
rm -f "$RES/.cuda_check"

# --- 2. every CUDA op against the CPU op ----------------------------------------------------------
step "2: tests/cuda"
timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/cuda | tee "$RES/.cuda_tests"
status=${PIPESTATUS[0]}
if grep -q "no CUDA device" "$RES/.cuda_tests"; then
  record "tests/cuda" "FAILED (skipped as if there were no device)"
elif [ "$status" -eq 0 ]; then
  record "tests/cuda" "ok ($(tail -1 "$RES/.cuda_tests" | tr -d '='))"
else
  record "tests/cuda" "FAILED, status $status ($(tail -1 "$RES/.cuda_tests" | tr -d '='))"
fi
rm -f "$RES/.cuda_tests"

# --- 3. the kernels' own device time, results against CPU, tree_reduce's bandwidth ----------------
step "3: benchmarks/gpu_kernels.py (CUPTI kernel times)"
timeout 120 "$PY" benchmarks/gpu_kernels.py --out "$RES/kernels.json" | tee "$RES/.kernels"
status=${PIPESTATUS[0]}
bandwidth=$(sed -n 's/.*tree_reduce kernel moves .* = \([0-9]*%\) of a device-to-device copy.*: \(met\|MISSED\)$/\1 of copy bandwidth, target 70%: \2/p' "$RES/.kernels")
if [ "$status" -eq 0 ]; then
  record "kernels" "ok: every op's kernels profiled, results match the CPU op"
else
  record "kernels" "FAILED, status $status: $(grep 'FAILED' "$RES/.kernels" | head -3 | tr '\n' ' ')"
fi
record "tree_reduce bandwidth" "${bandwidth:-not measured}"
rm -f "$RES/.kernels"

# --- 4. one aggregate() under nsys: its NVTX ranges and its kernels -------------------------------
step "4: benchmarks/profile_aggregate.py under nsys"
NSYS=$(command -v nsys || true)
for candidate in /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys; do
  if [ -z "$NSYS" ] && [ -x "$candidate" ]; then NSYS=$candidate; fi
done
# The kernels every aggregate() that builds a tree launches (layer_distances, silhouette, tree_reduce).
KERNELS=(distance_epilogue_kernel silhouette_rows_kernel silhouette_mean_kernel tree_reduce_kernel)
if [ -z "$NSYS" ]; then
  timeout 120 "$PY" benchmarks/profile_aggregate.py
  record "profile" "FAILED (nsys not found: NVTX ranges and kernels NOT checked)"
elif ! timeout 150 "$NSYS" profile -t cuda,nvtx --force-overwrite=true -o "$RES/aggregate" "$PY" benchmarks/profile_aggregate.py; then
  record "profile" "FAILED under $NSYS"
elif ! "$NSYS" stats --report nvtx_sum --format csv "$RES/aggregate.nsys-rep" > "$RES/nvtx_sum.csv"; then
  record "profile" "FAILED: nsys stats could not read $RES/aggregate.nsys-rep"
else
  # cuda_gpu_kern_sum since nsys 2023; gpukernsum before
  "$NSYS" stats --report cuda_gpu_kern_sum --format csv "$RES/aggregate.nsys-rep" > "$RES/kern_sum.csv" 2>/dev/null ||
    "$NSYS" stats --report gpukernsum --format csv "$RES/aggregate.nsys-rep" > "$RES/kern_sum.csv"
  cat "$RES/nvtx_sum.csv" "$RES/kern_sum.csv"
  missing=()
  for op in layer_distances linkage cut_tree silhouette tree_reduce pack_rows; do
    grep -q "fedtreelora::$op" "$RES/nvtx_sum.csv" || missing+=("NVTX range fedtreelora::$op")
  done
  for kernel in "${KERNELS[@]}"; do
    grep -q "$kernel" "$RES/kern_sum.csv" || missing+=("kernel $kernel")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    record "profile" "ok: all six fedtreelora::* NVTX ranges in nvtx_sum, ${#KERNELS[@]} fedtreelora kernels in cuda_gpu_kern_sum"
  else
    record "profile" "FAILED: not in the profile: ${missing[*]}"
  fi
fi

# --- 5. the op benchmark on the device (wall clock, against the plain torch stack) ----------------
step "5: benchmarks/bench_ops.py --device cuda"
touch "$RES/.bench_start"
if timeout 120 "$PY" benchmarks/bench_ops.py --device cuda; then
  record "bench_ops" "ok ($(took))"
else
  record "bench_ops" "FAILED or timed out ($(took))"
fi
# Bring the json it wrote along with the rest of this run's files.
if [ "$RES" != "$ROOT/benchmarks/results" ]; then
  find benchmarks/results -maxdepth 1 -name '*.json' -newer "$RES/.bench_start" -exec cp {} "$RES/" \;
fi
rm -f "$RES/.bench_start"

# --- summary --------------------------------------------------------------------------------------
printf '%s\n' "${RESULTS[@]}" > "$RES/summary.txt"
say "summary after $(( $(date +%s) - STARTED )) s (also in $RES/summary.txt):"
sed 's/^/gpu-check:   /' "$RES/summary.txt"
if grep -q "FAILED" "$RES/summary.txt"; then exit 1; fi
say "OK"
