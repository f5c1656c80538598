"""perf_analyzer installs and measures the served models; the BENCHMARKS.md section update keeps other sections."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

from contract import ENSEMBLE_MODEL, FUSION_MODEL
from export.onnx_export import ort_chain, ort_session
from export.repository import NETWORK_MODELS
from serving.embedded import EmbeddedTriton
from serving.perf import (
    SECTION_BEGIN,
    SECTION_END,
    BenchSettings,
    CallSampler,
    ComparisonReport,
    InprocessChainSampler,
    InterleavedResult,
    PerfAnalyzerSampler,
    TritonShmSampler,
    ensure_perf_analyzer,
    measure_interleaved,
    profile_export_latencies_ms,
    render_markdown,
    run_perf_analyzer,
    server_stats_delta_ms,
    server_stats_snapshot,
    settled_stats_snapshot,
    study_tensors,
    update_benchmarks_md,
    write_input_data,
)


@pytest.mark.triton
@pytest.mark.slow
def test_perf_analyzer_measures_ensemble_and_a_composing_model(
    triton_server: EmbeddedTriton, exported_repository: Path, tmp_path: Path
) -> None:
    ensure_perf_analyzer()  # installs into .tools/ on a fresh machine (PyPI + Debian's archive)
    tensors = study_tensors(None)
    sessions = {m: ort_session(exported_repository / m / "1" / "model.onnx") for m in NETWORK_MODELS}
    tensors = ort_chain(sessions, tensors)
    settings = dataclasses.replace(BenchSettings(), measurement_interval_ms=500)
    for model in (FUSION_MODEL, ENSEMBLE_MODEL):
        data = write_input_data(tmp_path / f"{model}.json", model, tensors)
        row = run_perf_analyzer(triton_server.grpc_url, model, data, 1, settings, tmp_path / f"{model}.csv")
        assert row["Inferences/Second"] > 0
        assert row["p99 latency"] >= row["p50 latency"] > 0


def test_benchmarks_section_is_replaced_and_other_sections_kept(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Training\nkept\n")
    update_benchmarks_md(md, f"{SECTION_BEGIN}\nfirst\n{SECTION_END}")
    update_benchmarks_md(md, f"{SECTION_BEGIN}\nsecond\n{SECTION_END}")
    text = md.read_text()
    assert "## Training\nkept" in text and "second" in text and "first" not in text
    assert text.count(SECTION_BEGIN) == 1


def test_study_tensors_repeat_one_preprocessed_study(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((3, 16, 64, 64), dtype=np.float32)
    np.savez(tmp_path / "study.npz", images=images, availability=np.array([1, 1, 0], np.float32))
    tensors = study_tensors(tmp_path / "study.npz", batch_size=2)
    assert tensors["images"].shape == (2, 3, 16, 64, 64)
    np.testing.assert_array_equal(tensors["images"][1], images)
    np.testing.assert_array_equal(tensors["availability"], [[1, 1, 0], [1, 1, 0]])


def test_bench_inputs_are_preprocessed_onto_the_grid_the_repository_serves(tmp_path: Path) -> None:
    """A repository exported for the GPU profile's realistic grid gets realistic-grid requests, not default ones."""
    from contract import REALISTIC_GRID
    from export.repository import write_configs
    from serving.perf import repository_grid

    write_configs(tmp_path / "repo", REALISTIC_GRID)
    assert repository_grid(tmp_path / "repo") == REALISTIC_GRID
    tensors = study_tensors(None, grid=repository_grid(tmp_path / "repo"))
    assert tensors["images"].shape == (1, 3, *REALISTIC_GRID.size_dhw)


