"""Shared fixtures. Studies are synthetic (mpmri synth): no patient data reaches these tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four synthetic studies (seed 1234) written as DICOM folders; returns the case directories."""
    from synth.generator import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    return generate_dataset(out, cases=4, seed=1234)


@pytest.fixture(scope="session")
def synthetic_case(synthetic_dataset: list[Path]) -> Path:
    """One synthetic case directory: ``<case>/dicom/<series>/*.dcm`` and ``<case>/ground_truth.json``."""
    return synthetic_dataset[0]
