"""The second-stage lesion scorer: features, the numpy evaluation of the trees, findings built with it, fitting.

Every study here is synthetic; no patient data reaches these tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contract import DEFAULT_CANDIDATES, GridGeometry
from postprocessing.lesion_scoring import (
    FEATURE_NAMES,
    LesionScorer,
    Tree,
    candidate_features,
    coherent_category,
    coherent_distribution,
    missing_as_nan,
    scorer_from_metadata,
)
from postprocessing.report import build_findings

SHAPE = (6, 16, 16)
GEOMETRY = GridGeometry((0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (1.5, 1.5, 3.0), SHAPE[::-1])


def _leaf(value: float) -> dict[str, list[float]]:
    return {"feature": [-1], "threshold": [0.0], "left": [0], "right": [0], "value": [value], "missing_left": [0]}


def _stump(feature: str, threshold: float, below: float, above: float, missing_left: bool = False) -> Tree:
    """One split on ``feature``: ``below`` at or under ``threshold``, ``above`` over it."""
    return Tree(
        feature=(FEATURE_NAMES.index(feature), -1, -1),
        threshold=(threshold, 0.0, 0.0),
        left=(1, 0, 0),
        right=(2, 0, 0),
        value=(0.0, below, above),
        missing_left=(missing_left, False, False),
    )


def _scorer(*trees: Tree, no_candidate: float = 0.03) -> LesionScorer:
    return LesionScorer(FEATURE_NAMES, 0.0, trees, no_candidate, {"data": "hand-made for tests"})


def _two_blob_study() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Ensemble outputs with two fused-map blobs: A (stronger map, bright T2W) and B (weaker map, dark T2W)."""
    fused = np.zeros(SHAPE, np.float32)
    fused[2:4, 3:6, 3:6] = 0.9  # A
    fused[2:4, 10:13, 10:13] = 0.5  # B
    images = np.zeros((3, *SHAPE), np.float32)
    images[0][2:4, 3:6, 3:6] = 1.0
    images[0][2:4, 10:13, 10:13] = -1.0
    cspca = fused * 0.8
    outputs = {
        "sequence_maps": np.zeros((3, *SHAPE), np.float32),
        "fused_map": fused[None],
        "cspca_map": cspca[None],
        "score_map": (1.0 + 4.0 * fused)[None],
        "cspca_probability": np.array([float(cspca.max())], np.float32),
        "pirads_distribution": np.full(5, 0.2, np.float32),
    }
    return outputs, images


def test_candidate_features_measure_the_blob_its_ring_and_the_network_evidence() -> None:
    images = np.zeros((3, *SHAPE), np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 5:10, 5:10] = 1
    images[0][labels == 1] = -2.0  # a dark T2W lesion in tissue at 0
    images[1][labels == 1] = 3.0
    cspca = np.where(labels == 1, 0.75, 0.01).astype(np.float32)
    score = np.where(labels == 1, 4.2, 1.0).astype(np.float32)
    fused = np.where(labels == 1, 0.6, 0.0).astype(np.float32)
    sequence_maps = np.stack([fused * 0.5, fused * 0.25, fused])
    sequence_maps[2][0, 0, 0] = 0.99  # outside the blob: not its peak
    (row,) = candidate_features(images, labels, [1], cspca, score, fused, sequence_maps, [True])
    f = dict(zip(FEATURE_NAMES, row, strict=True))
    assert f["cspca_logit"] == pytest.approx(np.log(0.75 / 0.25))
    assert (f["score_max"], f["fused_peak"]) == pytest.approx((4.2, 0.6))
    assert f["log_voxels"] == pytest.approx(np.log(75))
    assert (f["t2w_mean"], f["t2w_ring_mean"], f["t2w_contrast"], f["t2w_std"]) == pytest.approx((-2.0, 0.0, -2.0, 0.0))
    assert (f["adc_contrast"], f["dwi_contrast"]) == pytest.approx((3.0, 0.0))
    assert f["t2w_edge_gradient"] > 0 and f["dwi_edge_gradient"] == 0.0
    assert (f["extent_d"], f["extent_h"], f["extent_w"]) == (3, 5, 5)
    assert (f["t2w_map_peak"], f["adc_map_peak"], f["dwi_map_peak"]) == pytest.approx((0.3, 0.15, 0.6))
    assert f["secondary"] == 1.0


