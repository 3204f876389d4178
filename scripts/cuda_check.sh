#!/usr/bin/env bash
# `make cuda-check`: check the CUDA build path on any machine with nvcc, GPU or not (docs/cuda.md).
#   1. a venv with a CUDA build of torch, whose headers a .cu needs, built once per machine and kept
#      OUTSIDE the clone (~/.cache/fedtreelora/cuda-venv-<key of the torch pin, the deps and Python>),
#      created under a flock so that two clones running this at once build it once;
#   2. every csrc/cuda/*.cu compiled on its own for sm_80 and sm_90, warnings as errors;
#   3. the full JIT build through fedtreelora/core/build.py with CUDA forced on, a check that all six
#      ops have a CUDA kernel registered, and the CPU tests of the native ops run against that build.
# Skips (exit 0, saying SKIPPED) where nvcc is missing. Usage: cuda_check.sh [--venv-only] (step 1 only:
# warm the cache on a new machine). Environment knobs:
#   PYTHON (python3) to create the venv, CUDA_VENV (the cached venv's path), TORCH_CUDA_PIN (torch==2.14.1),
#   CUDA_CHECK_PYTHON (an interpreter with a CUDA torch to use instead of the venv),
#   FEDTREELORA_CUDA_CACHE_DIR (~/.cache/fedtreelora/cuda-check: the JIT build and the files that passed),
#   CUDA_CHECK_ARCHS ("80 90"), CUDA_CHECK_JOBS (files compiled at once: a job per 4 cores),
#   CUDA_CHECK_TESTS (the test files of step 3; "none": no tests), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
say() { echo "cuda-check: $*"; }

# --- the toolkit ---------------------------------------------------------------------------------
NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc; fi
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  say "SKIPPED: nvcc not found (no CUDA toolkit on PATH, in \$CUDA_HOME or /usr/local/cuda); the CUDA path is not checked here"
  exit 0
fi
# nvcc may be a wrapper script; ask nvcc itself where its toolkit lives (its bin/ is _HERE_).
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)
  CUDA_HOME=$(cd "$CUDA_HOME/.." && pwd)
fi
export CUDA_HOME
NVCC=$CUDA_HOME/bin/nvcc
CUDA_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
say "nvcc $CUDA_VERSION at $NVCC (CUDA_HOME=$CUDA_HOME)"

# --- 1. the venv with a CUDA torch: once per machine, outside the clone, under a lock ----------------
# CUDA_CHECK_PYTHON=python3 uses an interpreter that already has a CUDA torch instead (a GPU machine).
VENV_ONLY=0
[ "${1:-}" = "--venv-only" ] && VENV_ONLY=1
CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/fedtreelora
if [ -n "${CUDA_CHECK_PYTHON:-}" ]; then
  PY=$(command -v "$CUDA_CHECK_PYTHON")
  say "using $PY (CUDA_CHECK_PYTHON), no venv"
else
  BASE_PY=$(command -v "${PYTHON:-python3}")
  TORCH_CUDA_PIN=${TORCH_CUDA_PIN:-torch==2.14.1}
  # What the package and its test suite need, read from pyproject.toml (dependencies + the dev extra).
  DEPS=$("$BASE_PY" - <<'PY' 2>/dev/null || echo "numpy scipy scikit-learn fastcluster hypothesis pytest pytest-timeout ninja filelock"
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(" ".join(d.replace(" ", "") for d in project["dependencies"] + project["optional-dependencies"]["dev"]))
PY
)
  BASE_VERSION=$("$BASE_PY" -c "import sys; print(sys.version.split()[0])")
  KEY=$(echo "$TORCH_CUDA_PIN $DEPS $BASE_VERSION" | sha256sum | cut -c1-12)
  VENV=${CUDA_VENV:-$CACHE_ROOT/cuda-venv-$KEY}
  STAMP=$VENV/.fedtreelora-cuda-check-$KEY  # written last: a venv without it is half-built
  PY=$VENV/bin/python
  mkdir -p "$(dirname "$VENV")"
  if [ ! -f "$STAMP" ]; then
    exec 9>"$VENV.lock"
    say "waiting for the lock on $VENV.lock (another clone may be building the venv)"
    flock 9
    if [ ! -f "$STAMP" ]; then  # whoever held the lock may have built it meanwhile
      started=$(date +%s)
      say "creating $VENV with $TORCH_CUDA_PIN (about 5 GB, a few minutes, once per machine)"
      rm -rf "$VENV"  # a half-built venv from an interrupted run
      "$BASE_PY" -m venv "$VENV"
      "$PY" -m pip install -qq --upgrade pip
      # shellcheck disable=SC2086  # DEPS is a list of requirement specifiers, split on purpose
      "$PY" -m pip install -qq "$TORCH_CUDA_PIN" $DEPS
      touch "$STAMP"
      say "venv ready in $(( $(date +%s) - started )) s"
    fi
    flock -u 9
    exec 9>&-
  else
    say "cached venv $VENV (key $KEY: $TORCH_CUDA_PIN, deps, Python $BASE_VERSION)"
  fi
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)")
TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')")
if [ -z "$TORCH_CUDA" ]; then
  say "FAILED: $PY has a CPU-only torch ($TORCH_VERSION); set TORCH_CUDA_PIN (or CUDA_CHECK_PYTHON) to a CUDA build"
  exit 1
