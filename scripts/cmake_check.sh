#!/usr/bin/env bash
# Configure and build the native core with CMake against the LibTorch of the given Python's torch,
# load the built library into that Python with torch.ops.load_library and run ops on it: every op
# that has a csrc/cpu/<op>.cpp must have a CPU kernel, and linkage + cut_tree must match scipy.
# Usage: scripts/cmake_check.sh [python] [extra cmake arguments, e.g. -DFEDTREELORA_WITH_CUDA=ON]
set -euo pipefail
PY=${1:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the script changes folder
shift || true
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${FEDTREELORA_CMAKE_BUILD_DIR:-$ROOT/cmake-build}
PREFIX=$("$PY" -c "import torch; print(torch.utils.cmake_prefix_path)")

cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v "$PY")" \
      -DCMAKE_PREFIX_PATH="$PREFIX" "$@"
cmake --build "$BUILD" --parallel "$(nproc 2>/dev/null || echo 2)"
LIBRARY="$BUILD/_C.so"
test -f "$LIBRARY" || { echo "cmake-check: $LIBRARY was not built"; exit 1; }

# Not `import fedtreelora`: its JIT build would register the same op namespace a second time.
"$PY" - "$LIBRARY" "$ROOT" <<'PY'
import pathlib, shutil, subprocess, sys
import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import pdist, squareform

library, root = sys.argv[1], pathlib.Path(sys.argv[2])
torch.ops.load_library(library)
expected = sorted(p.stem for p in (root / "csrc" / "cpu").glob("*.cpp"))
missing = [op for op in expected if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fedtreelora::{op}", "CPU")]
assert not missing, f"cmake-check: no CPU kernel registered for {missing}"

x = np.random.default_rng(0).normal(size=(40, 5))
y = pdist(x)
d = torch.from_numpy(squareform(y))
for method in ("single", "complete", "average", "weighted", "ward"):
    z = torch.ops.fedtreelora.linkage(d, method)
    assert np.array_equal(z.numpy(), linkage(y, method)), method
z = linkage(y, "average")
labels = torch.ops.fedtreelora.cut_tree(torch.from_numpy(z), torch.tensor([3, 1, 7]))
assert np.array_equal(labels.numpy(), cut_tree(z, n_clusters=[3, 1, 7]).T)
# torch's backend is OpenMP here, so the library must link it, or its parallel loops run on one thread
if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info() and shutil.which("readelf"):
    needed = subprocess.run(["readelf", "-d", library], capture_output=True, text=True, check=True).stdout
    assert "libgomp" in needed or "libomp" in needed, f"cmake-check: {library} does not link OpenMP:\n{needed}"
print(f"cmake-check: {library} loaded; CPU kernels for {', '.join(expected)}; linkage and cut_tree equal scipy")
PY
