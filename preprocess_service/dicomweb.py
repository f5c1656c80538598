"""DICOMweb for ``AnalyzeReference``: pull a study with WADO-RS, store SEG/SR back with STOW-RS
(``dicomweb-client``). Blocking calls: the servicer runs them in its worker pool."""

from __future__ import annotations

import grpc
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from preprocess_service.status import RequestError
from preprocessing.pipeline import uid_hash


def _client(url: str, timeout_s: float) -> DICOMwebClient:
    return DICOMwebClient(url=url, timeout=timeout_s)


def _translate(err: Exception, what: str) -> RequestError:
    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 404:
            return RequestError(grpc.StatusCode.NOT_FOUND, f"{what}: not found on the DICOMweb server (HTTP 404)")
        if status in (401, 403):
            return RequestError(grpc.StatusCode.PERMISSION_DENIED, f"{what}: DICOMweb server refused (HTTP {status})")
        if status >= 500:
            return RequestError(grpc.StatusCode.UNAVAILABLE, f"{what}: DICOMweb server error (HTTP {status})")
        return RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"{what}: DICOMweb server answered HTTP {status}")
    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return RequestError(grpc.StatusCode.UNAVAILABLE, f"{what}: DICOMweb server unreachable ({type(err).__name__})")
    if isinstance(err, requests.exceptions.MissingSchema | requests.exceptions.InvalidURL | ValueError):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: invalid DICOMweb URL ({err})")
    return RequestError(grpc.StatusCode.UNAVAILABLE, f"{what}: DICOMweb failure ({type(err).__name__}: {err})")


def retrieve_study(url: str, study_instance_uid: str, timeout_s: float, max_instances: int) -> list[pydicom.Dataset]:
    """Every instance of the study (WADO-RS); raises :class:`RequestError` with a router-actionable status."""
    what = f"study {uid_hash(study_instance_uid)}"
    try:
        client = _client(url, timeout_s)
        datasets = list(client.retrieve_study(study_instance_uid))
    except Exception as err:  # noqa: BLE001 - every transport/HTTP failure becomes a status
        raise _translate(err, what) from None
    if not datasets:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"{what}: the DICOMweb server returned no instances")
    if len(datasets) > max_instances:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what}: {len(datasets)} instances > max_instances={max_instances}"
        )
    return datasets


def store_instances(url: str, datasets: list[pydicom.Dataset], timeout_s: float) -> None:
    """STOW-RS ``datasets`` to the server at ``url``."""
    if not datasets:
        return
    try:
        _client(url, timeout_s).store_instances(datasets)
    except Exception as err:  # noqa: BLE001
        raise _translate(err, "storing SEG/SR") from None