def test_candidate_features_name_a_candidate_without_voxels_and_wrong_shapes() -> None:
    images = np.zeros((3, *SHAPE), np.float32)
    maps = np.zeros(SHAPE, np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    with pytest.raises(ValueError, match="candidate 2 has no voxel"):
        candidate_features(images, labels, [2], maps, maps, maps, images, [False])
    with pytest.raises(ValueError, match="score_map has shape"):
        candidate_features(images, labels, [], maps, maps[:-1], maps, images, [])
    with pytest.raises(ValueError, match="sequence_maps has shape"):
        candidate_features(images, labels, [], maps, maps, maps, images[:2], [])
    with pytest.raises(ValueError, match="2 flags for 1 candidates"):
        candidate_features(images, labels, [2], maps, maps, maps, images, [False, True])


def test_trees_route_by_threshold_and_missing_values_as_recorded() -> None:
    scorer = _scorer(_stump("adc_mean", 0.5, -2.0, 2.0, missing_left=True))
    x = np.zeros((3, len(FEATURE_NAMES)))
    x[:, FEATURE_NAMES.index("adc_mean")] = [0.5, 0.6, np.nan]
    assert scorer.logits(x).tolist() == [-2.0, 2.0, -2.0]  # <= goes left; NaN as recorded
    # a study without ADC: its ADC features are missing, whatever the (fill-value) image said
    assert scorer.logits(x[1:2], availability=np.array([1.0, 0.0, 1.0])).tolist() == [-2.0]
    assert np.isnan(missing_as_nan(x, np.array([1.0, 1.0, 0.0]))[:, FEATURE_NAMES.index("dwi_max")]).all()


def test_scorer_round_trips_through_json_and_refuses_other_features() -> None:
    scorer = _scorer(_stump("t2w_contrast", 0.0, 1.0, -1.0), _stump("log_voxels", 2.0, -0.5, 0.5))
    again = LesionScorer.from_json(scorer.to_json())
    x = np.random.default_rng(0).normal(size=(20, len(FEATURE_NAMES)))
    assert again == scorer and np.array_equal(again.probability(x), scorer.probability(x))
    assert scorer_from_metadata({"lesion_scoring": scorer.to_dict()}) == scorer
    assert scorer_from_metadata({}) is None
    other = {**scorer.to_dict(), "feature_names": ["t2w_texture", *FEATURE_NAMES[1:]]}
    with pytest.raises(ValueError, match=r"missing \['cspca_logit'\], unknown \['t2w_texture'\].*refit"):
        scorer_from_metadata({"lesion_scoring": other})
    with pytest.raises(ValueError, match="lacks 'trees'"):
        LesionScorer.from_dict({k: v for k, v in scorer.to_dict().items() if k != "trees"})
    with pytest.raises(ValueError, match="points outside its tree"):
        LesionScorer.from_dict({**scorer.to_dict(), "trees": [{**_leaf(0.0), "feature": [3]}]})
    with pytest.raises(ValueError, match="not JSON"):
        LesionScorer.from_json("{")


def test_findings_with_a_scorer_rank_lesions_by_it_and_derive_the_study_probability() -> None:
    outputs, images = _two_blob_study()
    plain = build_findings(outputs, GEOMETRY)
    assert [round(les.likelihood, 2) for les in plain.lesions] == [0.72, 0.4]  # A first: the network's map
    # a scorer that calls dark T2W lesions csPCa (logit +2) and bright ones benign (logit -2.5: 0.076, reported)
    scorer = _scorer(_stump("t2w_mean", 0.0, 2.0, -2.5))
    scored = build_findings(outputs, GEOMETRY, scorer=scorer, images=images, availability=np.ones(3, np.float32))
    likelihoods = [les.likelihood for les in scored.lesions]
    assert likelihoods == pytest.approx([1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.5))], abs=1e-6)
    assert [les.id for les in scored.lesions] == [1, 2]
    # B is lesion 1 now, in the lesion list and in the label map (the SEG's segment numbers)
    assert scored.lesions[0].center_lps_mm == plain.lesions[1].center_lps_mm
    assert np.array_equal(scored.labels == 1, plain.labels == 2)
    assert np.array_equal(scored.labels == 2, plain.labels == 1)
    assert scored.cspca_probability == pytest.approx(max(likelihoods))
    # categories agree with the likelihoods: B (score 3.0, category 3) is csPCa by the scorer -> 4; A (score 4.6,
    # category 5) is not -> 3. The study is the highest lesion category; P(>= 4) is the study probability.
    assert [plain.lesions[1].pirads, plain.lesions[0].pirads] == [3, 5]
    assert [les.pirads for les in scored.lesions] == [4, 3] and plain.pirads_score == 5
    assert scored.pirads_score == 4
    assert sum(scored.pirads_distribution[3:]) == pytest.approx(scored.cspca_probability)
    assert scored.pirads_distribution[3] == pytest.approx(scored.pirads_distribution[4])  # network's proportions
    with pytest.raises(ValueError, match="needs the preprocessed images"):
        build_findings(outputs, GEOMETRY, scorer=scorer)


