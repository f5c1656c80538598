"""TLS, mutual TLS, bearer tokens and limits of the real `mpmri-service` (against the session's real Triton)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from service_harness import health_status, running_service

from mpmri_client import AnalysisClient, ChannelOptions, read_instances

pytestmark = [pytest.mark.triton, pytest.mark.service]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl)."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mpmri test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"))  # fmt: skip
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(d / f"{name}.ext"),
                 "-out", str(d / f"{name}.pem"))  # fmt: skip
    # a second CA whose certificates the server must not accept
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other CA",
             "-keyout", str(d / "other.key"), "-out", str(d / "other.pem"))  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


@pytest.fixture(scope="module")
def study(service_studies: dict[str, Path]) -> list[bytes]:
    return read_instances(service_studies["cancer"] / "dicom")


def _fails_with(client: AnalysisClient, study: list[bytes], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        client.analyze(study, timeout_s=30)
    assert info.value.code() == code, info.value  # type: ignore[attr-defined]
    return str(info.value.details())  # type: ignore[attr-defined]


def test_tls_handshake_serves_and_plaintext_or_unknown_ca_fail(
    serve_stack: Any, pki: dict[str, Path], study: list[bytes], tmp_path: Path
) -> None:
    env = {"MPMRI_TLS_CERT": str(pki["server_pem"]), "MPMRI_TLS_KEY": str(pki["server_key"])}
    creds = grpc.ssl_channel_credentials(pki["ca_pem"].read_bytes())
    with running_service(serve_stack.triton_url, tmp_path, env=env, credentials=creds) as service:
        with AnalysisClient(service.target, ChannelOptions(root_certificates=pki["ca_pem"], retries=0)) as client:
            assert client.analyze(study, timeout_s=120).lesions
        with AnalysisClient(service.target, ChannelOptions(retries=0)) as plaintext:
            _fails_with(plaintext, study, grpc.StatusCode.UNAVAILABLE)
        with AnalysisClient(service.target, ChannelOptions(root_certificates=pki["other_pem"], retries=0)) as wrong:
            _fails_with(wrong, study, grpc.StatusCode.UNAVAILABLE)


def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(
    serve_stack: Any, pki: dict[str, Path], study: list[bytes], tmp_path: Path
) -> None:
    env = {
        "MPMRI_TLS_CERT": str(pki["server_pem"]),
        "MPMRI_TLS_KEY": str(pki["server_key"]),
        "MPMRI_TLS_CLIENT_CA": str(pki["ca_pem"]),
    }
    creds = grpc.ssl_channel_credentials(
        pki["ca_pem"].read_bytes(), pki["client_key"].read_bytes(), pki["client_pem"].read_bytes()
    )
    with running_service(serve_stack.triton_url, tmp_path, env=env, credentials=creds) as service:
        mutual = ChannelOptions(
            root_certificates=pki["ca_pem"],
            certificate_chain=pki["client_pem"],
            private_key=pki["client_key"],
            retries=0,
        )
        with AnalysisClient(service.target, mutual) as client:
            assert client.analyze(study, timeout_s=120).lesions
        with AnalysisClient(service.target, ChannelOptions(root_certificates=pki["ca_pem"], retries=0)) as no_cert:
            _fails_with(no_cert, study, grpc.StatusCode.UNAVAILABLE)


def test_bearer_token_wrong_or_missing_is_unauthenticated_health_stays_open(
    serve_stack: Any, study: list[bytes], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with running_service(serve_stack.triton_url, tmp_path, env={"MPMRI_AUTH_TOKEN_FILE": str(token_file)}) as service:
        assert health_status(service.target) == "SERVING"  # probes carry no token
        with AnalysisClient(service.target, ChannelOptions(token="s3cret-token", retries=0)) as good:
            assert good.analyze(study, timeout_s=120).lesions
        with AnalysisClient(service.target, ChannelOptions(token="wrong", retries=0)) as wrong:
            assert "invalid bearer token" in _fails_with(wrong, study, grpc.StatusCode.UNAUTHENTICATED)
        with AnalysisClient(service.target, ChannelOptions(retries=0)) as missing:
            assert "missing bearer token" in _fails_with(missing, study, grpc.StatusCode.UNAUTHENTICATED)
        log = service.process.log()
        assert "s3cret" not in log


def test_too_large_study_and_too_many_instances_are_resource_exhausted(
    serve_stack: Any, study: list[bytes], tmp_path: Path
) -> None:
    env = {"MPMRI_MAX_STUDY_BYTES": str(sum(map(len, study)) // 2), "MPMRI_MAX_INSTANCES": "200"}
    with running_service(serve_stack.triton_url, tmp_path, env=env) as service:
        with AnalysisClient(service.target, ChannelOptions(retries=0)) as client:
            assert "max_study_bytes" in _fails_with(client, study, grpc.StatusCode.RESOURCE_EXHAUSTED)
            many = [study[0][:100]] * 201
            assert "max_instances" in _fails_with(client, many, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert health_status(service.target) == "SERVING"


def test_full_queue_is_resource_exhausted_and_admitted_studies_finish(
    serve_stack: Any, study: list[bytes], tmp_path: Path
) -> None:
    env = {"MPMRI_MAX_CONCURRENT": "1", "MPMRI_MAX_QUEUE": "0", "MPMRI_PREPROCESS_WORKERS": "1"}
    codes: list[grpc.StatusCode | None] = []
    lock = threading.Lock()
    service_cm = running_service(serve_stack.triton_url, tmp_path, env=env)
    with service_cm as service, AnalysisClient(service.target, ChannelOptions(retries=0)) as client:

        def one() -> None:
            try:
                client.analyze(study, timeout_s=120)
                code = None
            except grpc.RpcError as err:
                code = err.code()  # type: ignore[attr-defined]
                assert "queue full" in err.details()  # type: ignore[attr-defined]
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert len(codes) == 6
    assert codes.count(None) >= 1
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {None, grpc.StatusCode.RESOURCE_EXHAUSTED}
