"""``mpmri bench service``: the analysis service end to end, against its stages measured alone, in one run.

* Latency (interleaved rounds, same study): preprocessing alone (in this process, the service's settings),
  ensemble alone (Triton gRPC, plain tensors), end to end through the service with plain tensors and with
  system shared memory, and end to end with SEG/SR. Goal: end to end ≤ 1.10 × (preprocessing + ensemble),
  the per-round ratio's median.
* Throughput at concurrency 1, 2, 4, 8 against each stage alone at saturation. Goal: ≥ 90 % of the bound
  set by the slowest stage. On one host both stages share the CPUs, so the shared-CPU bound
  ``1 / (1/P + 1/T)`` is reported too.
* Service memory per in-flight study: (peak RSS at concurrency 8 − idle RSS) / 8.

Writes its own section of ``BENCHMARKS.md`` (between ``<!-- serving:service:begin/end -->``).
All studies are synthetic (`mpmri synth`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

SECTION_BEGIN = "<!-- serving:service:begin -->"
SECTION_END = "<!-- serving:service:end -->"


def register(bench_sub: Any) -> None:
    p = bench_sub.add_parser("service", help="the analysis service end to end vs its stages alone")
    p.add_argument("--repository", type=Path, default=Path("out/bench_service/model_repository"))
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint to serve (default: the shipped one); the repository is exported again when it is not "
        "current for it (e.g. left by an older version)",
    )
    p.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated concurrency levels")
    p.add_argument("--requests-per-level", type=int, default=16, help="studies sent per concurrency level")
    p.add_argument("--saturation-requests", type=int, default=16, help="studies per stage-alone saturation run")
    p.add_argument("--benchmarks-md", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--note", default="", help="free text for the report (e.g. what else ran on the machine)")
    p.set_defaults(func=run)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes(self.pid))

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _saturate(fn: Callable[[], Any], threads: int, requests: int) -> float:
    """Studies per second with ``threads`` callers sharing ``requests`` calls."""
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: fn(), range(requests)))
    return requests / (time.perf_counter() - t)


def _q(values: list[float]) -> tuple[float, float, float]:
    q = np.percentile(values, [25, 50, 75])
    return float(q[1]), float(q[0]), float(q[2])


def run(args: argparse.Namespace) -> int:
    from mpmri_client import AnalysisClient, ChannelOptions
    from networks.checkpoint import DEFAULT_CHECKPOINT
    from preprocess_service.cli import ensure_repository
    from preprocess_service.launcher import start_service
    from preprocess_service.triton import load_served_model
    from preprocessing import PreprocessSettings, preprocess_study
    from serving.embedded import EmbeddedTriton, free_ports
    from serving.perf import machine_description, update_benchmarks_md
    from serving.triton_client import EnsembleClient
    from synth.generator import synthesize_study, write_study

    ensure_repository(args.repository, args.checkpoint or DEFAULT_CHECKPOINT)
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="mpmri_bench_service_"))
    case = write_study(synthesize_study(7, 0), work / "study")
    instances = [p.read_bytes() for p in sorted((case / "dicom").rglob("*")) if p.is_file()]
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"study: {len(instances)} instances, {sum(map(len, instances)) / 1e6:.1f} MB (synthetic)", flush=True)

    http_port, grpc_port, metrics_port = free_ports(3)
    with EmbeddedTriton(args.repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port) as tr:
        import asyncio

        import tritonclient.grpc.aio as triton_aio

        async def contract() -> Any:
            client = triton_aio.InferenceServerClient(tr.grpc_url)
            try:
                return (await load_served_model(client)).contract
            finally:
                await client.close()

        served = asyncio.run(contract())
        settings = PreprocessSettings(grid=served.grid, normalization=served.normalization)
        pre = preprocess_study(instances, settings)
        common = {"MPMRI_MAX_CONCURRENT": "8", "MPMRI_MAX_QUEUE": "64", "MPMRI_PREPROCESS_WORKERS": "2"}
        plain = start_service(tr.grpc_url, work, env={**common, "MPMRI_TRITON_SHARED_MEMORY": "none"})
        shm = start_service(tr.grpc_url, work, env={**common, "MPMRI_TRITON_SHARED_MEMORY": "system"})
        try:
            options = ChannelOptions(retries=0)
            with (
                EnsembleClient(tr.grpc_url) as ensemble,
                AnalysisClient(plain.target, options) as c_plain,
                AnalysisClient(shm.target, options) as c_shm,
            ):
                samplers: dict[str, Callable[[], Any]] = {
                    "preprocess": lambda: preprocess_study(instances, settings),
                    "ensemble": lambda: ensemble.infer(pre.tensor, pre.availability),
                    "e2e_plain": lambda: c_plain.analyze(instances, timeout_s=300),
                    "e2e_shm": lambda: c_shm.analyze(instances, timeout_s=300),
                    "e2e_seg_sr": lambda: c_plain.analyze(instances, timeout_s=300, include_dicom_outputs=True),
                }
                for fn in samplers.values():  # warm-up: first calls pay imports and caches
                    fn()
                rounds: list[dict[str, float]] = []
                order = list(samplers)
                for r in range(args.rounds):
                    rotated = order[r % len(order) :] + order[: r % len(order)]
                    rounds.append({name: _timed(samplers[name]) for name in rotated})
                print(f"latency: {args.rounds} interleaved rounds done", flush=True)

                saturation = {
                    "preprocess": _saturate(samplers["preprocess"], 2, args.saturation_requests),
                    "ensemble": _saturate(samplers["ensemble"], 4, args.saturation_requests),
                }
                idle_rss = _rss_bytes(plain.process.pid)
                throughput: dict[int, dict[str, float]] = {}
                for level in levels:
                    latencies: list[float] = []

                    def one(_: int, sink: list[float] = latencies) -> None:
                        sink.append(_timed(samplers["e2e_plain"]))

                    with _RssSampler(plain.process.pid) as rss:
                        t = time.perf_counter()
                        with ThreadPoolExecutor(level) as pool:
                            list(pool.map(one, range(args.requests_per_level)))
                        wall = time.perf_counter() - t
                    throughput[level] = {
                        "studies_per_s": args.requests_per_level / wall,
                        "latency_median_s": statistics.median(latencies),
                        "peak_rss": float(rss.peak),
                    }
                    print(f"concurrency {level}: {throughput[level]['studies_per_s']:.2f} studies/s", flush=True)
        finally:
            plain.process.stop()
            shm.process.stop()
    load_end = os.getloadavg()

    section = _section(args, rounds, saturation, throughput, idle_rss, len(instances), load_start, load_end)
    section = section.replace("{machine}", machine_description()).replace(
        "{date}", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    )
    update_benchmarks_md(args.benchmarks_md, section, SECTION_BEGIN, SECTION_END)
    print(section)
    return 0


def _section(
    args: argparse.Namespace,
    rounds: list[dict[str, float]],
    saturation: dict[str, float],
    throughput: dict[int, dict[str, float]],
    idle_rss: int,
    num_instances: int,
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float],
) -> str:
    def ms(name: str) -> str:
        med, lo, hi = _q([r[name] * 1000 for r in rounds])
        return f"{med:.1f} ({lo:.1f}–{hi:.1f})"

    ratio = [r["e2e_plain"] / (r["preprocess"] + r["ensemble"]) for r in rounds]
    ratio_med, ratio_lo, ratio_hi = _q(ratio)
    shm_vs_plain = [r["e2e_shm"] / r["e2e_plain"] for r in rounds]
    shm_med, shm_lo, shm_hi = _q(shm_vs_plain)
    slowest = min(saturation.values())
    shared = 1.0 / sum(1.0 / v for v in saturation.values())
    best_level = max(throughput, key=lambda c: throughput[c]["studies_per_s"])
    best = throughput[best_level]["studies_per_s"]
    top = max(throughput)
    per_study_mb = (throughput[top]["peak_rss"] - idle_rss) / top / 1e6
    lines = [
        SECTION_BEGIN,
        "## Analysis service end to end — `mpmri bench service` (`preprocess_service/bench.py`)",
        "",
        "- Date (UTC): {date}; machine: {machine}",
        f"- Command: `mpmri bench service --rounds {args.rounds} --concurrency {args.concurrency} "
        f"--requests-per-level {args.requests_per_level}`" + (f"; note: {args.note}" if args.note else ""),
        f"- Study: synthetic (seed 7, case 0; {num_instances} instances), the shipped CPU checkpoint on the embedded "
        "CPU Triton; the service (`mpmri-service`, 2 preprocessing workers, 8 slots) and Triton share the "
        "machine's cores. Load average at start / end: "
        f"{load_start[0]:.2f} / {load_end[0]:.2f}.",
        "",
        f"### Latency, one study at a time ({args.rounds} interleaved rounds; median (IQR), ms)",
        "",
        "| stage / path | latency ms |",
        "|---|---|",
        f"| preprocessing alone (in-process, bytes → tensor) | {ms('preprocess')} |",
        f"| ensemble alone (Triton gRPC, plain tensors) | {ms('ensemble')} |",
        f"| end to end through the service, plain gRPC tensors | {ms('e2e_plain')} |",
        f"| end to end, system shared memory to Triton | {ms('e2e_shm')} |",
        f"| end to end with DICOM SEG + SR | {ms('e2e_seg_sr')} |",
        "",
        f"- End to end / (preprocessing + ensemble), per round: median **{ratio_med:.3f}** "
        f"(IQR {ratio_lo:.3f}–{ratio_hi:.3f}); goal ≤ 1.10: **{'met' if ratio_med <= 1.10 else 'not met'}**.",
        f"- Shared memory / plain tensors, end to end per round: {shm_med:.3f} (IQR {shm_lo:.3f}–{shm_hi:.3f}).",
        "",
        f"### Throughput ({args.requests_per_level} studies per level)",
        "",
        "| concurrency | studies/s | median latency ms | service peak RSS MB |",
        "|---|---|---|---|",
    ]
    for level, row in throughput.items():
        latency_ms, rss_mb = row["latency_median_s"] * 1000, row["peak_rss"] / 1e6
        lines.append(f"| {level} | {row['studies_per_s']:.2f} | {latency_ms:.0f} | {rss_mb:.0f} |")
    lines += [
        "",
        f"- Stages alone at saturation: preprocessing {saturation['preprocess']:.2f} studies/s (2 threads), "
        f"ensemble {saturation['ensemble']:.2f} studies/s (4 callers).",
        f"- Bound of the slowest stage: {slowest:.2f} studies/s; best service throughput {best:.2f} studies/s "
        f"(concurrency {best_level}) = **{best / slowest:.0%}** of it; goal ≥ 90 %: "
        f"**{'met' if best >= 0.9 * slowest else 'not met'}**.",
        f"- Both stages run on the same cores here, so the shared-CPU bound 1/(1/P + 1/T) = {shared:.2f} "
        f"studies/s applies on this machine: the service reaches {best / shared:.0%} of it. With Triton on a GPU "
        "node the slowest-stage bound applies (preprocessing: add service replicas).",
        f"- Service memory per in-flight study: {per_study_mb:.1f} MB "
        f"((peak RSS at concurrency {top} − idle {idle_rss / 1e6:.0f} MB) / {top}).",
        "",
        SECTION_END,
    ]
    return "\n".join(lines)
