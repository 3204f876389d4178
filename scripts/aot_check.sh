#!/usr/bin/env bash
# FEDTREELORA_BUILD_EXT=1 at install time compiles the extension ahead of time (fedtreelora/_C.so);
# the installed package then loads it without any JIT build (an empty build cache stays empty).
set -euo pipefail
PY=${1:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the script changes folder
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FEDTREELORA_BUILD_EXT=1 "$PY" -m pip install -q --no-deps --no-build-isolation --target "$WORK/site" "$ROOT"
test -f "$WORK/site/fedtreelora/_C.so" || { echo "aot-check: fedtreelora/_C.so was not built"; exit 1; }
cd "$WORK"
PYTHONPATH="$WORK/site" FEDTREELORA_CACHE_DIR="$WORK/cache" FEDTREELORA_REQUIRE_NATIVE=1 "$PY" - <<'PY'
import os, torch
import fedtreelora
assert not fedtreelora.core.build.native_info()["native"], "the native core loaded at import, not at first use"
fedtreelora.native_available()
info = fedtreelora.core.build.native_info()
assert info["library"].endswith("fedtreelora/_C.so") and info["library"].startswith(os.getcwd()), info
assert not os.path.exists(os.environ["FEDTREELORA_CACHE_DIR"]), "a JIT build ran although the AOT library was there"
z = fedtreelora.ops.linkage(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
assert z.tolist() == [[0.0, 1.0, 1.0, 2.0]]
print("aot-check: OK: the ahead-of-time build", info["library"], "loads and runs")
PY
