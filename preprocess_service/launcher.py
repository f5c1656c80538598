"""Start, probe and stop ``mpmri-service`` processes (tests, benchmarks): free ports on 127.0.0.1, a log file
each, settings through ``MPMRI_*`` environment variables as in a container, stopped by PID (SIGTERM, then
SIGKILL of the process group)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.embedded import free_ports

BIN = Path(sys.executable).parent


SERVICE_NAME = "mpmri.v1.AnalysisService"


def health_status(target: str, credentials: grpc.ChannelCredentials | None = None, **kw: str) -> str:
    """``SERVING`` / ``NOT_SERVING`` / ``UNREACHABLE`` of the analysis service at ``target``."""
    options = [("grpc.ssl_target_name_override", kw["server_name"])] if "server_name" in kw else []
    channel = (
        grpc.secure_channel(target, credentials, options=options)
        if credentials
        else grpc.insecure_channel(target, options=options)
    )
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError:
        return "UNREACHABLE"
    finally:
        channel.close()


def wait_for(predicate: object, timeout_s: float, what: str, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s:.0f} s")


@dataclass
class Process:
    """A started subprocess with its log file."""

    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def poll(self) -> int | None:
        assert self.popen is not None
        return self.popen.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM; after ``timeout_s`` SIGKILL the whole process group. Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        return self.popen.returncode


def wait_serving_or_exit(
    process: Process,
    target: str,
    timeout_s: float,
    what: str,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> None:
    """Wait until ``target``'s health says SERVING; stop the process and raise with its log tail when it
    exits or does not get there in ``timeout_s``."""
    kw = {"server_name": server_name} if server_name else {}
    try:
        wait_for(
            lambda: process.poll() is not None or health_status(target, credentials, **kw) == "SERVING",
            timeout_s,
            f"{what} SERVING",
        )
    except TimeoutError:
        process.stop()
        raise TimeoutError(f"{what} did not become SERVING; log:\n{process.log()[-3000:]}") from None
    if process.poll() is not None:
        raise RuntimeError(f"{what} exited with {process.poll()}; log:\n{process.log()[-3000:]}")


@dataclass
class ServiceProcess:
    """``mpmri-service`` against an existing Triton."""

    process: Process
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_service(
    triton_url: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    wait_serving: bool = True,
    timeout_s: float = 60.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
    command: Sequence[str] | None = None,
) -> ServiceProcess:
    """Start ``mpmri-service`` (settings through ``MPMRI_*`` environment variables, as in a container)."""
    port, metrics_port = free_ports(2)
    service = ServiceProcess(
        process=Process(
            list(command or [str(BIN / "mpmri-service")]),
            log_dir / f"service-{port}.log",
            env={
                "MPMRI_PORT": str(port),
                "MPMRI_METRICS_PORT": str(metrics_port),
                "MPMRI_TRITON_URL": triton_url,
                "MPMRI_HEALTH_INTERVAL_S": "0.5",
                **(env or {}),
            },
        ).start(),
        port=port,
        metrics_port=metrics_port,
    )
    if wait_serving:
        wait_serving_or_exit(service.process, service.target, timeout_s, "mpmri-service", credentials, server_name)
    return service


@contextlib.contextmanager
def running_service(triton_url: str, log_dir: Path, **kwargs: object) -> Iterator[ServiceProcess]:
    service = start_service(triton_url, log_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield service
    finally:
        service.process.stop()
