"""``mpmri export``: checkpoint -> ONNX (+ TensorRT plans on GPUs) -> Triton model repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from export.repository import DEFAULT_REPOSITORY


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from networks.checkpoint import DEFAULT_CHECKPOINT

    parser = subparsers.add_parser("export", help="checkpoint -> ONNX/TensorRT -> Triton model repository")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint file (.pt)")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository folder")
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT FP16/FP32 plans (needs a GPU)")
    parser.add_argument("--tolerance", type=float, default=None, help="onnxruntime vs torch max abs diff (1e-4)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from export.pipeline import PARITY_TOLERANCE, export_repository

    def progress(message: str) -> None:
        print(f"[export] {message}", flush=True)

    export_repository(
        args.checkpoint,
        args.repository,
        tensorrt=args.tensorrt,
        tolerance=PARITY_TOLERANCE if args.tolerance is None else args.tolerance,
        progress=progress,
    )
    return 0
