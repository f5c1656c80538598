"""``mpmri triton`` (run the embedded CPU Triton in the foreground) and ``mpmri bench triton`` (perf_analyzer)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
from pathlib import Path
from types import FrameType

from export.repository import CPU_CONFIG_NAME, DEFAULT_REPOSITORY


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository (mpmri export)")
    parser.add_argument(
        "--address", default="127.0.0.1", help="interface to bind (127.0.0.1; 0.0.0.0 to serve other hosts)"
    )
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-level", choices=("error", "warning", "info", "verbose"), default="info")
    parser.add_argument(
        "--model-config-name",
        default=CPU_CONFIG_NAME,
        help="configs/<name>.pbtxt to use ('cpu' here; '' = config.pbtxt, the GPU production settings)",
    )
    parser.add_argument("--startup-timeout-s", type=float, default=180.0)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    triton = subparsers.add_parser("triton", help="run the embedded Triton server on the model repository")
    _add_server_args(triton)
    triton.set_defaults(func=_run_triton)

    bench = subparsers.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    perf = bench_sub.add_parser("triton", help="perf_analyzer on the ensemble and its models (+ in-process baseline)")
    _add_server_args(perf)
    perf.set_defaults(log_level="warning")
    perf.add_argument("--concurrency", default="1,2,4", help="comma-separated concurrency sweep")
    perf.add_argument("--measurement-interval-ms", type=int, default=3000)
    perf.add_argument("--out", type=Path, default=Path("benchmarks") / "results", help="CSV output folder")
    perf.add_argument("--benchmarks-md", type=Path, default=Path("BENCHMARKS.md"), help="markdown file to update")
    perf.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    perf.add_argument("--shared-memory", choices=("none", "system", "cuda"), default="system")
    perf.add_argument(
        "--inputs-npz", type=Path, default=None, help="preprocessed study: images [S,D,H,W], availability [S]"
    )
    perf.add_argument("--models", default=None, help="comma-separated models (default: ensemble + the three networks)")
    perf.add_argument("--rounds", type=int, default=40, help="request-by-request interleaved rounds (b)")
    perf.add_argument("--requests-per-round", type=int, default=10, help="requests per sampler per round (b)")
    perf.add_argument("--pa-rounds", type=int, default=16, help="chain / perf_analyzer block rounds (a)")
    perf.add_argument("--pa-requests-per-round", type=int, default=30, help="requests per block (a)")
    perf.add_argument("--note", default="", help="free text for the report (e.g. what else ran on the machine)")
    perf.set_defaults(func=_run_bench)
    from preprocess_service.bench import register as register_service_bench

    register_service_bench(bench_sub)
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])


def _server(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from serving.embedded import EmbeddedTriton

    return EmbeddedTriton(
        args.repository,
        address=args.address,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_level=args.log_level,
        model_config_name=args.model_config_name or None,
        startup_timeout_s=args.startup_timeout_s,
    )


def _run_triton(args: argparse.Namespace) -> int:
    server = _server(args)

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    with server:
        print(
            f"Triton ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}\n"
            f"log: {server.log_path}  (Ctrl-C stops)",
            flush=True,
        )
        try:
            return server.wait()
        except KeyboardInterrupt:
            return 0


def _run_bench(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from serving.perf import BenchSettings, run_triton_benchmark

    settings = BenchSettings(
        concurrency=tuple(int(c) for c in str(args.concurrency).split(",") if c),
        measurement_interval_ms=args.measurement_interval_ms,
        protocol=args.protocol,
        out_dir=args.out,
        benchmarks_md=args.benchmarks_md,
        shared_memory=args.shared_memory,
        inputs_npz=args.inputs_npz,
        rounds=args.rounds,
        requests_per_round=args.requests_per_round,
        pa_rounds=args.pa_rounds,
        pa_requests_per_round=args.pa_requests_per_round,
        note=args.note,
    )
    if args.models:
        settings = dataclasses.replace(settings, models=tuple(m for m in args.models.split(",") if m))
    command = "mpmri " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_triton_benchmark(_server(args), settings, command=command)
    return 0
