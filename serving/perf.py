"""``mpmri bench triton``: perf_analyzer against the ensemble and each composing model, plus the in-process
onnxruntime chain of the same three ONNX models as the baseline, measured in the same run.

Outputs: a CSV per run under ``benchmarks/results/`` and a markdown section (between the markers
:data:`SECTION_BEGIN` / :data:`SECTION_END`) in ``BENCHMARKS.md``.

perf_analyzer comes from ``scripts/install_perf_analyzer.sh`` (run automatically when missing).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime as dt
import json
import logging
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from export.onnx_export import ort_chain, ort_session, parity_inputs
from export.repository import MODEL_VERSION, NETWORK_MODELS, ONNX_FILENAME, parse_config
from mpmri.contract import DEFAULT_GRID, ENSEMBLE_MODEL, MODEL_IO, tensor_specs
from mpmri.errors import MpmriError
from serving.embedded import EmbeddedTriton
from serving.triton_env import REPO_ROOT

LOG = logging.getLogger(__name__)
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_perf_analyzer.sh"
PERF_ANALYZER = REPO_ROOT / ".tools" / "bin" / "perf_analyzer"
SECTION_BEGIN = "<!-- serving:triton:begin -->"
SECTION_END = "<!-- serving:triton:end -->"


class BenchmarkError(MpmriError):
    """perf_analyzer could not be installed or run, or its output was unusable."""


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Settings of one ``mpmri bench triton`` run.

    Attributes:
        concurrency: perf_analyzer concurrency sweep (requests in flight).
        measurement_interval_ms: perf_analyzer measurement window per trial.
        protocol: ``grpc`` or ``http``.
        batch_size: requests' batch size (1 = one study per request).
        models: models to measure (ensemble first).
        baseline_iterations: in-process onnxruntime chain runs (after warm-up) per baseline measurement.
        out_dir: CSV folder; benchmarks_md: markdown file whose serving section is replaced.
        shared_memory: perf_analyzer ``--shared-memory`` (``none``/``system``/``cuda``): ``system`` passes
            inputs and outputs through POSIX shared memory like ``EnsembleClient(shared_memory="system")``.
        inputs_npz: optional preprocessed study (``images [S,D,H,W]``, ``availability [S]``); otherwise
            realistic synthetic-like tensors (:func:`export.onnx_export.parity_inputs`).
    """

    concurrency: tuple[int, ...] = (1, 2, 4)
    measurement_interval_ms: int = 3000
    protocol: str = "grpc"
    batch_size: int = 1
    models: tuple[str, ...] = (ENSEMBLE_MODEL, *NETWORK_MODELS)
    baseline_iterations: int = 100
    out_dir: Path = Path("benchmarks") / "results"
    benchmarks_md: Path = Path("BENCHMARKS.md")
    inputs_npz: Path | None = None
    shared_memory: str = "system"


