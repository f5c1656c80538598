"""Evaluation of a checkpoint on ``mpmri synth`` studies: the full chain from DICOM, scored the PI-CAI way.

For every case folder: :func:`preprocessing.pipeline.preprocess_study` on ``dicom/`` -> networks ->
:func:`postprocessing.candidates.extract_candidates` on the fused map. Scores:

* ``picai_eval.evaluate`` on the candidate maps vs the csPCa lesion masks (``lesions.nii.gz`` resampled
  to the model grid, significant lesions only): ``auroc`` (patient level, case score = the highest
  candidate likelihood), ``ap`` (lesion level), ``score`` = (auroc + ap) / 2;
* ``classifier_auroc``: the classification network's csPCa probability vs the study truth;
* PI-RADS-like confusion matrix of ``argmax(pirads_distribution)`` vs the study's max PI-RADS;
* lesion centre errors (mm): each csPCa truth lesion vs the best candidate overlapping it;
* the same picai scores for the trivial baseline ``adc_min`` (:mod:`training.baseline`), keys ``baseline_*``,
  and for the stronger ``dwi_max`` heuristic, keys ``baseline_dwi_*``.

Outputs in OUT_DIR: ``metrics.json``, ``cases.csv``, ``roc.png``, ``pr.png``, ``froc.png``, ``confusion.png``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score, roc_curve
from tqdm import tqdm

from contract import PIRADS_CATEGORIES, GridGeometry
from contract.errors import MpmriError
from networks.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
from networks.models import MpmriNetworks
from postprocessing.candidates import (
    CANDIDATE_THRESHOLD,
    DYNAMIC_THRESHOLD_FACTOR,
    MIN_VOXELS_DETECTION,
    NUM_LESIONS_TO_EXTRACT,
    LesionCandidate,
    extract_candidates,
)
from training.baseline import BASELINES, baseline_likelihood_map
from training.data import CaseRecord, prepare_case_dir

log = logging.getLogger(__name__)

#: a truth lesion counts as located when a candidate overlapping it has its centre within this distance
CENTRE_TOLERANCE_MM: float = 5.0


class EvaluationError(MpmriError):
    """The evaluation data or checkpoint cannot be used."""


@dataclass
class CaseResult:
    case_id: str
    significant: int
    max_pirads: int
    cspca_probability: float
    pirads_distribution: list[float]
    candidates: list[LesionCandidate]
    candidate_map: np.ndarray
    target: np.ndarray
    baseline_maps: dict[str, np.ndarray]
    centre_errors_mm: list[float]
    lesions_missed: int


def find_cases(data_dir: Path) -> list[Path]:
    """Case folders of an ``mpmri synth`` output (those with ``ground_truth.json``), sorted by name."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvaluationError(f"data folder not found: {data_dir}")
    cases = sorted(p.parent for p in data_dir.glob("*/ground_truth.json"))
    if not cases:
        raise EvaluationError(f"no case folders with ground_truth.json in {data_dir} (make it with `mpmri synth`)")
    return cases


def centre_errors(
    record: CaseRecord, candidates: list[LesionCandidate], candidate_map: np.ndarray
) -> tuple[list[float], int]:
    """Distances (mm) from each csPCa truth lesion centre to the most likely candidate overlapping it.

    A candidate's voxels are those of ``candidate_map`` holding its likelihood. Returns
    ``(errors, missed)``: lesions that no candidate overlaps count as missed.
    """
    errors: list[float] = []
    missed = 0
    for i, lesion in enumerate(record.truth.get("lesions", []), start=1):
        if not lesion.get("significant"):
            continue
        mask = record.lesion_index == i
        overlapping = [c for c in candidates if (candidate_map[mask] == np.float32(c.likelihood)).any()]
        if not overlapping:
            missed += 1
            continue
        best = max(overlapping, key=lambda c: c.likelihood)
        errors.append(float(np.linalg.norm(np.asarray(best.center_lps_mm) - np.asarray(lesion["center_lps_mm"]))))
    return errors, missed


