"""Start-up and shutdown of the analysis service (``mpmri-service``).

``build_server(settings)`` returns a started :class:`AnalysisServer` (testable, in the style of grpc's
examples); ``main()`` runs one until SIGTERM/SIGINT. Health: ``grpc.health.v1`` reports SERVING for ``""``
and ``mpmri.v1.AnalysisService`` only while Triton and the ensemble are ready and its contract is one this
service can honour. Reflection lists the services.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mpmri_client.v1 import analysis_pb2 as pb
from mpmri_client.v1 import analysis_pb2_grpc as pb_grpc
from preprocess_service import logs
from preprocess_service.analysis import Analyzer, warm_up_dicom_outputs
from preprocess_service.metrics import ServiceMetrics
from preprocess_service.security import BearerTokenInterceptor, server_credentials
from preprocess_service.servicer import AnalysisServicer
from preprocess_service.settings import ServiceSettings, SettingsError, parse_settings
from preprocess_service.triton import ServedModelError, TritonEnsemble, TritonUnavailableError
from preprocessing.kernel_check import KernelCheckError

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["AnalysisService"].full_name


class AnalysisServer:
    """The gRPC server, its Triton connection, worker pool, health watcher and metrics endpoint."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.ensemble = TritonEnsemble(
            settings.triton_url,
            settings.model_name,
            shared_memory=settings.triton_shared_memory,
            timeout_s=settings.triton_timeout_s,
            retries=settings.triton_retries,
            max_concurrent=settings.max_concurrent,
        )
        self.executor = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="mpmri-work")
        self.health = health.aio.HealthServicer()
        self.ready = False
        self.port = 0
        self.metrics_port = -1
        self.model_error: str | None = None
        self._watcher: asyncio.Task[None] | None = None
        interceptors = []
        token = settings.auth_token()
        if token:
            interceptors.append(BearerTokenInterceptor(token))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ],
        )
        self.servicer = AnalysisServicer(
            settings, Analyzer(settings, self.ensemble, self.executor), self.metrics, lambda: self.ready
        )
        pb_grpc.add_AnalysisServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )

    async def _set_health(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.metrics.triton_ready.set(1 if ready else 0)

    async def check_triton(self) -> bool:
        """One readiness check: Triton up, ensemble ready, its contract loaded and honoured."""
        was_ready = self.ready
        ready = await self.ensemble.is_ready()
        if ready and (not was_ready or self.ensemble.model is None):
            try:
                model = await self.ensemble.refresh_model()
                self.ensemble.invalidate_registrations()
                self.model_error = None
                log.info(
                    "serving model",
                    extra={
                        "fields": {
                            "model": model.name,
                            "version": model.version,
                            "grid": model.contract.grid.to_dict(),
                        }
                    },
                )
            except ServedModelError as err:
                self.model_error = str(err)
                ready = False
            except TritonUnavailableError:
                ready = False
        if ready != was_ready:
            log.warning("health %s", "SERVING" if ready else f"NOT_SERVING ({self.model_error or 'Triton not ready'})")
        self.ready = ready
        await self._set_health(ready)
        return ready

    async def _watch(self) -> None:
        while True:
            try:
                await self.check_triton()
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("health check failed")
            await asyncio.sleep(self.settings.health_interval_s)

    async def start(self) -> AnalysisServer:
        """Bind, start, and run the first Triton check.

        Raises:
            ServedModelError: Triton is up but serves a model whose contract this service cannot honour
                (the service refuses to start).
        """
        await self._set_health(False)
        await self.check_triton()
        if self.model_error:
            self.executor.shutdown(wait=False)
            raise ServedModelError(f"refusing to start: {self.model_error}")
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(self.settings.address)
        else:
            self.port = self.server.add_secure_port(self.settings.address, credentials)
        if self.port == 0:
            raise SettingsError(f"cannot listen on {self.settings.address}")
        if self.settings.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.settings.host, self.settings.metrics_port)
        # highdicom's first SEG costs about a second: pay it before the first router call, not during it
        warm_up_s = await asyncio.get_running_loop().run_in_executor(self.executor, warm_up_dicom_outputs)
        await self.server.start()
        self._watcher = asyncio.create_task(self._watch())
        log.info(
            "listening",
            extra={
                "fields": {
                    "address": f"{self.settings.host}:{self.port}",
                    "tls": credentials is not None,
                    "mtls": self.settings.tls_client_ca is not None,
                    "metrics_port": self.metrics_port,
                    "triton": self.settings.triton_url,
                    "shared_memory": self.settings.triton_shared_memory,
                    "warm_up_s": round(warm_up_s, 3),
                }
            },
        )
        return self

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: health NOT_SERVING first, in-flight calls get ``grace_s`` to finish."""
        await self.health.enter_graceful_shutdown()
        if self._watcher is not None:
            self._watcher.cancel()
        await self.server.stop(self.settings.grace_s if grace_s is None else grace_s)
        await self.ensemble.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def build_server(settings: ServiceSettings) -> AnalysisServer:
    """A started :class:`AnalysisServer` (``server.port`` is the bound port)."""
    return await AnalysisServer(settings).start()


async def serve(settings: ServiceSettings, stop_event: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop_event``), then shut down gracefully."""
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await build_server(settings)
    print(f"mpmri service listening on {settings.host}:{server.port} (metrics {server.metrics_port})", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``mpmri-service``: one error line and exit code 2 on bad settings or an incompatible model."""
    try:
        settings = parse_settings(argv)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (SettingsError, ServedModelError, KernelCheckError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


class BackgroundServer:
    """An :class:`AnalysisServer` on its own event loop in a thread (the demo, benchmarks, notebooks).

    Example::

        with BackgroundServer(ServiceSettings(port=0, metrics_port=-1, triton_url=url)) as server:
            target = f"127.0.0.1:{server.port}"
    """

    def __init__(self, settings: ServiceSettings, startup_timeout_s: float = 60.0) -> None:
        import threading

        self.settings = settings
        self.startup_timeout_s = startup_timeout_s
        self.loop = asyncio.new_event_loop()
        self.server: AnalysisServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="mpmri-service", daemon=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(build_server(self.settings), self.loop)
        self.server = future.result(timeout=self.startup_timeout_s)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace_s=5.0), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