def test_a_study_without_candidates_gets_the_scorers_probability_and_at_most_category_2() -> None:
    outputs, images = _two_blob_study()
    empty = {**outputs, "fused_map": np.zeros_like(outputs["fused_map"])}
    findings = build_findings(empty, GEOMETRY, scorer=_scorer(no_candidate=0.04), images=images)
    assert findings.lesions == [] and findings.cspca_probability == pytest.approx(0.04)
    assert findings.pirads_score == 2  # the network's highest score (4.6) lies outside any lesion
    assert sum(findings.pirads_distribution) == pytest.approx(1.0)


def test_candidates_scored_below_the_reporting_floor_are_no_lesions_but_count_for_the_study() -> None:
    """``CandidateSettings.min_scored_likelihood``: a candidate the scorer puts below it is not reported (findings,
    label map, so neither SEG nor SR), the others keep their order and numbers; the study probability is still the
    highest likelihood of all candidates."""
    import dataclasses

    from contract import DEFAULT_CANDIDATES

    outputs, images = _two_blob_study()
    scorer = _scorer(_stump("t2w_mean", 0.0, -2.0, -4.0))  # A (bright): 0.018, B (dark): 0.119
    ones = np.ones(3, np.float32)
    every = build_findings(
        outputs,
        GEOMETRY,
        dataclasses.replace(DEFAULT_CANDIDATES, min_scored_likelihood=0.0),
        scorer=scorer,
        images=images,
        availability=ones,
    )
    assert [round(les.likelihood, 3) for les in every.lesions] == [0.119, 0.018]
    assert DEFAULT_CANDIDATES.min_scored_likelihood == 0.05
    reported = build_findings(outputs, GEOMETRY, scorer=scorer, images=images, availability=ones)
    assert [les.id for les in reported.lesions] == [1] and reported.lesions[0] == every.lesions[0]
    assert np.array_equal(reported.labels, np.where(every.labels == 1, 1, 0).astype(reported.labels.dtype))
    assert reported.cspca_probability == every.cspca_probability == pytest.approx(0.119, abs=1e-3)
    below = _scorer(_stump("t2w_mean", 0.0, -4.0, -4.0))  # both 0.018
    none = build_findings(outputs, GEOMETRY, scorer=below, images=images, availability=ones)
    assert none.lesions == [] and not none.labels.any()
    assert none.cspca_probability == pytest.approx(1 / (1 + np.exp(4.0)))
    assert none.pirads_score <= 2


def test_coherent_categories_and_distribution() -> None:
    assert [coherent_category(c, 0.5) for c in range(1, 6)] == [4, 4, 4, 4, 5]
    assert [coherent_category(c, 0.49) for c in range(1, 6)] == [1, 2, 3, 3, 3]
    assert coherent_distribution([0.1, 0.2, 0.1, 0.4, 0.2], 0.3) == pytest.approx([0.175, 0.35, 0.175, 0.2, 0.1])
    # no mass on a side: it goes to category 4 (csPCa) or 2
    assert coherent_distribution([0.5, 0.5, 0.0, 0.0, 0.0], 0.8) == pytest.approx([0.1, 0.1, 0.0, 0.8, 0.0])
    assert coherent_distribution([0.0, 0.0, 0.0, 0.0, 1.0], 0.1) == pytest.approx([0.0, 0.9, 0.0, 0.0, 0.1])


