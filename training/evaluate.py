"""Evaluation of a checkpoint on ``mpmri synth`` studies: the full chain from DICOM, scored the PI-CAI way
and by the protocol of :mod:`training.scoring` (intervals, located within 5 mm, FROC, calibration, coherence).

For every case folder: :func:`preprocessing.pipeline.preprocess_study` on ``dicom/`` -> networks ->
:func:`postprocessing.report.build_findings` (the service's and the demo's code: candidates from the calibrated
csPCa map, a csPCa likelihood and PI-RADS-like category per lesion). Scores (docs/networks.md, "Evaluation"):

* ``picai_eval.evaluate`` on the candidate maps vs the csPCa lesion masks (``lesions.nii.gz`` resampled
  to the model grid, significant lesions only): ``auroc`` (patient level, case score = the highest
  candidate likelihood), ``ap`` (lesion level), ``score`` = (auroc + ap) / 2;
* ``classifier_auroc``, ``brier``, ``ece``: the study csPCa probability (calibrated) vs the study truth;
* PI-RADS-like confusion matrix and quadratic kappa of the study category (``Findings.pirads_score``) vs the
  study's max PI-RADS;
* ``located_fraction``: significant truth lesions with a candidate centre within 5 mm, over all of them;
  ``froc_sensitivity_at_{0.5,1}_fp``; ``incoherent_fraction``; the same by zone and by lesion size;
* the same picai scores for the trivial baseline ``adc_min`` (:mod:`training.baseline`), keys ``baseline_*``,
  and for the stronger ``dwi_max`` heuristic, keys ``baseline_dwi_*``;
* ``ci95``: case-level bootstrap 95 % intervals of every figure above;
* ``fusion_weights``: the mean per-voxel fusion weight of each sequence inside the truth lesions of each zone
  (and over the whole grid);
* ``lesion_map_response``: per zone and lesion kind (cancers and mimics), the fraction of truth lesions whose
  peak reaches 0.5 in each sequence map, the fused map and ``cspca_map`` (detection or false-alarm rates), and in
  ``cspca_map`` computed with the fused map zeroed (``cspca_without_map``: what the classification network
  concludes from the images alone);
* ``ablation``: AUROC / AP with each sequence removed at inference (availability 0, channel filled), and with
  T2W only and T2W + ADC (the missing-sequence paths), each with its change from the full model.

Outputs in OUT_DIR: ``metrics.json``, ``cases.csv``, ``candidates.csv``, ``lesions.csv``, ``roc.png``,
``pr.png``, ``froc.png``, ``confusion.png``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_curve
from tqdm import tqdm

from contract import DEFAULT_CANDIDATES, PIRADS_CATEGORIES, SEQUENCES, GridGeometry
from contract.errors import MpmriError
from networks.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
from networks.models import MpmriNetworks
from postprocessing.candidates import extract_candidates
from postprocessing.lesion_scoring import LesionScorer, scorer_from_metadata
from postprocessing.report import MM3_PER_ML, Lesion, build_findings
from training.baseline import BASELINES, baseline_likelihood_map
from training.data import CaseRecord, prepare_case_dir, remove_sequences
from training.scoring import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CENTRE_TOLERANCE_MM,
    COHERENCE_HIGH_CANDIDATE,
    ECE_BINS,
    FROC_FP_PER_STUDY,
    SIZE_BINS_MM,
    Figure,
    Match,
    auroc_or_none,
    bootstrap_intervals,
    brier_score,
    expected_calibration_error,
    froc_curve,
    froc_sensitivity,
    incoherent,
    match_candidates,
    quadratic_kappa_or_none,
    size_bin,
)

log = logging.getLogger(__name__)


class EvaluationError(MpmriError):
    """The evaluation data or checkpoint cannot be used."""


@dataclass
class CaseResult:
    case_id: str
    significant: int
    max_pirads: int
    cspca_probability: float
    pirads_distribution: list[float]
    candidates: list[Lesion]
    candidate_map: np.ndarray
    target: np.ndarray
    baseline_maps: dict[str, np.ndarray]
    lesions: list[dict[str, Any]]  # the significant truth lesions (ground_truth.json entries)
    match: Match
    pirads_predicted: int
    data_seed: int | None = None

    @property
    def top_likelihood(self) -> float:
        return self.candidates[0].likelihood if self.candidates else 0.0


def find_cases(data_dir: Path) -> list[Path]:
    """Case folders of an ``mpmri synth`` output (those with ``ground_truth.json``), sorted by name."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvaluationError(f"data folder not found: {data_dir}")
    cases = sorted(p.parent for p in data_dir.glob("*/ground_truth.json"))
    if not cases:
        raise EvaluationError(f"no case folders with ground_truth.json in {data_dir} (make it with `mpmri synth`)")
    return cases


