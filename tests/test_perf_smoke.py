"""perf_analyzer installs and measures the served models; the BENCHMARKS.md section update keeps other sections."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from export.onnx_export import ort_chain, ort_session
from export.repository import NETWORK_MODELS
from mpmri.contract import ENSEMBLE_MODEL, FUSION_MODEL
from serving.embedded import EmbeddedTriton
from serving.perf import (
    SECTION_BEGIN,
    SECTION_END,
    BenchSettings,
    ensure_perf_analyzer,
    run_perf_analyzer,
    study_tensors,
    update_benchmarks_md,
    write_input_data,
)


@pytest.mark.triton
@pytest.mark.slow
def test_perf_analyzer_measures_ensemble_and_a_composing_model(
    triton_server: EmbeddedTriton, exported_repository: Path, tmp_path: Path
) -> None:
    ensure_perf_analyzer()  # installs into .tools/ on a fresh machine (PyPI + deb.debian.org)
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
