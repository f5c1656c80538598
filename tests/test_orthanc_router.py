"""A real PACS on both ends: Orthanc (Debian `orthanc`, `orthanc-python`, `orthanc-dicomweb`) with the
mpmri router plugin, `storescu` (dcmtk) as the modality, the real service and Triton.

C-STORE a synthetic study → the router sends it to the service (streamed, or by reference over Orthanc's
DICOMweb) → SEG and SR are stored back into Orthanc; they reference the source T2W series and their lesion
centres match the service's own answer for the study. Studies are synthetic: no patient data.
"""

from __future__ import annotations

import io
import json
import shutil
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from service_harness import Process, wait_for
from test_service_api import assert_seg_centres_match

from mpmri_client import AnalysisClient, ChannelOptions, read_instances
from serving.embedded import free_ports

ROOT = Path(__file__).resolve().parents[1]
ROUTER = ROOT / "deploy" / "orthanc" / "mpmri_router.py"
PLUGINS = Path("/usr/share/orthanc/plugins")

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.triton,
    pytest.mark.service,
    pytest.mark.skipif(shutil.which("Orthanc") is None, reason="Debian package orthanc not installed"),
]


class Orthanc:
    def __init__(self, root: Path, service_target: str, mode: str) -> None:
        self.http_port, self.dicom_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = {
            "Name": f"mpmri-test-{mode}",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StableAge": 2,
            "Plugins": [str(PLUGINS / "libOrthancPython.so"), str(PLUGINS / "libOrthancDicomWeb.so")],
            "PythonScript": str(ROUTER),
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "MpmriRouter": {
                "Server": service_target,
                "Mode": mode,
                "DicomWebUrl": f"{self.url}/dicom-web",
                "SitePackages": sysconfig.get_paths()["purelib"],
                "DeadlineSeconds": 240,
                "Retries": 5,
            },
        }
        (root / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.process = Process(["Orthanc", str(root / "orthanc.json")], root / "orthanc.log").start()
        wait_for(lambda: self.process.poll() is not None or self._up(), 60, "Orthanc HTTP")
        if self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {self.process.log()[-3000:]}")

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def get(self, uri: str) -> Any:
        with urllib.request.urlopen(self.url + uri, timeout=10) as reply:
            return json.loads(reply.read())

    def file(self, instance_id: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/instances/{instance_id}/file", timeout=30) as reply:
            return bytes(reply.read())

    def storescu(self, folder: Path) -> None:
        import subprocess

        subprocess.run(
            ["storescu", "-aec", "ORTHANC", "+sd", "+r", "127.0.0.1", str(self.dicom_port), str(folder)],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def series_by_modality(self, study_uid: str) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for study in self.get("/studies?expand"):
            if study["MainDicomTags"]["StudyInstanceUID"] != study_uid:
                continue
            for series_id in study["Series"]:
                series = self.get(f"/series/{series_id}")
                out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
        return out


@pytest.fixture(params=["stream", "reference"])
def orthanc(request: pytest.FixtureRequest, serve_stack: Any, tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path, serve_stack.target, request.param)
    try:
        yield server
    finally:
        server.process.stop()


def test_cstore_study_gets_seg_and_sr_stored_back_once(
    orthanc: Orthanc, serve_stack: Any, service_studies: dict[str, Path]
) -> None:
    case = service_studies["cancer"]
    study_uid = json.loads((case / "ground_truth.json").read_text())["study_instance_uid"]
    orthanc.storescu(case / "dicom")
    wait_for(
        lambda: {"SEG", "SR"} <= set(orthanc.series_by_modality(study_uid)),
        240,
        f"SEG and SR in Orthanc; log:\n{orthanc.process.log()[-1500:]}",
        interval_s=1.0,
    )
    # loop-safe: storing our outputs made the study stable again; nothing more may arrive
    time.sleep(6)
    series = orthanc.series_by_modality(study_uid)
    assert len(series["SEG"]) == 1 and len(series["SR"]) == 1, {k: len(v) for k, v in series.items()}
    seg_bytes = orthanc.file(series["SEG"][0]["Instances"][0])
    sr_bytes = orthanc.file(series["SR"][0]["Instances"][0])

    import highdicom as hd

    with AnalysisClient(serve_stack.target, ChannelOptions(retries=2)) as client:
        direct = client.analyze(read_instances(case / "dicom"), timeout_s=120)
    t2w_uid = next(s.series_instance_uid for s in direct.series if s.sequence == "t2w")
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {t2w_uid}
    assert len(seg.SegmentSequence) == len(direct.lesions)
    assert_seg_centres_match(seg, direct.lesions)
    sr = pydicom.dcmread(io.BytesIO(sr_bytes))
    evidence = {
        str(s.SeriesInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    assert t2w_uid in evidence and str(seg.SeriesInstanceUID) in evidence
    report = hd.sr.srread(io.BytesIO(sr_bytes))
    volumes = sorted(
        m.value for g in report.content.get_volumetric_roi_measurement_groups() for m in g.get_measurements()
        if m.name.meaning == "Volume"
    )  # fmt: skip
    assert np.allclose(volumes, sorted(les.volume_ml for les in direct.lesions), atol=1e-4)
    assert "analyzed" in orthanc.process.log()


def test_router_survives_a_study_the_service_refuses(
    orthanc: Orthanc, service_studies: dict[str, Path], tmp_path: Path
) -> None:
    ct = get_testdata_file("CT_small.dcm", download=False)
    assert ct is not None
    bad = tmp_path / "ct_only"
    bad.mkdir()
    shutil.copy(str(ct), bad / "ct.dcm")
    orthanc.storescu(bad)
    wait_for(lambda: "mpmri: study" in orthanc.process.log() and "failed" in orthanc.process.log(), 60, "refusal")
    assert "INVALID_ARGUMENT" in orthanc.process.log() or "NOT_FOUND" in orthanc.process.log()
    assert orthanc.process.poll() is None
    case = service_studies["benign"]
    study_uid = json.loads((case / "ground_truth.json").read_text())["study_instance_uid"]
    orthanc.storescu(case / "dicom")
    wait_for(lambda: "SR" in orthanc.series_by_modality(study_uid), 240, "SR of the next study", interval_s=1.0)


@pytest.mark.parametrize("store", [False, True])
def test_analyze_reference_pulls_over_dicomweb(
    serve_stack: Any, service_studies: dict[str, Path], tmp_path: Path, store: bool
) -> None:
    server = Orthanc(tmp_path, "127.0.0.1:1", "stream")  # router pointed nowhere: only the service stores here
    try:
        case = service_studies["cancer"]
        study_uid = json.loads((case / "ground_truth.json").read_text())["study_instance_uid"]
        server.storescu(case / "dicom")
        with AnalysisClient(serve_stack.target, ChannelOptions(retries=0)) as client:
            r = client.analyze_reference(f"{server.url}/dicom-web", study_uid, store_results=store, timeout_s=120)
            direct = client.analyze(read_instances(case / "dicom"), timeout_s=120)
            assert r.study_instance_uid == study_uid and r.results_stored == store
            assert r.cspca_probability == pytest.approx(direct.cspca_probability, abs=1e-6)
            assert [list(les.center_lps_mm) for les in r.lesions] == [list(les.center_lps_mm) for les in direct.lesions]
            with pytest.raises(grpc.RpcError) as info:
                client.analyze_reference(f"{server.url}/dicom-web", "1.2.3.4.5.6.7", timeout_s=60)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        modalities = set(server.series_by_modality(study_uid))
        assert ({"SEG", "SR"} <= modalities) == store
    finally:
        server.process.stop()