def test_with_a_category5_model_cspca_lesions_are_5_or_4_by_it_and_the_distribution_splits_by_it() -> None:
    """The ordinal pair: P(>= 4) is the csPCa likelihood, P(5 | >= 4) the category-5 model's; lesions under 0.5
    keep the network's category (at most 3)."""
    import dataclasses

    from postprocessing.lesion_scoring import BoostedTrees

    assert [coherent_category(c, 0.5, 0.5) for c in range(1, 6)] == [5, 5, 5, 5, 5]
    assert [coherent_category(c, 0.9, 0.49) for c in range(1, 6)] == [4, 4, 4, 4, 4]
    assert [coherent_category(c, 0.49, 0.99) for c in range(1, 6)] == [1, 2, 3, 3, 3]
    assert coherent_distribution([0.1, 0.2, 0.1, 0.4, 0.2], 0.3, 0.9) == pytest.approx([0.175, 0.35, 0.175, 0.03, 0.27])
    outputs, images = _two_blob_study()
    ones = np.ones(3, np.float32)
    # both blobs csPCa (logit +2 and +1); category 5 for the bright T2W blob A (P5 0.88), 4 for the dark B (0.12)
    both = _stump("t2w_mean", 0.0, 1.0, 2.0)
    five = BoostedTrees(0.0, (_stump("t2w_mean", 0.0, -2.0, 2.0),))
    plain = build_findings(outputs, GEOMETRY, scorer=_scorer(both), images=images, availability=ones)
    assert [les.pirads for les in plain.lesions] == [5, 4]  # the network's scores: A 4.6 (5), B 3.0 (3 -> 4)
    scorer = dataclasses.replace(_scorer(both), category5=five)
    scored = build_findings(outputs, GEOMETRY, scorer=scorer, images=images, availability=ones)
    assert [les.likelihood for les in scored.lesions] == [les.likelihood for les in plain.lesions]
    assert [les.pirads for les in scored.lesions] == [5, 4] and scored.pirads_score == 5
    p5 = 1 / (1 + np.exp(-2.0))
    assert scored.pirads_distribution[4] == pytest.approx(scored.cspca_probability * p5)
    assert scored.pirads_distribution[3] == pytest.approx(scored.cspca_probability * (1 - p5))
    flipped = dataclasses.replace(scorer, category5=BoostedTrees(0.0, (_stump("t2w_mean", 0.0, 2.0, -2.0),)))
    assert [les.pirads for les in build_findings(outputs, GEOMETRY, scorer=flipped, images=images).lesions] == [4, 5]
    # it travels with the scorer (checkpoint, model repository) and survives a recalibration
    again = LesionScorer.from_json(scorer.to_json())
    assert again.category5 == five and scorer.recalibrated(1.2, 0.1).category5 == five
    with pytest.raises(ValueError, match="splits on feature"):
        dataclasses.replace(
            scorer,
            category5=BoostedTrees(
                0.0, (Tree((999, -1, -1), (0.0,) * 3, (1, 0, 0), (2, 0, 0), (0.0,) * 3, (False,) * 3),)
            ),
        )


