#!/opt/venv/bin/python
"""``mpmri-healthcheck``: exit 0 when the analysis service answers SERVING on the standard gRPC health service.

Used by the service image's ``HEALTHCHECK`` and, when TLS is on, by the chart's exec probes (Kubernetes'
native gRPC probes speak plaintext only). Reads the same environment as the service:

* ``MPMRI_PORT`` (50051): the gRPC port, reached on 127.0.0.1 inside the container.
* ``MPMRI_TLS_CERT`` / ``MPMRI_TLS_KEY``: when set, the check connects with TLS. It trusts
  ``MPMRI_HEALTHCHECK_CA``, else ``ca.crt`` beside the certificate (cert-manager secrets have one), else the
  certificate itself (self-signed). ``MPMRI_HEALTHCHECK_SERVER_NAME`` (default ``localhost``) is the name
  checked against the certificate.
* ``MPMRI_TLS_CLIENT_CA``: mutual TLS; the check presents ``MPMRI_HEALTHCHECK_CERT``/``MPMRI_HEALTHCHECK_KEY``
  when set, else the server's own certificate and key. That works when the client CA also issued the server
  certificate and the certificate allows client authentication (extended key usage clientAuth, or none).
* ``MPMRI_HEALTHCHECK_SERVICE`` (default ``""``: the whole server) and ``MPMRI_HEALTHCHECK_TIMEOUT_S`` (3).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(target: str) -> grpc.Channel:
    cert = os.environ.get("MPMRI_TLS_CERT")
    if not cert:
        return grpc.insecure_channel(target)
    cert_path = Path(cert)
    ca_candidates = [os.environ.get("MPMRI_HEALTHCHECK_CA", ""), str(cert_path.with_name("ca.crt")), cert]
    ca = next(Path(c) for c in ca_candidates if c and Path(c).is_file())
    client_key = client_cert = None
    if os.environ.get("MPMRI_TLS_CLIENT_CA"):
        client_cert = Path(os.environ.get("MPMRI_HEALTHCHECK_CERT") or cert_path).read_bytes()
        client_key = Path(os.environ.get("MPMRI_HEALTHCHECK_KEY") or os.environ["MPMRI_TLS_KEY"]).read_bytes()
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), client_key, client_cert)
    server_name = os.environ.get("MPMRI_HEALTHCHECK_SERVER_NAME", "localhost")
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", server_name)])


def main() -> int:
    target = f"127.0.0.1:{os.environ.get('MPMRI_PORT', '50051')}"
    service = os.environ.get("MPMRI_HEALTHCHECK_SERVICE", "")
    timeout = float(os.environ.get("MPMRI_HEALTHCHECK_TIMEOUT_S", "3"))
    metadata = []
    token_file = os.environ.get("MPMRI_AUTH_TOKEN_FILE")
    if token_file and Path(token_file).is_file():
        metadata.append(("authorization", f"Bearer {Path(token_file).read_text().strip()}"))
    try:
        with _channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        print(f"{target}: {err.code().name} {err.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
