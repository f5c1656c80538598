"""Fit the second-stage lesion scorer (:mod:`postprocessing.lesion_scoring`) of a trained chain.

The scorer must be fitted on studies the networks never trained on: the networks' maps of their own training
studies are cleaner than on new ones (docs/networks.md), so a scorer fitted there would trust the network's
evidence too much. ``make checkpoint`` fits it on the run's validation split and calibration-only studies,
after the calibration (whose ``cspca_map`` is one of its features).

Every study here is synthetic (``mpmri synth``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract import DEFAULT_CANDIDATES
from contract.errors import MpmriError
from networks.models import MpmriNetworks
from postprocessing.lesion_scoring import FEATURE_NAMES, LesionScorer, Tree, candidate_features, missing_as_nan
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
    """

    features: np.ndarray
    is_cspca: np.ndarray
    study: np.ndarray
    study_significant: np.ndarray
    all_sequences: np.ndarray | None = None

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


@torch.no_grad()
def candidate_table(
    nets: MpmriNetworks, records: Sequence[CaseRecord], missing_sequences: bool = False
) -> CandidateTable:
    """Run the chain on ``records`` and describe every candidate (the served extraction, no scorer).

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
        findings = build_findings(outputs, record.geometry, availability=availability)
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
            labels.append(bool((record.target[findings.labels == lesion_id] > 0).any()))
            study.append(index)
    return CandidateTable(
        features=np.concatenate(rows) if rows else np.zeros((0, len(FEATURE_NAMES))),
        is_cspca=np.asarray(labels, dtype=bool),
        study=np.asarray(study, dtype=np.int64),
        study_significant=np.asarray(significant, dtype=bool),
        all_sequences=np.asarray([keep is None for _, keep in passes], dtype=bool),
    )


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
    from sklearn.ensemble import HistGradientBoostingClassifier

    positives, negatives = int(table.is_cspca.sum()), int((~table.is_cspca).sum())
    if min(positives, negatives) < 5:
        raise LesionScoringError(
            f"the lesion scorer needs at least 5 csPCa and 5 other candidates, got {positives} and {negatives}"
        )
    model = HistGradientBoostingClassifier(
        max_iter=settings.iterations,
        learning_rate=settings.learning_rate,
        max_depth=settings.max_depth,
        min_samples_leaf=settings.min_samples_leaf,
        early_stopping=False,
        random_state=settings.random_state,
    )
    model.fit(table.features, table.is_cspca.astype(int))
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
        **(fitted_on or {}),
    }
    log.info("lesion scorer fitted: %s", record)
    return LesionScorer(
        feature_names=FEATURE_NAMES,
        baseline=float(np.asarray(model._baseline_prediction).reshape(-1)[0]),  # noqa: SLF001
        trees=_trees_of(model),
        no_candidate_probability=no_candidate,
        fitted_on=record,
    )


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
    data = metadata.get("training", {}).get("data", {})
    if data.get("data_seed") == data_seed and data.get("train_cases"):
        trained = range(int(data["train_cases"]))
        overlap = range(max(cases.start, trained.start), min(cases.stop, trained.stop))
        if len(overlap):
            raise LesionScoringError(
                f"cases {overlap.start}-{overlap.stop - 1} of seed {data_seed} are training studies of {checkpoint}:"
                " fit the lesion scorer on studies the networks never trained on"
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
