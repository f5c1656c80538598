"""``mpmri serve``: the embedded default — the CPU Triton server and the analysis service in one command.

Triton is supervised: when it dies it is restarted on the same ports (meanwhile health says NOT_SERVING
and calls get UNAVAILABLE). SIGTERM/SIGINT stop the service gracefully, then Triton.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from preprocess_service import logs
from preprocess_service.settings import add_arguments, settings_from

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="embedded Triton + the analysis service (gRPC 50051, metrics 8090, Triton 8000/8001/8002)",
        description="Run the embedded CPU Triton server and the gRPC analysis service together.",
    )
    p.add_argument("--repository", type=Path, default=Path("out/serve/model_repository"), help="model repository")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="export this checkpoint unless the repository is current for it (default: serve the repository as "
        "it is, or export the shipped checkpoint when it holds no exported model)",
    )
    p.add_argument("--triton-http-port", type=int, default=8000)
    p.add_argument("--triton-grpc-port", type=int, default=8001)
    p.add_argument("--triton-metrics-port", type=int, default=8002)
    p.add_argument("--triton-address", default="127.0.0.1", help="interface Triton binds (0.0.0.0: other hosts)")
    p.add_argument("--restart-delay-s", type=float, default=1.0, help="pause before restarting a dead Triton")
    add_arguments(p)
    p.set_defaults(func=run)


def ensure_repository(repository: Path, checkpoint: Path | None) -> None:
    """Make ``repository`` servable.

    With ``checkpoint``: export it unless the repository is current for it. Without: serve an exported
    repository (one with a manifest) as it is, else export the shipped checkpoint into it.
    """
    from export.pipeline import export_repository, repository_is_current
    from export.repository import MANIFEST_FILENAME
    from networks.checkpoint import DEFAULT_CHECKPOINT

    if checkpoint is None and (repository / MANIFEST_FILENAME).is_file():
        return
    ckpt = checkpoint or DEFAULT_CHECKPOINT
    if not repository_is_current(ckpt, repository):
        export_repository(ckpt, repository)


class TritonSupervisor:
    """Restarts the embedded Triton when its process dies (polled once per second)."""

    def __init__(self, triton: Any, restart_delay_s: float) -> None:
        self.triton = triton
        self.restart_delay_s = restart_delay_s
        self.restarts = 0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(1.0):
            code = self.triton.poll()
            if code is None:
                continue
            log.error("tritonserver exited with code %s; restarting", code)
            if self._stop.wait(self.restart_delay_s):
                return
            try:
                self.triton.restart()
                self.restarts += 1
                log.warning("tritonserver restarted (%d restarts so far)", self.restarts)
            except Exception:  # noqa: BLE001 - keep trying: the service answers UNAVAILABLE meanwhile
                log.exception("tritonserver restart failed")

    def stop(self) -> None:
        self._stop.set()


def run(args: argparse.Namespace) -> int:
    from preprocess_service.server import serve
    from serving.embedded import EmbeddedTriton

    settings = settings_from(args, triton_url=f"127.0.0.1:{args.triton_grpc_port}")
    logs.configure(settings.log_format)
    ensure_repository(args.repository, args.checkpoint)
    triton = EmbeddedTriton(
        args.repository,
        http_port=args.triton_http_port,
        grpc_port=args.triton_grpc_port,
        metrics_port=args.triton_metrics_port,
        address=args.triton_address,
    )
    stop = asyncio.Event()
    triton.start()
    supervisor = TritonSupervisor(triton, args.restart_delay_s)
    thread = threading.Thread(target=supervisor.run, name="triton-supervisor", daemon=True)
    thread.start()
    print(f"embedded Triton ready (grpc {triton.grpc_url}, pid {triton.pid})", flush=True)
    try:
        asyncio.run(serve(settings, stop))
    finally:
        supervisor.stop()
        thread.join(timeout=5)
        # SIGINT/SIGTERM already reached the service; Triton is stopped last so in-flight calls finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        triton.stop()
        print("stopped", flush=True)
    return 0