def test_with_a_lesion_model_a_candidate_below_cspca_is_1_or_2_to_3_and_a_study_is_2_if_any_candidate_is_one() -> None:
    """Below csPCa the lesion model decides 1 (no lesion) against 2-3 (a benign lesion, the network's score deciding
    between them); the study is 2 outside its reported lesions when any candidate, reported or not, is a lesion."""
    import dataclasses

    from postprocessing.lesion_scoring import BoostedTrees

    assert [coherent_category(c, 0.3, None, 0.49) for c in range(1, 6)] == [1, 1, 1, 1, 1]
    assert [coherent_category(c, 0.3, None, 0.5) for c in range(1, 6)] == [2, 2, 3, 3, 3]
    assert [coherent_category(c, 0.7, None, 0.0) for c in range(1, 6)] == [4, 4, 4, 4, 5]  # csPCa: not its say
    outputs, images = _two_blob_study()
    ones = np.ones(3, np.float32)
    # neither blob csPCa (A 0.018, B 0.119: A below the reporting floor); the lesion model calls A (bright) a lesion
    low = _scorer(_stump("t2w_mean", 0.0, -2.0, -4.0))
    lesion_a = BoostedTrees(0.0, (_stump("t2w_mean", 0.0, -3.0, 3.0),))
    plain = build_findings(outputs, GEOMETRY, scorer=low, images=images, availability=ones)
    assert [les.pirads for les in plain.lesions] == [3]  # B: the network's 3 (score 3.0), at most 3
    with_model = build_findings(
        outputs, GEOMETRY, scorer=dataclasses.replace(low, lesion=lesion_a), images=images, availability=ones
    )
    assert [les.pirads for les in with_model.lesions] == [1]  # B: no lesion by the model
    assert with_model.pirads_score == 2  # A, unreported, is a lesion: a benign finding somewhere, category 2
    lesion_b = BoostedTrees(0.0, (_stump("t2w_mean", 0.0, 3.0, -3.0),))
    only_b = build_findings(
        outputs, GEOMETRY, scorer=dataclasses.replace(low, lesion=lesion_b), images=images, availability=ones
    )
    assert [les.pirads for les in only_b.lesions] == [3] and only_b.pirads_score == 3
    nothing = dataclasses.replace(low, lesion=BoostedTrees(-5.0, ()))
    none = build_findings(outputs, GEOMETRY, scorer=nothing, images=images, availability=ones)
    assert [les.pirads for les in none.lesions] == [1] and none.pirads_score == 1
    assert LesionScorer.from_json(dataclasses.replace(low, lesion=lesion_a).to_json()).lesion == lesion_a


def test_the_category5_model_is_fitted_on_the_candidates_over_cspca_lesions_and_skipped_when_too_few() -> None:
    from training.lesion_scoring import CandidateTable, ScorerSettings, fit_lesion_scorer

    small = ScorerSettings(iterations=60)
    rng = np.random.default_rng(5)
    n = 600
    x = rng.normal(size=(n, len(FEATURE_NAMES)))
    is_cspca = x[:, FEATURE_NAMES.index("cspca_logit")] > 0.0
    size = x[:, FEATURE_NAMES.index("log_voxels")]
    category = np.where(is_cspca, np.where(size > 0.3, 5, 4), 0)
    table = CandidateTable(x, is_cspca, np.arange(n) // 2, np.zeros(n // 2, bool), lesion_category=category)
    scorer = fit_lesion_scorer(table, small)
    assert scorer.category5 is not None
    record = scorer.fitted_on["category5"]
    assert record == {"candidates": int(is_cspca.sum()), "positives": int(np.sum(category == 5))}
    # the lesion model reads every candidate: here the lesions are the csPCa ones
    assert scorer.lesion is not None and scorer.fitted_on["lesion"] == {
        "candidates": n,
        "positives": int(is_cspca.sum()),
    }
    test = rng.normal(size=(400, len(FEATURE_NAMES)))
    p5 = scorer.category5_probability(test)
    assert p5 is not None
    truth = test[:, FEATURE_NAMES.index("log_voxels")] > 0.3
    assert np.mean((p5 >= 0.5) == truth) > 0.9  # it learned the size rule from the csPCa candidates alone
    few = CandidateTable(
        x, is_cspca, np.arange(n) // 2, np.zeros(n // 2, bool), lesion_category=np.where(is_cspca, 4, 0)
    )
    skipped = fit_lesion_scorer(few, small)
    assert skipped.category5 is None and "0 category-5 and " in skipped.fitted_on["category5"]["skipped"]
    unrecorded = fit_lesion_scorer(CandidateTable(x, is_cspca, np.arange(n) // 2, np.zeros(n // 2, bool)), small)
    assert unrecorded.category5 is None and unrecorded.lesion is None
    assert "records no lesion categories" in unrecorded.fitted_on["category5"]["skipped"]
    assert "records no lesion categories" in unrecorded.fitted_on["lesion"]["skipped"]


def test_served_tree_evaluation_equals_scikit_learn(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from sklearn.ensemble import HistGradientBoostingClassifier

    from training.lesion_scoring import CandidateTable, ScorerSettings, fit_lesion_scorer

    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, len(FEATURE_NAMES)))
    x[rng.random(x.shape) < 0.05] = np.nan  # some missing values, so the fit learns where they go
    y = (np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 5]) ** 2 + 0.3 * rng.normal(size=400)) > 1.0
    table = CandidateTable(x, y, np.arange(400) // 2, np.zeros(250, dtype=bool))
    settings = ScorerSettings(iterations=30)
    scorer = fit_lesion_scorer(table, settings)
    reference = HistGradientBoostingClassifier(
        max_iter=30, learning_rate=0.05, max_depth=3, min_samples_leaf=20, early_stopping=False, random_state=0
    ).fit(x, y.astype(int))
    test = rng.normal(size=(200, len(FEATURE_NAMES)))
    test[rng.random(test.shape) < 0.1] = np.nan
    assert np.allclose(scorer.probability(test), reference.predict_proba(test)[:, 1], atol=1e-12, rtol=0)
    # 50 studies without a candidate, none csPCa: (0 + 1) / (50 + 2)
    assert scorer.no_candidate_probability == pytest.approx(1 / 52)
    assert json.loads(scorer.to_json())["fitted_on"]["candidates"] == 400


def test_fitting_refuses_too_few_candidates_of_a_class() -> None:
    from training.lesion_scoring import CandidateTable, LesionScoringError, fit_lesion_scorer

    x = np.zeros((10, len(FEATURE_NAMES)))
    table = CandidateTable(x, np.array([True] * 3 + [False] * 7), np.arange(10), np.ones(10, dtype=bool))
    with pytest.raises(LesionScoringError, match="at least 5 csPCa and 5 other candidates, got 3 and 7"):
        fit_lesion_scorer(table)


def _assert_weights_are_the_shipped_ones(nets: Any) -> None:
    """Every tensor of ``nets`` equals the shipped checkpoint's (the scorer commands leave the weights alone)."""
    import torch

    from networks.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint

    shipped, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    for name, module in nets.modules().items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, shipped.modules()[name].state_dict()[key]), f"{name}.{key} changed"


