"""The thin ``mpmri.v1.AnalysisService`` servicer: validate the stream, admit, analyze, answer.

Admission: a study first needs room in the queue (``max_queue`` waiting, else RESOURCE_EXHAUSTED), then one
of ``max_concurrent`` processing slots. While Triton is not ready every call gets UNAVAILABLE at once (a
router retries; nothing is half-done). The client's deadline bounds the whole call: when it passes, the
call's task is cancelled and its slot freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import numpy as np

from contract import PIRADS_CATEGORIES, SEQUENCES, GridGeometry
from mpmri_client.v1 import analysis_pb2 as pb
from mpmri_client.v1 import analysis_pb2_grpc as pb_grpc
from preprocess_service import dicomweb
from preprocess_service.analysis import AnalysisOptions, AnalysisResult, Analyzer
from preprocess_service.logs import request_id_var
from preprocess_service.metrics import ServiceMetrics
from preprocess_service.settings import ServiceSettings
from preprocess_service.status import RequestError, status_for
from preprocessing.dicom_io import SourceReader

log = logging.getLogger(__name__)


def _options(message: pb.AnalyzeOptions) -> AnalysisOptions:
    return AnalysisOptions(
        include_fused_map=message.include_fused_map,
        include_t2w_preview=message.include_t2w_preview,
        include_dicom_outputs=message.include_dicom_outputs,
        study_instance_uid=message.study_instance_uid,
        include_cspca_map=message.include_cspca_map,
    )


def grid_volume(array: np.ndarray, geometry: GridGeometry) -> pb.GridVolume:
    """``[D, H, W]`` array on the model grid -> ``GridVolume`` (float16, little endian)."""
    return pb.GridVolume(
        origin_lps_mm=list(geometry.origin_lps_mm),
        direction=list(geometry.direction),
        spacing_mm_ijk=list(geometry.spacing_mm_ijk),
        size_ijk=list(geometry.size_ijk),
        float16_dhw=np.ascontiguousarray(array, dtype="<f2").tobytes(),
    )


def build_response(request_id: str, result: AnalysisResult, options: AnalysisOptions) -> pb.AnalyzeResponse:
    findings = result.findings
    response = pb.AnalyzeResponse(
        request_id=request_id,
        study_instance_uid=result.study_instance_uid,
        cspca_probability=findings.cspca_probability,
        pirads_score=findings.pirads_score,
        pirads_distribution=findings.pirads_distribution,
        warnings=result.warnings,
        model_name=result.model.name,
        model_version=result.model.version,
        num_instances=result.num_instances,
    )
    for seq in SEQUENCES:
        info = (result.meta.get("series") or {}).get(seq)
        response.availability[seq] = bool(info)
        if info:
            response.series.add(
                sequence=seq,
                series_instance_uid=str(info.get("series_uid") or ""),
                series_description=str(info.get("description") or ""),
                reason=str(info.get("reason") or ""),
                b_value_s_per_mm2=float(info.get("b_value") or 0.0),
            )
    for lesion in findings.lesions:
        response.lesions.add(
            id=lesion.id,
            center_lps_mm=list(lesion.center_lps_mm),
            volume_ml=lesion.volume_ml,
            likelihood=lesion.likelihood,
            pirads=lesion.pirads,
            score=lesion.score,
        )
    if options.include_fused_map:
        response.fused_map.CopyFrom(grid_volume(findings.fused_map, findings.geometry))
    if options.include_cspca_map:
        response.cspca_map.CopyFrom(grid_volume(findings.cspca_map, findings.geometry))
    if options.include_t2w_preview and result.t2w_channel is not None:
        response.t2w_preview.CopyFrom(grid_volume(result.t2w_channel, findings.geometry))
    for name, dataset in (("seg", result.seg), ("sr", result.sr)):
        if dataset is not None:
            getattr(response, name).CopyFrom(
                pb.DicomObject(
                    sop_class_uid=str(dataset.SOPClassUID),
                    sop_instance_uid=str(dataset.SOPInstanceUID),
                    series_instance_uid=str(dataset.SeriesInstanceUID),
                    data=result.encoded[name],
                )
            )
    assert len(findings.pirads_distribution) == len(PIRADS_CATEGORIES)
    return response


class AnalysisServicer(pb_grpc.AnalysisServiceServicer):
    """gRPC entry points; the work is in :class:`Analyzer`."""

    def __init__(
        self,
        settings: ServiceSettings,
        analyzer: Analyzer,
        metrics: ServiceMetrics,
        is_ready: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.analyzer = analyzer
        self.metrics = metrics
        self.is_ready = is_ready
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._waiting = 0

    # -- shared path -------------------------------------------------------------------------------
    async def _handle(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        request_id: str,
        work: Callable[[dict[str, float]], Awaitable[tuple[AnalysisResult, AnalysisOptions, bool]]],
    ) -> pb.AnalyzeResponse:
        request_id = request_id or uuid.uuid4().hex[:16]
        request_id_var.set(request_id)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        self.metrics.in_flight.inc()
        try:
            if not self.is_ready():
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "Triton or the ensemble is not ready; retry later")
            if self._waiting >= self.settings.max_queue + self.settings.max_concurrent:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"queue full ({self.settings.max_queue} waiting, {self.settings.max_concurrent} in progress); "
                    "retry later",
                )
            timings: dict[str, float] = {}
            self._waiting += 1
            try:
                result, options, stored = await work(timings)
            finally:
                self._waiting -= 1
            t = time.perf_counter()
            response = build_response(request_id, result, options)
            response.results_stored = stored
            response.timings_s.update({k: round(v, 6) for k, v in result.timings_s.items()})
            result.timings_s["encode"] = result.timings_s.get("encode", 0.0) + time.perf_counter() - t
            response.timings_s["encode"] = round(result.timings_s["encode"], 6)
            self.metrics.observe_timings(result.timings_s)
            return response
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            if context.time_remaining() is not None and (context.time_remaining() or 0.0) <= 0:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            log.info("call cancelled", extra={"fields": {"method": method, "code": code.name}})
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes a status; the service keeps serving
            mapped = status_for(err)
            if mapped is None:
                code = grpc.StatusCode.INTERNAL
                log.exception("unexpected failure", extra={"fields": {"method": method}})
                message = f"internal error ({type(err).__name__}); request id {request_id}"
            else:
                code = mapped
                message = str(err)
                log.warning("request failed", extra={"fields": {"method": method, "code": code.name, "error": message}})
            await context.abort(code, message)
            raise AssertionError("abort returns by raising") from None
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(method=method, code=code.name).inc()
            log.info(
                "call finished",
                extra={
                    "fields": {
                        "method": method,
                        "code": code.name,
                        "duration_s": round(time.perf_counter() - started, 4),
                    }
                },
            )

    async def _with_slot(self, coro_fn: Callable[[], Awaitable[Any]]) -> Any:
        """Wait for one of ``max_concurrent`` slots (counted in ``mpmri_queue_depth`` meanwhile), then run."""
        self.metrics.queue_depth.inc()
        try:
            await self._slots.acquire()
        finally:
            self.metrics.queue_depth.dec()
        try:
            return await coro_fn()
        finally:
            self._slots.release()

    # -- Analyze -----------------------------------------------------------------------------------
    async def _receive(
        self,
        request_iterator: AsyncIterator[pb.AnalyzeRequest],
        on_instances: Callable[[list[bytes]], None],
    ) -> tuple[pb.AnalyzeHeader, int]:
        """Read the stream; hand each message's completed instances to ``on_instances`` as they arrive.

        Returns the header and the number of instances.
        """
        header: pb.AnalyzeHeader | None = None
        count = 0
        current: list[bytes] = []
        total = 0
        async for message in request_iterator:
            if header is None:
                if not message.HasField("header"):
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT, "the first message of Analyze must carry the header"
                    )
                header = message.header
            elif message.HasField("header"):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "a second header arrived; one study per call")
            completed: list[bytes] = []
            for chunk in message.chunks:
                total += len(chunk.data)
                if total > self.settings.max_study_bytes:
                    raise RequestError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"study larger than max_study_bytes={self.settings.max_study_bytes}",
                    )
                current.append(chunk.data)
                if chunk.end_of_instance:
                    completed.append(current[0] if len(current) == 1 else b"".join(current))
                    current = []
            count += len(completed)
            if count > self.settings.max_instances:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than max_instances={self.settings.max_instances} instances in one study",
                )
            if completed:
                on_instances(completed)
        if header is None:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "empty request stream: no header, no instances")
        if current:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the stream ended inside instance {count + 1} (its last chunk lacks end_of_instance)",
            )
        if not count:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "no DICOM instances in the request")
        self.metrics.study_bytes.observe(total)
        return header, count

    async def Analyze(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.AnalyzeRequest], context: grpc.aio.ServicerContext
    ) -> pb.AnalyzeResponse:
        header_holder: dict[str, pb.AnalyzeHeader] = {}

        async def work(timings: dict[str, float]) -> tuple[AnalysisResult, AnalysisOptions, bool]:
            # headers are parsed in the worker pool while the rest of the study still arrives
            reader = SourceReader(self.settings.max_instances)
            parse_s = [0.0]
            chain: asyncio.Future[None] | None = None

            def parse(batch: list[bytes], first: int) -> None:
                t0 = time.perf_counter()
                for i, data in enumerate(batch, start=first):
                    reader.add(data, f"bytes[{i}]")
                parse_s[0] += time.perf_counter() - t0

            async def parse_after(previous: asyncio.Future[None] | None, batch: list[bytes], first: int) -> None:
                if previous is not None:
                    await previous
                await self.analyzer.run_in_pool(parse, batch, first)

            received = [0]

            def on_instances(batch: list[bytes]) -> None:
                nonlocal chain
                chain = asyncio.ensure_future(parse_after(chain, batch, received[0]))
                received[0] += len(batch)

            t = time.perf_counter()
            try:
                header, count = await self._receive(request_iterator, on_instances)
            except BaseException:
                if chain is not None:
                    chain.cancel()
                raise
            header_holder["h"] = header
            if header.request_id:
                request_id_var.set(header.request_id)
            timings["receive"] = time.perf_counter() - t
            if chain is not None:
                await chain
            ingested = reader.finish()
            options = _options(header.options)
            result = await self._with_slot(
                lambda: self.analyzer.analyze_ingested(ingested, parse_s[0], count, options, timings)
            )
            return result, options, False

        # the request id is in the header, which is read inside work(); the log context is set there
        response = await self._handle("Analyze", context, "", work)
        header = header_holder.get("h")
        if header is not None and header.request_id:
            response.request_id = header.request_id
        return response

    # -- AnalyzeReference --------------------------------------------------------------------------
    async def AnalyzeReference(  # noqa: N802 - gRPC method name
        self, request: pb.AnalyzeReferenceRequest, context: grpc.aio.ServicerContext
    ) -> pb.AnalyzeResponse:
        async def work(timings: dict[str, float]) -> tuple[AnalysisResult, AnalysisOptions, bool]:
            if not request.dicomweb_url or not request.study_instance_uid:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, "AnalyzeReference needs dicomweb_url and study_instance_uid"
                )
            options = _options(request.options)
            if request.store_results and not options.include_dicom_outputs:
                options = dataclasses.replace(options, include_dicom_outputs=True)
            loop = asyncio.get_running_loop()
            t = time.perf_counter()
            datasets = await loop.run_in_executor(
                self.analyzer.executor,
                dicomweb.retrieve_study,
                request.dicomweb_url,
                request.study_instance_uid,
                self.settings.dicomweb_timeout_s,
                self.settings.max_instances,
            )
            timings["receive"] = time.perf_counter() - t
            result = await self._with_slot(lambda: self.analyzer.analyze(datasets, options, timings))
            stored = False
            if request.store_results:
                to_store = [ds for ds in (result.seg, result.sr) if ds is not None]
                await loop.run_in_executor(
                    self.analyzer.executor,
                    dicomweb.store_instances,
                    request.dicomweb_url,
                    to_store,
                    self.settings.dicomweb_timeout_s,
                )
                stored = True
            return result, options, stored

        return await self._handle("AnalyzeReference", context, request.request_id, work)
