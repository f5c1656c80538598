"""``training.evaluate.lesion_map_response``: which map answers which kind of lesion (synthetic studies only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from networks.models import build_networks
from training.data import CaseRecord, prepare_synthetic_case
from training.evaluate import lesion_map_response, predict_record


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


def test_the_no_map_column_reads_the_images_alone_whatever_the_localization_says(
    records: list[CaseRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cspca_without_map`` is the classification network given an all-zero fused map. With a network whose score
    is the map itself (5 where the map is 1, 1 where it is 0), a localization that fires everywhere makes every
    lesion answer in ``cspca`` and none in ``cspca_without_map``."""
    nets = build_networks("cpu").eval()
    monkeypatch.setattr(nets.classification, "raw_score", lambda images, fused_map: 1.0 + 4.0 * fused_map)
    with torch.no_grad():
        nets.localization.logit_bias.fill_(30.0)
    response = lesion_map_response(nets, records)
    assert response
    for key, group in response.items():
        assert (group["cspca"], group["cspca_without_map"]) == (1.0, 0.0), key


@pytest.mark.parametrize(("logit", "responds"), [(5.0, 1.0), (-5.0, 0.0)])
def test_the_lesion_scorer_column_is_the_served_likelihood_of_the_candidate_on_each_lesion(
    records: list[CaseRecord], logit: float, responds: float
) -> None:
    """With a localization that fires everywhere, one candidate covers every lesion; a scorer that gives every
    candidate ``sigmoid(logit)`` makes every lesion answer (or none). Without a scorer there is no such column."""
    from postprocessing.lesion_scoring import FEATURE_NAMES, LesionScorer, Tree

    nets = build_networks("cpu").eval()
    with torch.no_grad():
        nets.localization.logit_bias.fill_(30.0)
    leaf = Tree(feature=(-1,), threshold=(0.0,), left=(0,), right=(0,), value=(logit,), missing_left=(False,))
    scorer = LesionScorer(FEATURE_NAMES, 0.0, (leaf,), 0.02)
    scored = [predict_record(nets, r, baselines=False, scorer=scorer).candidate_map for r in records]
    response = lesion_map_response(nets, records, scored)
    assert response
    assert all(group["scorer"] == responds for group in response.values())
    assert "scorer" not in next(iter(lesion_map_response(nets, records).values()))
