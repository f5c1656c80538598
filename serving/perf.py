"""``mpmri bench triton``: the ensemble against the in-process onnxruntime chain of the same three ONNX models,
measured interleaved in the same run, plus the perf_analyzer sweep over the ensemble and each composing model.

The latency goal (ensemble p50 at batch 1 <= 1.05 x chain) is judged on the median of per-round ratios,
each round measuring both sides back to back (:func:`measure_interleaved`), so the load bursts of a shared
machine hit both sides; see docs/serving.md, section 4.

Outputs: a sweep CSV and a per-request CSV per run under ``benchmarks/results/`` and a markdown section
(between the markers :data:`SECTION_BEGIN` / :data:`SECTION_END`) in ``BENCHMARKS.md``.

perf_analyzer comes from ``scripts/install_perf_analyzer.sh`` (run automatically when missing).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from contract import DEFAULT_GRID, ENSEMBLE_MODEL, MODEL_IO, GridSpec, tensor_specs
from contract.errors import MpmriError
from export.onnx_export import ort_chain, ort_session, parity_inputs
from export.repository import ALL_MODELS, MODEL_VERSION, NETWORK_MODELS, ONNX_FILENAME, parse_config, served_contract
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
        rounds, requests_per_round: the request-by-request interleaved comparison (in-process chain, ensemble
            via Python gRPC + system shared memory, ensemble via ``EnsembleClient``): rounds x requests each.
        pa_rounds, pa_requests_per_round: the block-interleaved comparison (in-process chain block, then a
            perf_analyzer block of the same size, order alternating): rounds x requests each.
        goal_ratio: the latency goal, ensemble p50 / in-process chain p50 at batch 1.
        note: free text added to the report (e.g. what else ran on the machine).
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
    rounds: int = 40
    requests_per_round: int = 10
    pa_rounds: int = 16
    pa_requests_per_round: int = 30
    goal_ratio: float = 1.05
    note: str = ""


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


def repository_grid(repository: Path) -> GridSpec:
    """The model grid the repository's ensemble serves (the contract ``mpmri export`` writes into its config)."""
    try:
        return served_contract(repository).grid
    except ValueError as err:
        raise BenchmarkError(str(err)) from err


