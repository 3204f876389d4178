#!/usr/bin/env bash
# A non-editable install ships the C++ sources and JIT-builds from them in another folder; two
# processes importing at once with an empty cache both succeed and share one build (the file lock).
set -euo pipefail
PY=${1:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the script changes folder
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip install -q --no-deps --no-build-isolation --target "$WORK/site" "$ROOT"
test -f "$WORK/site/fedtreelora/csrc/ops.cpp" || { echo "install-check: csrc/ missing from the installed package"; exit 1; }
cd "$WORK"
cat > check.py <<'PY'
import os, sys, torch
import fedtreelora
fedtreelora.native_available()
info = fedtreelora.core.build.native_info()
assert fedtreelora.__file__.startswith(os.getcwd()), f"imported {fedtreelora.__file__}, not the installed copy"
assert info["native"] and info["library"].startswith(os.environ["FEDTREELORA_CACHE_DIR"]), info
assert str(fedtreelora.core.build.source_dir()).startswith(os.getcwd())
per_layer, mean = fedtreelora.ops.layer_distances(torch.randn(5, 12), torch.tensor([0, 4, 12]))
assert per_layer.shape == (2, 5, 5)
print(info["library"])
PY
export PYTHONPATH="$WORK/site" FEDTREELORA_CACHE_DIR="$WORK/cache" FEDTREELORA_REQUIRE_NATIVE=1
"$PY" check.py > a.out 2> a.err & first=$!
"$PY" check.py > b.out 2> b.err & second=$!
status=0
wait $first || status=1
wait $second || status=1
if [ $status -ne 0 ] || ! cmp -s a.out b.out; then
  echo "install-check: FAILED"; cat a.out a.err b.out b.err; exit 1
fi
builds=$(find "$WORK/cache" -name '*.so' | wc -l)
[ "$builds" -eq 1 ] || { echo "install-check: expected one shared build, found $builds"; exit 1; }
echo "install-check: OK: the installed package built its native core once from its own csrc/ for two concurrent imports ($(cat a.out))"