fi
if [ "${TORCH_CUDA%%.*}" != "${CUDA_VERSION%%.*}" ]; then
  say "FAILED: torch was built with CUDA $TORCH_CUDA but nvcc is CUDA $CUDA_VERSION; the majors must match"
  exit 1
fi
if [ "$VENV_ONLY" = 1 ]; then say "OK: venv ready ($PY, torch $TORCH_VERSION, CUDA $TORCH_CUDA)"; exit 0; fi
# The repo itself is imported from the checkout (no install into the venv, nothing written to the repo).
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# --- 2. every .cu on its own, each architecture, warnings as errors --------------------------------
# Include paths and defines the way torch.utils.cpp_extension passes them, so that what compiles here
# compiles in the JIT build. torch's headers come in with -isystem: their own warnings are not ours
# to fix, while every warning in our code (and in templates of theirs we instantiate) is an error.
mapfile -t TORCH_FLAGS < <("$PY" - <<'PY'
import glob, logging, os, sysconfig, torch
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime": known
from torch.utils import cpp_extension as ce
site = sysconfig.get_paths()["purelib"]
system = ce.include_paths(device_type="cuda") + sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
for p in system + [sysconfig.get_paths()["include"]]:  # + cuBLAS/cuSPARSE headers, Python.h
    print("-isystem")
    print(p)
for f in ce.COMMON_NVCC_FLAGS:
    print(f)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print("-DTORCH_API_INCLUDE_EXTENSION_H")
print("-DTORCH_EXTENSION_NAME=fedtreelora_cuda_check")
PY
)
NVTX_FLAGS=()
if [ -f "$CUDA_HOME/include/nvtx3/nvToolsExt.h" ]; then NVTX_FLAGS=(-DFEDTREELORA_NVTX=1); fi
# Host warnings: -Wall -Wextra plus the ones that catch real bugs in kernel launch code (shadowing,
# silent narrowing of sizes in index math is left to review: torch's TORCH_CHECK macros trip -Wconversion).
HOST_WARN="-Wall,-Wextra,-Wshadow,-Wnon-virtual-dtor,-Wcast-align,-Woverloaded-virtual,-Wnull-dereference,-Werror"
STRICT=(-Werror all-warnings -Xcudafe --display_error_number -Xcompiler "$HOST_WARN")
ARCHS=${CUDA_CHECK_ARCHS:-80 90}
# --threads 0: nvcc builds the architectures of one file in parallel.
GENCODE=()
for arch in $ARCHS; do GENCODE+=(-gencode "arch=compute_$arch,code=sm_$arch"); done
LAST_ARCH=${ARCHS##* }
GENCODE+=(-gencode "arch=compute_$LAST_ARCH,code=compute_$LAST_ARCH")  # the PTX that +PTX ships
NVCC_ARGS=(-O3 -std=c++20 -Xcompiler -fPIC --threads 0 "${GENCODE[@]}" -Icsrc/include "${TORCH_FLAGS[@]}" "${NVTX_FLAGS[@]}"
           -DFEDTREELORA_WITH_CUDA=1 "${STRICT[@]}")
# A file that passed with exactly these sources, headers and flags is not compiled again.
PASSED_DIR=${FEDTREELORA_CUDA_CACHE_DIR:-$CACHE_ROOT/cuda-check}/nvcc-passed
mkdir -p "$PASSED_DIR"
HEADERS_KEY=$(cat csrc/include/*.h 2>/dev/null | sha256sum | cut -c1-16)
OBJ_DIR=$(mktemp -d)
trap 'rm -rf "$OBJ_DIR"' EXIT
compiled=0
failed=()
shopt -s nullglob
CU_FILES=(csrc/cuda/*.cu)
[ ${#CU_FILES[@]} -gt 0 ] || say "no csrc/cuda/*.cu files to compile"
# Files compile side by side, CUDA_CHECK_JOBS at a time (default: a job per 4 cores; nvcc's --threads 0
# already spreads one file's architectures), each into its own log, printed when it ends.
JOBS=${CUDA_CHECK_JOBS:-$(( $(nproc) / 4 > 1 ? $(nproc) / 4 : 1 ))}
pending_cu=() pending_pid=() pending_key=()
finish_oldest() {
  local cu=${pending_cu[0]} pid=${pending_pid[0]} key=${pending_key[0]}
  local log
  log="$OBJ_DIR/$(basename "$cu" .cu).log"
  if wait "$pid"; then
    cat "$log"
    touch "$PASSED_DIR/$key"
    say "compiled $cu for sm_${ARCHS// /, sm_} without warnings"
    compiled=$((compiled + 1))
  else
    cat "$log"
    say "$cu does not compile cleanly for sm_${ARCHS// /, sm_} (nvcc's messages above)"
    failed+=("$cu")
  fi
  pending_cu=("${pending_cu[@]:1}") pending_pid=("${pending_pid[@]:1}") pending_key=("${pending_key[@]:1}")
}
for cu in "${CU_FILES[@]}"; do
  key=$( { cat "$cu"; echo "$HEADERS_KEY ${NVCC_ARGS[*]} $CUDA_VERSION $TORCH_VERSION"; } | sha256sum | cut -c1-24)
  if [ -f "$PASSED_DIR/$key" ]; then
    say "$cu unchanged since it compiled cleanly for sm_${ARCHS// /, sm_}"
    compiled=$((compiled + 1))
    continue
  fi
  [ ${#pending_pid[@]} -lt "$JOBS" ] || finish_oldest
  name=$(basename "$cu" .cu)
  "$NVCC" -c "$cu" -o "$OBJ_DIR/$name.o" "${NVCC_ARGS[@]}" > "$OBJ_DIR/$name.log" 2>&1 &
  pending_cu+=("$cu") pending_pid+=($!) pending_key+=("$key")
done
while [ ${#pending_pid[@]} -gt 0 ]; do finish_oldest; done
if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED: ${failed[*]} did not compile cleanly with warnings as errors"
  exit 1
fi

# --- 3. the full JIT build with CUDA on, the CUDA registrations, the CPU tests on that build -------
export FEDTREELORA_WITH_CUDA=1 FEDTREELORA_REQUIRE_NATIVE=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"}  # +PTX: newer GPUs JIT the sm_90 PTX
export FEDTREELORA_CACHE_DIR=${FEDTREELORA_CUDA_CACHE_DIR:-$CACHE_ROOT/cuda-check}
say "JIT build with CUDA (cache $FEDTREELORA_CACHE_DIR)"
"$PY" - <<'PY'
import logging
import torch
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime": known
import fedtreelora
from fedtreelora.core import build

fedtreelora.native_available()
info = build.native_info()
assert info["native"], info
assert build.build_plan().with_cuda, "the build plan left the CUDA sources out"
ops_names = ("layer_distances", "linkage", "cut_tree", "silhouette", "tree_reduce", "pack_rows")
missing = [op for op in ops_names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fedtreelora::{op}", "CUDA")]
print("cuda-check: built", info["library"])
for op in ops_names:
    print(f"cuda-check:   fedtreelora::{op:16s} CUDA kernel {'MISSING' if op in missing else 'registered'}")
if missing:
    raise SystemExit(f"cuda-check: FAILED: no CUDA kernel registered for {', '.join(missing)}")
PY
# The suites that exercise the native library (the ops, and the tree and aggregate built on them);
# the federated and Flower suites train models and gain nothing from another build.
CUDA_CHECK_TESTS=${CUDA_CHECK_TESTS:-"tests/test_build.py tests/test_compile.py tests/test_fuzz_ops.py tests/test_layer_distances.py tests/test_linkage.py tests/test_cut_tree.py tests/test_silhouette.py tests/test_tree_reduce.py tests/test_pack_rows.py tests/test_tree.py tests/test_aggregate.py"}
if [ "$CUDA_CHECK_TESTS" = none ]; then
  say "OK: ${compiled} .cu file(s) warning-free under nvcc, CUDA build loads with all 6 ops registered for CUDA; CPU tests not run (CUDA_CHECK_TESTS=none) (torch $TORCH_VERSION, nvcc $CUDA_VERSION)"
  exit 0
fi
say "CPU tests of the native ops against the CUDA build"
# shellcheck disable=SC2086
"$PY" -m pytest -q -m "not slow" -p no:cacheprovider ${PYTEST_ARGS:-} $CUDA_CHECK_TESTS
say "OK: ${compiled} .cu file(s) warning-free under nvcc, CUDA build loads with all 6 ops registered for CUDA, CPU tests pass on it (torch $TORCH_VERSION, nvcc $CUDA_VERSION)"