def significant_lesions(truth: dict[str, Any]) -> list[dict[str, Any]]:
    """The clinically significant lesions of a ground-truth dict (with their 1-based ``label``)."""
    return [
        {**lesion, "label": int(lesion.get("label", i))}
        for i, lesion in enumerate(truth.get("lesions", []), start=1)
        if lesion.get("significant")
    ]


def match_case(candidates: list[Lesion], lesions: list[dict[str, Any]]) -> Match:
    """:func:`training.scoring.match_candidates` on one study's candidates and significant lesions."""
    return match_candidates(
        np.asarray([c.center_lps_mm for c in candidates], dtype=np.float64).reshape(-1, 3),
        np.asarray([c.likelihood for c in candidates], dtype=np.float64),
        np.asarray([les["center_lps_mm"] for les in lesions], dtype=np.float64).reshape(-1, 3),
    )


@torch.no_grad()
def network_outputs(nets: MpmriNetworks, images: np.ndarray, availability: np.ndarray) -> dict[str, np.ndarray]:
    """The ensemble's outputs for one study (``images [S, D, H, W]``, ``availability [S]``), without batch axis."""
    out = nets(torch.from_numpy(np.ascontiguousarray(images[None])), torch.from_numpy(availability[None]))
    return {name: value[0].numpy() for name, value in out.items()}


def predict_record(
    nets: MpmriNetworks,
    record: CaseRecord,
    availability: np.ndarray | None = None,
    baselines: bool = True,
    scorer: LesionScorer | None = None,
) -> CaseResult:
    """The full chain on one case: networks -> :func:`postprocessing.report.build_findings` -> matching.

    ``availability`` overrides the record's (a sequence set to 0 gets the contract's missing-channel value),
    for the sequence ablation. ``scorer``: the checkpoint's lesion scorer (the served path applies it the same
    way). A record preprocessed onto another grid than the networks' is refused.
    """
    images, avail = record.images, record.availability
    if tuple(images.shape[1:]) != tuple(nets.grid.size_dhw):
        raise EvaluationError(
            f"case {record.case_id} was preprocessed onto a {'x'.join(map(str, images.shape[1:]))} grid, but the"
            f" checkpoint's networks read {'x'.join(map(str, nets.grid.size_dhw))} (contract grid)"
        )
    if availability is not None:
        images, avail = remove_sequences(images, avail, availability)
    out = network_outputs(nets, images.astype(np.float32), avail.astype(np.float32))
    findings = build_findings(out, record.geometry, scorer=scorer, images=images, availability=avail)
    candidate_map = np.zeros(findings.labels.shape, dtype=np.float32)
    for lesion in findings.lesions:
        candidate_map[findings.labels == lesion.id] = lesion.likelihood
    lesions = significant_lesions(record.truth)
    seed = record.truth.get("seed")
    return CaseResult(
        case_id=record.case_id,
        significant=record.significant,
        max_pirads=record.max_pirads,
        cspca_probability=findings.cspca_probability,
        pirads_distribution=findings.pirads_distribution,
        candidates=findings.lesions,
        candidate_map=candidate_map,
        target=record.target,
        baseline_maps=(
            {rule: baseline_likelihood_map(record.images, record.availability, rule) for rule in BASELINES}
            if baselines
            else {}
        ),
        lesions=lesions,
        match=match_case(findings.lesions, lesions),
        pirads_predicted=findings.pirads_score,
        data_seed=None if seed is None else int(seed),
    )


