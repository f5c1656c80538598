"""Start and stop the real service processes for tests (``mpmri serve``, ``mpmri-service``) on 127.0.0.1.

Every process runs on free ports, logs to a file, and is stopped by PID even when a test fails.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from preprocess_service.launcher import (
    BIN,
    SERVICE_NAME,
    Process,
    ServiceProcess,
    free_ports,
    health_status,
    running_service,
    start_service,
    wait_for,
    wait_serving_or_exit,
)

__all__ = [
    "BIN",
    "SERVICE_NAME",
    "Process",
    "ServeStack",
    "ServiceProcess",
    "health_status",
    "running_service",
    "start_serve",
    "start_service",
    "wait_for",
]


@dataclass
class ServeStack:
    """``mpmri serve``: embedded Triton + the service."""

    process: Process
    port: int
    metrics_port: int
    triton_http_port: int
    triton_grpc_port: int
    triton_metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def triton_url(self) -> str:
        return f"127.0.0.1:{self.triton_grpc_port}"

    def triton_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-f", f"tritonserver.*--grpc-port={self.triton_grpc_port}"], capture_output=True, text=True
        )
        return [int(p) for p in out.stdout.split()]


def start_serve(repository: Path, log_dir: Path, extra: Sequence[str] = (), timeout_s: float = 240.0) -> ServeStack:
    ports = free_ports(5)
    stack = ServeStack(
        process=Process(
            [
                str(BIN / "mpmri"),
                "serve",
                "--repository",
                str(repository),
                "--port",
                str(ports[0]),
                "--metrics-port",
                str(ports[1]),
                "--triton-http-port",
                str(ports[2]),
                "--triton-grpc-port",
                str(ports[3]),
                "--triton-metrics-port",
                str(ports[4]),
                "--restart-delay-s",
                "0.5",
                *extra,
            ],
            log_dir / f"serve-{ports[0]}.log",
        ).start(),
        port=ports[0],
        metrics_port=ports[1],
        triton_http_port=ports[2],
        triton_grpc_port=ports[3],
        triton_metrics_port=ports[4],
    )
    wait_serving_or_exit(stack.process, stack.target, timeout_s, "mpmri serve")
    return stack
