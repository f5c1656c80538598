#!/usr/bin/env bash
# The model-repository artifact that Triton pods load: `mpmri export` (torch, on a build host or in CI, never
# in the serving images) -> a reproducible tar.gz plus its SHA-256, e.g. for object storage.
#
#   deploy/docker/build-model-repository.sh [OUT_DIR] [CHECKPOINT]
#     -> OUT_DIR/model_repository/          (the folder: mount it into a Triton container)
#        OUT_DIR/model-repository-<sha12>.tar.gz and .sha256
#
# Defaults: OUT_DIR=build/model-repository, CHECKPOINT=checkpoints/cpu_default.pt. Upload the tarball
# (e.g. `aws s3 cp`, `gsutil cp`) and set tritonServer.modelRepository.fetch.url / .sha256 in the chart; or
# copy the folder onto the PersistentVolume. The repository holds ONNX models and both configs
# (config.pbtxt for GPUs, configs/cpu.pbtxt for --model-config-name=cpu); TensorRT engines are not in
# it: they are built on the target GPU at start-up (onnxruntime TensorRT engine cache, see README).
# Environment: MPMRI (default .venv/bin/mpmri).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/build/model-repository}" && cd "${1:-$ROOT/build/model-repository}" && pwd)"
CHECKPOINT="${2:-$ROOT/checkpoints/cpu_default.pt}"
MPMRI="${MPMRI:-$ROOT/.venv/bin/mpmri}"

"$MPMRI" export --checkpoint "$CHECKPOINT" --repository "$OUT/model_repository" >&2
# every file readable by the (non-root) Triton user; reproducible archive (sorted, fixed owner and times)
chmod -R a+rX "$OUT/model_repository"
TMP="$OUT/.model-repository.tar.gz.tmp"
tar -C "$OUT/model_repository" --sort=name --owner=0 --group=0 --numeric-owner --mtime='2020-01-01 00:00Z' \
  -cf - . | gzip -n >"$TMP"
SHA="$(sha256sum "$TMP" | cut -d' ' -f1)"
rm -f "$OUT"/model-repository-*.tar.gz "$OUT"/model-repository-*.tar.gz.sha256
mv "$TMP" "$OUT/model-repository-${SHA:0:12}.tar.gz"
echo "$SHA  model-repository-${SHA:0:12}.tar.gz" >"$OUT/model-repository-${SHA:0:12}.tar.gz.sha256"
echo "$OUT/model-repository-${SHA:0:12}.tar.gz"
