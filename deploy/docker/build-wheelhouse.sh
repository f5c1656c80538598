#!/usr/bin/env bash
# Wheelhouses for the CPU images, so that `pip install` inside a build needs no index and no network:
#
#   build/wheelhouse/service/      local/: mpmri-serve + mpmri-client (built from this checkout);
#                                  deps/: their base dependencies (no torch), pinned by constraints.txt
#   build/wheelhouse/triton-cpu/   nvidia-pytriton (only for its tritonserver, installed --no-deps),
#                                  numpy and onnxruntime for the Python-based onnxruntime backend
#
# Each folder also holds constraints.txt (copied from the repository root) so the image build installs
# exactly the versions verified here. pip runs with the host's configuration (index, find-links, CA
# bundle). Usage: deploy/docker/build-wheelhouse.sh [service|triton-cpu|all] (default all).
# Environment: PYTHON (default .venv/bin/python), WHEELHOUSE (default build/wheelhouse).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${WHEELHOUSE:-$ROOT/build/wheelhouse}"
TARGET="${1:-all}"
PIP=("$PY" -m pip --disable-pip-version-check)

# the project's pins for what the images install
pin() { grep -i -E "^$1==" "$ROOT/constraints.txt" | head -n1; }

service() {
  local dir="$OUT/service"
  mkdir -p "$dir/deps" "$dir/local"
  cp "$ROOT/constraints.txt" "$dir/constraints.txt"
  rm -f "$dir"/local/*.whl
  # the two local packages as wheels (pure Python; built from the checkout every time) ...
  # fixed timestamps: an unchanged checkout gives byte-identical wheels, so image builds reuse their layers
  SOURCE_DATE_EPOCH=315532800 "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$dir/local" \
    "$ROOT/client" "$ROOT" >&2
  rm -rf "$ROOT"/build/lib "$ROOT"/build/bdist.*
  # ... and their dependencies, base dependencies only (no [ml] extra: no torch). Two folders, so that an
  # image rebuild after a code change reuses the layer with the dependencies.
  "${PIP[@]}" download -q --only-binary=:all: -d "$dir/deps" -c "$dir/constraints.txt" --find-links "$dir/local" \
    mpmri-serve==0.1.0 mpmri-client==0.1.0 >&2
  rm -f "$dir"/deps/mpmri_serve-*.whl "$dir"/deps/mpmri_client-*.whl
  echo "$dir"
}

triton_cpu() {
  local dir="$OUT/triton-cpu"
  mkdir -p "$dir"
  cp "$ROOT/constraints.txt" "$dir/constraints.txt"
  "${PIP[@]}" download -q --only-binary=:all: --no-deps -d "$dir" "$(pin nvidia-pytriton)" >&2
  "${PIP[@]}" download -q --only-binary=:all: -d "$dir" -c "$dir/constraints.txt" \
    "$(pin numpy)" "$(pin onnxruntime)" >&2
  echo "$dir"
}

case "$TARGET" in
  service) service ;;
  triton-cpu) triton_cpu ;;
  all) service && triton_cpu ;;
  *) echo "usage: $0 [service|triton-cpu|all]" >&2 && exit 2 ;;
esac
