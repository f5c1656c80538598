"""The analysis service over real gRPC: `mpmri serve` (real Triton + real service), the real client.

Studies are synthetic (mpmri synth): no patient data reaches these tests.
"""

from __future__ import annotations

import io
import json
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from service_harness import BIN, health_status, running_service, wait_for

from contract import pirads_category
from mpmri_client import AnalysisClient, ChannelOptions, read_instances
from mpmri_client.results import grid_volume_array
from mpmri_client.v1 import analysis_pb2 as pb
from mpmri_client.v1 import analysis_pb2_grpc as pb_grpc
from postprocessing.lesion_scoring import coherent_category
from preprocess_service.metrics import STAGES

pytestmark = [pytest.mark.triton, pytest.mark.service]


def _truth(case: Path) -> dict[str, Any]:
    return json.loads((case / "ground_truth.json").read_text())


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def _pydicom_file(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(str(path)).read_bytes()


@pytest.fixture(scope="module")
def client(serve_stack: Any) -> Any:
    with AnalysisClient(serve_stack.target, ChannelOptions(retries=0)) as c:
        yield c


@pytest.fixture(scope="module")
def cancer_reference(client: AnalysisClient, service_studies: dict[str, Path]) -> pb.AnalyzeResponse:
    return client.analyze_folder(
        service_studies["cancer"] / "dicom",
        request_id="reference",
        timeout_s=120,
        include_fused_map=True,
        include_cspca_map=True,
        include_t2w_preview=True,
        include_dicom_outputs=True,
    )


def test_analyze_answers_study_findings_series_and_timings(
    cancer_reference: pb.AnalyzeResponse, service_studies: dict[str, Path]
) -> None:
    r = cancer_reference
    truth = _truth(service_studies["cancer"])
    assert r.request_id == "reference"
    assert r.study_instance_uid == truth["study_instance_uid"]
    assert dict(r.availability) == {"t2w": True, "adc": True, "dwi": True}
    assert {s.sequence for s in r.series} == {"t2w", "adc", "dwi"}
    assert all(s.series_instance_uid and s.reason for s in r.series)
    assert 0.0 <= r.cspca_probability <= 1.0
    assert 1 <= r.pirads_score <= 5 and len(r.pirads_distribution) == 5
    assert abs(sum(r.pirads_distribution) - 1.0) < 1e-3
    assert r.model_name == "mpmri_ensemble" and r.model_version == "1"
    assert set(r.timings_s) == set(STAGES)
    # the trained model finds the significant lesion of this study within 5 mm of its true centre
    significant = [np.asarray(les["center_lps_mm"]) for les in truth["lesions"] if les["significant"]]
    assert r.lesions, "no lesion found"
    top = np.asarray(r.lesions[0].center_lps_mm)
    assert min(np.linalg.norm(top - c) for c in significant) < 5.0
    assert [les.id for les in r.lesions] == list(range(1, len(r.lesions) + 1))
    assert all(0 < les.volume_ml < 50 and 0 < les.likelihood <= 1 for les in r.lesions)
    # every lesion carries its own category, brought into agreement with the lesion's likelihood (the shipped
    # checkpoint has a lesion scorer, whose category-5 model decides 4 against 5 for a csPCa lesion and whose lesion
    # model decides 1 against 2-3 below it, the network's score between 2 and 3); the study category is the highest
    assert all(
        les.pirads in (4, 5)
        if les.likelihood >= 0.5
        else les.pirads in (1, coherent_category(pirads_category(les.score), les.likelihood, None, 1.0))
        for les in r.lesions
    )
    assert all((les.pirads >= 4) == (les.likelihood >= 0.5) for les in r.lesions)
    assert r.pirads_score == max(les.pirads for les in r.lesions)
    assert r.cspca_probability == pytest.approx(max(les.likelihood for les in r.lesions), abs=1e-5)
    assert sum(r.pirads_distribution[3:]) == pytest.approx(r.cspca_probability, abs=1e-5)


def test_fused_map_and_preview_come_as_float16_on_the_model_grid(cancer_reference: pb.AnalyzeResponse) -> None:
    fused = grid_volume_array(cancer_reference.fused_map)
    t2w = grid_volume_array(cancer_reference.t2w_preview)
    assert fused.shape == t2w.shape == (16, 64, 64)
    assert list(cancer_reference.fused_map.spacing_mm_ijk) == pytest.approx([1.5, 1.5, 3.0], abs=1e-6)
    assert fused.min() >= 0.0 and fused.max() <= 1.0
    assert t2w.std() > 0.05
    cspca = grid_volume_array(cancer_reference.cspca_map)
    assert cspca.shape == (16, 64, 64) and cspca.min() >= 0.0
    assert cspca.max() > 0.5  # the network's own csPCa map marks this study's cancer


def test_served_findings_equal_the_evaluation_of_the_shipped_checkpoint(
    cancer_reference: pb.AnalyzeResponse, service_studies: dict[str, Path]
) -> None:
    """Triton (ONNX) + the service's lesion scorer give what `mpmri evaluate` computes in-process (torch)."""
    import torch

    from networks.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from postprocessing.lesion_scoring import scorer_from_metadata
    from training.data import prepare_case_dir
    from training.evaluate import predict_record

    nets, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    scorer = scorer_from_metadata(meta)
    assert scorer is not None, "the shipped checkpoint carries its lesion scorer"
    with torch.no_grad():  # local: the suite's later training tests need gradients
        result = predict_record(nets, prepare_case_dir(service_studies["cancer"]), baselines=False, scorer=scorer)
    served = cancer_reference
    assert [les.likelihood for les in served.lesions] == pytest.approx(
        [les.likelihood for les in result.candidates], abs=1e-4
    )
    assert [les.pirads for les in served.lesions] == [les.pirads for les in result.candidates]
    assert served.pirads_score == result.pirads_predicted
    assert [list(les.center_lps_mm) for les in served.lesions] == [
        pytest.approx(list(les.center_lps_mm), abs=1e-2) for les in result.candidates
    ]
    assert served.cspca_probability == pytest.approx(result.cspca_probability, abs=1e-4)


def test_seg_and_sr_reference_the_t2w_series_and_hold_the_lesions(cancer_reference: pb.AnalyzeResponse) -> None:
    import highdicom as hd

    t2w_uid = next(s.series_instance_uid for s in cancer_reference.series if s.sequence == "t2w")
    seg = hd.seg.segread(io.BytesIO(cancer_reference.seg.data))
    sr = pydicom.dcmread(io.BytesIO(cancer_reference.sr.data))
    assert seg.SOPInstanceUID == cancer_reference.seg.sop_instance_uid
    assert seg.StudyInstanceUID == cancer_reference.study_instance_uid == sr.StudyInstanceUID
    assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {t2w_uid}
    assert len(seg.SegmentSequence) == len(cancer_reference.lesions)
    assert_seg_centres_match(seg, cancer_reference.lesions)
    evidence = {
        str(s.SeriesInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    assert {t2w_uid, cancer_reference.seg.series_instance_uid} <= evidence
    report = hd.sr.srread(io.BytesIO(cancer_reference.sr.data))
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(cancer_reference.lesions)
    referenced = {n for g in groups for n in g.referenced_segment.referenced_segment_numbers}
    assert referenced == {les.id for les in cancer_reference.lesions}


def assert_seg_centres_match(seg: Any, lesions: Any, tol_mm: float = 3.0) -> None:
    """Each SEG segment's voxel centroid (LPS mm, from its frames' positions) lies near its lesion's centre."""
    spacing = np.asarray(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing, float)
    iop = np.asarray(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]
    points: dict[int, list[np.ndarray]] = {}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    for frame, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if "SegmentIdentificationSequence" in item:
            number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        else:
            number = int(seg.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        origin = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        rows, cols = np.nonzero(pixels[frame])
        for r, c in zip(rows, cols):
            points.setdefault(number, []).append(origin + c * spacing[1] * row_dir + r * spacing[0] * col_dir)
    for lesion in lesions:
        centroid = np.mean(points[lesion.id], axis=0)
        assert np.linalg.norm(centroid - np.asarray(lesion.center_lps_mm)) < tol_mm, (lesion.id, centroid)


def test_same_study_gives_the_same_answer_in_any_chunking(
    client: AnalysisClient, cancer_reference: pb.AnalyzeResponse, service_studies: dict[str, Path]
) -> None:
    small = client.analyze_folder(service_studies["cancer"] / "dicom", timeout_s=120, chunk_bytes=4096)
    assert small.cspca_probability == pytest.approx(cancer_reference.cspca_probability, abs=1e-6)
    assert [list(les.center_lps_mm) for les in small.lesions] == [
        list(les.center_lps_mm) for les in cancer_reference.lesions
    ]


def test_resent_instances_give_the_same_answer_with_a_warning(
    client: AnalysisClient, cancer_reference: pb.AnalyzeResponse, service_studies: dict[str, Path]
) -> None:
    instances = read_instances(service_studies["cancer"] / "dicom")
    resent = instances + instances[::7]  # a router resent every seventh instance
    r = client.analyze(resent, timeout_s=120)
    assert r.num_instances == len(resent)
    assert r.cspca_probability == pytest.approx(cancer_reference.cspca_probability, abs=1e-6)
    assert [list(les.center_lps_mm) for les in r.lesions] == [
        list(les.center_lps_mm) for les in cancer_reference.lesions
    ]
    assert any("duplicate" in w.lower() or "resent" in w.lower() for w in r.warnings), list(r.warnings)


@pytest.mark.parametrize(
    ("name", "build", "expected", "phrase"),
    [
        ("not DICOM", lambda s: [b"hello, this is no DICOM file" * 10], grpc.StatusCode.INVALID_ARGUMENT, "dicom"),
        ("truncated", lambda s: [s[0][: len(s[0]) // 3]] + s[1:], grpc.StatusCode.INVALID_ARGUMENT, "truncat"),
        ("CT only", lambda s: [_pydicom_file("CT_small.dcm")], grpc.StatusCode.INVALID_ARGUMENT, "no mr"),
        ("no T2W", lambda s: [_pydicom_file("MR_small.dcm")], grpc.StatusCode.FAILED_PRECONDITION, "t2w"),
    ],
)
def test_bad_studies_get_the_status_a_router_can_act_on(
    client: AnalysisClient,
    service_studies: dict[str, Path],
    name: str,
    build: Any,
    expected: grpc.StatusCode,
    phrase: str,
) -> None:
    instances = read_instances(service_studies["cancer"] / "dicom")
    code, message = _code(lambda: client.analyze(build(instances), timeout_s=60))
    assert code == expected, (name, code, message)
    assert phrase in message.lower(), message


def test_two_studies_in_one_call_are_invalid_and_named(
    client: AnalysisClient, service_studies: dict[str, Path]
) -> None:
    both = read_instances(service_studies["cancer"] / "dicom") + read_instances(service_studies["benign"] / "dicom")
    code, message = _code(lambda: client.analyze(both, timeout_s=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 mr studies" in message.lower()
    # the caller may pick one of them
    truth = _truth(service_studies["benign"])
    r = client.analyze(both, timeout_s=120, study_instance_uid=truth["study_instance_uid"])
    assert r.study_instance_uid == truth["study_instance_uid"]


def test_malformed_streams_are_invalid_argument(serve_stack: Any) -> None:
    with grpc.insecure_channel(serve_stack.target) as channel:
        stub = pb_grpc.AnalysisServiceStub(channel)
        chunk = pb.AnalyzeRequest(chunks=[pb.InstanceChunk(data=b"x", end_of_instance=True)])
        header = pb.AnalyzeRequest(header=pb.AnalyzeHeader(request_id="r"))
        open_chunk = pb.AnalyzeRequest(chunks=[pb.InstanceChunk(data=b"DICM", end_of_instance=False)])
        cases = {
            "must carry the header": [chunk],
            "no dicom instances": [header],
            "ended inside instance 1": [header, open_chunk],
            "second header": [header, header],
        }
        for phrase, messages in cases.items():
            code, message = _code(lambda m=messages: stub.Analyze(iter(m), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and phrase in message.lower(), (phrase, message)


def test_deadline_is_honoured_and_the_service_keeps_serving(
    client: AnalysisClient, service_studies: dict[str, Path], serve_stack: Any
) -> None:
    instances = read_instances(service_studies["cancer"] / "dicom")
    code, _ = _code(lambda: client.analyze(instances, timeout_s=0.05))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert health_status(serve_stack.target) == "SERVING"
    assert client.analyze(instances, timeout_s=120).lesions


def test_concurrent_mix_of_good_and_bad_studies_answers_every_good_one(
    client: AnalysisClient, cancer_reference: pb.AnalyzeResponse, service_studies: dict[str, Path]
) -> None:
    good = read_instances(service_studies["cancer"] / "dicom")
    benign = read_instances(service_studies["benign"] / "dicom")
    jobs: list[tuple[str, list[bytes]]] = []
    for _ in range(4):
        jobs += [("good", good), ("benign", benign), ("bad", [b"garbage" * 100]), ("bad", [good[0][:500]])]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(lambda j=j: _safe(client, j[1])) for j in jobs]
        results = [f.result() for f in futures]
    for (kind, _), (response, code) in zip(jobs, results):
        if kind == "bad":
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert code is None, (kind, code)
        if kind == "good":
            assert response.cspca_probability == pytest.approx(cancer_reference.cspca_probability, abs=1e-6)
            assert len(response.lesions) == len(cancer_reference.lesions)


def _safe(client: AnalysisClient, instances: list[bytes]) -> tuple[Any, grpc.StatusCode | None]:
    try:
        return client.analyze(instances, timeout_s=300), None
    except grpc.RpcError as err:
        return None, err.code()  # type: ignore[attr-defined]


def test_metrics_endpoint_counts_requests_and_stages(serve_stack: Any, client: AnalysisClient) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{serve_stack.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    ok = [line for line in text.splitlines() if line.startswith('mpmri_requests_total{code="OK",method="Analyze"}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    assert 'mpmri_requests_total{code="INVALID_ARGUMENT",method="Analyze"}' in text
    for stage in ("receive", "parse", "resample", "normalize", "infer", "candidates", "encode"):
        count = [
            line
            for line in text.splitlines()
            if line.startswith(f'mpmri_stage_duration_seconds_count{{stage="{stage}"}}')
        ]
        assert count and float(count[0].split()[-1]) >= 1, stage
    assert "mpmri_requests_in_flight" in text and "mpmri_queue_depth" in text


def test_reflection_lists_the_analysis_and_health_services(serve_stack: Any) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(serve_stack.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"mpmri.v1.AnalysisService", "grpc.health.v1.Health"} <= names


def test_mpmri_analyze_writes_result_seg_sr_and_overlay(
    serve_stack: Any, service_studies: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "analyze"
    run = subprocess.run(
        [str(BIN / "mpmri"), "analyze", str(service_studies["cancer"] / "dicom"), "--server", serve_stack.target,
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["lesions"] and len(result["lesions"][0]["center_lps_mm"]) == 3
    assert 0 <= result["cspca_probability"] <= 1 and 1 <= result["pirads_score"] <= 5
    assert pydicom.dcmread(out / "seg.dcm").Modality == "SEG"
    assert pydicom.dcmread(out / "sr.dcm").Modality == "SR"
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mpmri_analyze_failure_prints_one_status_line(serve_stack: Any, tmp_path: Path) -> None:
    (tmp_path / "junk.txt").write_text("not a DICOM study")
    run = subprocess.run(
        [str(BIN / "mpmri"), "analyze", str(tmp_path), "--server", serve_stack.target, "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: INVALID_ARGUMENT: "), run.stderr


def test_shared_memory_and_plain_grpc_tensors_give_identical_answers(
    serve_stack: Any, cancer_reference: pb.AnalyzeResponse, service_studies: dict[str, Path], tmp_path: Path
) -> None:
    instances = read_instances(service_studies["cancer"] / "dicom")
    env = {"MPMRI_TRITON_SHARED_MEMORY": "system"}
    with running_service(serve_stack.triton_url, tmp_path, env=env) as service, AnalysisClient(service.target) as shm:
        answers = [shm.analyze(instances, timeout_s=120, include_fused_map=True) for _ in range(3)]
    for r in answers:
        assert r.cspca_probability == pytest.approx(cancer_reference.cspca_probability, abs=1e-6)
        assert r.fused_map.float16_dhw == cancer_reference.fused_map.float16_dhw


def test_triton_killed_mid_run_unavailable_then_recovery_loses_nothing(
    serve_stack: Any, service_studies: dict[str, Path], cancer_reference: pb.AnalyzeResponse
) -> None:
    """`mpmri serve` restarts a dead Triton; meanwhile UNAVAILABLE + NOT_SERVING; retrying clients all succeed."""
    instances = read_instances(service_studies["cancer"] / "dicom")
    pids = serve_stack.triton_pids()
    assert pids, "tritonserver of the stack not found"
    patient = AnalysisClient(serve_stack.target, ChannelOptions(retries=30, backoff_s=0.5, max_backoff_s=2.0))
    impatient = AnalysisClient(serve_stack.target, ChannelOptions(retries=0))
    results: list[Any] = []
    errors: list[BaseException] = []

    def run_one() -> None:
        try:
            results.append(patient.analyze(instances, timeout_s=240))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run_one) for _ in range(4)]
    for i, t in enumerate(threads):
        t.start()
        if i == 1:
            subprocess.run(["kill", "-9", *map(str, pids)], check=True)
    wait_for(lambda: health_status(serve_stack.target) == "NOT_SERVING", 20, "NOT_SERVING after the kill", 0.1)
    code, message = _code(lambda: impatient.analyze(instances, timeout_s=30))
    assert code == grpc.StatusCode.UNAVAILABLE and "not ready" in message
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 4
    assert all(r.cspca_probability == pytest.approx(cancer_reference.cspca_probability, abs=1e-6) for r in results)
    wait_for(lambda: health_status(serve_stack.target) == "SERVING", 120, "SERVING after the restart")
    assert serve_stack.triton_pids() and set(serve_stack.triton_pids()).isdisjoint(pids)
    patient.close()
    impatient.close()
    assert "restarting" in serve_stack.process.log()


def test_async_client_analyzes_concurrently(
    serve_stack: Any, cancer_reference: pb.AnalyzeResponse, service_studies: dict[str, Path]
) -> None:
    import asyncio

    from mpmri_client import AsyncAnalysisClient

    instances = read_instances(service_studies["cancer"] / "dicom")

    async def main() -> list[pb.AnalyzeResponse]:
        async with AsyncAnalysisClient(serve_stack.target, ChannelOptions(retries=1)) as client:
            return list(await asyncio.gather(*(client.analyze(instances, timeout_s=120) for _ in range(3))))

    for r in asyncio.run(main()):
        assert r.cspca_probability == pytest.approx(cancer_reference.cspca_probability, abs=1e-6)


def test_cancelled_call_frees_its_slot_and_the_service_keeps_serving(
    serve_stack: Any, client: AnalysisClient, service_studies: dict[str, Path]
) -> None:
    from mpmri_client import request_stream

    instances = read_instances(service_studies["cancer"] / "dicom")

    def in_flight() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{serve_stack.metrics_port}/metrics", timeout=10) as reply:
            line = next(x for x in reply.read().decode().splitlines() if x.startswith("mpmri_requests_in_flight "))
        return float(line.split()[-1])

    # The stream stalls after its first messages, so the call is surely in flight when it is cancelled (a
    # sleep-then-cancel raced a fast machine: the whole analysis finished within the sleep).
    release = threading.Event()

    def stalled_stream() -> Iterator[pb.AnalyzeRequest]:
        for i, message in enumerate(request_stream(instances, "to-cancel")):
            yield message
            if i == 1:
                release.wait(60)

    with grpc.insecure_channel(serve_stack.target) as channel:
        stub = pb_grpc.AnalysisServiceStub(channel)
        future = stub.Analyze.future(stalled_stream(), timeout=120)
        try:
            wait_for(lambda: in_flight() == 1.0, 30, "the call in flight at the service")
            future.cancel()
        finally:
            release.set()
        assert future.cancelled() or future.code() == grpc.StatusCode.CANCELLED

    wait_for(lambda: in_flight() == 0.0, 30, "in-flight gauge back to 0 after the cancel")
    assert client.analyze(instances, timeout_s=120).lesions


def test_logs_hold_no_patient_identifiers_or_raw_uids(serve_stack: Any, service_studies: dict[str, Path]) -> None:
    truth = _truth(service_studies["cancer"])
    first = pydicom.dcmread(next(p for p in sorted((service_studies["cancer"] / "dicom").rglob("*")) if p.is_file()))
    log = serve_stack.process.log()
    assert log, "the service wrote no log"
    for secret in (truth["study_instance_uid"], str(first.SeriesInstanceUID), str(first.SOPInstanceUID)):
        assert secret not in log
    for value in (str(first.get("PatientName", "")), str(first.get("PatientID", ""))):
        if len(value) > 3:
            assert value not in log
