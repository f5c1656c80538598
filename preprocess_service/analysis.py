"""One study through the stages: parse → select → assemble → resample → normalize (preprocessing, in a worker
thread) → infer (Triton, awaited) → candidates → encode (findings, optional SEG/SR and maps).

The event loop never runs CPU work: preprocessing, candidates and DICOM encoding go to a thread pool, so
while one study is in Triton the next one is being preprocessed (the pipeline's throughput approaches the
slower stage's).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom

from contract import SEQUENCES, sequence_index
from postprocessing.dicom_outputs import DicomOutputs, build_dicom_outputs
from postprocessing.report import Findings, build_findings
from preprocess_service.settings import ServiceSettings
from preprocess_service.triton import ServedModel, TritonEnsemble
from preprocessing import PreprocessSettings
from preprocessing.dicom_io import Ingested, read_source
from preprocessing.pipeline import PreprocessedStudy, preprocess_ingested, uid_hash

log = logging.getLogger(__name__)

#: preprocessing's own timing keys -> the service's stage names
_PREPROCESS_STAGES: dict[str, str] = {
    "read": "parse",
    "select": "select",
    "assemble": "assemble",
    "decode": "assemble",
    "resample": "resample",
    "normalize": "normalize",
}


@dataclass(frozen=True)
class AnalysisOptions:
    include_fused_map: bool = False
    include_t2w_preview: bool = False
    include_dicom_outputs: bool = False
    include_cspca_map: bool = False
    study_instance_uid: str = ""


@dataclass
class AnalysisResult:
    """Everything the response carries (the servicer turns it into protobuf)."""

    study_instance_uid: str
    meta: dict[str, Any]
    findings: Findings
    model: ServedModel
    warnings: list[str]
    timings_s: dict[str, float]
    num_instances: int
    t2w_channel: np.ndarray | None = None
    seg: pydicom.Dataset | None = None
    sr: pydicom.Dataset | None = None
    encoded: dict[str, bytes] = field(default_factory=dict)


def _source_datasets(datasets: Sequence[pydicom.Dataset], series_uid: str) -> list[pydicom.Dataset]:
    """The instances of ``series_uid`` (one per SOP instance, resent copies dropped), for SEG/SR references."""
    seen: set[str] = set()
    out: list[pydicom.Dataset] = []
    for ds in datasets:
        if str(ds.get("SeriesInstanceUID", "")) != series_uid:
            continue
        sop = str(ds.get("SOPInstanceUID", ""))
        if sop in seen:
            continue
        seen.add(sop)
        out.append(ds)
    return out


def warm_up_dicom_outputs() -> float:
    """Load the compiled preprocessing kernels (numba: compiled on a machine's first start, then read from
    its cache, ``NUMBA_CACHE_DIR``) and build a SEG and SR once for a tiny synthetic series (highdicom's
    first call costs about a second).

    Returns the seconds it took. Run at start-up in the worker pool, so no router waits for it.

    Raises:
        KernelCheckError: a compiled kernel disagrees with its Python definition on this CPU
            (:func:`preprocessing.kernel_check.check_kernels`): the service would compute wrong tensors.
    """
    from contract import GridGeometry
    from preprocessing import element_scan, linear_resample, normalize
    from preprocessing.kernel_check import check_kernels
    from preprocessing.testing import make_series

    t = time.perf_counter()
    element_scan.warm_up()
    linear_resample.warm_up()
    normalize.warm_up()
    checked = check_kernels()
    log.info("preprocessing kernels checked", extra={"fields": checked})
    sources = make_series(
        description="warm-up", value_fn=lambda p: np.zeros(p.shape[:-1]), num_slices=4, rows=8, columns=8
    )
    labels = np.zeros((4, 8, 8), np.float32)
    labels[1:3, 2:5, 2:5] = 0.9
    geometry = GridGeometry(
        (-8.0, -8.0, -6.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (2.0, 2.0, 4.0), (8, 8, 4)
    )
    outputs = {
        "sequence_maps": np.repeat(labels[None], len(SEQUENCES), axis=0),
        "fused_map": labels[None],
        "cspca_map": labels[None],
        "score_map": 1.0 + 4.0 * labels[None],
        "cspca_probability": np.array([0.5], np.float32),
        "pirads_distribution": np.full(5, 0.2, np.float32),
    }
    built = build_dicom_outputs(build_findings(outputs, geometry), sources)
    DicomOutputs.encode(built.sr)
    return time.perf_counter() - t


class Analyzer:
    """Runs studies against one :class:`TritonEnsemble` with a shared worker pool."""

    def __init__(self, settings: ServiceSettings, ensemble: TritonEnsemble, executor: Executor) -> None:
        self.settings = settings
        self.ensemble = ensemble
        self.executor = executor

    def preprocess_settings(self, model: ServedModel, options: AnalysisOptions) -> PreprocessSettings:
        """Preprocessing as the served model's contract asks (grid, normalization), not compiled-in defaults."""
        return PreprocessSettings(
            grid=model.contract.grid,
            normalization=model.contract.normalization,
            rules_path=self.settings.series_rules,
            max_instances=self.settings.max_instances,
            study_instance_uid=options.study_instance_uid or None,
        )

    async def run_in_pool(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the worker pool, with this call's context (its request id reaches the logs)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self.executor, context.run, fn, *args)

    async def analyze(
        self,
        source: Sequence[bytes] | Sequence[pydicom.Dataset],
        options: AnalysisOptions,
        timings_s: dict[str, float] | None = None,
    ) -> AnalysisResult:
        """Analyze one study (DICOM bytes or datasets). Raises the typed errors mapped in :mod:`status`."""
        t = time.perf_counter()
        ingested = await self.run_in_pool(read_source, source, self.settings.max_instances)
        return await self.analyze_ingested(ingested, time.perf_counter() - t, len(source), options, timings_s)

    async def analyze_ingested(
        self,
        ingested: Ingested,
        read_s: float,
        num_instances: int,
        options: AnalysisOptions,
        timings_s: dict[str, float] | None = None,
    ) -> AnalysisResult:
        """Analyze a study whose headers were already read (e.g. while it arrived): ``read_s`` is that time."""
        timings = dict(timings_s or {})
        model = self.ensemble.model or await self.ensemble.refresh_model()
        pre: PreprocessedStudy = await self.run_in_pool(
            preprocess_ingested, ingested, self.preprocess_settings(model, options), read_s
        )
        for key, seconds in pre.meta.get("timings_s", {}).items():
            stage = _PREPROCESS_STAGES.get(key)
            if stage is not None:
                timings[stage] = timings.get(stage, 0.0) + float(seconds)

        t = time.perf_counter()
        outputs = await self.ensemble.infer(pre.tensor, pre.availability)
        timings["infer"] = time.perf_counter() - t

        t = time.perf_counter()
        score = functools.partial(
            build_findings, scorer=model.lesion_scorer, images=pre.tensor, availability=pre.availability
        )
        findings: Findings = await self.run_in_pool(score, outputs, pre.geometry)
        timings["candidates"] = time.perf_counter() - t

        t = time.perf_counter()
        result = AnalysisResult(
            study_instance_uid=str(pre.meta["study_instance_uid"]),
            meta=pre.meta,
            findings=findings,
            model=model,
            warnings=list(pre.meta.get("warnings", [])),
            timings_s=timings,
            num_instances=num_instances,
            t2w_channel=pre.tensor[sequence_index("t2w")] if options.include_t2w_preview else None,
        )
        if options.include_dicom_outputs:
            t2w_uid = pre.meta["series"]["t2w"]["series_uid"]
            await self.run_in_pool(self._encode_dicom, result, ingested.datasets, t2w_uid)
        timings["encode"] = time.perf_counter() - t
        log.info(
            "analyzed",
            extra={
                "fields": {
                    "study": uid_hash(result.study_instance_uid),
                    "lesions": len(findings.lesions),
                    "available": [s for s, a in zip(SEQUENCES, pre.availability) if a],
                }
            },
        )
        return result

    @staticmethod
    def _encode_dicom(result: AnalysisResult, datasets: Sequence[pydicom.Dataset], t2w_uid: str) -> None:
        outputs = build_dicom_outputs(result.findings, _source_datasets(datasets, t2w_uid))
        result.seg, result.sr = outputs.seg, outputs.sr
        if outputs.seg is not None:
            result.encoded["seg"] = DicomOutputs.encode(outputs.seg)
        result.encoded["sr"] = DicomOutputs.encode(outputs.sr)
