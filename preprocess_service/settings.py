"""One settings object for the analysis service, from command-line flags and ``MPMRI_*`` environment variables.

Precedence: flag > environment variable > default. Every setting has both (``--max-queue`` and
``MPMRI_MAX_QUEUE``), so a container or Helm chart configures the service through its environment alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from contract.errors import MpmriError


class SettingsError(MpmriError):
    """A setting has an invalid value (names the setting and the value)."""


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """Settings of the analysis service.

    Attributes:
        host: listen address of the gRPC server (``0.0.0.0`` in containers).
        port: gRPC port (0: pick a free one, reported on start).
        metrics_port: Prometheus ``/metrics`` port (0: pick a free one; -1: no metrics endpoint).
        triton_url: Triton's gRPC ``host:port``.
        triton_shared_memory: ``"none"`` (tensors in the gRPC body) or ``"system"`` (POSIX shared memory;
            only when Triton runs on the same host or pod).
        model_name: the Triton ensemble.
        tls_cert, tls_key: server certificate and key (PEM paths): enable TLS.
        tls_client_ca: CA bundle (PEM) for client certificates: enables mutual TLS (requires TLS).
        auth_token_file: file with the bearer token; when set, every call needs ``authorization: Bearer …``.
        max_message_bytes: largest gRPC message either way (chunks in, responses out).
        max_study_bytes: largest study (sum of instance bytes); larger studies get RESOURCE_EXHAUSTED.
        max_instances: most DICOM instances in one study.
        max_concurrent: studies processed at once (preprocessing of one overlaps inference of another).
        max_queue: studies waiting for a slot; one more gets RESOURCE_EXHAUSTED.
        preprocess_workers: threads that preprocess (CPU bound: about the number of cores).
        series_rules: series-rules JSON (default: the packaged ``preprocessing/series_rules.json``).
        triton_timeout_s: per-inference timeout towards Triton.
        triton_retries: retries of an inference on UNAVAILABLE (exponential backoff from 0.2 s).
        health_interval_s: how often Triton's readiness is polled for the health service.
        dicomweb_timeout_s: timeout of one WADO-RS / STOW-RS call.
        grace_s: how long in-flight calls may finish on shutdown.
        log_format: ``"json"`` (one object per line) or ``"text"``.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 8090
    triton_url: str = "127.0.0.1:8001"
    triton_shared_memory: str = "none"
    model_name: str = "mpmri_ensemble"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    max_message_bytes: int = 16 << 20
    max_study_bytes: int = 2 << 30
    max_instances: int = 5000
    max_concurrent: int = 4
    max_queue: int = 16
    preprocess_workers: int = 2
    series_rules: Path | None = None
    triton_timeout_s: float = 60.0
    triton_retries: int = 3
    health_interval_s: float = 1.0
    dicomweb_timeout_s: float = 60.0
    grace_s: float = 10.0
    log_format: str = "json"

    def __post_init__(self) -> None:
        if self.triton_shared_memory not in ("none", "system"):
            raise SettingsError(f"triton_shared_memory must be 'none' or 'system', got {self.triton_shared_memory!r}")
        if self.log_format not in ("json", "text"):
            raise SettingsError(f"log_format must be 'json' or 'text', got {self.log_format!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("max_message_bytes", "max_study_bytes", "max_instances", "max_concurrent", "preprocess_workers"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise SettingsError(f"max_queue must be >= 0, got {self.max_queue}")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "series_rules"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise SettingsError(f"{name}: {path} is not a readable file")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def auth_token(self) -> str | None:
        if self.auth_token_file is None:
            return None
        token = Path(self.auth_token_file).read_text().strip()
        if not token:
            raise SettingsError(f"auth_token_file {self.auth_token_file} is empty")
        return token


def _env_name(field: str) -> str:
    return "MPMRI_" + field.upper()


def _convert(field: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(field.type)
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if "Path" in kind:
            return Path(raw) if raw else None
    except ValueError:
        raise SettingsError(f"{_env_name(field.name)}={raw!r} is not a valid {kind}") from None
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (``--max-queue``); the help names its environment variable and default."""
    for field in dataclasses.fields(ServiceSettings):
        default = field.default
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            default=None,
            metavar=field.name.upper(),
            help=f"env {_env_name(field.name)}; default {default}",
        )


def settings_from(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> ServiceSettings:
    """Settings from flags (``args``), then the environment, then defaults; ``overrides`` win over all."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in dataclasses.fields(ServiceSettings):
        raw = getattr(args, field.name, None) if args is not None else None
        if raw is None:
            raw = env.get(_env_name(field.name))
        if raw is not None:
            values[field.name] = _convert(field, str(raw))
    values.update(overrides)
    return ServiceSettings(**values)


def parse_settings(argv: Sequence[str] | None = None) -> ServiceSettings:
    parser = argparse.ArgumentParser(prog="mpmri-service", description="the mpmri analysis service (gRPC)")
    add_arguments(parser)
    return settings_from(parser.parse_args(argv))
