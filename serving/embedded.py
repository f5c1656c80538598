"""Run the real ``tritonserver`` (nvidia-pytriton's CPU build) as a child process.

Example::

    with EmbeddedTriton(Path("model_repository"), http_port=8000, grpc_port=8001, metrics_port=8002) as server:
        client = EnsembleClient(server.grpc_url)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from contract.errors import MpmriError
from export.repository import CPU_CONFIG_NAME, MODEL_VERSION, NETWORK_MODELS, ONNX_FILENAME
from serving.triton_env import DEFAULT_BUILD_DIR, PreparedTriton, prepare_environment

LOG = logging.getLogger(__name__)

#: accepted ``log_level`` values -> tritonserver logging flags
LOG_LEVELS: dict[str, tuple[str, ...]] = {
    "error": ("--log-info=false", "--log-warning=false", "--log-error=true"),
    "warning": ("--log-info=false", "--log-warning=true", "--log-error=true"),
    "info": ("--log-info=true", "--log-warning=true", "--log-error=true"),
    "verbose": ("--log-info=true", "--log-warning=true", "--log-error=true", "--log-verbose=1"),
}


#: Python backend shared-memory pool per stub (``shm-default-byte-size``) and its growth step: 16 MiB holds a
#: batch of 8 studies' inputs and outputs, so the pool never grows while serving. The default (1 MiB)
#: grows on the first request whose tensors exceed it (classification's inputs are ~1.05 MB per study);
#: measured ~2% lower ensemble latency at batch 1 (docs/serving.md, A/B table).
PYTHON_SHM_BYTE_SIZE = 16 * 1024 * 1024


class TritonStartError(MpmriError):
    """The server did not become ready (message carries the log tail) or could not be started."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on localhost that are free right now (for tests and ad-hoc servers).

    Every socket stays bound until all are picked: ports picked one at a time can repeat, because the kernel hands
    a port just released out again (Triton then refuses its HTTP and metrics ports being the same one).
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    """A TCP port on localhost that is free right now; pick several at once with :func:`free_ports`."""
    return free_ports(1)[0]


def _accepts_connections(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether something listens on ``host:port`` (a TCP connect succeeds)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))  # every interface: a server on any of them conflicts
        except OSError:
            return True
    return False