def ensure_perf_analyzer() -> Path:
    """Path of a working perf_analyzer launcher; runs the idempotent install script when missing."""
    if PERF_ANALYZER.exists():
        probe = subprocess.run([str(PERF_ANALYZER), "--version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return PERF_ANALYZER
    LOG.info("installing perf_analyzer (%s)", INSTALL_SCRIPT)
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not PERF_ANALYZER.exists():
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise BenchmarkError(f"perf_analyzer install failed ({INSTALL_SCRIPT}): {tail}")
    return PERF_ANALYZER


def synthetic_study(seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic study (``mpmri synth``) run through preprocessing: ``images [1,S,D,H,W]``, ``availability [1,S]``.

    Falls back to realistic random tensors (:func:`export.onnx_export.parity_inputs`) when the synth or
    preprocessing packages are not importable.
    """
    import tempfile

    try:
        from preprocess_service.pipeline import preprocess_study
        from synth.generator import generate_dataset
    except ImportError as err:
        LOG.warning("synth/preprocess not available (%s): using synthetic-like random tensors", err)
        sample = parity_inputs(DEFAULT_GRID, batch=1, seed=seed)
        return sample["images"], sample["availability"]
    with tempfile.TemporaryDirectory(prefix="mpmri_bench_") as tmp:
        case_dir = generate_dataset(Path(tmp), cases=1, seed=seed)[0]
        study = preprocess_study(case_dir / "dicom")
    return study.tensor[None].astype(np.float32), study.availability[None].astype(np.float32)


def study_tensors(inputs_npz: Path | None, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Ensemble inputs ``images [B,S,D,H,W]``, ``availability [B,S]`` (float32) for one study repeated B times."""
    if inputs_npz is not None:
        with np.load(inputs_npz) as data:
            images = np.asarray(data["images"], np.float32)
            availability = np.asarray(data["availability"], np.float32)
        if images.ndim == 4:
            images, availability = images[None], availability[None]
        images, availability = images[:1], availability[:1]
    else:
        images, availability = synthetic_study(seed=5)
    return {
        "images": np.repeat(images, batch_size, axis=0),
        "availability": np.repeat(availability, batch_size, axis=0),
    }


def write_input_data(path: Path, model: str, tensors: dict[str, np.ndarray]) -> Path:
    """perf_analyzer ``--input-data`` JSON for ``model`` (one request, binary ``b64`` content, no batch axis)."""
    entry = {}
    for name in MODEL_IO[model][0]:
        array = np.ascontiguousarray(tensors[name][0], dtype=np.float32)
        entry[name] = {"b64": base64.b64encode(array.tobytes()).decode("ascii"), "shape": list(array.shape)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": [entry]}))
    return path


def run_perf_analyzer(
    url: str, model: str, input_data: Path, concurrency: int, settings: BenchSettings, csv_path: Path
) -> dict[str, float]:
    """One perf_analyzer measurement; returns the CSV row (latencies in microseconds) as floats."""
    binary = ensure_perf_analyzer()
    cmd = [
        str(binary),
        "-m", model,
        "-u", url,
        "-i", settings.protocol,
        "-b", str(settings.batch_size),
        "--input-data", str(input_data),
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "--measurement-interval", str(settings.measurement_interval_ms),
        "--stability-percentage", "25",
        "--max-trials", "8",
        "-f", str(csv_path),
    ]  # fmt: skip
    if settings.shared_memory != "none":
        largest_output = (
            max(int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize for spec in tensor_specs().values())
            * settings.batch_size
        )
        cmd += [f"--shared-memory={settings.shared_memory}", f"--output-shared-memory-size={largest_output}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "stable measurement" in proc.stdout + proc.stderr:
        # shared, noisy CPUs: retry once with a window twice as long and a looser stability criterion
        LOG.warning("perf_analyzer: no stable measurement for %s (concurrency %d); retrying", model, concurrency)
        interval = cmd.index("--measurement-interval") + 1
        cmd[interval] = str(2 * settings.measurement_interval_ms)
        cmd[cmd.index("--stability-percentage") + 1] = "50"
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not csv_path.exists():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
        raise BenchmarkError(f"perf_analyzer failed on {model} (concurrency {concurrency}): {tail}")
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise BenchmarkError(f"perf_analyzer wrote no results for {model}")
    return {k: float(v) for k, v in rows[0].items() if k and v not in (None, "")}


@dataclasses.dataclass(frozen=True)
class BaselineResult:
    """In-process onnxruntime chain latency (milliseconds) for one study per call."""

    p50_ms: float
    mean_ms: float
    iterations: int


def measure_inprocess_chain(repository: Path, tensors: dict[str, np.ndarray], iterations: int) -> BaselineResult:
    """The three ONNX models chained in-process with the CPU config's onnxruntime threads (spinning off)."""
    threads = int(
        parse_config(repository / NETWORK_MODELS[0] / "configs" / "cpu.pbtxt")
        .parameters["intra_op_thread_count"]
        .string_value
    )
    sessions = {m: ort_session(repository / m / MODEL_VERSION / ONNX_FILENAME, threads=threads) for m in NETWORK_MODELS}
    for _ in range(5):
        ort_chain(sessions, tensors)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        ort_chain(sessions, tensors)
        times.append((time.perf_counter() - start) * 1e3)
    return BaselineResult(statistics.median(times), statistics.fmean(times), iterations)


def _machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def render_markdown(
    rows: list[dict[str, float | str]], baseline: list[BaselineResult], settings: BenchSettings, csv_path: Path
) -> str:
    """The serving section of BENCHMARKS.md (between the markers)."""
    # conservative: the least-disturbed baseline run (shared CPUs make single runs noisy)
    base_p50 = min(b.p50_ms for b in baseline)
    ensemble_c1 = next(r for r in rows if r["model"] == ENSEMBLE_MODEL and r["concurrency"] == settings.concurrency[0])
    ratio = float(ensemble_c1["p50_ms"]) / base_p50
    lines = [
        SECTION_BEGIN,
        "## Serving: Triton (embedded CPU tritonserver 2.51) — `mpmri bench triton`",
        "",
        f"- Date (UTC): {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')}; machine: {_machine()}",
        f"- perf_analyzer 2.60 over {settings.protocol} (shared memory: {settings.shared_memory}), "
        f"batch {settings.batch_size}, measurement window "
        f"{settings.measurement_interval_ms} ms; raw CSV: `{csv_path}`",
        f"- Baseline: the same three ONNX models chained in-process with onnxruntime (same threads, spinning off), "
        f"p50 {base_p50:.2f} ms (fastest of the runs before/after: "
        f"{', '.join(f'{b.p50_ms:.2f}' for b in baseline)} ms)",
        f"- **Ensemble p50 at batch 1 / in-process chain p50: {ratio:.3f}x** (goal <= 1.05x)",
        "",
        "| model | concurrency | throughput (infer/s) | p50 (ms) | p90 (ms) | p99 (ms) "
        "| server queue (ms) | server compute (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['concurrency']} | {float(r['throughput']):.1f} | {float(r['p50_ms']):.2f} | "
            f"{float(r['p90_ms']):.2f} | {float(r['p99_ms']):.2f} | {float(r['queue_ms']):.2f} "
            f"| {float(r['compute_ms']):.2f} |"
        )
    lines += [
        "",
        "Notes: 2 shared cores (other jobs ran at the same time): single runs vary by up to 2x, so compare only "
        "within one run. Tuning in configs/cpu.pbtxt: onnxruntime spinning off (~20% lower latency measured "
        "earlier on this machine), 2 intra-op threads, no batcher queue delay, one instance per model; the "
        "client side uses system shared memory (A/B here, same server, one run each: 26.9 ms without vs "
        "24.9 ms with, within the noise). Concurrency > 1 buys no throughput on 2 cores (queueing only).",
        "",
        SECTION_END,
    ]
    return "\n".join(lines)


def update_benchmarks_md(path: Path, section: str) -> None:
    """Replace (or append) the serving section of ``path``; other sections stay untouched."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        tail = rest.split(SECTION_END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def run_triton_benchmark(server: EmbeddedTriton, settings: BenchSettings) -> dict[str, object]:
    """Baseline, server start, perf_analyzer sweep over models x concurrency, baseline again, reports."""
    ensure_perf_analyzer()
    repository = server.repository
    tensors = study_tensors(settings.inputs_npz, batch_size=1)
    sessions = {m: ort_session(repository / m / MODEL_VERSION / ONNX_FILENAME) for m in NETWORK_MODELS}
    all_tensors = ort_chain(sessions, tensors)  # intermediates feed the composing models' input data
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    # input JSON + raw perf_analyzer CSVs (build output, not committed)
    work = REPO_ROOT / "build" / "bench" / f"triton_{stamp}"
    baseline = [measure_inprocess_chain(repository, tensors, settings.baseline_iterations)]
    print(f"[bench] in-process onnxruntime chain p50 {baseline[0].p50_ms:.2f} ms", flush=True)
    rows: list[dict[str, float | str]] = []
    url = server.grpc_url if settings.protocol == "grpc" else server.http_url
    with server:
        for model in settings.models:
            input_data = write_input_data(work / f"{model}_input.json", model, all_tensors)
            for concurrency in settings.concurrency:
                raw = run_perf_analyzer(
                    url, model, input_data, concurrency, settings, work / f"{model}_c{concurrency}.csv"
                )
                row: dict[str, float | str] = {
                    "model": model,
                    "concurrency": concurrency,
                    "throughput": raw["Inferences/Second"],
                    "p50_ms": raw["p50 latency"] / 1e3,
                    "p90_ms": raw["p90 latency"] / 1e3,
                    "p99_ms": raw["p99 latency"] / 1e3,
                    "queue_ms": raw.get("Server Queue", 0.0) / 1e3,
                    "compute_ms": (
                        raw.get("Server Compute Input", 0.0)
                        + raw.get("Server Compute Infer", 0.0)
                        + raw.get("Server Compute Output", 0.0)
                    )
                    / 1e3,
                }
                rows.append(row)
                print(
                    f"[bench] {model:<15} c={concurrency}: {float(row['throughput']):7.1f} infer/s  "
                    f"p50 {float(row['p50_ms']):6.2f} ms  p99 {float(row['p99_ms']):6.2f} ms",
                    flush=True,
                )
    baseline.append(measure_inprocess_chain(repository, tensors, settings.baseline_iterations))
    print(f"[bench] in-process onnxruntime chain p50 {baseline[1].p50_ms:.2f} ms (after)", flush=True)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = settings.out_dir / f"triton_{stamp}.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    section = render_markdown(rows, baseline, settings, csv_path)
    update_benchmarks_md(settings.benchmarks_md, section)
    print(section, flush=True)
    return {"rows": rows, "baseline": baseline, "csv": csv_path}