def _with_recorded_contract(tmp_path: Path, name: str, **changes: Any) -> Path:
    """The shipped checkpoint, written to ``tmp_path / name`` with its recorded contract changed (``key=value``;
    ``candidates`` replaces the candidate settings wholesale)."""
    from networks.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint

    nets, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    meta["contract"] = {**meta["contract"], **changes}
    save_checkpoint(tmp_path / name, nets, meta)
    return tmp_path / name


#: the candidate settings of the seventh release (before the DWI map's secondary candidates)
RELEASE_7_CANDIDATES = {
    k: v
    for k, v in DEFAULT_CANDIDATES.to_dict().items()
    if k not in ("secondary_sequence", "secondary_exclusion_voxels")
}


def test_fit_lesion_scorer_command_adds_a_scorer_keeps_the_weights_and_adopts_the_candidate_settings(
    tmp_path: Path,
) -> None:
    """Refitting the scorer is how a checkpoint adopts new candidate settings (they shape the scorer's candidates,
    not the weights): one recorded with the seventh release's settings comes out with the code's, the replaced
    ones recorded, and loads; the weights are the input's."""

    from networks.checkpoint import CheckpointContractError, load_checkpoint
    from training.cli import main

    older = _with_recorded_contract(tmp_path, "release7.pt", candidates=RELEASE_7_CANDIDATES)
    with pytest.raises(CheckpointContractError, match="candidates.secondary_sequence: '<absent>' -> 'dwi'"):
        load_checkpoint(older)
    out = tmp_path / "scored.pt"
    args = ["fit-lesion-scorer", "--checkpoint", str(older), "--out", str(out), "--no-progress"]
    assert main([*args, "--data-seed", "1", "--cases", "700-739", "--cache", str(tmp_path / "cache")]) == 0
    nets, meta = load_checkpoint(out)
    _assert_weights_are_the_shipped_ones(nets)
    assert meta["contract"]["candidates"] == DEFAULT_CANDIDATES.to_dict()
    scorer = scorer_from_metadata(meta)
    assert scorer is not None and scorer.fitted_on["data"] == "seed 1 cases 700-739"
    assert scorer.fitted_on["studies"] == 40 and scorer.fitted_on["cspca_candidates"] >= 5
    assert scorer.fitted_on["candidate_settings_replaced"] == RELEASE_7_CANDIDATES


