"""Client library of the analysis service (``mpmri.v1.AnalysisService``), sync and asyncio.

Only the generated stubs, grpcio and numpy: no torch, MONAI or Triton.

Example::

    from mpmri_client import AnalysisClient, ChannelOptions

    with AnalysisClient("pacs-gw:50051", ChannelOptions(token="...")) as client:
        response = client.analyze_folder("study/", include_dicom_outputs=True, timeout_s=120)
    print(response.cspca_probability, [list(l.center_lps_mm) for l in response.lesions])
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from mpmri_client.v1 import analysis_pb2 as pb
from mpmri_client.v1 import analysis_pb2_grpc as pb_grpc

#: bytes per streamed message: well under gRPC's default 4 MiB limit; small enough that the service parses
#: headers while the rest of the study still arrives (measured: 1 MiB beat 3 MiB end to end)
DEFAULT_CHUNK_BYTES = 1 << 20
#: status codes worth retrying: the service or its Triton is down or restarting
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclasses.dataclass(frozen=True)
class ChannelOptions:
    """How to reach the service.

    Attributes:
        root_certificates: PEM file of the CA that signed the server certificate (enables TLS).
        certificate_chain: client certificate PEM (mutual TLS, with ``private_key``).
        private_key: client key PEM (mutual TLS).
        server_name: override of the TLS host name to verify (e.g. when connecting by IP).
        token: bearer token sent as ``authorization: Bearer <token>``.
        max_message_bytes: largest response accepted (SEG/SR and maps can be several MiB).
        retries: attempts after the first on UNAVAILABLE (exponential backoff with jitter).
        backoff_s: first backoff; doubles per retry up to ``max_backoff_s`` (with +-50 % jitter).
        max_backoff_s: longest pause between two attempts.
    """

    root_certificates: Path | None = None
    certificate_chain: Path | None = None
    private_key: Path | None = None
    server_name: str | None = None
    token: str | None = None
    max_message_bytes: int = 64 << 20
    retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 5.0

    def grpc_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.root_certificates is None and self.certificate_chain is None:
            return None
        root = Path(self.root_certificates).read_bytes() if self.root_certificates else None
        chain = Path(self.certificate_chain).read_bytes() if self.certificate_chain else None
        key = Path(self.private_key).read_bytes() if self.private_key else None
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


def read_instances(folder: Path | str) -> list[bytes]:
    """Every file under ``folder`` (recursively, sorted by path) as bytes; the service skips non-DICOM files.

    Raises:
        FileNotFoundError: ``folder`` does not exist or holds no file.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    if not paths:
        raise FileNotFoundError(f"{root}: holds no file")
    return [p.read_bytes() for p in paths]


def request_stream(
    instances: Iterable[bytes],
    request_id: str = "",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    **options: Any,
) -> Iterator[pb.AnalyzeRequest]:
    """The ``Analyze`` request stream: the header, then the instances packed into messages of about
    ``chunk_bytes`` (small instances share a message, a large one is split).

    ``options`` are :class:`AnalyzeOptions` fields (``include_fused_map``, ``include_dicom_outputs``, ...).
    """
    message = pb.AnalyzeRequest(header=pb.AnalyzeHeader(request_id=request_id, options=pb.AnalyzeOptions(**options)))
    size = 0
    for data in instances:
        start = 0
        while True:
            take = min(len(data) - start, chunk_bytes - size)
            if take <= 0 and start < len(data):  # the message is full: send it, start the next
                yield message
                message, size = pb.AnalyzeRequest(), 0
                continue
            end = start + take
            piece = data if (start == 0 and end == len(data)) else data[start:end]
            message.chunks.add(data=piece, end_of_instance=end == len(data))
            size += max(take, 1)
            start = end
            if start >= len(data):
                break
    yield message


def reference_request(
    dicomweb_url: str, study_instance_uid: str, request_id: str = "", store_results: bool = False, **options: Any
) -> pb.AnalyzeReferenceRequest:
    """The ``AnalyzeReference`` request; ``options`` are :class:`AnalyzeOptions` fields."""
    return pb.AnalyzeReferenceRequest(
        request_id=request_id,
        dicomweb_url=dicomweb_url,
        study_instance_uid=study_instance_uid,
        store_results=store_results,
        options=pb.AnalyzeOptions(**options),
    )


def _backoff(options: ChannelOptions, attempt: int) -> float:
    return float(min(options.backoff_s * (2**attempt), options.max_backoff_s) * (0.5 + random.random()))