@torch.no_grad()
def fusion_weights_by_zone(nets: MpmriNetworks, records: list[CaseRecord]) -> dict[str, dict[str, Any]]:
    """Mean per-voxel fusion weight of each sequence inside the truth lesions of each zone, and over all voxels.

    Only studies with every sequence present count (a missing sequence has weight 0 by construction).
    """
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for record in records:
        if float(record.availability.min()) < 0.5:
            continue
        images = torch.from_numpy(np.ascontiguousarray(record.images[None]))
        availability = torch.from_numpy(record.availability[None])
        maps = nets.localization(images)
        weights = nets.fusion.weights(maps, availability, images)[0].numpy()  # [S, D, H, W]
        groups = {"all_voxels": np.ones(record.lesion_index.shape, dtype=bool)}
        for i, lesion in enumerate(record.truth.get("lesions", []), start=1):
            kind = "cancer" if lesion.get("significant") else "mimic"
            key = f"{lesion.get('zone', 'unknown')}_{kind}"
            mask = record.lesion_index == i
            groups[key] = groups[key] | mask if key in groups else mask
        for key, mask in groups.items():
            n = int(mask.sum())
            if n == 0:
                continue
            sums[key] = sums.get(key, np.zeros(len(SEQUENCES))) + weights[:, mask].sum(axis=1, dtype=np.float64)
            counts[key] = counts.get(key, 0) + n
    return {
        key: {"voxels": counts[key], **{seq: float(v) for seq, v in zip(SEQUENCES, sums[key] / counts[key])}}
        for key in sorted(sums)
    }


#: a map "responds" to a truth lesion when its peak inside the lesion reaches this value
RESPONSE_THRESHOLD = 0.5


@torch.no_grad()
def lesion_map_response(
    nets: MpmriNetworks, records: list[CaseRecord], scored_maps: Sequence[np.ndarray] | None = None
) -> dict[str, dict[str, Any]]:
    """How each map answers each kind of truth lesion, by zone: the evidence behind the fusion and the candidates.

    For every truth lesion (cancers and mimics) of the studies with every sequence, the peak inside the lesion of
    each sequence map, of the fused map and of ``cspca_map``. Per group ``<zone>_<kind>`` (e.g. ``tz_cancer``,
    ``tz_bph_stromal``): ``lesions``, the fraction whose peak reaches :data:`RESPONSE_THRESHOLD` in each map
    (``t2w``, ``adc``, ``dwi``, ``fused``, ``cspca``; for a cancer a detection rate, for a mimic a false-alarm
    rate), and ``fused_reaches_floor``: the fraction whose fused peak reaches the candidate floor
    (``DEFAULT_CANDIDATES.floor_likelihood``), without which no candidate can find the lesion.
    ``cspca_without_map``: the same rate for ``cspca_map`` when the classification network reads the images with
    an all-zero fused map; far below ``cspca``, it says that the scores follow the map rather than the images.
    ``scored_maps`` (one per record: :attr:`CaseResult.candidate_map` of the checkpoint's lesion scorer, each
    candidate's blob holding its served likelihood): ``scorer`` is then the rate at which a candidate overlapping
    the lesion gets a likelihood of at least the threshold.
    """
    peaks: dict[str, list[np.ndarray]] = {}
    maps_order = (*SEQUENCES, "fused", "cspca", "cspca_without_map", *(("scorer",) if scored_maps is not None else ()))
    for index, record in enumerate(records):
        if float(record.availability.min()) < 0.5:
            continue
        images = np.ascontiguousarray(record.images, dtype=np.float32)
        out = network_outputs(nets, images, record.availability.astype(np.float32))
        batch = torch.from_numpy(images[None])
        without_map = nets.classification(batch, torch.zeros_like(batch[:, :1]))[2][0].numpy()
        layers = [out["sequence_maps"], out["fused_map"], out["cspca_map"], without_map]
        if scored_maps is not None:
            layers.append(np.asarray(scored_maps[index], dtype=np.float32)[None])
        stack = np.concatenate(layers)
        for i, lesion in enumerate(record.truth.get("lesions", []), start=1):
            mask = record.lesion_index == i
            if not mask.any():
                continue
            key = f"{lesion.get('zone', 'unknown')}_{lesion.get('kind', 'unknown')}"
            peaks.setdefault(key, []).append(stack[:, mask].max(axis=1))
    result: dict[str, dict[str, Any]] = {}
    for key in sorted(peaks):
        values = np.stack(peaks[key])  # [lesions, S + 2]
        entry: dict[str, Any] = {"lesions": int(values.shape[0])}
        entry.update({name: float(np.mean(values[:, j] >= RESPONSE_THRESHOLD)) for j, name in enumerate(maps_order)})
        entry["fused_reaches_floor"] = float(np.mean(values[:, len(SEQUENCES)] >= DEFAULT_CANDIDATES.floor_likelihood))
        result[key] = entry
    return result


#: the sequence sets of the ablation: name -> availability mask (1 = kept)
ABLATIONS: dict[str, tuple[float, ...]] = {
    "without_t2w": (0.0, 1.0, 1.0),
    "without_adc": (1.0, 0.0, 1.0),
    "without_dwi": (1.0, 1.0, 0.0),
    "t2w_only": (1.0, 0.0, 0.0),
    "t2w_adc": (1.0, 1.0, 0.0),
}