def test_fit_lesion_scorer_command_refuses_other_contract_differences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main

    other = _with_recorded_contract(
        tmp_path, "other.pt", missing_channel_fill_value=-1.0, candidates=RELEASE_7_CANDIDATES
    )
    args = ["fit-lesion-scorer", "--checkpoint", str(other), "--out", str(tmp_path / "x.pt"), "--no-progress"]
    assert main([*args, "--data-seed", "1", "--cases", "700-739", "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "missing_channel_fill_value: -1.0 -> " in err and "candidates.secondary_sequence" in err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "cache").exists()


def test_fit_lesion_scorer_command_refuses_the_networks_training_studies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from networks.checkpoint import DEFAULT_CHECKPOINT
    from training.cli import main

    args = ["fit-lesion-scorer", "--checkpoint", str(DEFAULT_CHECKPOINT), "--out", str(tmp_path / "x.pt")]
    assert main([*args, "--data-seed", "1", "--cases", "690-709", "--cache", str(tmp_path / "cache")]) == 2
    assert "cases 690-699 of seed 1 are training studies" in capsys.readouterr().err
    assert main([*args, "--cases", "709-690"]) == 2
    assert "FIRST-LAST with 0 <= FIRST <= LAST" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def _random_scorer(seed: int = 0, trees: int = 6) -> LesionScorer:
    """A scorer of random stumps over the network features (for the exactness of the recalibration)."""
    rng = np.random.default_rng(seed)
    stumps = tuple(
        _stump(str(rng.choice(["cspca_logit", "score_max", "fused_peak"])), float(rng.normal()), *rng.normal(size=2))
        for _ in range(trees)
    )
    return LesionScorer(FEATURE_NAMES, -0.7, stumps, 0.03, {"data": "seed 1 cases 700-1899"})


def test_a_recalibrated_scorer_applies_the_platt_map_to_every_log_odds_and_keeps_the_order() -> None:
    scorer = _random_scorer()
    x = np.random.default_rng(1).normal(size=(200, len(FEATURE_NAMES)))
    recalibrated = scorer.recalibrated(1.3, -0.25, {"data": "seed 1 cases 1900-2899"})
    np.testing.assert_allclose(recalibrated.logits(x), 1.3 * scorer.logits(x) - 0.25, rtol=0, atol=1e-12)
    assert np.array_equal(np.argsort(recalibrated.logits(x)), np.argsort(scorer.logits(x)))
    assert recalibrated.no_candidate_probability == scorer.no_candidate_probability
    assert recalibrated.recalibration == {"data": "seed 1 cases 1900-2899", "slope": 1.3, "intercept": -0.25}
    assert scorer.recalibration is None and recalibrated.fitted_on["data"] == "seed 1 cases 700-1899"
    # it travels in the checkpoint / model repository as JSON, map included
    assert LesionScorer.from_json(recalibrated.to_json()).recalibration == recalibrated.recalibration
    np.testing.assert_array_equal(LesionScorer.from_json(recalibrated.to_json()).logits(x), recalibrated.logits(x))
    with pytest.raises(ValueError, match="already recalibrated \\(seed 1 cases 1900-2899\\)"):
        recalibrated.recalibrated(1.1, 0.0)
    for slope, intercept in ((0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="positive finite slope and a finite intercept"):
            scorer.recalibrated(slope, intercept)


def test_the_platt_fit_recovers_the_map_of_miscalibrated_study_scores_and_ignores_studies_without_candidate() -> None:
    from training.lesion_scoring import StudyScores, fit_platt

    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, 20000)
    significant = rng.random(20000) < 1.0 / (1.0 + np.exp(-(1.5 * logits - 0.4)))
    logits[:500] = np.nan  # no candidate: left to no_candidate_probability
    slope, intercept = fit_platt(StudyScores(logits, significant))
    assert abs(slope - 1.5) < 0.06 and abs(intercept + 0.4) < 0.06


def test_the_platt_fit_refuses_too_few_studies_and_perfectly_separated_ones() -> None:
    from training.lesion_scoring import LesionScoringError, StudyScores, fit_platt

    few = StudyScores(
        np.array([0.1, 0.2, 0.3, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, np.nan]), np.array([0] * 3 + [1] * 7, bool)
    )
    with pytest.raises(LesionScoringError, match="at least 5 studies of each class with a candidate, got 6 csPCa"):
        fit_platt(few)
    separated = StudyScores(np.arange(12.0), np.arange(12) >= 6)
    with pytest.raises(LesionScoringError, match="separated perfectly"):
        fit_platt(separated)


def _with_scorer_as_fitted(tmp_path: Path) -> Path:
    """The shipped checkpoint with its lesion scorer as fitted (the shipped recalibration undone), at
    ``tmp_path / "as_fitted.pt"``."""
    import dataclasses

    from networks.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint

    nets, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    scorer = scorer_from_metadata(meta)
    assert scorer is not None and scorer.recalibration is not None
    a, b = scorer.recalibration["slope"], scorer.recalibration["intercept"]
    trees = tuple(dataclasses.replace(t, value=tuple(v / a for v in t.value)) for t in scorer.trees)
    fitted_on = {k: v for k, v in scorer.fitted_on.items() if k != "recalibration"}
    as_fitted = LesionScorer(
        scorer.feature_names, (scorer.baseline - b) / a, trees, scorer.no_candidate_probability, fitted_on
    )
    meta["lesion_scoring"] = as_fitted.to_dict()
    save_checkpoint(tmp_path / "as_fitted.pt", nets, meta)
    return tmp_path / "as_fitted.pt"


def test_recalibrate_command_folds_a_platt_map_fitted_on_unseen_studies_into_the_scorer_and_keeps_the_weights(
    tmp_path: Path,
) -> None:

    from networks.checkpoint import load_checkpoint
    from training.cli import main

    as_fitted = _with_scorer_as_fitted(tmp_path)
    out = tmp_path / "recalibrated.pt"
    args = ["recalibrate-lesion-scorer", "--checkpoint", str(as_fitted), "--out", str(out), "--no-progress"]
    assert main([*args, "--data-seed", "1", "--cases", "3500-3559", "--cache", str(tmp_path / "cache")]) == 0
    nets, meta = load_checkpoint(out)
    _assert_weights_are_the_shipped_ones(nets)
    before, after = scorer_from_metadata(load_checkpoint(as_fitted)[1]), scorer_from_metadata(meta)
    assert before is not None and after is not None and after.recalibration is not None
    record = after.recalibration
    assert record["data"] == "seed 1 cases 3500-3559" and record["studies"] == 60
    assert 0 < record["studies_with_candidate"] <= 60 and record["slope"] > 0
    x = np.random.default_rng(0).normal(size=(50, len(FEATURE_NAMES)))
    np.testing.assert_allclose(
        after.logits(x), record["slope"] * before.logits(x) + record["intercept"], rtol=0, atol=1e-9
    )


def test_recalibrate_command_refuses_seen_studies_and_a_scorer_already_recalibrated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from networks.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from training.cli import main
    from training.lesion_scoring import scorer_case_range

    as_fitted = _with_scorer_as_fitted(tmp_path)
    fitted = scorer_from_metadata(load_checkpoint(as_fitted)[1])
    assert fitted is not None
    seed_and_cases = scorer_case_range(fitted)  # read from fitted_on["data"], "seed 1 cases 700-1899 (...)"
    assert seed_and_cases is not None and seed_and_cases[0] == 1
    first = seed_and_cases[1].start
    out = tmp_path / "x.pt"
    args = ["recalibrate-lesion-scorer", "--out", str(out), "--data-seed", "1", "--cache", str(tmp_path / "cache")]
    assert main([*args, "--checkpoint", str(as_fitted), "--cases", "690-709"]) == 2
    assert "cases 690-699 of seed 1 are training studies" in capsys.readouterr().err
    assert main([*args, "--checkpoint", str(as_fitted), "--cases", f"{first + 10}-{first + 20}"]) == 2
    assert f"cases {first + 10}-{first + 20} of seed 1 are lesion scorer's fitting studies" in capsys.readouterr().err
    assert main([*args, "--checkpoint", str(DEFAULT_CHECKPOINT), "--cases", "3500-3509"]) == 2
    assert "is already recalibrated (seed 1 cases" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()
