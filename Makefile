# The two set-up commands: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv in the repository root when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean system-packages checkpoint checkpoint-gpu

$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ./client -e '.[ml,dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/mpmri demo

# Debian packages the suite starts for real (Orthanc, dcmtk, openssl); a no-op when present
system-packages:
	@scripts/install_system_packages.sh

test: $(STAMP) system-packages
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# Retrain the shipped CPU checkpoint from scratch (docs/networks.md, "The shipped default checkpoint"):
# synthetic seed 1 (700 training + 100 validation + 300 calibration-only + 800 scorer-only + 1600 recalibration-only
# cases), 3 phases, category thresholds + Platt calibration on the validation and calibration-only cases; the fused-map
# loss trains the fusion only (sixth release); the second-stage lesion scorer fitted on cases 700-1899 (seventh
# release), on the fused-map and DWI-map candidates of the contract's candidate settings (eighth release; blobs cut at
# valleys of the map's log-odds since the tenth; the scorer reads the blobs, not the regions grown to 65 mm^3 after
# scoring since the eleventh), with its category-5 and lesion models, then recalibrated (study-level Platt) on cases
# 1900-3499 (ninth release). 21.0 min from an empty cache in a fresh clone on a 2-core Zen 5 VM (10.6 of them the
# cache), 11.0-11.9 with it (BENCHMARKS "Training").
checkpoint: $(STAMP)
	$(BIN)/mpmri train --profile cpu --grid default --cases 800 --val-cases 100 --calibration-cases 300 --scorer-cases 800 \
	  --recalibration-cases 1600 --data-seed 1 \
	  --epochs-localization 4 --epochs-classification 4 --epochs-joint 3 --fused-loss-trains-fusion-only --seed 0 --threads 2 \
	  --cache .cache/train --out build/runs/cpu_default --checkpoint-out checkpoints/cpu_default.pt --no-progress

# The GPU profile at the realistic grid (24x256x256 at 3x0.5x0.5 mm), on a CUDA device: same data and split as
# above, 6 + 4 + 3 epochs; 8.3 min on an H200 from an empty cache (docs/networks.md, "The GPU profile"). Not
# shipped: it has not beaten the CPU checkpoint on validation.
checkpoint-gpu: $(STAMP)
	PYTHON=$(BIN)/python scripts/train_gpu_profile.sh build/runs/gpu_realistic build/gpu_realistic.pt

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy contract preprocessing postprocessing preprocess_service mpmri synth networks training export serving client/mpmri_client

clean:
	rm -rf build out .pytest_cache .mypy_cache .ruff_cache
