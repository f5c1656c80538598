"""Checkpoint -> ONNX models (one per network) with checks and torch parity.

Each network is exported with the settings of :func:`networks.models.export_kwargs` (opset, exporter,
tensor names from :data:`contract.MODEL_IO`, dynamic batch axis), then checked:

1. ``onnx.checker.check_model(full_check=True)`` and ONNX shape inference;
2. input/output names, element types and non-batch dimensions equal :func:`contract.tensor_specs`;
3. onnxruntime vs torch on realistic inputs (see :func:`parity_inputs`): max abs diff <= tolerance,
   per network (fed with torch's intermediates) and for the whole chain, at two batch sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

from contract import (
    ENSEMBLE_MODEL,
    MISSING_CHANNEL_FILL_VALUE,
    MODEL_IO,
    NORMALIZATION,
    SEQUENCES,
    GridSpec,
    tensor_specs,
)
from contract.errors import MpmriError
from export.repository import NETWORK_MODELS
from networks.models import MpmriNetworks, example_inputs, export_kwargs

Progress = Callable[[str], None]

_ONNX_ELEM_TO_NUMPY = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
}


class ExportError(MpmriError):
    """ONNX/TensorRT export or one of its checks failed; the model repository was left untouched."""


#: suffix of the informational diff over the sequence-map channels of *missing* sequences
MISSING_SUFFIX = "[missing]"


def max_abs_diffs(
    actual: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    names: tuple[str, ...] | list[str],
    availability: np.ndarray,
) -> dict[str, float]:
    """Max abs difference per tensor ``name``; ``sequence_maps`` only over *available* sequences.

    The map of a missing sequence (its channel holds a constant fill value) is ignored by the fusion
    (weight 0) and carries no meaning; instance normalization of a constant input amplifies rounding
    differences between torch and onnxruntime there (observed up to ~1e-4). That channel's diff is
    returned under ``"sequence_maps[missing]"`` for information and is not held to the tolerance.

    ``score_map`` is a regression in PI-RADS units (values up to ~5, not a probability): its difference is
    taken relative to ``max(1, |expected|)`` so that it is held to the same number of significant digits.
    """
    diffs: dict[str, float] = {}
    present = np.asarray(availability) > 0.5  # [B, S]
    for name in names:
        diff = np.abs(np.asarray(actual[name], dtype=np.float64) - np.asarray(expected[name], dtype=np.float64))
        if name == "score_map":
            diff = diff / np.maximum(1.0, np.abs(np.asarray(expected[name], dtype=np.float64)))
        if name == "sequence_maps" and diff.ndim == 5:
            diffs[name] = float(diff[present].max()) if present.any() else 0.0
            if (~present).any():
                diffs[name + MISSING_SUFFIX] = float(diff[~present].max())
        else:
            diffs[name] = float(diff.max())
    return diffs


@dataclasses.dataclass(frozen=True)
class ParityResult:
    """Max abs difference onnxruntime vs torch per output tensor (see :func:`max_abs_diffs`)."""

    model: str
    batch: int
    max_abs_diff: dict[str, float]

    @property
    def checked(self) -> dict[str, float]:
        """The diffs held to the tolerance (all but the missing-sequence maps)."""
        return {k: v for k, v in self.max_abs_diff.items() if not k.endswith(MISSING_SUFFIX)}

    @property
    def worst(self) -> float:
        return max(self.checked.values())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parity_inputs(grid: GridSpec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic ensemble inputs ``images [B,S,D,H,W]`` and ``availability [B,S]`` (float32).

    Smooth random anatomy-like volumes in each sequence's normalized range (percentile-normalized
    sequences around 0-1, ADC in its fixed-scale range) with a few bright/dark blobs; batch element 1
    (when present) misses ADC and DWI (filled with the contract's missing value, availability 0).
    """
    gen = torch.Generator().manual_seed(seed)
    d, h, w = grid.size_dhw
    s = len(SEQUENCES)
    coarse = torch.rand((batch, s, max(2, d // 4), max(2, h // 8), max(2, w // 8)), generator=gen)
    smooth = F.interpolate(coarse, size=(d, h, w), mode="trilinear", align_corners=False)
    detail = 0.05 * torch.randn((batch, s, d, h, w), generator=gen)
    images = smooth + detail
    for c, name in enumerate(SEQUENCES):
        spec = NORMALIZATION[name]
        images[:, c] = images[:, c].clamp(spec.clip_min, spec.clip_max)
    availability = torch.ones((batch, s))
    if batch > 1:
        availability[1, 1:] = 0.0
        images[1, 1:] = MISSING_CHANNEL_FILL_VALUE
    return {"images": images.numpy().astype(np.float32), "availability": availability.numpy().astype(np.float32)}


def export_network(nets: MpmriNetworks, model: str, path: Path) -> Path:
    """Export one network (contract name ``model``) to ``path`` with the networks package's settings."""
    module = nets.modules()[model].eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    args = example_inputs(model, nets.grid, batch=2)
    with torch.no_grad(), warnings.catch_warnings():
        # instance norm always normalizes with the input's own statistics: "train=True" is what eval does too
        warnings.filterwarnings("ignore", message=".*instance_norm.*", category=UserWarning)
        # shape checks inside MONAI/torch modules are traced as constants; the batch axis stays dynamic
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\..*")
        torch.onnx.export(module, args, str(path), **export_kwargs(model))
    return path


def pin_contract_shapes(path: Path, model: str, grid: GridSpec) -> None:
    """Declare the contract's static non-batch dims on the graph inputs/outputs (batch stays ``"batch"``).

    The TorchScript exporter leaves output dims symbolic where the network reshapes with traced sizes;
    Triton, TensorRT and shape inference then know less than the contract guarantees.
    """
    proto = onnx.load(str(path))
    specs = tensor_specs(grid)
    for value in (*proto.graph.input, *proto.graph.output):
        if value.name not in specs:
            continue
        shape = value.type.tensor_type.shape
        dims = [("batch", 0), *[(None, int(n)) for n in specs[value.name].shape]]
        del shape.dim[:]
        for param, size in dims:
            dim = shape.dim.add()
            if param is None:
                dim.dim_value = size
            else:
                dim.dim_param = param
    onnx.save(proto, str(path))


def check_onnx_model(path: Path, model: str, grid: GridSpec) -> None:
    """onnx.checker + shape inference + contract names/dtypes/shapes (batch axis symbolic)."""
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{model}: ONNX check failed: {str(err).splitlines()[0]}") from err
    specs = tensor_specs(grid)
    inputs, outputs = MODEL_IO[model]
    graph = inferred.graph
    for expected, actual in ((inputs, graph.input), (outputs, graph.output)):
        names = [v.name for v in actual]
        if names != list(expected):
            raise ExportError(f"{model}: ONNX tensors {names} differ from the contract {list(expected)}")
        for value in actual:
            spec = specs[value.name]
            ttype = value.type.tensor_type
            dims = [dim.dim_param or dim.dim_value for dim in ttype.shape.dim]
            dtype = _ONNX_ELEM_TO_NUMPY.get(ttype.elem_type, str(ttype.elem_type))
            if dtype != spec.dtype or tuple(dims[1:]) != spec.shape or not isinstance(dims[0], str):
                raise ExportError(
                    f"{model}: ONNX tensor {value.name} is {dtype}{dims}, "
                    f"contract wants {spec.dtype}[batch, *{spec.shape}]"
                )


def ort_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """CPU onnxruntime session (``threads`` intra-op threads, 0 = default; spinning off)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def torch_chain(nets: MpmriNetworks, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All tensors of the chain computed by torch (numpy float32), keyed by contract name."""
    with torch.no_grad():
        out = nets.eval()(torch.from_numpy(inputs["images"]), torch.from_numpy(inputs["availability"]))
    return {**inputs, **{k: v.numpy() for k, v in out.items()}}


def ort_chain(sessions: dict[str, ort.InferenceSession], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ensemble's computation with onnxruntime sessions (what Triton runs), keyed by contract name."""
    tensors = dict(inputs)
    for model in NETWORK_MODELS:
        model_inputs, model_outputs = MODEL_IO[model]
        results = sessions[model].run(list(model_outputs), {n: tensors[n] for n in model_inputs})
        tensors.update(zip(model_outputs, results, strict=True))
    return tensors


def check_parity(
    nets: MpmriNetworks, paths: dict[str, Path], tolerance: float, batches: tuple[int, ...] = (1, 3), seed: int = 0
) -> list[ParityResult]:
    """onnxruntime vs torch per network (on torch's intermediates) and for the chain ("chain").

    Raises:
        ExportError: a max abs diff exceeds ``tolerance``; the message names model, tensor and value.
    """
    sessions = {model: ort_session(path) for model, path in paths.items()}
    results = []
    for batch in batches:
        reference = torch_chain(nets, parity_inputs(nets.grid, batch, seed))
        for model in NETWORK_MODELS:
            model_inputs, model_outputs = MODEL_IO[model]
            got = sessions[model].run(list(model_outputs), {n: reference[n] for n in model_inputs})
            got_by_name = dict(zip(model_outputs, got, strict=True))
            diffs = max_abs_diffs(got_by_name, reference, model_outputs, reference["availability"])
            results.append(ParityResult(model, batch, diffs))
        chain = ort_chain(sessions, {n: reference[n] for n in ("images", "availability")})
        outputs = MODEL_IO[ENSEMBLE_MODEL][1]
        results.append(
            ParityResult("chain", batch, max_abs_diffs(chain, reference, outputs, reference["availability"]))
        )
    for result in results:
        for name, diff in result.checked.items():
            if not diff <= tolerance:  # also catches NaN
                raise ExportError(
                    f"{result.model}: onnxruntime vs torch max abs diff {diff:.3g} on {name} (batch {result.batch}) "
                    f"exceeds {tolerance:g}"
                )
    return results


def export_onnx_models(
    nets: MpmriNetworks, repository: Path, version: str, filename: str, tolerance: float, progress: Progress
) -> tuple[dict[str, Path], list[ParityResult]]:
    """Export, check and parity-test all networks into ``repository/<model>/<version>/<filename>``."""
    paths: dict[str, Path] = {}
    for model in NETWORK_MODELS:
        path = repository / model / version / filename
        progress(f"export {model} -> ONNX")
        try:
            export_network(nets, model, path)
            pin_contract_shapes(path, model, nets.grid)
        except Exception as err:  # noqa: BLE001 - any exporter failure becomes a one-line ExportError
            raise ExportError(
                f"{model}: torch.onnx.export failed: {err.__class__.__name__}: {str(err).splitlines()[0]}"
            ) from err
        progress(f"check {model} (onnx.checker, shape inference, contract)")
        check_onnx_model(path, model, nets.grid)
        paths[model] = path
    progress(f"parity onnxruntime vs torch (tolerance {tolerance:g})")
    parity = check_parity(nets, paths, tolerance)
    for result in parity:
        extra = "".join(
            f", {k} {v:.1e} (not checked)" for k, v in result.max_abs_diff.items() if k.endswith(MISSING_SUFFIX)
        )
        progress(f"  {result.model:<15} batch {result.batch}: max abs diff {result.worst:.2e}{extra}")
    return paths, parity
