"""Fit the second-stage lesion scorer (:mod:`postprocessing.lesion_scoring`) of a trained chain.

The scorer must be fitted on studies the networks never trained on: the networks' maps of their own training
studies are cleaner than on new ones (docs/networks.md), so a scorer fitted there would trust the network's
evidence too much. ``make checkpoint`` fits it on the run's validation split, calibration-only and scorer-only
studies, after the calibration (whose ``cspca_map`` is one of its features), with its category-5 and lesion models,
then recalibrates it (:func:`recalibrate_scorer`) on recalibration-only studies that nothing else sees.

Every study here is synthetic (``mpmri synth``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract import CSPCA_MIN_PIRADS, DEFAULT_CANDIDATES
from contract.errors import MpmriError
from networks.models import MpmriNetworks
from postprocessing.lesion_scoring import (
    FEATURE_NAMES,
    BoostedTrees,
    LesionScorer,
    Tree,
    candidate_features,
    missing_as_nan,
)
from postprocessing.report import build_findings
from training.data import CaseRecord, remove_sequences

log = logging.getLogger(__name__)


class LesionScoringError(MpmriError, ValueError):
    """The scorer cannot be fitted on these studies (names why)."""


@dataclass
class CandidateTable:
    """The candidates of a set of studies, with their features and truth.

    Attributes:
        features: ``[N, F]`` (:data:`postprocessing.lesion_scoring.FEATURE_NAMES`).
        is_cspca: ``[N]`` bool: the candidate's blob overlaps a clinically significant lesion.
        study: ``[N]`` index of the candidate's study pass (see :func:`candidate_table`).
        study_significant: ``[M]`` bool per study pass.
        all_sequences: ``[M]`` bool per study pass: run with every sequence the study has (not a
            missing-sequence pass); ``None``: all of them.
        lesion_category: ``[N]`` int: the highest PI-RADS-like category of the truth lesions the candidate's blob
            overlaps (benign 2-3, csPCa 4-5), 0 where it overlaps none; ``None``: not recorded (then neither the
            lesion model nor the category-5 model is fitted).
    """

    features: np.ndarray
    is_cspca: np.ndarray
    study: np.ndarray
    study_significant: np.ndarray
    all_sequences: np.ndarray | None = None
    lesion_category: np.ndarray | None = None

    @property
    def studies_without_candidate(self) -> np.ndarray:
        """Bool ``[M]``: the study passes without any candidate."""
        has = np.zeros(len(self.study_significant), dtype=bool)
        has[self.study] = True
        return ~has


#: sequence sets (availability masks, contract order) a study is also seen with when the fit learns to score
#: studies with missing sequences: T2W + ADC, T2W + DWI, ADC + DWI, T2W alone
MISSING_SEQUENCE_MASKS: tuple[tuple[float, ...], ...] = (
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
    (0.0, 1.0, 1.0),
    (1.0, 0.0, 0.0),
)


#: the candidate settings whose label map holds the blobs the served scorer reads: the served ones without the
#: growth of small regions, which :func:`postprocessing.report.build_findings` applies after scoring
SCORED_BLOBS = dataclasses.replace(DEFAULT_CANDIDATES, min_region_mm3=None)


@torch.no_grad()
def candidate_table(
    nets: MpmriNetworks, records: Sequence[CaseRecord], missing_sequences: bool = False
) -> CandidateTable:
    """Run the chain on ``records`` and describe every candidate (the served extraction, no scorer; each
    candidate's blob as the served scorer reads it, before the growth of small regions: :data:`SCORED_BLOBS`).

    ``missing_sequences``: each study is also run once with sequences removed (study ``i`` with
    ``MISSING_SEQUENCE_MASKS[i % 4]``; removed channels get the contract's fill value and their features are
    missing), so that the scorer learns how the chain answers without them. Such passes count as studies of
    their own in ``study`` / ``study_significant``.
    """
    nets.eval()
    device = nets.device  # the GPU profile fits its scorer right after training on the GPU
    rows: list[np.ndarray] = []
    labels: list[bool] = []
    study: list[int] = []
    categories: list[int] = []
    significant: list[bool] = []
    passes: list[tuple[CaseRecord, np.ndarray | None]] = []
    for index, record in enumerate(records):
        passes.append((record, None))
        if missing_sequences:
            passes.append((record, np.asarray(MISSING_SEQUENCE_MASKS[index % len(MISSING_SEQUENCE_MASKS)])))
    for index, (record, keep) in enumerate(passes):
        images, availability = remove_sequences(record.images, record.availability, keep)
        out = nets(torch.from_numpy(images[None]).to(device), torch.from_numpy(availability[None]).to(device))
        outputs = {name: value[0].cpu().numpy() for name, value in out.items()}
        findings = build_findings(outputs, record.geometry, settings=SCORED_BLOBS, availability=availability)
        significant.append(bool(record.significant))
        if not findings.lesions:
            continue
        shape = findings.labels.shape
        ids = [lesion.id for lesion in findings.lesions]
        features = candidate_features(
            images,
            findings.labels,
            ids,
            outputs["cspca_map"].reshape(shape),
            outputs["score_map"].reshape(shape),
            outputs["fused_map"].reshape(shape),
            outputs["sequence_maps"].reshape((-1, *shape)),
            [lesion.source != DEFAULT_CANDIDATES.source_map for lesion in findings.lesions],
        )
        rows.append(missing_as_nan(features, availability))
        for lesion_id in ids:
            blob = findings.labels == lesion_id
            labels.append(bool((record.target[blob] > 0).any()))
            categories.append(_lesion_category(record, blob))
            study.append(index)
    return CandidateTable(
        features=np.concatenate(rows) if rows else np.zeros((0, len(FEATURE_NAMES))),
        is_cspca=np.asarray(labels, dtype=bool),
        study=np.asarray(study, dtype=np.int64),
        study_significant=np.asarray(significant, dtype=bool),
        all_sequences=np.asarray([keep is None for _, keep in passes], dtype=bool),
        lesion_category=np.asarray(categories, dtype=np.int64),
    )


def _lesion_category(record: CaseRecord, blob: np.ndarray) -> int:
    """The highest category of the truth lesions of ``record`` that ``blob [D, H, W]`` overlaps, 0 for none."""
    lesions = record.truth.get("lesions", [])
    inside = np.unique(record.lesion_index[blob])
    found = [int(lesions[i - 1].get("pirads", 0)) for i in inside if 0 < i <= len(lesions)]
    return max(found, default=0)


@dataclass(frozen=True)
class ScorerSettings:
    """Settings of the boosted trees (scikit-learn ``HistGradientBoostingClassifier``), chosen on the validation
    seeds 9101 / 9102 (docs/networks.md, "Candidate rescoring").

    Attributes:
        iterations: boosting iterations (one tree each).
        learning_rate: shrinkage of each tree.
        max_depth: depth of each tree.
        min_samples_leaf: fewest candidates in a leaf.
        random_state: seed (the fit is deterministic without early stopping; kept for the record).
    """

    iterations: int = 300
    learning_rate: float = 0.05
    max_depth: int = 3
    min_samples_leaf: int = 20
    random_state: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _trees_of(model: Any) -> tuple[Tree, ...]:
    """The fitted trees of a binary ``HistGradientBoostingClassifier`` as :class:`Tree` (numerical splits only)."""
    trees = []
    for per_iteration in model._predictors:  # noqa: SLF001 - the fitted trees; a test checks the numpy evaluation
        (predictor,) = per_iteration
        nodes = predictor.nodes
        if bool(np.any(nodes["is_categorical"])):
            raise LesionScoringError("categorical splits are not supported by the served evaluator")
        leaf = nodes["is_leaf"].astype(bool)
        trees.append(
            Tree(
                feature=tuple(
                    int(f) if not is_leaf else -1 for f, is_leaf in zip(nodes["feature_idx"], leaf, strict=True)
                ),
                threshold=tuple(float(v) for v in nodes["num_threshold"]),
                left=tuple(int(v) for v in nodes["left"]),
                right=tuple(int(v) for v in nodes["right"]),
                value=tuple(float(v) for v in nodes["value"]),
                missing_left=tuple(bool(v) for v in nodes["missing_go_to_left"]),
            )
        )
    return tuple(trees)


def fit_lesion_scorer(
    table: CandidateTable, settings: ScorerSettings = ScorerSettings(), fitted_on: dict[str, Any] | None = None
) -> LesionScorer:
    """Boosted trees (binary log-loss) of ``table.is_cspca`` on the candidates' features.

    ``no_candidate_probability`` is the share of csPCa among the studies without a candidate (their passes with
    all their sequences: missing-sequence passes miss more cancers), with one pseudo study of each class (so never
    0 or 1).

    Raises:
        LesionScoringError: fewer than 5 candidates of either class.
    """
    positives, negatives = int(table.is_cspca.sum()), int((~table.is_cspca).sum())
    if min(positives, negatives) < 5:
        raise LesionScoringError(
            f"the lesion scorer needs at least 5 csPCa and 5 other candidates, got {positives} and {negatives}"
        )
    cspca = _ensemble_of(_boosted_trees(settings).fit(table.features, table.is_cspca.astype(int)))
    (category5, category5_record), (lesion, lesion_record) = _fit_category_models(table, settings)
    empty = table.studies_without_candidate
    if table.all_sequences is not None:
        empty = empty & table.all_sequences
    no_candidate = (float(table.study_significant[empty].sum()) + 1.0) / (float(empty.sum()) + 2.0)
    record = {
        "studies": int(len(table.study_significant) if table.all_sequences is None else table.all_sequences.sum()),
        "study_passes": int(len(table.study_significant)),
        "studies_without_candidate": int(empty.sum()),
        "candidates": int(len(table.is_cspca)),
        "cspca_candidates": positives,
        "settings": settings.to_dict(),
        "scikit_learn": _sklearn_version(),
        "category5": category5_record,
        "lesion": lesion_record,
        **(fitted_on or {}),
    }
    log.info("lesion scorer fitted: %s", record)
    return LesionScorer(
        feature_names=FEATURE_NAMES,
        baseline=cspca.baseline,
        trees=cspca.trees,
        no_candidate_probability=no_candidate,
        fitted_on=record,
        category5=category5,
        lesion=lesion,
    )


def _boosted_trees(settings: ScorerSettings) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=settings.iterations,
        learning_rate=settings.learning_rate,
        max_depth=settings.max_depth,
        min_samples_leaf=settings.min_samples_leaf,
        early_stopping=False,
        random_state=settings.random_state,
    )


def _ensemble_of(model: Any) -> BoostedTrees:
    """A fitted binary ``HistGradientBoostingClassifier`` as :class:`BoostedTrees` (initial log-odds + trees)."""
    baseline = float(np.asarray(model._baseline_prediction).reshape(-1)[0])  # noqa: SLF001
    return BoostedTrees(baseline, _trees_of(model))


_Fitted = tuple[BoostedTrees | None, dict[str, Any]]


def _fit_category_models(table: CandidateTable, settings: ScorerSettings) -> tuple[_Fitted, _Fitted]:
    """The category-5 model (category 5 against 4, on the candidates that overlap a csPCa lesion) and the lesion
    model (a truth lesion of any kind, benign included, against none, on every candidate), each with its record;
    same settings as the csPCa model. A model is ``None``, with the reason recorded, where the table records no
    categories or has fewer than 5 candidates of either class for it."""
    if table.lesion_category is None:
        skipped: _Fitted = (None, {"skipped": "the candidate table records no lesion categories"})
        return skipped, skipped
    cspca = table.lesion_category >= CSPCA_MIN_PIRADS
    fives = table.lesion_category[cspca] == CSPCA_MIN_PIRADS + 1
    return (
        _fit_binary(table.features[cspca], fives, settings, "category-5"),
        _fit_binary(table.features, table.lesion_category > 0, settings, "lesion"),
    )


def _fit_binary(x: np.ndarray, y: np.ndarray, settings: ScorerSettings, what: str) -> _Fitted:
    positives, negatives = int(np.sum(y)), int(np.sum(~y))
    record: dict[str, Any] = {"candidates": int(len(y)), "positives": positives}
    if min(positives, negatives) < 5:
        return None, {**record, "skipped": f"{positives} {what} and {negatives} other candidates (fewer than 5)"}
    return _ensemble_of(_boosted_trees(settings).fit(x, y.astype(int))), record


def _sklearn_version() -> str:
    import sklearn

    return str(sklearn.__version__)


def fit_checkpoint_scorer(
    checkpoint: Path,
    out: Path,
    data_seed: int,
    cases: range,
    cache_dir: Path,
    settings: ScorerSettings = ScorerSettings(),
    threads: int = 2,
    progress: bool = True,
) -> LesionScorer:
    """Fit a lesion scorer for the networks of ``checkpoint`` and write the checkpoint with it to ``out``.

    The weights and the rest of the metadata are kept (an earlier scorer is replaced); the fitting studies are
    cases ``cases`` of ``data_seed`` (synthesized and preprocessed into ``cache_dir`` where missing), each also
    seen once with sequences removed (:func:`candidate_table`).

    A checkpoint whose recorded contract differs from the code's only in its candidate settings
    (``contract.CandidateSettings``: they shape the candidates the scorer is fitted on, not the networks' weights)
    is accepted: it is written with the code's candidate settings, and ``fitted_on`` records the ones it replaced.
    Any other difference is refused as by :func:`networks.checkpoint.load_checkpoint`.

    Raises:
        LesionScoringError: ``cases`` overlap the studies the networks trained on (names them), or too few
            candidates of either class.
        CheckpointContractError: the recorded contract differs from the code's beyond the candidate settings.
    """
    from networks.checkpoint import save_checkpoint
    from training.data import build_cache, load_cases

    nets, metadata, replaced = _load_adopting_candidate_settings(checkpoint)
    _refuse_seen(
        cases,
        data_seed,
        _training_studies(metadata, data_seed),
        f"{checkpoint}: fit the lesion scorer on studies the networks never trained on",
    )
    paths = build_cache(cache_dir, data_seed, cases, progress=progress, grid=nets.grid, workers=threads)
    table = candidate_table(nets, load_cases(paths, workers=threads), missing_sequences=True)
    fitted_on: dict[str, Any] = {"data": f"seed {data_seed} cases {cases.start}-{cases.stop - 1}"}
    if replaced is not None:
        fitted_on["candidate_settings_replaced"] = replaced
    scorer = fit_lesion_scorer(table, settings, fitted_on=fitted_on)
    metadata["lesion_scoring"] = scorer.to_dict()
    save_checkpoint(out, nets, metadata)
    return scorer


def _load_adopting_candidate_settings(checkpoint: Path) -> tuple[MpmriNetworks, dict[str, Any], dict[str, Any] | None]:
    """``(networks, metadata with the code's candidate settings, the recorded ones they replaced or None)``."""
    from contract import DEFAULT_CANDIDATES
    from networks.checkpoint import contract_problems, load_checkpoint, require_code_contract

    nets, metadata = load_checkpoint(checkpoint, check_contract=False)
    problems = contract_problems(metadata, nets.grid)
    if not problems:
        return nets, metadata, None
    recorded = metadata.get("contract")
    if not isinstance(recorded, dict) or any(not p.startswith("candidates.") for p in problems):
        require_code_contract(metadata, nets.grid, checkpoint)  # raises, naming every difference
    assert isinstance(recorded, dict)
    replaced = dict(recorded.get("candidates") or {})
    metadata["contract"] = {**recorded, "candidates": DEFAULT_CANDIDATES.to_dict()}
    require_code_contract(metadata, nets.grid, checkpoint)
    log.info("candidate settings of %s replaced by the code's: %s", checkpoint, "; ".join(problems))
    return nets, metadata, replaced


@dataclass(frozen=True)
class StudyScores:
    """The study csPCa log-odds a scorer gives a set of studies (all their sequences), and their truth.

    Attributes:
        logits: ``[M]`` the highest candidate log-odds of each study (``nan``: no candidate; such a study gets
            the scorer's ``no_candidate_probability``, which the recalibration leaves alone).
        significant: ``[M]`` bool, the study has a csPCa lesion.
    """

    logits: np.ndarray
    significant: np.ndarray

    @property
    def with_candidate(self) -> np.ndarray:
        return ~np.isnan(self.logits)


def study_scores(nets: MpmriNetworks, scorer: LesionScorer, records: Sequence[CaseRecord]) -> StudyScores:
    """:class:`StudyScores` of ``records`` under the chain ``nets`` + ``scorer`` (the served candidates)."""
    table = candidate_table(nets, records, missing_sequences=False)
    logits = np.full(len(table.study_significant), -np.inf)
    # the highest candidate log-odds per study (absent sequences are NaN in the table already)
    np.maximum.at(logits, table.study, scorer.logits(table.features))
    logits[np.isneginf(logits)] = np.nan  # no candidate
    return StudyScores(logits=logits, significant=np.asarray(table.study_significant, dtype=bool))


def fit_platt(scores: StudyScores) -> tuple[float, float]:
    """``(slope, intercept)`` of the unpenalized logistic fit of ``significant`` on the log-odds of the studies
    with a candidate: the map that makes the study probabilities calibrated on these studies.

    Raises:
        LesionScoringError: fewer than 5 studies of either class have a candidate, or the classes are separated
            perfectly (the slope would be infinite).
    """
    from sklearn.linear_model import LogisticRegression

    keep = scores.with_candidate
    x, y = scores.logits[keep], scores.significant[keep]
    positives, negatives = int(y.sum()), int((~y).sum())
    if min(positives, negatives) < 5:
        raise LesionScoringError(
            f"a recalibration needs at least 5 studies of each class with a candidate, got {positives} csPCa"
            f" and {negatives} other"
        )
    if x[y].min() > x[~y].max():
        raise LesionScoringError("the studies are separated perfectly: the recalibration slope would be infinite")
    model = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(x[:, None], y.astype(int))
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def recalibrate_scorer(
    nets: MpmriNetworks, scorer: LesionScorer, records: Sequence[CaseRecord], data: str
) -> LesionScorer:
    """``scorer`` with a study-level Platt map fitted on ``records`` folded into it (:meth:`LesionScorer.recalibrated`).

    Why: a scorer fitted with the log-loss on its own studies is calibrated there, yet on new studies its study
    probabilities are too moderate (docs/networks.md, "Recalibrating the lesion scorer"); ``records`` must be
    studies neither the networks nor the scorer have seen. ``data`` says which (recorded).
    """
    scores = study_scores(nets, scorer, records)
    slope, intercept = fit_platt(scores)
    record = {
        "method": "study-level Platt scaling of the highest candidate log-odds (leaf values and baseline rescaled)",
        "data": data,
        "studies": int(len(scores.significant)),
        "studies_with_candidate": int(scores.with_candidate.sum()),
    }
    log.info("lesion scorer recalibrated on %s: slope %.4f intercept %.4f", data, slope, intercept)
    try:
        return scorer.recalibrated(slope, intercept, record)
    except ValueError as err:
        raise LesionScoringError(str(err)) from err


def scorer_case_range(scorer: LesionScorer) -> tuple[int, range] | None:
    """``(data_seed, cases)`` the scorer was fitted on, from its ``fitted_on`` record, or ``None`` if unknown."""
    match = re.match(r"seed (\d+) cases (\d+)-(\d+)", str(scorer.fitted_on.get("data", "")))
    if match is None:
        return None
    seed, first, last = (int(g) for g in match.groups())
    return seed, range(first, last + 1)


def _training_studies(metadata: dict[str, Any], data_seed: int) -> list[tuple[str, range]]:
    """``[("training studies", cases)]`` of a checkpoint's networks when they trained on ``data_seed``, else ``[]``."""
    data = metadata.get("training", {}).get("data", {})
    if data.get("data_seed") == data_seed and data.get("train_cases"):
        return [("training studies", range(int(data["train_cases"])))]
    return []


def _refuse_seen(cases: range, data_seed: int, seen: list[tuple[str, range]], advice: str) -> None:
    """Raise :class:`LesionScoringError` naming the first overlap of ``cases`` with a ``(what, cases)`` of ``seen``."""
    for what, studies in seen:
        overlap = range(max(cases.start, studies.start), min(cases.stop, studies.stop))
        if len(overlap):
            raise LesionScoringError(
                f"cases {overlap.start}-{overlap.stop - 1} of seed {data_seed} are {what} of {advice}"
            )


def recalibrate_checkpoint_scorer(
    checkpoint: Path,
    out: Path,
    data_seed: int,
    cases: range,
    cache_dir: Path,
    threads: int = 2,
    progress: bool = True,
) -> LesionScorer:
    """Recalibrate the lesion scorer of ``checkpoint`` on cases ``cases`` of ``data_seed`` and write the checkpoint
    with it to ``out`` (weights and the rest of the metadata unchanged; the checkpoint's candidate settings may be
    replaced by the code's, as by :func:`fit_checkpoint_scorer`).

    Raises:
        LesionScoringError: the checkpoint has no lesion scorer, or it is already recalibrated, or ``cases``
            overlap the studies its networks trained on or its scorer was fitted on (names them).
    """
    from networks.checkpoint import save_checkpoint
    from postprocessing.lesion_scoring import scorer_from_metadata
    from training.data import build_cache, load_cases

    nets, metadata, replaced = _load_adopting_candidate_settings(checkpoint)
    scorer = scorer_from_metadata(metadata)
    if scorer is None:
        raise LesionScoringError(f"{checkpoint} has no lesion scorer to recalibrate (`mpmri fit-lesion-scorer`)")
    if scorer.recalibration is not None:
        raise LesionScoringError(
            f"the lesion scorer of {checkpoint} is already recalibrated ({scorer.recalibration.get('data')})"
        )
    seen = _training_studies(metadata, data_seed)
    fitted = scorer_case_range(scorer)
    if fitted is not None and fitted[0] == data_seed:
        seen.append(("lesion scorer's fitting studies", fitted[1]))
    _refuse_seen(
        cases, data_seed, seen, f"{checkpoint}: recalibrate on studies neither the networks nor the scorer have seen"
    )
    paths = build_cache(cache_dir, data_seed, cases, progress=progress, grid=nets.grid, workers=threads)
    torch.set_num_threads(threads)
    recalibrated = recalibrate_scorer(
        nets, scorer, load_cases(paths, workers=threads), f"seed {data_seed} cases {cases.start}-{cases.stop - 1}"
    )
    if replaced is not None:
        recalibrated = dataclasses.replace(
            recalibrated, fitted_on={**recalibrated.fitted_on, "candidate_settings_replaced_at_recalibration": replaced}
        )
    metadata["lesion_scoring"] = recalibrated.to_dict()
    save_checkpoint(out, nets, metadata)
    return recalibrated