def sequence_ablation(
    nets: MpmriNetworks,
    records: list[CaseRecord],
    full: Any,
    subjects: list[str],
    scorer: LesionScorer | None = None,
) -> dict[str, dict[str, Any]]:
    """AUROC / AP with sequences removed at inference, and their change from the full model ``full``."""
    out: dict[str, dict[str, Any]] = {}
    for name, mask in ABLATIONS.items():
        results = [
            predict_record(nets, r, np.asarray(mask, np.float32), baselines=False, scorer=scorer) for r in records
        ]
        metrics = _picai([r.candidate_map for r in results], [r.target for r in results], subjects)
        auroc, ap = _finite(metrics.auroc), _finite(metrics.AP)
        out[name] = {
            "sequences": [seq for seq, keep in zip(SEQUENCES, mask) if keep],
            "auroc": auroc,
            "ap": ap,
            "auroc_change": None if auroc is None or _finite(full.auroc) is None else auroc - float(full.auroc),
            "ap_change": None if ap is None or _finite(full.AP) is None else ap - float(full.AP),
        }
    return out


def _picai(y_det: list[np.ndarray], y_true: list[np.ndarray], subjects: list[str]) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        from picai_eval import evaluate as picai_evaluate

        return picai_evaluate(
            y_det=y_det,
            y_true=y_true,
            subject_list=subjects,
            y_true_postprocess_func=lambda lbl: (lbl > 0).astype(np.int32),
            num_parallel_calls=1,
        )


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _picai_figure(metrics: Any, subjects: list[str], what: str) -> Figure:
    """A bootstrap figure computed by picai_eval's own code on the resampled subjects (repeats included)."""

    def figure(idx: np.ndarray) -> float | None:
        chosen = [subjects[i] for i in idx]
        if what == "auroc":
            targets = {metrics.case_target[s] for s in chosen}
            return _finite(float(metrics.calc_auroc(chosen))) if len(targets) == 2 else None
        if not any(is_lesion for s in chosen for is_lesion, *_ in metrics.lesion_results[s]):
            return None
        return _finite(float(metrics.calc_AP(chosen)))

    return figure


