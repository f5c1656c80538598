"""Post-training calibration on a validation split: category thresholds, then Platt scaling of the csPCa logit.

Both fits read one number per validation study, its highest score (``max s`` of the score map), against the
study truth, and both are stored as buffers of the classification network (``score_thresholds``,
``calibration``): they travel in the checkpoint and inside the ONNX graph, so evaluation, the demo and the
service apply them identically.

1. **Category thresholds** (:func:`fit_score_thresholds`): an ordinal (cumulative-link) regression of the study
   category on the raw ``max s`` with free thresholds ``t_2 < t_3 < t_4 < t_5`` and a free scale, by maximum
   likelihood. The network then maps its raw score piecewise-linearly so that ``t_k`` lands on the contract's
   cut point ``c_k`` (``Classification.remap_score``): the cut points of the contract never change, the score
   is what moves. Training fits the score to the training cases, which it over-fits; the thresholds move the
   category boundaries to where held-out studies put them.
2. **Platt scaling** (:func:`fit_platt`) of the study csPCa logit ``(max s - c_4) / tau``, after the remap.

With fewer than :data:`MIN_CALIBRATION_CASES` studies (smoke runs) both stay the identity and the reason is
recorded instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from contract import PIRADS_CATEGORIES, PIRADS_SCORE_CUTPOINTS
from networks.models import MIN_THRESHOLD_GAP, MpmriNetworks
from training.data import CaseDataset, CaseRecord

#: fewer validation cases than this leave the calibration at the identity (recorded as skipped)
MIN_CALIBRATION_CASES = 10


@torch.no_grad()
def study_raw_scores(
    nets: MpmriNetworks, records: Sequence[CaseRecord], batch_size: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(raw max s [N], significant [N] int, max_pirads [N] int)`` of ``records`` (raw: before the remap)."""
    nets.eval()
    scores: list[float] = []
    significant: list[int] = []
    categories: list[int] = []
    loader = torch.utils.data.DataLoader(CaseDataset(records), batch_size=batch_size, shuffle=False)
    device = nets.device
    for batch in loader:
        images, availability = batch["images"].to(device), batch["availability"].to(device)
        fused = nets.fusion(nets.localization(images), availability, images)
        scores += nets.classification.raw_score(images, fused).amax(dim=(1, 2, 3, 4)).tolist()
        significant += [int(v) for v in batch["significant"].tolist()]
        categories += [int(v) + PIRADS_CATEGORIES[0] for v in batch["pirads_class"].tolist()]
    return np.asarray(scores, dtype=np.float64), np.asarray(significant), np.asarray(categories)


def _thresholds_from(params: np.ndarray) -> np.ndarray:
    gaps = MIN_THRESHOLD_GAP + np.exp(params[1:-1])
    return np.cumsum(np.r_[params[0], gaps])


def ordinal_nll(thresholds: np.ndarray, scale: float, scores: np.ndarray, categories: np.ndarray) -> float:
    """Negative log-likelihood of ``categories`` (1-5) under ``P(>= k) = sigmoid((s - t_k) / scale)``."""
    z = (scores[:, None] - thresholds[None, :]) / scale
    at_least = np.concatenate([np.ones((len(scores), 1)), 1 / (1 + np.exp(-z)), np.zeros((len(scores), 1))], axis=1)
    p = np.clip(at_least[:, :-1] - at_least[:, 1:], 1e-12, 1.0)
    return float(-np.log(p[np.arange(len(scores)), categories - PIRADS_CATEGORIES[0]]).sum())


