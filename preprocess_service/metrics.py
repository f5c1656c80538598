"""Prometheus metrics of the analysis service (own registry; served on their own port).

Names follow Prometheus conventions: ``_total`` counters, ``_seconds`` histograms, base units.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: the stages of one study, in order (histogram label ``stage`` and the response's ``timings_s`` keys)
STAGES: tuple[str, ...] = (
    "receive",
    "parse",
    "select",
    "assemble",
    "resample",
    "normalize",
    "infer",
    "candidates",
    "encode",
)
_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """The service's metrics in one registry (a test or a second server in one process gets its own)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mpmri_requests",
            "Finished RPCs by method and gRPC status code.",
            ("method", "code"),
            registry=self.registry,
        )
        self.in_flight = Gauge("mpmri_requests_in_flight", "RPCs being processed now.", registry=self.registry)
        self.queue_depth = Gauge(
            "mpmri_queue_depth", "Studies received and waiting for a processing slot.", registry=self.registry
        )
        self.stage_seconds = Histogram(
            "mpmri_stage_duration_seconds",
            "Time per study spent in each stage.",
            ("stage",),
            buckets=_BUCKETS_S,
            registry=self.registry,
        )
        self.study_bytes = Histogram(
            "mpmri_study_size_bytes",
            "Bytes received per study.",
            buckets=tuple(float(1 << n) for n in range(16, 32, 2)),
            registry=self.registry,
        )
        self.triton_ready = Gauge(
            "mpmri_triton_ready", "1 while Triton and the ensemble are ready, else 0.", registry=self.registry
        )
        self.duplicates = Counter(
            "mpmri_duplicate_instances", "Resent instances dropped (same SOP instance twice).", registry=self.registry
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)

    def observe_timings(self, timings_s: dict[str, float]) -> None:
        for stage, seconds in timings_s.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage=stage).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Start the ``/metrics`` HTTP endpoint; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