class _Protocol:
    """Per-case arrays of one evaluation and the figures of the protocol on any case subset (index array)."""

    def __init__(self, results: list[CaseResult]) -> None:
        self.n = len(results)
        self.labels = np.array([r.significant for r in results], dtype=np.int64)
        self.probs = np.array([r.cspca_probability for r in results], dtype=np.float64)
        self.top = np.array([r.top_likelihood for r in results], dtype=np.float64)
        self.truth_pirads = np.array([r.max_pirads for r in results], dtype=np.int64)
        self.pred_pirads = np.array([r.pirads_predicted for r in results], dtype=np.int64)
        self.incoherent = incoherent(self.top, self.probs)
        self.baseline_top = {
            rule: np.array([float(r.baseline_maps[rule].max()) for r in results]) for rule in BASELINES
        }
        # per case: false-positive likelihoods and per-lesion (likelihood, zone, size bin)
        self.fp = [
            np.array([c.likelihood for c, m in zip(r.candidates, r.match.candidate_lesion) if m < 0]) for r in results
        ]
        self.lesion_lik = [r.match.lesion_likelihood for r in results]
        self.lesion_zone = [np.array([str(les.get("zone", "?")) for les in r.lesions], dtype=object) for r in results]
        self.lesion_size = [
            np.array([size_bin(float(les.get("diameter_mm", 0.0))) for les in r.lesions], dtype=object) for r in results
        ]
        self.has_zone = {zone: np.array([bool(np.any(z == zone)) for z in self.lesion_zone]) for zone in self.zones()}

    def zones(self) -> list[str]:
        return sorted({str(z) for zs in self.lesion_zone for z in zs})

    def _lesions(self, idx: np.ndarray, group: tuple[str, str] | None = None) -> np.ndarray:
        parts = []
        for i in idx:
            lik = self.lesion_lik[i]
            if group is not None:
                kind, value = group
                keep = (self.lesion_zone[i] if kind == "zone" else self.lesion_size[i]) == value
                lik = lik[keep.astype(bool)]
            parts.append(lik)
        return np.concatenate(parts) if parts else np.zeros(0)

    def located_fraction(self, idx: np.ndarray, group: tuple[str, str] | None = None) -> float | None:
        lik = self._lesions(idx, group)
        return float(np.mean(~np.isnan(lik))) if lik.size else None

    def froc(self, idx: np.ndarray, fp_per_study: float, group: tuple[str, str] | None = None) -> float | None:
        fps = np.concatenate([self.fp[i] for i in idx]) if len(idx) else np.zeros(0)
        return froc_sensitivity(fps, self._lesions(idx, group), len(idx), fp_per_study)

    def zone_auroc(self, idx: np.ndarray, zone: str) -> float | None:
        """Top-candidate AUROC: studies with a significant lesion in ``zone`` vs studies without csPCa."""
        keep = idx[(self.labels[idx] == 0) | self.has_zone[zone][idx]]
        return auroc_or_none(self.labels[keep], self.top[keep])

    def figures(self, model: Any, baselines: dict[str, Any], subjects: list[str]) -> dict[str, Figure]:
        f: dict[str, Figure] = {
            "auroc": _picai_figure(model, subjects, "auroc"),
            "ap": _picai_figure(model, subjects, "ap"),
            "classifier_auroc": lambda idx: auroc_or_none(self.labels[idx], self.probs[idx]),
            "brier": lambda idx: brier_score(self.labels[idx], self.probs[idx]),
            "ece": lambda idx: expected_calibration_error(self.labels[idx], self.probs[idx]),
            "pirads_accuracy": lambda idx: float(np.mean(self.truth_pirads[idx] == self.pred_pirads[idx])),
            "pirads_quadratic_kappa": lambda idx: quadratic_kappa_or_none(
                self.truth_pirads[idx].tolist(), self.pred_pirads[idx].tolist()
            ),
            "located_fraction": self.located_fraction,
            "incoherent_fraction": lambda idx: float(np.mean(self.incoherent[idx])),
            "baseline_auroc": _picai_figure(baselines["adc_min"], subjects, "auroc"),
            "baseline_ap": _picai_figure(baselines["adc_min"], subjects, "ap"),
            "baseline_dwi_auroc": _picai_figure(baselines["dwi_max"], subjects, "auroc"),
            "baseline_dwi_ap": _picai_figure(baselines["dwi_max"], subjects, "ap"),
        }
        for fp in FROC_FP_PER_STUDY:
            f[f"froc_sensitivity_at_{fp:g}_fp"] = functools.partial(self.froc, fp_per_study=fp)
        return f

    def group_figures(self) -> dict[str, Figure]:
        """By zone and by lesion size: located fraction, FROC sensitivities; by zone also the study AUROC."""
        f: dict[str, Figure] = {}
        groups = [("zone", z) for z in self.zones()] + [("size", label) for label, _, _ in SIZE_BINS_MM]
        for group in groups:
            key = f"{group[0]}={group[1]}"
            f[f"{key}/located_fraction"] = functools.partial(self.located_fraction, group=group)
            for fp in FROC_FP_PER_STUDY:
                f[f"{key}/froc_sensitivity_at_{fp:g}_fp"] = functools.partial(self.froc, fp_per_study=fp, group=group)
            if group[0] == "zone":
                f[f"{key}/auroc"] = functools.partial(self.zone_auroc, zone=group[1])
        return f

    def lesion_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for zones, sizes in zip(self.lesion_zone, self.lesion_size):
            for z in zones:
                counts[f"zone={z}"] = counts.get(f"zone={z}", 0) + 1
            for b in sizes:
                counts[f"size={b}"] = counts.get(f"size={b}", 0) + 1
        return counts