class EmbeddedTriton:
    """Context manager around one ``tritonserver`` process.

    Args:
        repository: model repository folder (``mpmri export`` output).
        http_port, grpc_port, metrics_port: ports the server listens on (all interfaces).
        log_level: one of :data:`LOG_LEVELS` (``error``, ``warning``, ``info``, ``verbose``).
        model_config_name: ``--model-config-name`` (``"cpu"`` selects ``configs/cpu.pbtxt``); ``None`` uses
            ``config.pbtxt`` only (GPU production settings).
        startup_timeout_s: how long to wait for readiness before failing with the log tail.
        shutdown_timeout_s: how long to wait after SIGTERM before killing the process group.
        build_dir: where the backend directory is assembled and the server log is written.
        python_shm_byte_size: initial size and growth step of each Python backend stub's shared-memory pool
            (``--backend-config=python,shm-default-byte-size`` / ``shm-growth-byte-size``); ``None`` keeps
            Triton's defaults (1 MiB). Our onnxruntime backend is Python-based, so this sizes its IPC buffers.
        extra_args: further ``tritonserver`` flags, appended last.
        extra_env: environment variables added to the server's (and its backend stubs') environment.
    """

    def __init__(
        self,
        repository: Path,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_level: str = "warning",
        model_config_name: str | None = CPU_CONFIG_NAME,
        startup_timeout_s: float = 180.0,
        shutdown_timeout_s: float = 30.0,
        build_dir: Path = DEFAULT_BUILD_DIR,
        python_shm_byte_size: int | None = PYTHON_SHM_BYTE_SIZE,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        if log_level not in LOG_LEVELS:
            raise TritonStartError(f"log_level must be one of {sorted(LOG_LEVELS)}, got {log_level!r}")
        self.repository = Path(repository).resolve()
        #: interface the HTTP, gRPC and metrics endpoints bind to: loopback by default (tests, demo,
        #: benchmarks); "0.0.0.0" to serve other hosts (a container or a Kubernetes pod)
        self.address = address
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.log_level = log_level
        self.model_config_name = model_config_name
        self.startup_timeout_s = startup_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.build_dir = Path(build_dir)
        self.python_shm_byte_size = python_shm_byte_size
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(extra_env or {})
        self.log_path = self.build_dir / "logs" / f"tritonserver-{http_port}.log"
        self.prepared: PreparedTriton | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        """Host a local client connects to: the bound address, or loopback when bound to every interface."""
        return "127.0.0.1" if self.address in ("0.0.0.0", "::", "") else self.address

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient URL form)."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (tritonclient URL form)."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def command(self) -> list[str]:
        """The ``tritonserver`` command line (after :meth:`start` has prepared the environment)."""
        if self.prepared is None:
            self.prepared = prepare_environment(self.build_dir)
        cmd = [
            str(self.prepared.installation.server_binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.prepared.backend_dir}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--metrics-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={max(1, int(self.shutdown_timeout_s) - 5)}",
            *LOG_LEVELS[self.log_level],
        ]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        if self.python_shm_byte_size:
            cmd += [
                f"--backend-config=python,shm-default-byte-size={self.python_shm_byte_size}",
                f"--backend-config=python,shm-growth-byte-size={self.python_shm_byte_size}",
            ]
        return [*cmd, *self.extra_args]

    def log_tail(self, lines: int = 30) -> str:
        """Last ``lines`` lines of the server log (empty when there is none)."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        if not self.repository.is_dir():
            raise TritonStartError(f"model repository {self.repository} does not exist (run mpmri export)")
        for model in NETWORK_MODELS:
            model_dir = self.repository / model
            if model_dir.is_dir() and not (model_dir / MODEL_VERSION / ONNX_FILENAME).is_file():
                raise TritonStartError(
                    f"{model_dir / MODEL_VERSION / ONNX_FILENAME} is missing: "
                    f"run mpmri export --repository {self.repository}"
                )
        for name, port in (("http", self.http_port), ("grpc", self.grpc_port), ("metrics", self.metrics_port)):
            if _port_in_use(port):
                raise TritonStartError(f"{name} port {port} is already in use")

    def _ready(self) -> bool:
        """Models ready *and* every endpoint listening.

        tritonserver starts its endpoints one after another (HTTP before metrics), so HTTP can answer
        ready while the gRPC or metrics port still refuses connections; a caller of :meth:`start` may
        use any of the three at once (the HPA scrape, the service's gRPC client).
        """
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                if resp.status != 200:
                    return False
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False
        ports = [self.grpc_port]
        if "--allow-metrics=false" not in self.extra_args:
            ports.append(self.metrics_port)
        return all(_accepts_connections(self._client_host, port) for port in ports)

    def start(self) -> EmbeddedTriton:
        """Start the server and block until it reports ready (all models loaded)."""
        if self._process is not None:
            raise TritonStartError("server already started")
        self._check_inputs()
        cmd = self.command()
        assert self.prepared is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        LOG.info("starting tritonserver (log %s): %s", self.log_path, " ".join(cmd))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.prepared.env, **self.extra_env},
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise TritonStartError(
                    f"tritonserver exited with code {code} during startup; "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            if self._ready():
                LOG.info("tritonserver ready: http %s grpc %s", self.http_url, self.grpc_url)
                return self
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise TritonStartError(
            f"tritonserver not ready after {self.startup_timeout_s:.0f} s; log tail ({self.log_path}):\n{tail}"
        )

    def stop(self) -> int | None:
        """SIGTERM, wait up to ``shutdown_timeout_s``, then SIGKILL the process group. Returns the exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.shutdown_timeout_s)
            except subprocess.TimeoutExpired:
                LOG.warning(
                    "tritonserver did not stop after SIGTERM within %.0f s; killing it", self.shutdown_timeout_s
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        # backend stubs share the server's process group; none may outlive it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    def poll(self) -> int | None:
        """Exit code of a server that has died, ``None`` while it runs (or was never started)."""
        if self._process is None:
            return None
        return self._process.poll()

    def restart(self) -> EmbeddedTriton:
        """Reap a dead (or running) server and start a new one on the same ports."""
        self.stop()
        return self.start()

    def wait(self) -> int:
        """Block until the server exits (for ``mpmri triton``); returns its exit code."""
        if self._process is None:
            raise TritonStartError("server not started")
        return self._process.wait()

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
