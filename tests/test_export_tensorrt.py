"""TensorRT plans (FP16/FP32, batch 1-8) built with the TensorRT Python API agree with onnxruntime (GPU only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_tensorrt_export_builds_checked_fp16_and_fp32_plans(random_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    from contract import DEFAULT_GRID
    from export.onnx_export import parity_inputs
    from export.pipeline import export_repository
    from export.repository import NETWORK_MODELS, parse_config
    from export.tensorrt_export import FP16_TOLERANCE, FP32_TOLERANCE, run_plan

    repository = tmp_path / "repo"
    manifest = export_repository(random_checkpoint, repository, tensorrt=True, progress=print)
    for model in NETWORK_MODELS:
        entry = manifest["models"][model]
        assert max(entry["tensorrt_fp16"]["max_abs_diff_vs_onnxruntime"].values()) <= FP16_TOLERANCE
        assert max(entry["tensorrt_fp32"]["max_abs_diff_vs_onnxruntime"].values()) <= FP32_TOLERANCE
        config = parse_config(repository / model / "configs" / "tensorrt.pbtxt")
        assert config.backend == "tensorrt" and config.default_model_filename == "model.plan"
    # the profile covers batch 8
    inputs = parity_inputs(DEFAULT_GRID, 8)
    out = run_plan(repository / "localization" / "1" / "model.plan", "localization", inputs)
    assert out["sequence_maps"].shape[0] == 8
    assert json.loads((repository / "manifest.json").read_text())["versions"]["tensorrt"]
