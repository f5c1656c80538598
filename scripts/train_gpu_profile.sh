#!/usr/bin/env bash
# The GPU profile's recipe: `--profile gpu --grid realistic` (24x256x256 voxels at 3.0x0.5x0.5 mm), trained on
# a CUDA device from the same synthetic seed, split and calibration-only cases as the CPU recipe
# (`make checkpoint`), with more localization epochs (docs/networks.md, "The GPU profile"). Since the ninth session
# it uses the CPU recipe's loss (`--fused-loss-trains-fusion-only`, sixth release); the lesion scorer
# (`--scorer-cases 800`) is left out to keep the run within one 10-minute device call (800 more cases to cache).
#
#   PYTHON=.venv/bin/python scripts/train_gpu_profile.sh RUN_DIR CHECKPOINT_OUT [extra mpmri train options]
#
# PYTHON defaults to python3; CACHE (default .cache/train) holds the preprocessed cases (22 MB each at this
# grid: 1100 cases need 24 GB of disk and as much memory). THREADS (default: every CPU) builds the cache;
# LOADER_WORKERS (default 8) read and augment the batches.
set -euo pipefail
run_dir=${1:?run folder}
checkpoint_out=${2:?checkpoint path}
shift 2
threads=${THREADS:-$(nproc)}
exec "${PYTHON:-python3}" -m training.cli train --profile gpu --grid realistic --device cuda \
  --cases 800 --val-cases 100 --calibration-cases 300 --data-seed 1 \
  --epochs-localization 6 --epochs-classification 4 --epochs-joint 3 --fused-loss-trains-fusion-only --seed 0 \
  --threads "$threads" --loader-workers "${LOADER_WORKERS:-8}" \
  --cache "${CACHE:-.cache/train}" --out "$run_dir" --checkpoint-out "$checkpoint_out" --no-progress "$@"