@torch.no_grad()
def predict_record(nets: MpmriNetworks, record: CaseRecord) -> CaseResult:
    images = torch.from_numpy(record.images[None])
    availability = torch.from_numpy(record.availability[None])
    out = nets(images, availability)
    fused = out["fused_map"][0, 0].numpy()
    candidates, candidate_map = extract_candidates(fused, record.geometry)
    errors, missed = centre_errors(record, candidates, candidate_map)
    return CaseResult(
        case_id=record.case_id,
        significant=record.significant,
        max_pirads=record.max_pirads,
        cspca_probability=float(out["cspca_probability"][0, 0]),
        pirads_distribution=[float(v) for v in out["pirads_distribution"][0]],
        candidates=candidates,
        candidate_map=candidate_map,
        target=record.target,
        baseline_maps={rule: baseline_likelihood_map(record.images, record.availability, rule) for rule in BASELINES},
        centre_errors_mm=errors,
        lesions_missed=missed,
    )


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


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def evaluate(
    data_dir: Path,
    out_dir: Path,
    checkpoint: Path = DEFAULT_CHECKPOINT,
    threads: int = 2,
    progress: bool = True,
    record_in_checkpoint: bool = False,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on every case of ``data_dir``; writes the report to ``out_dir``; returns metrics."""
    torch.set_num_threads(threads)
    t0 = time.monotonic()
    nets, meta = load_checkpoint(checkpoint)  # first: a checkpoint under another contract is refused by name
    cases = find_cases(data_dir)
    results: list[CaseResult] = []
    for case_dir in tqdm(cases, desc="evaluate", disable=not progress, mininterval=5):
        results.append(predict_record(nets, prepare_case_dir(case_dir)))

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

    labels = np.array([r.significant for r in results])
    probs = np.array([r.cspca_probability for r in results])
    both_classes = 0 < labels.sum() < len(labels)
    truth_pirads = [r.max_pirads for r in results]
    pred_pirads = [int(np.argmax(r.pirads_distribution)) + PIRADS_CATEGORIES[0] for r in results]
    cm = confusion_matrix(truth_pirads, pred_pirads, labels=list(PIRADS_CATEGORIES))
    errors = [e for r in results for e in r.centre_errors_mm]
    missed = sum(r.lesions_missed for r in results)
    n_lesions = len(errors) + missed

    metrics: dict[str, Any] = {
        "auroc": _finite(model.auroc),
        "ap": _finite(model.AP),
        "score": _finite(model.score),
        "classifier_auroc": _finite(float(roc_auc_score(labels, probs))) if both_classes else None,
        "baseline_auroc": _finite(base.auroc),
        "baseline_ap": _finite(base.AP),
        "baseline_score": _finite(base.score),
        "baseline_rule": "adc_min",
        "baseline_dwi_auroc": _finite(baselines["dwi_max"].auroc),
        "baseline_dwi_ap": _finite(baselines["dwi_max"].AP),
        "baseline_dwi_score": _finite(baselines["dwi_max"].score),
        "pirads_accuracy": float(np.trace(cm) / max(1, cm.sum())),
        "pirads_quadratic_kappa": _finite(float(cohen_kappa_score(truth_pirads, pred_pirads, weights="quadratic")))
        if len(set(truth_pirads) | set(pred_pirads)) > 1
        else None,
        "pirads_confusion": {"categories": list(PIRADS_CATEGORIES), "rows_truth_cols_predicted": cm.tolist()},
        "centre_error_mm_median": float(np.median(errors)) if errors else None,
        "centre_error_mm_mean": float(np.mean(errors)) if errors else None,
        "centre_error_mm_p90": float(np.percentile(errors, 90)) if errors else None,
        "centre_error_mm_max": float(np.max(errors)) if errors else None,
        "centre_within_5mm_fraction": float(np.mean(np.asarray(errors) <= CENTRE_TOLERANCE_MM)) if errors else None,
        "lesions_located": len(errors),
        "lesions_missed": missed,
        "lesions_total": n_lesions,
        "num_cases": len(results),
        "num_significant_cases": int(labels.sum()),
        "candidates": {
            "threshold": CANDIDATE_THRESHOLD,
            "min_voxels_detection": MIN_VOXELS_DETECTION,
            "num_lesions_to_extract": NUM_LESIONS_TO_EXTRACT,
            "dynamic_threshold_factor": DYNAMIC_THRESHOLD_FACTOR,
        },
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
    _write_cases_csv(out_dir / "cases.csv", results)
    _plots(out_dir, model, baselines, labels, probs, cm)
    if record_in_checkpoint:
        summary = {k: metrics[k] for k in metrics if k not in ("pirads_confusion", "candidates")}
        save_checkpoint(checkpoint, nets, {**meta, "evaluation": summary})
    return metrics


def _unit_geometry(shape_dhw: tuple[int, ...]) -> GridGeometry:
    """Baseline candidate maps only need voxel indices; any geometry does."""
    d, h, w = shape_dhw
    return GridGeometry((0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (w, h, d))


def _write_cases_csv(path: Path, results: list[CaseResult]) -> None:
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
                "baseline_adc_min_score",
                "baseline_dwi_max_score",
                "centre_errors_mm",
                "lesions_missed",
            ]
        )
        for r in results:
            writer.writerow(
                [
                    r.case_id,
                    r.significant,
                    r.max_pirads,
                    f"{r.cspca_probability:.4f}",
                    int(np.argmax(r.pirads_distribution)) + 1,
                    f"{(r.candidates[0].likelihood if r.candidates else 0.0):.4f}",
                    len(r.candidates),
                    f"{float(r.baseline_maps['adc_min'].max()):.4f}",
                    f"{float(r.baseline_maps['dwi_max'].max()):.4f}",
                    " ".join(f"{e:.2f}" for e in r.centre_errors_mm),
                    r.lesions_missed,
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


def _plots(
    out_dir: Path, model: Any, baselines: dict[str, Any], labels: np.ndarray, probs: np.ndarray, cm: np.ndarray
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(model.case_FPR, model.case_TPR, label=f"networks, top candidate (AUROC {model.auroc:.3f})")
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, label=f"networks, csPCa head (AUROC {roc_auc_score(labels, probs):.3f})")
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
    ax.plot(model.lesion_FPR, model.lesion_TPR, label="networks")
    for rule, base in baselines.items():
        ax.plot(base.lesion_FPR, base.lesion_TPR, label=f"baseline {rule}", linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("false positives per case")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title("FROC")
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
