"""``training.evaluate.lesion_map_response``: which map answers which kind of lesion (synthetic studies only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from networks.models import build_networks
from training.data import CaseRecord, prepare_synthetic_case
from training.evaluate import lesion_map_response


@pytest.fixture(scope="module")
def records() -> list[CaseRecord]:
    found = [prepare_synthetic_case(1234, i) for i in range(6)]
    return [r for r in found if r.truth.get("lesions")]


def _expected_groups(records: list[CaseRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if float(r.availability.min()) < 0.5:
            continue
        for i, lesion in enumerate(r.truth["lesions"], start=1):
            if np.any(r.lesion_index == i):
                key = f"{lesion['zone']}_{lesion['kind']}"
                counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize(("bias", "responds"), [(30.0, 1.0), (-30.0, 0.0)])
def test_every_lesion_is_counted_by_zone_and_kind_and_the_rates_follow_the_maps(
    records: list[CaseRecord], bias: float, responds: float
) -> None:
    nets = build_networks("cpu").eval()
    with torch.no_grad():
        nets.localization.logit_bias.fill_(bias)  # every sequence map ~1 (or ~0) everywhere
    response = lesion_map_response(nets, records)
    expected = _expected_groups(records)
    assert expected, "the fixture studies must hold lesions"
    assert {k: v["lesions"] for k, v in response.items()} == expected
    for group in response.values():
        for name in ("t2w", "adc", "dwi", "fused", "fused_reaches_floor"):
            assert group[name] == responds, name
        assert 0.0 <= group["cspca"] <= 1.0