def synthetic_study(seed: int = 5, grid: GridSpec = DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic study (``mpmri synth``) preprocessed onto ``grid``: ``images [1,S,D,H,W]``, ``availability [1,S]``.

    Falls back to realistic random tensors (:func:`export.onnx_export.parity_inputs`) when the synth or
    preprocessing packages are not importable.
    """
    import tempfile

    try:
        from preprocessing.pipeline import PreprocessSettings, preprocess_study
        from synth.generator import generate_dataset
    except ImportError as err:
        LOG.warning("synth/preprocess not available (%s): using synthetic-like random tensors", err)
        sample = parity_inputs(grid, batch=1, seed=seed)
        return sample["images"], sample["availability"]
    with tempfile.TemporaryDirectory(prefix="mpmri_bench_") as tmp:
        case_dir = generate_dataset(Path(tmp), cases=1, seed=seed)[0]
        study = preprocess_study(case_dir / "dicom", PreprocessSettings(grid=grid))
    return study.tensor[None].astype(np.float32), study.availability[None].astype(np.float32)


def study_tensors(inputs_npz: Path | None, batch_size: int = 1, grid: GridSpec = DEFAULT_GRID) -> dict[str, np.ndarray]:
    """Ensemble inputs ``images [B,S,D,H,W]``, ``availability [B,S]`` (float32) for one study repeated B times
    (without ``inputs_npz``: a synthetic study preprocessed onto ``grid``, the served repository's)."""
    if inputs_npz is not None:
        with np.load(inputs_npz) as data:
            images = np.asarray(data["images"], np.float32)
            availability = np.asarray(data["availability"], np.float32)
        if images.ndim == 4:
            images, availability = images[None], availability[None]
        images, availability = images[:1], availability[:1]
    else:
        images, availability = synthetic_study(seed=5, grid=grid)
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


def _shared_memory_args(settings: BenchSettings) -> list[str]:
    """perf_analyzer flags passing inputs and outputs through shared memory (none for ``shared_memory="none"``)."""
    if settings.shared_memory == "none":
        return []
    largest_output = (
        max(int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize for spec in tensor_specs().values())
        * settings.batch_size
    )
    return [f"--shared-memory={settings.shared_memory}", f"--output-shared-memory-size={largest_output}"]


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
    cmd += _shared_memory_args(settings)
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
    times = InprocessChainSampler(repository, tensors, warmup=5).sample(iterations)
    return BaselineResult(statistics.median(times), statistics.fmean(times), iterations)


# --------------------------------------------------------------------------------------------------
# Interleaved comparison: ensemble vs in-process chain in alternating rounds of the same run
# --------------------------------------------------------------------------------------------------
class LatencySampler(Protocol):
    """Serves ``n`` batch-1 requests one after another and returns their latencies (ms)."""

    def sample(self, n: int) -> list[float]: ...


class CallSampler:
    """A sampler whose unit is one synchronous request (:meth:`call`); can alternate request by request."""

    def call(self) -> None:
        raise NotImplementedError

    def sample(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.call()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def close(self) -> None:
        """Release connections / shared memory (no-op by default)."""


class InprocessChainSampler(CallSampler):
    """The three ONNX models of ``repository`` chained in-process with onnxruntime (the baseline).

    Same ONNX files and the same onnxruntime settings as the served models' ``configs/cpu.pbtxt``
    (intra-op threads, spinning off, sequential execution); one call = one study through all three models.
    """

    def __init__(self, repository: Path, tensors: dict[str, np.ndarray], warmup: int = 3) -> None:
        self.threads = int(
            parse_config(repository / NETWORK_MODELS[0] / "configs" / "cpu.pbtxt")
            .parameters["intra_op_thread_count"]
            .string_value
        )
        self.sessions = {
            m: ort_session(repository / m / MODEL_VERSION / ONNX_FILENAME, threads=self.threads) for m in NETWORK_MODELS
        }
        self.tensors = {name: tensors[name] for name in MODEL_IO[ENSEMBLE_MODEL][0]}
        for _ in range(warmup):
            self.call()

    def call(self) -> None:
        ort_chain(self.sessions, self.tensors)


class TritonShmSampler(CallSampler):
    """What perf_analyzer does per request, from Python: one synchronous ``infer`` with every input and
    output in registered system shared memory (inputs written once, outputs not read back).

    Only region names and shapes cross gRPC, so the latency is the server's work plus one local RPC, plus
    the Python client's request building (perf_analyzer's C++ numbers are reported next to it).
    ``outputs``: the outputs to request (default: all of the model's outputs).
    """

    def __init__(
        self,
        url: str,
        tensors: dict[str, np.ndarray],
        model: str = ENSEMBLE_MODEL,
        outputs: Sequence[str] | None = None,
        warmup: int = 3,
    ) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        self._shm = shm
        self.client = grpcclient.InferenceServerClient(url=url)
        self.model = model
        self.regions: list[tuple[str, object]] = []
        specs = tensor_specs()
        inputs_names, output_names = MODEL_IO[model][0], tuple(outputs or MODEL_IO[model][1])
        prefix = f"mpmri_bench_{os.getpid()}_{id(self)}"
        self.inputs, self.outputs = [], []
        for name in inputs_names:
            array = np.ascontiguousarray(tensors[name], dtype=specs[name].dtype)
            region = self._region(f"{prefix}_{name}", array.nbytes)
            shm.set_shared_memory_region(region, [array])
            item = grpcclient.InferInput(name, list(array.shape), specs[name].client_dtype)
            item.set_shared_memory(f"{prefix}_{name}", array.nbytes)
            self.inputs.append(item)
        batch = int(tensors[inputs_names[0]].shape[0])
        for name in output_names:
            nbytes = batch * int(np.prod(specs[name].shape)) * np.dtype(specs[name].dtype).itemsize
            self._region(f"{prefix}_{name}", nbytes)
            item = grpcclient.InferRequestedOutput(name)
            item.set_shared_memory(f"{prefix}_{name}", nbytes)
            self.outputs.append(item)
        for _ in range(warmup):
            self.call()

    def _region(self, name: str, nbytes: int) -> object:
        handle = self._shm.create_shared_memory_region(name, f"/{name}", nbytes)
        self.regions.append((name, handle))
        self.client.register_system_shared_memory(name, f"/{name}", nbytes)
        return handle

    def call(self) -> None:
        self.client.infer(self.model, self.inputs, outputs=self.outputs)

    def close(self) -> None:
        for name, handle in self.regions:
            with contextlib.suppress(Exception):  # perf_analyzer may have unregistered it already
                self.client.unregister_system_shared_memory(name)
            self._shm.destroy_shared_memory_region(handle)
        self.regions = []
        self.client.close()


class ClientLoopSampler(CallSampler):
    """:class:`serving.triton_client.EnsembleClient` calls (e.g. gRPC + system shared memory).

    Unlike perf_analyzer (inputs written to shared memory once, outputs never read), every call writes the
    inputs and copies the outputs back into numpy arrays: what an application calling the ensemble pays.
    """

    def __init__(
        self, url: str, tensors: dict[str, np.ndarray], protocol: str, shared_memory: str, warmup: int = 3
    ) -> None:
        from serving.triton_client import EnsembleClient

        self.client = EnsembleClient(url, protocol=protocol, shared_memory=shared_memory)
        self.images, self.availability = tensors["images"], tensors["availability"]
        for _ in range(warmup):
            self.call()

    def call(self) -> None:
        self.client.infer(self.images, self.availability)

    def close(self) -> None:
        self.client.close()


class PerfAnalyzerSampler:
    """perf_analyzer (concurrency 1) sending exactly ``n`` requests; per-request latencies from its profile export.

    ``--request-count n`` after ``--warmup-request-count warmup`` requests: the measured requests are the
    ones of this block only, so blocks interleave with the baseline at a granularity of ``n`` requests.
    perf_analyzer unregisters *all* shared-memory regions of the server when it starts: do not interleave
    it with :class:`TritonShmSampler` / :class:`ClientLoopSampler` on the same server.
    """

    def __init__(
        self, url: str, model: str, input_data: Path, settings: BenchSettings, work: Path, warmup: int = 3
    ) -> None:
        self.url, self.model, self.input_data, self.settings = url, model, input_data, settings
        self.work, self.warmup = work, warmup
        self.calls = 0

    def sample(self, n: int) -> list[float]:
        self.calls += 1
        export = self.work / f"{self.model}_block{self.calls}.json"
        export.parent.mkdir(parents=True, exist_ok=True)
        export.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite a profile export
        cmd = [
            str(ensure_perf_analyzer()),
            "-m", self.model,
            "-u", self.url,
            "-i", self.settings.protocol,
            "-b", str(self.settings.batch_size),
            "--input-data", str(self.input_data),
            "--concurrency-range", "1:1",
            "--request-count", str(n),
            "--warmup-request-count", str(self.warmup),
            "--profile-export-file", str(export),
            *_shared_memory_args(self.settings),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not export.exists():
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
            raise BenchmarkError(f"perf_analyzer failed on {self.model} ({n} requests): {tail}")
        return profile_export_latencies_ms(export)


def profile_export_latencies_ms(path: Path) -> list[float]:
    """Per-request latencies (ms, first response - send) from a perf_analyzer ``--profile-export-file``."""
    data = json.loads(path.read_text())
    latencies = [
        (request["response_timestamps"][0] - request["timestamp"]) / 1e6
        for experiment in data["experiments"]
        for request in experiment["requests"]
        if request.get("response_timestamps")
    ]
    if not latencies:
        raise BenchmarkError(f"perf_analyzer profile export {path} holds no completed requests")
    return latencies


@dataclasses.dataclass(frozen=True)
class InterleavedResult:
    """Latencies (ms) of several samplers measured in alternating rounds of the same run.

    Attributes:
        reference: label of the baseline sampler (the in-process chain).
        rounds: per round, ``{label: latencies_ms}`` (``requests_per_round`` each).
        orders: per round, the order the samplers ran in (rotated every round).
    """

    reference: str
    rounds: list[dict[str, list[float]]]
    orders: list[tuple[str, ...]]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.rounds[0])

    def round_p50s(self, label: str) -> list[float]:
        return [statistics.median(r[label]) for r in self.rounds]

    def ratios(self, label: str) -> list[float]:
        """Per-round p50(``label``) / p50(reference): each ratio compares neighbours in time."""
        return [a / b for a, b in zip(self.round_p50s(label), self.round_p50s(self.reference), strict=True)]

    def quiet_rounds(self, tolerance: float = 0.10) -> list[int]:
        """Rounds whose reference p50 is within ``tolerance`` of the fastest round's (no other load then).

        A fixed rule, declared before looking at the ratios: on a shared machine the reference slows down
        whenever other jobs run, so these are the rounds that measured the serving overhead itself.
        """
        p50s = self.round_p50s(self.reference)
        fastest = min(p50s)
        return [i for i, value in enumerate(p50s) if value <= (1.0 + tolerance) * fastest]

    def ratio_summary(self, label: str, rounds: Sequence[int] | None = None) -> dict[str, float]:
        """Median of the per-round ratios (all rounds, or only ``rounds``), their quartiles and extremes."""
        ratios = self.ratios(label)
        ratios = sorted(ratios if rounds is None else [ratios[i] for i in rounds])
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "min": ratios[0], "max": ratios[-1]}

    def pooled(self, label: str) -> dict[str, float]:
        """p50/p90/mean over all requests of ``label`` (all rounds pooled)."""
        values = np.asarray([v for r in self.rounds for v in r[label]])
        return {
            "p50_ms": float(np.percentile(values, 50)),
            "p90_ms": float(np.percentile(values, 90)),
            "mean_ms": float(values.mean()),
            "requests": float(values.size),
        }


def measure_interleaved(
    samplers: Mapping[str, LatencySampler],
    reference: str,
    rounds: int,
    requests_per_round: int,
    alternate: bool = False,
    block_warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> InterleavedResult:
    """Measure every sampler for ``requests_per_round`` requests per round, ``rounds`` times.

    Noise on a shared machine comes in bursts; a ratio between neighbours in time, and the median of those
    ratios over rounds, is far less sensitive to it than two separate measurements.

    Args:
        alternate: ``False``: per round, each sampler serves a block of requests (order rotated every round
            so each sampler is first / last equally often). ``True``: requests alternate one by one between
            the samplers (all must be :class:`CallSampler`; order rotated every cycle), so every sampler
            sees the same noise within a round.
        block_warmup: untimed requests a :class:`CallSampler` serves before each of its blocks (block mode),
            matching perf_analyzer's ``--warmup-request-count``.
    """
    if reference not in samplers:
        raise BenchmarkError(f"reference sampler {reference!r} is not among {sorted(samplers)}")
    labels = list(samplers)
    results: list[dict[str, list[float]]] = []
    orders: list[tuple[str, ...]] = []
    cycle = 0
    for index in range(rounds):
        shift = index % len(labels)
        order = tuple(labels[shift:] + labels[:shift])
        if alternate:
            measured: dict[str, list[float]] = {label: [] for label in labels}
            for _ in range(requests_per_round):
                shift = cycle % len(labels)
                cycle += 1
                for label in labels[shift:] + labels[:shift]:
                    sampler = samplers[label]
                    if not isinstance(sampler, CallSampler):
                        raise BenchmarkError(f"{label}: alternating needs a CallSampler")
                    start = time.perf_counter()
                    sampler.call()
                    measured[label].append((time.perf_counter() - start) * 1e3)
        else:
            measured = {}
            for label in order:
                sampler = samplers[label]
                if isinstance(sampler, CallSampler):  # perf_analyzer warms up itself (--warmup-request-count)
                    for _ in range(block_warmup):
                        sampler.call()
                measured[label] = sampler.sample(requests_per_round)
        results.append({label: measured[label] for label in labels})
        orders.append(order)
        if progress is not None:
            p50s = "  ".join(f"{label} {statistics.median(measured[label]):6.2f}" for label in labels)
            progress(f"round {index + 1}/{rounds}: p50 ms  {p50s}")
    return InterleavedResult(reference=reference, rounds=results, orders=orders)


#: Triton per-model statistics fields (``ModelInferenceStatistics.inference_stats``) in report order
STAT_FIELDS: tuple[str, ...] = ("queue", "compute_input", "compute_infer", "compute_output", "success")


def server_stats_snapshot(url: str, models: Sequence[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """Cumulative Triton statistics ``{model: {field: (count, ns)}}`` over gRPC (:data:`STAT_FIELDS`)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=url)
    try:
        snapshot = {}
        for model in models:
            stats = client.get_inference_statistics(model).model_stats[0].inference_stats
            snapshot[model] = {f: (getattr(stats, f).count, getattr(stats, f).ns) for f in STAT_FIELDS}
        return snapshot
    finally:
        client.close()


def settled_stats_snapshot(
    url: str, models: Sequence[str], timeout_s: float = 5.0, poll_s: float = 0.05
) -> dict[str, dict[str, tuple[int, int]]]:
    """:func:`server_stats_snapshot` once two consecutive reads agree (at most ``timeout_s``).

    Triton records a request's statistics just after it has sent the response, so a snapshot taken right
    after warm-up requests may miss the last of them, which then counts in the measured delta. Take the
    snapshot that precedes a measurement with this.
    """
    previous = server_stats_snapshot(url, models)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        current = server_stats_snapshot(url, models)
        if current == previous:
            return current
        previous = current
    return previous


def server_stats_delta_ms(
    before: dict[str, dict[str, tuple[int, int]]], after: dict[str, dict[str, tuple[int, int]]]
) -> dict[str, dict[str, float]]:
    """Mean milliseconds per request and field between two snapshots (``requests``: how many requests)."""
    delta: dict[str, dict[str, float]] = {}
    for model in after:
        row = {"requests": float(after[model]["success"][0] - before[model]["success"][0])}
        for field in STAT_FIELDS:
            count = after[model][field][0] - before[model][field][0]
            ns = after[model][field][1] - before[model][field][1]
            row[field] = ns / count / 1e6 if count else 0.0
        delta[model] = row
    return delta


def machine_description() -> str:
    """CPU model, logical CPUs and kernel of this machine (for benchmark reports)."""
    from preprocessing.numba_target import cpu_model_name

    return f"{cpu_model_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


@dataclasses.dataclass(frozen=True)
class ComparisonReport:
    """Everything the serving section of BENCHMARKS.md is made of.

    Attributes:
        perf_analyzer: block-interleaved in-process chain vs perf_analyzer (reference ``chain``).
        alternating: request-by-request interleaved chain vs ensemble (reference ``chain``).
        breakdown: Triton's per-model mean ms per request during the alternating phase.
        rows: perf_analyzer sweep rows (models x concurrency).
        load_average: the machine's 1-minute load average at the start and at the end of the run.
    """

    perf_analyzer: InterleavedResult
    alternating: InterleavedResult
    breakdown: dict[str, dict[str, float]]
    rows: list[dict[str, float | str]]
    load_average: tuple[float, float] = (0.0, 0.0)


#: labels of the samplers in :func:`run_triton_benchmark`
CHAIN, PA_ENSEMBLE, SHM_ENSEMBLE, CLIENT_ENSEMBLE = "chain", "perf_analyzer", "grpc_shm_loop", "ensemble_client"
_DESCRIPTIONS = {
    CHAIN: "in-process onnxruntime chain (same ONNX files, same threads, spinning off)",
    PA_ENSEMBLE: "ensemble via perf_analyzer (C++ gRPC, system shared memory in+out, concurrency 1)",
    SHM_ENSEMBLE: "ensemble via Python gRPC, system shared memory in+out (what perf_analyzer does per request)",
    CLIENT_ENSEMBLE: "ensemble via `EnsembleClient` (writes inputs, copies outputs back: application view)",
}


def _ratio_cell(result: InterleavedResult, label: str, rounds: Sequence[int] | None = None) -> str:
    r = result.ratio_summary(label, rounds)
    return f"**{r['median']:.3f}** [{r['q1']:.3f}, {r['q3']:.3f}] ({r['min']:.2f}-{r['max']:.2f})"


def render_markdown(report: ComparisonReport, settings: BenchSettings, csv_path: Path, command: str) -> str:
    """The serving section of BENCHMARKS.md (between the markers)."""
    pa, alt = report.perf_analyzer, report.alternating
    goal_ratio = pa.ratio_summary(PA_ENSEMBLE)["median"]
    met = "met" if goal_ratio <= settings.goal_ratio else "NOT met"
    lines = [
        SECTION_BEGIN,
        "## Serving: Triton (embedded CPU tritonserver 2.51) — `mpmri bench triton`",
        "",
        f"- Date (UTC): {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')}; machine: {machine_description()}",
        f"- Command: `{command}`; batch {settings.batch_size}, gRPC, system shared memory; raw CSVs: "
        f"`{csv_path}` (sweep), `{csv_path.with_name(csv_path.stem + '_rounds.csv')}` (every request)",
        "- Method: the ensemble and the in-process onnxruntime chain of the same three ONNX files are measured "
        "**interleaved in the same run**; the result is the median over rounds of p50(ensemble) / p50(chain) "
        "of the same round, so bursts of load on the shared machine hit both sides. "
        f"(a) {pa_rounds_text(settings)}; (b) {settings.rounds} rounds x {settings.requests_per_round} requests "
        "alternating request by request between the chain and two clients of the ensemble.",
        f"- Load: 1-minute load average {report.load_average[0]:.2f} at the start, {report.load_average[1]:.2f} "
        f"at the end ({os.cpu_count()} logical CPUs; above ~1 means other jobs shared the cores)"
        + (f". {settings.note}" if settings.note else ""),
        f"- **Goal: ensemble p50 at batch 1 <= {settings.goal_ratio:.2f} x in-process chain. Result "
        f"(perf_analyzer, median of {len(pa.rounds)} per-round ratios): {goal_ratio:.3f}x — {met}.**",
        "",
        "| measurement | round-ratio vs chain: median [q1, q3] (min-max) | p50 (ms) | p90 (ms) | requests |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for tag, result in (("a", pa), ("b", alt)):
        for label in result.labels:
            pooled = result.pooled(label)
            ratio = "1 (reference)" if label == result.reference else _ratio_cell(result, label)
            lines.append(
                f"| ({tag}) {_DESCRIPTIONS.get(label, label)} | {ratio} | {pooled['p50_ms']:.2f} | "
                f"{pooled['p90_ms']:.2f} | {int(pooled['requests'])} |"
            )
    quiet_cells = []
    for tag, result in (("a", pa), ("b", alt)):
        quiet = result.quiet_rounds()
        cells = ", ".join(
            f"{label} {_ratio_cell(result, label, quiet)}" for label in result.labels if label != result.reference
        )
        quiet_cells.append(f"({tag}) {len(quiet)} of {len(result.rounds)} rounds: {cells}")
    lines += [
        "",
        "Quiet rounds only (fixed rule: rounds whose chain p50 is within 10% of the run's fastest round, i.e. no "
        "other job slowed the machine): " + "; ".join(quiet_cells) + ".",
    ]
    lines += [
        "",
        "Overhead breakdown on a quiet machine, what was tuned and the A/B results: docs/serving.md, section 4.",
        "",
        "Where the ensemble's time goes (Triton statistics during (b), mean ms per request; the python-based "
        "onnxruntime backend's stub IPC is inside *infer*):",
        "",
        "| model | queue | compute input | compute infer | compute output | total (success) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, row in report.breakdown.items():
        lines.append(
            f"| {model} | {row['queue']:.3f} | {row['compute_input']:.3f} | {row['compute_infer']:.3f} | "
            f"{row['compute_output']:.3f} | {row['success']:.3f} |"
        )
    lines += [
        "",
        f"perf_analyzer sweep (measurement window {settings.measurement_interval_ms} ms, stability 25%):",
        "",
        "| model | concurrency | throughput (infer/s) | p50 (ms) | p90 (ms) | p99 (ms) "
        "| server queue (ms) | server compute (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report.rows:
        lines.append(
            f"| {r['model']} | {r['concurrency']} | {float(r['throughput']):.1f} | {float(r['p50_ms']):.2f} | "
            f"{float(r['p90_ms']):.2f} | {float(r['p99_ms']):.2f} | {float(r['queue_ms']):.2f} "
            f"| {float(r['compute_ms']):.2f} |"
        )
    lines += ["", SECTION_END]
    return "\n".join(lines)


def pa_rounds_text(settings: BenchSettings) -> str:
    return (
        f"{settings.pa_rounds} rounds, each a block of {settings.pa_requests_per_round} chain requests and a "
        f"perf_analyzer run of {settings.pa_requests_per_round} requests (`--request-count`, per-request "
        "latencies from `--profile-export-file`), order alternating"
    )


def update_benchmarks_md(path: Path, section: str, begin: str = SECTION_BEGIN, end: str = SECTION_END) -> None:
    """Replace (or append) one section of ``path`` (``section`` includes its ``begin``/``end`` markers);
    other sections stay untouched."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def write_rounds_csv(path: Path, results: dict[str, InterleavedResult]) -> Path:
    """Every measured request: ``phase, round, sampler, index, latency_ms``."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["phase", "round", "sampler", "index", "latency_ms"])
        for phase, result in results.items():
            for number, measured in enumerate(result.rounds, start=1):
                for label, values in measured.items():
                    writer.writerows([phase, number, label, i, f"{v:.4f}"] for i, v in enumerate(values))
    return path


def _sweep_row(model: str, concurrency: int, raw: dict[str, float]) -> dict[str, float | str]:
    return {
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


def run_triton_benchmark(
    server: EmbeddedTriton, settings: BenchSettings, command: str = "mpmri bench triton"
) -> dict[str, object]:
    """Interleaved ensemble-vs-chain comparison, then the perf_analyzer sweep; writes CSVs and BENCHMARKS.md.

    Phases (one server, one benchmark process):

    1. (b) request-by-request alternation: in-process chain, ensemble via Python gRPC + system shared
       memory (:class:`TritonShmSampler`), ensemble via :class:`EnsembleClient`; Triton's per-model
       statistics over this phase give the overhead breakdown.
    2. (a) block alternation: in-process chain block, perf_analyzer block (:class:`PerfAnalyzerSampler`).
       perf_analyzer unregisters all shared memory when it starts, so it runs after phase 1's clients closed.
    3. the perf_analyzer sweep over ``settings.models`` x ``settings.concurrency`` (the CSV rows).
    """
    ensure_perf_analyzer()
    repository = server.repository
    tensors = study_tensors(settings.inputs_npz, batch_size=1, grid=repository_grid(repository))
    sessions = {m: ort_session(repository / m / MODEL_VERSION / ONNX_FILENAME) for m in NETWORK_MODELS}
    all_tensors = ort_chain(sessions, tensors)  # intermediates feed the composing models' input data
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    # input JSON + raw perf_analyzer outputs (build output, not committed)
    work = REPO_ROOT / "build" / "bench" / f"triton_{stamp}"

    def progress(message: str) -> None:
        print(f"[bench] {message}", flush=True)

    rows: list[dict[str, float | str]] = []
    url = server.grpc_url if settings.protocol == "grpc" else server.http_url
    load_start = os.getloadavg()[0]
    with server:
        chain = InprocessChainSampler(repository, tensors)
        shm_loop = TritonShmSampler(server.grpc_url, tensors)
        client_loop = ClientLoopSampler(url, tensors, settings.protocol, settings.shared_memory)
        try:
            progress(f"(b) {settings.rounds} rounds x {settings.requests_per_round} requests, alternating")
            before = settled_stats_snapshot(server.grpc_url, ALL_MODELS)  # warm-up requests recorded
            alternating = measure_interleaved(
                {CHAIN: chain, SHM_ENSEMBLE: shm_loop, CLIENT_ENSEMBLE: client_loop},
                CHAIN,
                settings.rounds,
                settings.requests_per_round,
                alternate=True,
                progress=progress,
            )
            breakdown = server_stats_delta_ms(before, server_stats_snapshot(server.grpc_url, ALL_MODELS))
        finally:
            shm_loop.close()
            client_loop.close()
        ensemble_input = write_input_data(work / f"{ENSEMBLE_MODEL}_input.json", ENSEMBLE_MODEL, all_tensors)
        progress(f"(a) {settings.pa_rounds} rounds x {settings.pa_requests_per_round} requests, blocks")
        blocks = measure_interleaved(
            {CHAIN: chain, PA_ENSEMBLE: PerfAnalyzerSampler(url, ENSEMBLE_MODEL, ensemble_input, settings, work)},
            CHAIN,
            settings.pa_rounds,
            settings.pa_requests_per_round,
            progress=progress,
        )
        for model in settings.models:
            input_data = write_input_data(work / f"{model}_input.json", model, all_tensors)
            for concurrency in settings.concurrency:
                raw = run_perf_analyzer(
                    url, model, input_data, concurrency, settings, work / f"{model}_c{concurrency}.csv"
                )
                row = _sweep_row(model, concurrency, raw)
                rows.append(row)
                progress(
                    f"{model:<15} c={concurrency}: {float(row['throughput']):7.1f} infer/s  "
                    f"p50 {float(row['p50_ms']):6.2f} ms  p99 {float(row['p99_ms']):6.2f} ms"
                )
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = settings.out_dir / f"triton_{stamp}.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)
    rounds_csv = write_rounds_csv(csv_path.with_name(csv_path.stem + "_rounds.csv"), {"a": blocks, "b": alternating})
    report = ComparisonReport(
        perf_analyzer=blocks,
        alternating=alternating,
        breakdown=breakdown,
        rows=rows,
        load_average=(load_start, os.getloadavg()[0]),
    )
    section = render_markdown(report, settings, csv_path, command)
    update_benchmarks_md(settings.benchmarks_md, section)
    print(section, flush=True)
    return {"rows": rows, "report": report, "csv": csv_path, "rounds_csv": rounds_csv}