def evaluate(
    data_dir: Path,
    out_dir: Path,
    checkpoint: Path = DEFAULT_CHECKPOINT,
    threads: int = 2,
    progress: bool = True,
    record_in_checkpoint: bool = False,
    resamples: int = BOOTSTRAP_RESAMPLES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
    ablations: bool = True,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on every case of ``data_dir``; writes the report to ``out_dir``; returns metrics.

    ``ablations=False`` skips the sequence ablation (5 more passes of the networks over the studies).
    """
    torch.set_num_threads(threads)
    t0 = time.monotonic()
    nets, meta = load_checkpoint(checkpoint)  # first: a checkpoint under another contract is refused by name
    try:
        scorer = scorer_from_metadata(meta)
    except ValueError as err:
        raise EvaluationError(f"checkpoint {checkpoint}: {err}") from None
    cases = find_cases(data_dir)
    records = [  # onto the grid the checkpoint records (its contract), not the default one
        prepare_case_dir(case_dir, nets.grid)
        for case_dir in tqdm(cases, desc="preprocess", disable=not progress, mininterval=5)
    ]
    results = [
        predict_record(nets, r, scorer=scorer)
        for r in tqdm(records, desc="evaluate", disable=not progress, mininterval=5)
    ]

    subjects = [r.case_id for r in results]
    y_true = [r.target for r in results]
    model = _picai([r.candidate_map for r in results], y_true, subjects)
    baselines = {
        rule: _picai(
            [extract_candidates(r.baseline_maps[rule], _unit_geometry(r.target.shape))[1] for r in results],
            y_true,
            subjects,
        )
        for rule in BASELINES
    }
    base = baselines["adc_min"]
    ablation = sequence_ablation(nets, records, model, subjects, scorer) if ablations else {}
    fusion = fusion_weights_by_zone(nets, records)
    response = lesion_map_response(nets, records, [r.candidate_map for r in results] if scorer is not None else None)

    proto = _Protocol(results)
    all_idx = np.arange(len(results))
    cm = confusion_matrix(proto.truth_pirads, proto.pred_pirads, labels=list(PIRADS_CATEGORIES))
    figures = proto.figures(model, baselines, subjects)
    group_figures = proto.group_figures()
    point = {name: _finite(fig(all_idx)) for name, fig in figures.items()}
    group_point = {name: _finite(fig(all_idx)) for name, fig in group_figures.items()}
    intervals = bootstrap_intervals({**figures, **group_figures}, len(results), resamples, bootstrap_seed)
    nearest = np.concatenate([r.match.lesion_nearest_mm for r in results]) if results else np.zeros(0)
    located_nearest = nearest[nearest <= CENTRE_TOLERANCE_MM]
    n_lesions = int(nearest.size)
    n_located = int(sum(int(np.sum(~np.isnan(r.match.lesion_likelihood))) for r in results))
    secondary = [
        (c.source != DEFAULT_CANDIDATES.source_map, int(lesion) >= 0)
        for r in results
        for c, lesion in zip(r.candidates, r.match.candidate_lesion, strict=True)
    ]
    seeds = sorted({r.data_seed for r in results if r.data_seed is not None})

    by_group: dict[str, dict[str, Any]] = {}
    counts = proto.lesion_counts()
    for name, value in group_point.items():
        group, figure = name.split("/", 1)
        entry = by_group.setdefault(group, {"significant_lesions": counts.get(group, 0)})
        entry[figure] = value
        entry[f"{figure}_ci95"] = intervals[name]

    metrics: dict[str, Any] = {
        **{k: point[k] for k in ("auroc", "ap")},
        "score": _finite(model.score),
        "classifier_auroc": point["classifier_auroc"],
        "brier": point["brier"],
        "ece": point["ece"],
        "baseline_auroc": _finite(base.auroc),
        "baseline_ap": _finite(base.AP),
        "baseline_score": _finite(base.score),
        "baseline_rule": "adc_min",
        "baseline_dwi_auroc": _finite(baselines["dwi_max"].auroc),
        "baseline_dwi_ap": _finite(baselines["dwi_max"].AP),
        "baseline_dwi_score": _finite(baselines["dwi_max"].score),
        "pirads_accuracy": point["pirads_accuracy"],
        "pirads_quadratic_kappa": point["pirads_quadratic_kappa"],
        "pirads_confusion": {"categories": list(PIRADS_CATEGORIES), "rows_truth_cols_predicted": cm.tolist()},
        "pirads_categories_never_predicted": [
            int(c)
            for c in PIRADS_CATEGORIES
            if c in set(proto.truth_pirads.tolist()) and c not in set(proto.pred_pirads.tolist())
        ],
        "located_fraction": point["located_fraction"],
        "centre_within_5mm_fraction": point["located_fraction"],
        "lesions_located": n_located,
        "lesions_missed": n_lesions - n_located,
        "lesions_total": n_lesions,
        "candidates_per_study": len(secondary) / max(len(results), 1),
        "secondary_candidates_per_study": sum(s for s, _ in secondary) / max(len(results), 1),
        "lesions_located_by_secondary_candidates": sum(s and hit for s, hit in secondary),
        "centre_error_mm_median": float(np.median(located_nearest)) if located_nearest.size else None,
        "centre_error_mm_p90": float(np.percentile(located_nearest, 90)) if located_nearest.size else None,
        "centre_error_mm_max": float(np.max(located_nearest)) if located_nearest.size else None,
        **{f"froc_sensitivity_at_{fp:g}_fp": point[f"froc_sensitivity_at_{fp:g}_fp"] for fp in FROC_FP_PER_STUDY},
        "incoherent_fraction": point["incoherent_fraction"],
        "incoherent_studies": int(proto.incoherent.sum()),
        "studies_with_candidate_ge_0.9": int(np.sum(proto.top >= COHERENCE_HIGH_CANDIDATE)),
        "ci95": {name: intervals[name] for name in figures},
        "by_zone": {k.split("=", 1)[1]: v for k, v in by_group.items() if k.startswith("zone=")},
        "by_size": {k.split("=", 1)[1]: v for k, v in by_group.items() if k.startswith("size=")},
        "fusion_weights": fusion,
        "lesion_map_response": response,
        "lesion_map_response_threshold": RESPONSE_THRESHOLD,
        "ablation": ablation,
        "calibration": meta.get("calibration"),
        "lesion_scorer": None if scorer is None else scorer.fitted_on,
        "bootstrap": {
            "resamples": resamples,
            "seed": bootstrap_seed,
            "method": "case-level resampling with replacement, 2.5th-97.5th percentiles",
        },
        "definitions": {
            "located": f"a candidate centre within {CENTRE_TOLERANCE_MM:g} mm of a significant lesion centre, "
            "over all significant lesions",
            "froc": "greedy matching by likelihood; unmatched candidates are false positives",
            "incoherent": "a candidate >= 0.9 with study probability < 0.5, "
            "or no candidate >= 0.1 with probability > 0.5",
            "ece": f"{ECE_BINS} equal-width bins of cspca_probability vs the study truth",
        },
        "num_cases": len(results),
        "num_significant_cases": int(proto.labels.sum()),
        "data_seeds": seeds,
        "candidates": DEFAULT_CANDIDATES.to_dict(),
        "data_dir": str(data_dir),
        "checkpoint": str(checkpoint),
        "checkpoint_profile": meta.get("profile"),
        "checkpoint_training_data_seed": meta.get("training", {}).get("data", {}).get("data_seed"),
        "seconds": round(time.monotonic() - t0, 1),
        "note": "synthetic studies only",
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    _write_cases_csv(out_dir / "cases.csv", results, proto)
    _write_candidates_csv(out_dir / "candidates.csv", results)
    _write_lesions_csv(out_dir / "lesions.csv", results)
    _plots(out_dir, model, baselines, proto, cm)
    if record_in_checkpoint:
        summary = {k: metrics[k] for k in metrics if k not in ("pirads_confusion", "candidates", "definitions")}
        save_checkpoint(checkpoint, nets, {**meta, "evaluation": summary})
    return metrics


def _unit_geometry(shape_dhw: tuple[int, ...]) -> GridGeometry:
    """Baseline candidate maps only need voxel indices; any geometry does."""
    d, h, w = shape_dhw
    return GridGeometry((0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (w, h, d))


def _write_cases_csv(path: Path, results: list[CaseResult], proto: _Protocol) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "case_id",
                "significant",
                "max_pirads",
                "cspca_probability",
                "pirads_predicted",
                "top_candidate_likelihood",
                "num_candidates",
                "false_positive_candidates",
                "significant_lesions",
                "lesions_located",
                "incoherent",
                "baseline_adc_min_score",
                "baseline_dwi_max_score",
                "nearest_candidate_mm",
            ]
        )
        for i, r in enumerate(results):
            writer.writerow(
                [
                    r.case_id,
                    r.significant,
                    r.max_pirads,
                    f"{r.cspca_probability:.4f}",
                    r.pirads_predicted,
                    f"{r.top_likelihood:.4f}",
                    len(r.candidates),
                    int(np.sum(r.match.candidate_lesion < 0)),
                    len(r.lesions),
                    int(np.sum(~np.isnan(r.match.lesion_likelihood))),
                    int(proto.incoherent[i]),
                    f"{float(r.baseline_maps['adc_min'].max()):.4f}",
                    f"{float(r.baseline_maps['dwi_max'].max()):.4f}",
                    " ".join(f"{e:.2f}" for e in r.match.lesion_nearest_mm),
                ]
            )


def _write_candidates_csv(path: Path, results: list[CaseResult]) -> None:
    """One row per candidate (a lesion of the findings): LPS centre, csPCa likelihood, PI-RADS-like category, and the
    map that proposed it (``fused_map``, or ``dwi_map`` for a secondary candidate)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "case_id",
                "x_mm",
                "y_mm",
                "z_mm",
                "likelihood",
                "pirads",
                "score",
                "rank",
                "volume_mm3",
                "located_lesion_label",
                "nearest_significant_lesion_mm",
                "source",
            ]
        )
        for r in results:
            for c, lesion, dist in zip(r.candidates, r.match.candidate_lesion, r.match.candidate_distance_mm):
                x, y, z = c.center_lps_mm
                writer.writerow(
                    [
                        r.case_id,
                        f"{x:.2f}",
                        f"{y:.2f}",
                        f"{z:.2f}",
                        f"{c.likelihood:.4f}",
                        c.pirads,
                        f"{c.score:.3f}",
                        c.id,
                        f"{c.volume_ml * MM3_PER_ML:.1f}",
                        r.lesions[lesion]["label"] if lesion >= 0 else "",
                        f"{dist:.2f}" if math.isfinite(dist) else "",
                        c.source,
                    ]
                )


