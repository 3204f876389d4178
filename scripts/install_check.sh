#!/usr/bin/env bash
# Show that a non-editable install ships the C++ sources and JIT-builds from them in another folder.
set -euo pipefail
PY=${1:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip install -q --no-deps --no-build-isolation --target "$WORK/site" "$ROOT"
test -f "$WORK/site/fedtreelora/csrc/ops.cpp" || { echo "install-check: csrc/ missing from the installed package"; exit 1; }
cd "$WORK"
PYTHONPATH="$WORK/site" FEDTREELORA_CACHE_DIR="$WORK/cache" FEDTREELORA_REQUIRE_NATIVE=1 "$PY" - <<'PY'
import fedtreelora, torch
info = fedtreelora.ops._build.native_info()
assert fedtreelora.__file__.startswith(__import__("os").getcwd()), fedtreelora.__file__
assert info["native"] and "/cache/" in info["library"], info
x = torch.randn(5, 12)
per_layer, mean = fedtreelora.ops.layer_distances(x, torch.tensor([0, 4, 12]))
assert per_layer.shape == (2, 5, 5)
print("install-check: installed package built its native core from", fedtreelora.ops._build.source_dir())
PY