class AnalysisClient:
    """Blocking client. Retries UNAVAILABLE with backoff (the whole study is re-sent: nothing is lost)."""

    def __init__(self, target: str, options: ChannelOptions | None = None) -> None:
        self.target = target
        self.options = options or ChannelOptions()
        creds = self.options.credentials()
        grpc_options = self.options.grpc_options()
        self._channel = (
            grpc.secure_channel(target, creds, options=grpc_options)
            if creds is not None
            else grpc.insecure_channel(target, options=grpc_options)
        )
        self._stub = pb_grpc.AnalysisServiceStub(self._channel)

    def _call(self, fn: Any, make_request: Any, timeout_s: float | None) -> pb.AnalyzeResponse:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        attempt = 0
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                response: pb.AnalyzeResponse = fn(make_request(), timeout=remaining, metadata=self.options.metadata())
                return response
            except grpc.RpcError as err:
                code = err.code()  # type: ignore[attr-defined]
                if code not in RETRYABLE or attempt >= self.options.retries:
                    raise
                pause = _backoff(self.options, attempt)
                if deadline is not None and time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)
                attempt += 1

    def analyze(
        self,
        instances: Sequence[bytes],
        request_id: str = "",
        timeout_s: float | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        **options: Any,
    ) -> pb.AnalyzeResponse:
        """Analyze one study given as DICOM file bytes. Raises :class:`grpc.RpcError` on failure."""
        return self._call(
            self._stub.Analyze, lambda: request_stream(instances, request_id, chunk_bytes, **options), timeout_s
        )

    def analyze_folder(self, folder: Path | str, **kwargs: Any) -> pb.AnalyzeResponse:
        """:meth:`analyze` on every file under ``folder``."""
        return self.analyze(read_instances(folder), **kwargs)

    def analyze_reference(
        self,
        dicomweb_url: str,
        study_instance_uid: str,
        request_id: str = "",
        store_results: bool = False,
        timeout_s: float | None = None,
        **options: Any,
    ) -> pb.AnalyzeResponse:
        """Let the service pull the study over DICOMweb (and store SEG/SR back when ``store_results``)."""
        request = reference_request(dicomweb_url, study_instance_uid, request_id, store_results, **options)
        return self._call(self._stub.AnalyzeReference, lambda: request, timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AnalysisClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncAnalysisClient:
    """asyncio client (``grpc.aio``); same retry policy as :class:`AnalysisClient`."""

    def __init__(self, target: str, options: ChannelOptions | None = None) -> None:
        self.target = target
        self.options = options or ChannelOptions()
        creds = self.options.credentials()
        grpc_options = self.options.grpc_options()
        self._channel = (
            grpc.aio.secure_channel(target, creds, options=grpc_options)
            if creds is not None
            else grpc.aio.insecure_channel(target, options=grpc_options)
        )
        self._stub = pb_grpc.AnalysisServiceStub(self._channel)

    async def _call(self, fn: Any, make_request: Any, timeout_s: float | None) -> pb.AnalyzeResponse:
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        attempt = 0
        while True:
            remaining = None if deadline is None else max(deadline - loop.time(), 0.001)
            try:
                response: pb.AnalyzeResponse = await fn(
                    make_request(), timeout=remaining, metadata=self.options.metadata()
                )
                return response
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRYABLE or attempt >= self.options.retries:
                    raise
                pause = _backoff(self.options, attempt)
                if deadline is not None and loop.time() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)
                attempt += 1

    async def analyze(
        self,
        instances: Sequence[bytes],
        request_id: str = "",
        timeout_s: float | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        **options: Any,
    ) -> pb.AnalyzeResponse:
        async def stream() -> AsyncIterator[pb.AnalyzeRequest]:
            for message in request_stream(instances, request_id, chunk_bytes, **options):
                yield message

        return await self._call(self._stub.Analyze, stream, timeout_s)

    async def analyze_folder(self, folder: Path | str, **kwargs: Any) -> pb.AnalyzeResponse:
        return await self.analyze(read_instances(folder), **kwargs)

    async def analyze_reference(
        self,
        dicomweb_url: str,
        study_instance_uid: str,
        request_id: str = "",
        store_results: bool = False,
        timeout_s: float | None = None,
        **options: Any,
    ) -> pb.AnalyzeResponse:
        request = reference_request(dicomweb_url, study_instance_uid, request_id, store_results, **options)
        return await self._call(self._stub.AnalyzeReference, lambda: request, timeout_s)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncAnalysisClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def env_options(**overrides: Any) -> ChannelOptions:
    """:class:`ChannelOptions` from ``MPMRI_CLIENT_*`` environment variables, then ``overrides``."""
    env = os.environ
    values: dict[str, Any] = {
        "root_certificates": env.get("MPMRI_CLIENT_CA"),
        "certificate_chain": env.get("MPMRI_CLIENT_CERT"),
        "private_key": env.get("MPMRI_CLIENT_KEY"),
        "token": env.get("MPMRI_CLIENT_TOKEN"),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("root_certificates", "certificate_chain", "private_key"):
        if values.get(key):
            values[key] = Path(values[key])
    return ChannelOptions(**{k: v for k, v in values.items() if v is not None})