def _write_lesions_csv(path: Path, results: list[CaseResult]) -> None:
    """One row per significant truth lesion: zone, size, nearest candidate, located or not."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["case_id", "label", "zone", "diameter_mm", "pirads", "nearest_candidate_mm", "located", "likelihood"]
        )
        for r in results:
            for lesion, nearest, lik in zip(r.lesions, r.match.lesion_nearest_mm, r.match.lesion_likelihood):
                writer.writerow(
                    [
                        r.case_id,
                        lesion["label"],
                        lesion.get("zone", ""),
                        lesion.get("diameter_mm", ""),
                        lesion.get("pirads", ""),
                        f"{nearest:.2f}" if math.isfinite(nearest) else "",
                        int(not math.isnan(lik)),
                        "" if math.isnan(lik) else f"{lik:.4f}",
                    ]
                )


def _save(fig: Any, path: Path, legend_loc: str | None = None) -> None:
    """Finish one evaluation figure (legend on its first axes, tight layout) and write it as PNG."""
    import matplotlib.pyplot as plt

    if legend_loc is not None:
        fig.axes[0].legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plots(out_dir: Path, model: Any, baselines: dict[str, Any], proto: _Protocol, cm: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, probs = proto.labels, proto.probs
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(model.case_FPR, model.case_TPR, label=f"networks, top candidate (AUROC {model.auroc:.3f})")
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, label=f"networks, csPCa head (AUROC {auroc_or_none(labels, probs):.3f})")
    for rule, base in baselines.items():
        ax.plot(base.case_FPR, base.case_TPR, label=f"baseline {rule} (AUROC {base.auroc:.3f})", linestyle="--")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("patient-level ROC (synthetic studies)")
    _save(fig, out_dir / "roc.png", legend_loc="lower right")

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(model.recall, model.precision, label=f"networks (AP {model.AP:.3f})")
    for rule, base in baselines.items():
        ax.plot(base.recall, base.precision, label=f"baseline {rule} (AP {base.AP:.3f})", linestyle="--")
    ax.set_xlabel("recall (lesion)")
    ax.set_ylabel("precision (lesion)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("lesion-level precision-recall")
    _save(fig, out_dir / "pr.png", legend_loc="lower left")

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(model.lesion_FPR, model.lesion_TPR, label="networks (picai_eval, IoU >= 0.1)")
    idx = np.arange(proto.n)
    fp_rate, sens = froc_curve(
        np.concatenate([proto.fp[i] for i in idx]) if proto.n else np.zeros(0), proto._lesions(idx), proto.n
    )
    ax.plot(fp_rate, sens, label=f"networks (centre within {CENTRE_TOLERANCE_MM:g} mm)", drawstyle="steps-post")
    for fp in FROC_FP_PER_STUDY:
        ax.axvline(fp, color="grey", linewidth=0.5)
    for rule, base in baselines.items():
        ax.plot(base.lesion_FPR, base.lesion_TPR, label=f"baseline {rule}", linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("false positives per case")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title("FROC (synthetic studies)")
    _save(fig, out_dir / "froc.png", legend_loc="lower right")

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ticks = list(range(len(PIRADS_CATEGORIES)))
    ax.set_xticks(ticks, [str(c) for c in PIRADS_CATEGORIES])
    ax.set_yticks(ticks, [str(c) for c in PIRADS_CATEGORIES])
    ax.set_xlabel("predicted PI-RADS-like category")
    ax.set_ylabel("true max PI-RADS-like category")
    ax.set_title("PI-RADS-like confusion matrix")
    _save(fig, out_dir / "confusion.png")
