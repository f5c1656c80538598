"""ONNX -> TensorRT plans (FP16 and FP32) with the TensorRT Python API, checked against onnxruntime.

Needs a CUDA GPU and the ``tensorrt`` package whose version matches the serving Triton
(Triton 2.51 / NGC 24.10 ships TensorRT 10.5: a plan only loads on the TensorRT version and GPU
architecture it was built with, so build plans on the serving machine or inside its container).

Tolerances against onnxruntime (CPU, FP32) on realistic inputs, max abs diff over all outputs (all in
[0, 1]): FP32 plans (TF32 disabled) :data:`FP32_TOLERANCE`; FP16 plans :data:`FP16_TOLERANCE` (FP16 has
~3 significant digits, accumulated over ~20 layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from contract import MODEL_IO, GridSpec, tensor_specs
from export.onnx_export import ExportError, max_abs_diffs, ort_chain, ort_session, parity_inputs

Progress = Callable[[str], None]

FP32_TOLERANCE = 1e-3
FP16_TOLERANCE = 2e-2
#: optimization profile: (min, opt, max) batch
DEFAULT_PROFILE_BATCH = (1, 4, 8)
WORKSPACE_BYTES = 1 << 30


def gpu_available() -> bool:
    """True when torch sees a CUDA device (the plan builder and checker need one)."""
    import torch

    return bool(torch.cuda.is_available())


def require_tensorrt() -> Any:
    """Import ``tensorrt`` or stop with a clear message; also requires a CUDA GPU."""
    if not gpu_available():
        raise ExportError(
            "--tensorrt needs a CUDA GPU; none is visible here (export ONNX only, or run on a GPU machine)"
        )
    try:
        import tensorrt as trt
    except ImportError as err:
        raise ExportError(
            "--tensorrt needs the tensorrt Python package matching the serving Triton "
            "(e.g. pip install tensorrt==10.5.* for Triton 2.51 / NGC 24.10)"
        ) from err
    return trt


@dataclasses.dataclass(frozen=True)
class PlanResult:
    model: str
    precision: str  # "fp16" | "fp32"
    path: Path
    max_abs_diff: dict[str, float]
    tolerance: float


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    model: str,
    grid: GridSpec,
    fp16: bool,
    profile_batch: tuple[int, int, int] = DEFAULT_PROFILE_BATCH,
) -> Path:
    """Build a serialized TensorRT engine for ``onnx_path`` with one optimization profile over the batch axis."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{model}: TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.clear_flag(trt.BuilderFlag.TF32)  # FP32 plans stay IEEE FP32 (comparable with onnxruntime)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    specs = tensor_specs(grid)
    profile = builder.create_optimization_profile()
    lo, opt, hi = profile_batch
    for name in MODEL_IO[model][0]:
        shape = specs[name].shape
        profile.set_shape(name, (lo, *shape), (opt, *shape), (hi, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{model}: TensorRT engine build failed ({'FP16' if fp16 else 'FP32'})")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return plan_path


def run_plan(plan_path: Path, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a plan once on the GPU (torch CUDA tensors as I/O buffers); outputs as numpy float32."""
    import torch

    trt = require_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise ExportError(f"{model}: cannot deserialize {plan_path}")
    context = engine.create_execution_context()
    device = torch.device("cuda")
    keep: list[torch.Tensor] = []
    for name in MODEL_IO[model][0]:
        tensor = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(device)
        keep.append(tensor)
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs: dict[str, torch.Tensor] = {}
    for name in MODEL_IO[model][1]:
        shape = tuple(context.get_tensor_shape(name))
        outputs[name] = torch.empty(shape, dtype=torch.float32, device=device)
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise ExportError(f"{model}: TensorRT execution failed")
    stream.synchronize()
    return {name: t.cpu().numpy() for name, t in outputs.items()}


def check_plan(
    plan_path: Path, onnx_paths: dict[str, Path], model: str, grid: GridSpec, tolerance: float, batch: int = 3
) -> dict[str, float]:
    """Max abs diff plan vs onnxruntime on realistic inputs (chain intermediates from onnxruntime)."""
    sessions = {m: ort_session(path) for m, path in onnx_paths.items()}
    reference = ort_chain(sessions, parity_inputs(grid, batch))
    got = run_plan(plan_path, model, reference)
    diffs = max_abs_diffs(got, reference, MODEL_IO[model][1], reference["availability"])
    for name, diff in diffs.items():
        if not name.endswith("]") and not diff <= tolerance:
            raise ExportError(
                f"{model}: TensorRT {plan_path.name} vs onnxruntime max abs diff {diff:.3g} on {name} "
                f"exceeds {tolerance:g}"
            )
    return diffs


def export_plans(
    onnx_paths: dict[str, Path], grid: GridSpec, fp16_name: str, fp32_name: str, progress: Progress
) -> list[PlanResult]:
    """FP16 and FP32 plans next to each ``model.onnx``; each checked against onnxruntime."""
    require_tensorrt()
    results = []
    for model, onnx_path in onnx_paths.items():
        for precision, filename, tolerance in (
            ("fp16", fp16_name, FP16_TOLERANCE),
            ("fp32", fp32_name, FP32_TOLERANCE),
        ):
            plan_path = onnx_path.parent / filename
            progress(
                f"build TensorRT {precision.upper()} plan for {model} "
                f"(batch {DEFAULT_PROFILE_BATCH[0]}-{DEFAULT_PROFILE_BATCH[2]})"
            )
            build_plan(onnx_path, plan_path, model, grid, fp16=precision == "fp16")
            diffs = check_plan(plan_path, onnx_paths, model, grid, tolerance)
            progress(
                f"  {model} {precision}: max abs diff vs onnxruntime {max(diffs.values()):.2e} "
                f"(tolerance {tolerance:g})"
            )
            results.append(PlanResult(model, precision, plan_path, diffs, tolerance))
    return results
