"""Localization, map fusion and classification networks (torch, MONAI building blocks).

Public API: :func:`build_networks`, :class:`MpmriNetworks`, :data:`PROFILES`,
:func:`save_checkpoint` / :func:`load_checkpoint` / :data:`DEFAULT_CHECKPOINT`,
:func:`extract_candidates` / :class:`LesionCandidate`, :data:`ONNX_OPSET` / :func:`export_kwargs`.
"""

from networks.checkpoint import (
    DEFAULT_CHECKPOINT,
    CheckpointContractError,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from networks.models import (
    ONNX_OPSET,
    PROFILES,
    Classification,
    Localization,
    MapFusion,
    MpmriNetworks,
    NetworkProfile,
    build_networks,
    example_inputs,
    export_kwargs,
)
from postprocessing.candidates import LesionCandidate, extract_candidates

__all__ = [
    "DEFAULT_CHECKPOINT",
    "ONNX_OPSET",
    "PROFILES",
    "CheckpointContractError",
    "CheckpointError",
    "Classification",
    "LesionCandidate",
    "Localization",
    "MapFusion",
    "MpmriNetworks",
    "NetworkProfile",
    "build_networks",
    "example_inputs",
    "export_kwargs",
    "extract_candidates",
    "load_checkpoint",
    "save_checkpoint",
]