def fit_score_thresholds(scores: np.ndarray, categories: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """Maximum-likelihood thresholds ``t_2 < ... < t_5`` (gaps >= ``MIN_THRESHOLD_GAP``) and scale.

    ``scores`` are raw study ``max s`` ``[N]``, ``categories`` the study categories 1-5 ``[N]``; ``scale`` (the
    network's ``tau``) is the starting value of the fitted scale. Starts from the contract's cut points.
    Nelder-Mead on ``(t_2, log(gap - min_gap) x 3, log scale)``: deterministic.
    """
    from scipy.optimize import minimize

    cuts = np.asarray(PIRADS_SCORE_CUTPOINTS, dtype=np.float64)
    start = np.r_[cuts[0], np.log(np.diff(cuts) - MIN_THRESHOLD_GAP), math.log(scale)]

    def objective(params: np.ndarray) -> float:
        return ordinal_nll(_thresholds_from(params), math.exp(params[-1]), scores, categories)

    result = minimize(objective, start, method="Nelder-Mead", options={"maxiter": 20000, "xatol": 1e-5, "fatol": 1e-8})
    return _thresholds_from(result.x), math.exp(result.x[-1])


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float] | str:
    """``(slope, intercept)`` of ``sigmoid(slope * logit + intercept)`` by a weakly regularized logistic
    regression, or the reason there is none (one class only, or a slope that is not positive)."""
    from sklearn.linear_model import LogisticRegression

    if len(set(labels.tolist())) < 2:
        return "the validation cases are all of one class; calibration needs both"
    model = LogisticRegression(C=100.0).fit(logits[:, None], labels)
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if slope <= 0:
        return f"fitted slope {slope:.3f} is not positive: the network does not rank the validation studies"
    return slope, intercept


def calibrate(nets: MpmriNetworks, records: Sequence[CaseRecord], batch_size: int = 4) -> dict[str, Any]:
    """Fit the category thresholds, then the Platt calibration, on ``records``; store both in ``nets``.

    Any earlier calibration is reset first, so calibrating twice gives the same network. Returns what the
    checkpoint records (``metadata.calibration``).
    """
    cls = nets.classification
    cls.set_score_thresholds(PIRADS_SCORE_CUTPOINTS)
    cls.set_calibration(1.0, 0.0)
    if len(records) < MIN_CALIBRATION_CASES:
        return {"skipped": f"{len(records)} calibration cases; calibration needs at least {MIN_CALIBRATION_CASES}"}
    raw, labels, categories = study_raw_scores(nets, records, batch_size)
    tau = float(torch.exp(cls.log_tau.detach()))
    cuts = np.asarray(PIRADS_SCORE_CUTPOINTS, dtype=np.float64)
    thresholds, scale = fit_score_thresholds(raw, categories, tau)
    cls.set_score_thresholds(thresholds.tolist())
    with torch.no_grad():
        raw_t = torch.as_tensor(raw, dtype=torch.float32, device=nets.device)
        logits = cls.cspca_logit(cls.remap_score(raw_t).double()).cpu().numpy()
    out: dict[str, Any] = {
        "cases": len(records),
        "score_thresholds": {
            "method": "ordinal (cumulative-link) maximum likelihood of the study category on the raw highest score",
            "thresholds": [round(float(t), 5) for t in thresholds],
            "maps_to_cutpoints": list(PIRADS_SCORE_CUTPOINTS),
            "scale": round(scale, 5),
            "nll_before": round(ordinal_nll(cuts, tau, raw, categories), 4),
            "nll_after": round(ordinal_nll(thresholds, scale, raw, categories), 4),
        },
    }
    platt = fit_platt(logits, labels)
    if isinstance(platt, str):
        return {**out, "skipped": platt}
    slope, intercept = platt
    cls.set_calibration(slope, intercept)
    before = 1 / (1 + np.exp(-logits))
    after = 1 / (1 + np.exp(-(slope * logits + intercept)))
    return {
        **out,
        "method": "platt (logistic regression of the study truth on the study csPCa logit, after the thresholds)",
        "slope": slope,
        "intercept": intercept,
        "brier_before": float(np.mean((before - labels) ** 2)),
        "brier_after": float(np.mean((after - labels) ** 2)),
    }
