"""``mpmri export``: checkpoint -> complete Triton model repository, swapped in atomically.

Everything is written into a staging folder next to the repository; only when every export and check
passed is the old repository replaced (rename old aside, rename staging in, delete old). On any failure
the staging folder is removed and the existing repository stays as it was.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

from contract import CONTRACT_VERSION, GridSpec, __version__, contract_dict
from export.onnx_export import ExportError, export_onnx_models, sha256_file
from export.repository import (
    MANIFEST_FILENAME,
    MODEL_VERSION,
    ONNX_FILENAME,
    TENSORRT_FP16_FILENAME,
    TENSORRT_FP32_FILENAME,
    render_configs,
    write_configs,
)
from networks.checkpoint import CheckpointError, load_checkpoint
from postprocessing.lesion_scoring import LesionScorer, scorer_from_metadata

Progress = Callable[[str], None]
#: onnxruntime vs torch max abs diff accepted by the export
PARITY_TOLERANCE = 1e-4


def _versions(tensorrt_version: str | None) -> dict[str, str | None]:
    return {
        "mpmri": __version__,
        "contract": CONTRACT_VERSION,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tensorrt": tensorrt_version,
    }


def _swap_in(staging: Path, repository: Path) -> None:
    old = None
    if repository.exists():
        old = repository.with_name(f".{repository.name}.old-{os.getpid()}")
        os.replace(repository, old)
    try:
        os.replace(staging, repository)
    except OSError:
        if old is not None:
            os.replace(old, repository)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def repository_is_current(checkpoint: Path, repository: Path) -> bool:
    """True when ``repository`` holds exactly what :func:`export_repository` would build from ``checkpoint`` now.

    Checked against ``manifest.json``: the checkpoint's sha256, the contract (version and every constant), the
    sha256 of every model file on disk, and the generated configs (equal to what the current code renders).
    Anything missing, unreadable or different gives False, so callers re-export.
    """
    try:
        manifest = json.loads((repository / MANIFEST_FILENAME).read_text())
        grid = GridSpec.from_dict(manifest["contract"]["grid"])
        if manifest["checkpoint"]["sha256"] != sha256_file(checkpoint):
            return False
        if manifest["contract_version"] != CONTRACT_VERSION or manifest["contract"] != contract_dict(grid):
            return False
        has_plans = False
        for entry in manifest["models"].values():  # {"file", "sha256", "tensorrt_<precision>": {"file", "sha256"}}
            files = [entry] + [v for k, v in entry.items() if k.startswith("tensorrt")]
            has_plans = has_plans or len(files) > 1
            if any(sha256_file(repository / f["file"]) != f["sha256"] for f in files):
                return False
        _, metadata = load_checkpoint(checkpoint)
        configs = render_configs(grid, tensorrt=has_plans, lesion_scorer=scorer_from_metadata(metadata))
        return all((repository / rel).read_text() == text for rel, text in configs.items())
    except (OSError, KeyError, TypeError, ValueError, CheckpointError):
        return False


def _lesion_scorer(checkpoint: Path, metadata: dict[str, Any]) -> LesionScorer | None:
    """The checkpoint's lesion scorer, or ``None``; :class:`ExportError` naming the problem when it is unusable."""
    try:
        return scorer_from_metadata(metadata)
    except ValueError as err:
        raise ExportError(f"checkpoint {checkpoint}: {err}") from None


def export_repository(
    checkpoint: Path,
    repository: Path,
    tensorrt: bool = False,
    tolerance: float = PARITY_TOLERANCE,
    progress: Progress = print,
) -> dict[str, Any]:
    """Build the model repository from ``checkpoint``; returns the manifest (also written as manifest.json).

    Raises:
        ExportError: an export or check failed (the repository is left unchanged).
        CheckpointContractError: the checkpoint's recorded contract (sequences, normalization, fill value,
            candidate settings...) differs from the code's; the message names each difference and nothing
            is written.
        CheckpointError: the checkpoint is missing or unreadable.
    """
    checkpoint = Path(checkpoint)
    repository = Path(repository)
    if tensorrt:  # fail before any work when no GPU / tensorrt is there
        from export.tensorrt_export import require_tensorrt

        require_tensorrt()
    progress(f"load checkpoint {checkpoint}")
    nets, metadata = load_checkpoint(checkpoint)  # refuses a recorded contract other than the code's, by name
    progress(f"recorded contract matches the code's (version {CONTRACT_VERSION}, grid {list(nets.grid.size_dhw)})")
    scorer = _lesion_scorer(checkpoint, metadata)
    progress("lesion scorer: " + ("none" if scorer is None else f"{len(scorer.trees)} trees, {scorer.fitted_on}"))
    repository.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository.name}.staging-", dir=repository.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700; the server (another user in a container) must read it
    try:
        progress(f"write configs (contract version {CONTRACT_VERSION})")
        write_configs(staging, nets.grid, tensorrt=tensorrt, lesion_scorer=scorer)
        onnx_paths, parity = export_onnx_models(nets, staging, MODEL_VERSION, ONNX_FILENAME, tolerance, progress)
        plans: list[Any] = []
        trt_version = None
        if tensorrt:
            import tensorrt as trt

            from export.tensorrt_export import export_plans

            trt_version = str(trt.__version__)
            plans = export_plans(onnx_paths, nets.grid, TENSORRT_FP16_FILENAME, TENSORRT_FP32_FILENAME, progress)
        models: dict[str, Any] = {}
        for model, path in onnx_paths.items():
            models[model] = {"file": str(path.relative_to(staging)), "sha256": sha256_file(path)}
        for plan in plans:
            models[plan.model][f"tensorrt_{plan.precision}"] = {
                "file": str(plan.path.relative_to(staging)),
                "sha256": sha256_file(plan.path),
                "max_abs_diff_vs_onnxruntime": plan.max_abs_diff,
                "tolerance": plan.tolerance,
            }
        manifest = {
            "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "checkpoint": {
                "path": str(checkpoint),
                "sha256": sha256_file(checkpoint),
                "profile": metadata.get("profile"),
                "created_utc": metadata.get("created_utc"),
                "code_version": metadata.get("code_version"),
            },
            "contract_version": CONTRACT_VERSION,
            "contract": contract_dict(nets.grid),
            "lesion_scoring": None
            if scorer is None
            else {
                "sha256": hashlib.sha256(scorer.to_json().encode()).hexdigest(),
                "trees": len(scorer.trees),
                "category5_trees": 0 if scorer.category5 is None else len(scorer.category5.trees),
                "fitted_on": scorer.fitted_on,
            },
            "versions": _versions(trt_version),
            "models": models,
            "parity_vs_torch": {
                "tolerance": tolerance,
                "results": [{"model": r.model, "batch": r.batch, "max_abs_diff": r.max_abs_diff} for r in parity],
            },
        }
        (staging / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        progress(f"swap {repository} in")
        _swap_in(staging, repository)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise
    progress(f"done: {repository} ({', '.join(models)}; manifest {MANIFEST_FILENAME})")
    return manifest


__all__ = ["PARITY_TOLERANCE", "ExportError", "export_repository"]
