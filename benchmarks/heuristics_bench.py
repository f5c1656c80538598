"""Study-level AUROC of the one-line heuristics of :mod:`training.baseline` on fresh synthetic studies.

    PYTHONPATH=. .venv/bin/python benchmarks/heuristics_bench.py --seed 9101 --cases 100 --out result.json

Each case is ``synthesize_study(seed, i)`` run through the serving preprocessing
(:func:`training.data.prepare_synthetic_case`, the networks' own input). The study score of a rule is
:func:`training.baseline.baseline_score` (the maximum of its likelihood map: ``adc_min`` = low ADC in the
central ellipsoid, ``dwi_max`` = bright high-b DWI there); the label is the study's ``significant``.
``mpmri evaluate`` reports the same rules as ``baseline_auroc`` / ``baseline_dwi_auroc`` (scored through
the lesion candidates; figures differ slightly), with a 95 % bootstrap interval. AUROCs are also given for
the studies whose cancers lie in the PZ only / TZ only, each against all negative studies, and the mean
score (with the number of studies) of each study group: cancer, no lesion, or the mimic kinds present.

The generator used is whichever ``synth`` package is first on ``PYTHONPATH``: point it at an older
checkout to measure the previous generator on the same seed. All figures are on synthetic studies.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from synth.generator import GENERATOR_VERSION
from training.baseline import BASELINES, baseline_score
from training.data import prepare_synthetic_case


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Mann-Whitney AUROC of ``scores`` (higher = positive) for boolean ``labels``; None if one class is empty."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def bootstrap_ci(scores: np.ndarray, labels: np.ndarray, rounds: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap interval of :func:`auroc` (studies resampled with replacement)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        idx = rng.integers(0, len(labels), size=len(labels))
        value = auroc(scores[idx], labels[idx])
        if value is not None:
            values.append(value)
    return [round(float(v), 3) for v in np.percentile(values, [2.5, 97.5])]


def study_group(truth: dict) -> str:  # type: ignore[type-arg]
    """``"cancer"``, ``"no lesion"`` or the sorted mimic kinds of a study without cancer (e.g. ``"haemorrhage"``)."""
    kinds = sorted({str(les["kind"]) for les in truth["lesions"]})
    if "cancer" in kinds:
        return "cancer"
    return "+".join(kinds) if kinds else "no lesion"


def cancer_zones(truth: dict) -> set[str]:  # type: ignore[type-arg]
    """Zones (``"pz"``/``"tz"``) of the study's significant lesions."""
    return {str(les["zone"]) for les in truth["lesions"] if les["significant"]}


def run(seed: int, cases: int) -> dict:  # type: ignore[type-arg]
    """Scores, labels and AUROCs of every rule in :data:`training.baseline.BASELINES` over ``cases`` studies."""
    scores: dict[str, list[float]] = {rule: [] for rule in BASELINES}
    labels: list[bool] = []
    zones: list[set[str]] = []
    groups: list[str] = []
    kinds: dict[str, int] = {}
    start = time.perf_counter()
    for index in range(cases):
        record = prepare_synthetic_case(seed, index)
        for rule in BASELINES:
            scores[rule].append(baseline_score(record.images, record.availability, rule))
        labels.append(bool(record.significant))
        zones.append(cancer_zones(record.truth))
        groups.append(study_group(record.truth))
        for les in record.truth["lesions"]:
            key = f"{les['kind']}/{les['zone']}"
            kinds[key] = kinds.get(key, 0) + 1
    y = np.asarray(labels)
    pz_only = np.asarray([z == {"pz"} for z in zones])
    tz_only = np.asarray([z == {"tz"} for z in zones])
    result: dict = {  # type: ignore[type-arg]
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "cases": cases,
        "positives": int(y.sum()),
        "lesions_by_kind_zone": dict(sorted(kinds.items())),
        "seconds": round(time.perf_counter() - start, 1),
    }
    for rule in BASELINES:
        s = np.asarray(scores[rule])
        result[rule] = {
            "auroc": auroc(s, y),
            "auroc_ci95": bootstrap_ci(s, y),
            "auroc_pz_cancers": auroc(s[pz_only | ~y], pz_only[pz_only | ~y]),
            "auroc_tz_cancers": auroc(s[tz_only | ~y], tz_only[tz_only | ~y]),
            "mean_score_by_study_group": {
                g: [round(float(np.mean(s[[x == g for x in groups]])), 3), groups.count(g)] for g in sorted(set(groups))
            },
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=9101)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    result = run(args.seed, args.cases)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
