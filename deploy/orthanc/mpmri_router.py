"""Orthanc Python plugin: a PACS router for the mpmri analysis service.

When a study becomes stable, a worker thread (never Orthanc's callback thread) sends it to the service and
stores the returned DICOM SEG and SR back into Orthanc. Two modes:

* ``stream`` (default): the plugin reads the study's instances from Orthanc and streams them (``Analyze``);
  it stores the SEG and SR itself (``POST /instances``).
* ``reference``: the plugin sends only the StudyInstanceUID and Orthanc's DICOMweb URL
  (``AnalyzeReference``); the service pulls the study (WADO-RS) and stores SEG and SR (STOW-RS).

Loop-safe: instances made by mpmri-serve (Manufacturer ``mpmri-serve``) are never sent, and a study whose
other instances were already analyzed (same set of SOP instances) is not analyzed again, so storing our own
outputs (which makes the study change and become stable again) triggers nothing. The study's MR instances
are fingerprinted in memory; after an Orthanc restart, a study that already holds our outputs counts as
analyzed.

Survives service errors: every failure is logged (status name and message, UIDs hashed) and the worker
goes on with the next study. UNAVAILABLE is retried by the client with backoff.

Configuration, section ``MpmriRouter`` of Orthanc's configuration::

    "MpmriRouter": {
      "Server": "127.0.0.1:50051",        // the analysis service
      "Mode": "stream",                   // or "reference"
      "DicomWebUrl": "http://127.0.0.1:8042/dicom-web",  // reference mode: Orthanc as the service sees it
      "SitePackages": "/opt/mpmri/venv/lib/python3.11/site-packages",  // where mpmri-client is installed
      "TokenFile": "",                    // bearer token file (optional)
      "RootCertificates": "",             // CA PEM for TLS (optional)
      "DeadlineSeconds": 300,
      "Retries": 5
    }
"""

from __future__ import annotations

import hashlib
import json
import queue
import site
import sys
import threading
from typing import Any

import orthanc  # provided by the orthanc-python plugin

OUTPUT_MANUFACTURER = "mpmri-serve"
CONFIG = json.loads(orthanc.GetConfiguration()).get("MpmriRouter", {})
if CONFIG.get("SitePackages"):
    # in front of the system's dist-packages (Debian ships an older protobuf there)
    _before = list(sys.path)
    site.addsitedir(CONFIG["SitePackages"])
    sys.path[:] = [p for p in sys.path if p not in _before] + _before

import grpc  # noqa: E402 - after the site directory is added

from mpmri_client import AnalysisClient, ChannelOptions  # noqa: E402

_queue: queue.Queue[str] = queue.Queue()
_analyzed: dict[str, str] = {}  # Orthanc study id -> fingerprint of the instances analyzed


def _tag(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


def _get(uri: str) -> Any:
    return json.loads(orthanc.RestApiGet(uri))


def _client() -> AnalysisClient:
    token = None
    if CONFIG.get("TokenFile"):
        with open(CONFIG["TokenFile"]) as f:
            token = f.read().strip()
    options = ChannelOptions(
        root_certificates=CONFIG.get("RootCertificates") or None,
        token=token,
        retries=int(CONFIG.get("Retries", 5)),
        max_backoff_s=10.0,
    )
    return AnalysisClient(CONFIG.get("Server", "127.0.0.1:50051"), options)


def _source_instances(study_id: str) -> tuple[list[str], bool]:
    """Orthanc ids of the study's instances not made by us, and whether our outputs are present."""
    ours = False
    source: list[str] = []
    for instance in _get(f"/studies/{study_id}/instances?expand"):
        tags = _get(f"/instances/{instance['ID']}/simplified-tags")
        if str(tags.get("Manufacturer", "")) == OUTPUT_MANUFACTURER:
            ours = True
        else:
            source.append(instance["ID"])
    return sorted(source), ours


def _analyze(study_id: str) -> None:
    study = _get(f"/studies/{study_id}")
    study_uid = study["MainDicomTags"]["StudyInstanceUID"]
    source, ours = _source_instances(study_id)
    fingerprint = hashlib.sha256(",".join(source).encode()).hexdigest()
    if _analyzed.get(study_id) == fingerprint or (ours and study_id not in _analyzed):
        return  # our own outputs arrived, or the study was analyzed before a restart
    if not source:
        return
    deadline = float(CONFIG.get("DeadlineSeconds", 300))
    with _client() as client:
        if CONFIG.get("Mode", "stream") == "reference":
            response = client.analyze_reference(
                CONFIG["DicomWebUrl"], study_uid, request_id=f"orthanc-{study_id[:8]}", store_results=True,
                timeout_s=deadline,
            )  # fmt: skip
        else:
            instances = [orthanc.RestApiGet(f"/instances/{iid}/file") for iid in source]
            response = client.analyze(
                instances, request_id=f"orthanc-{study_id[:8]}", timeout_s=deadline, include_dicom_outputs=True
            )
            for obj in (response.seg, response.sr):
                if obj.data:
                    orthanc.RestApiPost("/instances", obj.data)
    _analyzed[study_id] = fingerprint
    orthanc.LogWarning(
        f"mpmri: study {_tag(study_uid)} analyzed: csPCa {response.cspca_probability:.3f}, "
        f"PI-RADS-like {response.pirads_score}, {len(response.lesions)} lesion(s)"
    )


def _worker() -> None:
    while True:
        study_id = _queue.get()
        try:
            _analyze(study_id)
        except grpc.RpcError as err:
            orthanc.LogError(f"mpmri: study {study_id[:8]} failed: {err.code().name}: {err.details()}")
        except Exception as err:  # noqa: BLE001 - the router must survive anything
            orthanc.LogError(f"mpmri: study {study_id[:8]} failed: {type(err).__name__}: {err}")
        finally:
            _queue.task_done()


def on_change(change_type: int, level: int, resource_id: str) -> None:
    """Orthanc's callback thread: only enqueue."""
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        _queue.put(resource_id)


threading.Thread(target=_worker, name="mpmri-router", daemon=True).start()
orthanc.RegisterOnChangeCallback(on_change)
orthanc.LogWarning(f"mpmri router: {CONFIG.get('Mode', 'stream')} mode, service {CONFIG.get('Server')}")