@pytest.mark.triton
@pytest.mark.slow
def test_interleaved_rounds_measure_chain_and_ensemble_on_the_same_requests(
    triton_server: EmbeddedTriton, exported_repository: Path, tmp_path: Path
) -> None:
    tensors = study_tensors(None)
    chain = InprocessChainSampler(exported_repository, tensors)
    shm_loop = TritonShmSampler(triton_server.grpc_url, tensors)
    models = (ENSEMBLE_MODEL, *NETWORK_MODELS)
    before = settled_stats_snapshot(triton_server.grpc_url, models)  # the sampler's warm-up requests recorded
    try:
        alternating = measure_interleaved({"chain": chain, "ensemble": shm_loop}, "chain", 2, 3, alternate=True)
    finally:
        shm_loop.close()
    for _ in range(20):  # Triton records a request's statistics just after it sent the response
        breakdown = server_stats_delta_ms(before, server_stats_snapshot(triton_server.grpc_url, models))
        if all(row["requests"] >= 6 for row in breakdown.values()):
            break
        time.sleep(0.1)
    assert [len(r["ensemble"]) for r in alternating.rounds] == [3, 3]
    assert breakdown[ENSEMBLE_MODEL]["requests"] == 6  # the server saw exactly the timed requests
    assert all(breakdown[m]["compute_infer"] > 0 for m in NETWORK_MODELS)

    data = write_input_data(tmp_path / "ensemble.json", ENSEMBLE_MODEL, tensors)
    pa = PerfAnalyzerSampler(triton_server.grpc_url, ENSEMBLE_MODEL, data, BenchSettings(), tmp_path, warmup=1)
    blocks = measure_interleaved({"chain": chain, "perf_analyzer": pa}, "chain", 2, 4)
    assert [len(r["perf_analyzer"]) for r in blocks.rounds] == [4, 4]
    assert blocks.orders == [("chain", "perf_analyzer"), ("perf_analyzer", "chain")]
    assert all(ratio > 0 for ratio in blocks.ratios("perf_analyzer"))


class _Scripted(CallSampler):
    """Appends its name to a shared log on every request (records the order requests were served in)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def call(self) -> None:
        self.log.append(self.name)


def test_alternating_rounds_rotate_who_goes_first_request_by_request() -> None:
    log: list[str] = []
    result = measure_interleaved(
        {"a": _Scripted("a", log), "b": _Scripted("b", log)}, "a", rounds=2, requests_per_round=2, alternate=True
    )
    assert log == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(r["a"]) for r in result.rounds] == [2, 2]


def test_ratios_are_per_round_p50_ratios_and_their_median() -> None:
    result = InterleavedResult(
        reference="chain",
        rounds=[
            {"chain": [10.0, 10.0, 30.0], "ensemble": [11.0, 12.0, 40.0]},  # p50 10 vs 12
            {"chain": [20.0, 20.0, 20.0], "ensemble": [21.0, 21.0, 21.0]},  # p50 20 vs 21
            {"chain": [10.0, 10.0, 10.0], "ensemble": [9.0, 9.0, 9.0]},  # p50 10 vs 9
        ],
        orders=[("chain", "ensemble")] * 3,
    )
    assert result.ratios("ensemble") == pytest.approx([1.2, 1.05, 0.9])
    summary = result.ratio_summary("ensemble")
    assert summary["median"] == pytest.approx(1.05)
    assert (summary["min"], summary["max"]) == pytest.approx((0.9, 1.2))
    assert result.pooled("chain")["p50_ms"] == pytest.approx(10.0)
    assert result.quiet_rounds() == [0, 2]  # round 1's chain ran at twice the fastest round's p50
    assert result.ratio_summary("ensemble", result.quiet_rounds())["median"] == pytest.approx(1.05)


def test_profile_export_gives_one_latency_per_completed_request(tmp_path: Path) -> None:
    export = tmp_path / "profile.json"
    requests = [
        {"timestamp": 1_000_000, "response_timestamps": [3_500_000]},
        {"timestamp": 4_000_000, "response_timestamps": [5_000_000, 6_000_000]},
        {"timestamp": 7_000_000, "response_timestamps": []},  # never answered: not a latency
    ]
    export.write_text(json.dumps({"experiments": [{"experiment": {}, "requests": requests}]}))
    assert profile_export_latencies_ms(export) == pytest.approx([2.5, 1.0])


def test_report_holds_the_perf_analyzer_ratio_against_the_goal(tmp_path: Path) -> None:
    def result(ratio: float, label: str) -> InterleavedResult:
        rounds = [{"chain": [10.0, 10.0, 10.0], label: [10.0 * ratio] * 3} for _ in range(3)]
        return InterleavedResult(reference="chain", rounds=rounds, orders=[("chain", label)] * 3)

    stats = {f: 1.0 for f in ("queue", "compute_input", "compute_infer", "compute_output", "success")}
    report = ComparisonReport(
        perf_analyzer=result(1.2, "perf_analyzer"),
        alternating=result(1.01, "grpc_shm_loop"),
        breakdown={ENSEMBLE_MODEL: stats},
        rows=[],
    )
    text = render_markdown(report, BenchSettings(), tmp_path / "x.csv", "mpmri bench triton")
    assert text.startswith(SECTION_BEGIN) and text.endswith(SECTION_END)
    assert "Result (perf_analyzer, median of 3 per-round ratios): 1.200x — NOT met." in text
    assert "**1.010** [1.010, 1.010]" in text  # the alternating comparison is reported too
